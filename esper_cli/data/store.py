"""Simic episode store: every decision of many episodes in one HDF5 file (h5py).

Layout (columnar, so loading every decision of 10,000 episodes is one read per column):

- ``/decisions/<column>``: one row per decision point, episodes back to back.
- ``/episodes/<column>``: the episode index, one row per episode (``offset``/``length`` locate its
  decisions; ``meta_offset``/``meta_length`` its JSON metadata in ``/meta_bytes``).
- ``/meta_bytes``, ``/reason_bytes``: UTF-8 text packed into byte arrays. SWMR handles
  variable-length strings badly, so text is bytes plus offset/length columns.
- ``/blueprint_names``: the vocabulary that ``/decisions/blueprint`` codes index (-1 = none).
- Columns added after the first stores (``_OPTIONAL``): each decision's behaviour probability,
  each episode's final observation. A store without them still opens and reads them as absent;
  the first writer to open such a store adds them (rewriting it, as a recovery does). Rows a
  writer that predates them did not write read as absent too (their fill value).
- ``/commit``: how many rows of each of the above are committed. Readers use nothing beyond it.
- File attributes: format, store version, observation schema name/version, feature names.

Crash safety: the file is written in HDF5 SWMR mode, which keeps it consistent on disk at every
moment. An append writes all its rows, flushes, and only then advances ``/commit`` (and flushes
again), so a ``kill -9`` at any point leaves every committed episode and no partial one. A crashed
writer leaves HDF5's "open for write" flag set; readers open in SWMR-read mode, which ignores it,
and the next writer rewrites the committed data into a clean file (``EpisodeWriter.recovered``).
Durability against power loss is not promised: commits are flushed, not fsynced.

One writer at a time (a lock file next to the store); any number of readers, even while writing.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import json
import operator
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import h5py
import numpy as np
from filelock import FileLock, Timeout
from h5py import h5f, h5p, h5s

from ..contracts import (
    ACTION_NAMES,
    FEATURE_NAMES,
    N_ACTIONS,
    N_FEATURES,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    Action,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    Outcome,
    SeedLifecycle,
    SeedStage,
    check_finite,
)
from ..policy import valid_action_mask

STORE_FORMAT = "simic-episode-store"
STORE_VERSION = 1

# Rows per chunk. A chunk is HDF5's unit of I/O: appending one 25-decision episode rewrites the
# last chunk of each column, so chunks stay small (<= ~220 KB); reading 250k decisions is still
# one read call per column.
_DECISION_CHUNK = 8192
_OBSERVATION_CHUNK = 2048
_EPISODE_CHUNK = 1024
_BYTES_CHUNK = 65536
_BLUEPRINT_NAME_BYTES = 64

# name -> (dtype, trailing shape). Floats other than observations are float64 so that an
# episode read back equals the one appended (Python floats round-trip exactly).
_DECISION_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "observations": ("<f4", (N_FEATURES,)),
    "actions": ("i1", ()),
    "expert_actions": ("i1", ()),  # -1: no expert label
    "valid": ("u1", ()),
    "confidence": ("<f8", ()),
    "blueprint": ("<i2", ()),  # index into /blueprint_names; -1: none
    "accuracy_change": ("<f8", ()),
    "loss_change": ("<f8", ()),
    "val_accuracy_after": ("<f8", ()),
    "reward": ("<f8", ()),
    "seed_alive": ("u1", ()),
    "stage_after": ("i1", ()),
    "reason_offset": ("<i8", ()),
    "reason_length": ("<i4", ()),
    "behaviour_prob": ("<f8", ()),  # -1: unknown (optional column)
}
_BOOL_COLUMNS = ("valid", "seed_alive")

_EPISODE_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "offset": ("<i8", ()),
    "length": ("<i4", ()),
    "seed": ("<i8", ()),
    "index": ("<i8", ()),
    "rng_seed": ("<i8", ()),
    "key": ("S16", ()),
    "final_accuracy": ("<f8", ()),
    "best_accuracy": ("<f8", ()),
    "test_accuracy": ("<f8", ()),
    "seeds_created": ("<i4", ()),
    "seeds_fossilized": ("<i4", ()),
    "seeds_culled": ("<i4", ()),
    "meta_offset": ("<i8", ()),
    "meta_length": ("<i4", ()),
    # The observation after the last epoch (optional columns): zeros and 0 where unknown.
    "final_observation": ("<f4", (N_FEATURES,)),
    "has_final_observation": ("u1", ()),
}

#: Datasets a store may lack (written before they existed) -> the value their absent rows read as.
_OPTIONAL: dict[str, float] = {
    "decisions/behaviour_prob": -1.0,
    "episodes/final_observation": 0.0,
    "episodes/has_final_observation": 0,
}


class _Counts(NamedTuple):
    """The commit record: committed rows of each growing dataset."""

    n_episodes: int = 0
    n_decisions: int = 0
    n_meta_bytes: int = 0
    n_reason_bytes: int = 0
    n_blueprints: int = 0


def _dataset_layout() -> dict[str, tuple[str, tuple[int, ...], int, str]]:
    """Every growing dataset: path -> (dtype, trailing shape, chunk rows, commit field)."""
    layout: dict[str, tuple[str, tuple[int, ...], int, str]] = {}
    for name, (dtype, tail) in _DECISION_COLUMNS.items():
        chunk = _OBSERVATION_CHUNK if tail else _DECISION_CHUNK
        layout[f"decisions/{name}"] = (dtype, tail, chunk, "n_decisions")
    for name, (dtype, tail) in _EPISODE_COLUMNS.items():
        layout[f"episodes/{name}"] = (dtype, tail, _EPISODE_CHUNK, "n_episodes")
    layout["meta_bytes"] = ("u1", (), _BYTES_CHUNK, "n_meta_bytes")
    layout["reason_bytes"] = ("u1", (), _BYTES_CHUNK, "n_reason_bytes")
    layout["blueprint_names"] = (f"S{_BLUEPRINT_NAME_BYTES}", (), 256, "n_blueprints")
    return layout


_LAYOUT = _dataset_layout()
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class StoreError(Exception):
    """One-line, user-facing message (the CLI prints str(e) and exits with `exit_code`)."""

    exit_code = 2  # bad input: a missing, damaged or foreign file


class StoreWriteError(StoreError):
    """Writing failed (disk full, I/O error): the job failed, every committed episode is kept."""

    exit_code = 1


class StoreLockedError(StoreError):
    """Another process (or another writer in this one) is writing the store."""


class NotAStoreError(StoreError):
    """The path exists but is not a Simic episode store; it is never modified."""


# ----------------------------------------------------------------------------- opening files
def _check_file(path: Path, shown: Path | None = None) -> None:
    """Cheap checks before HDF5 touches the file: exists, is HDF5, not truncated.

    The truncation check matters: in SWMR-read mode HDF5 skips its own end-of-file check, reads
    past the end as zeros and, on a badly truncated file, retries checksum failures for minutes.
    A SWMR writer never lets the superblock's end-of-file address run ahead of the real size
    (checked under a live writer and after kill -9), so a larger address means a truncated file.
    Messages name `shown` (the path as the user gave it), default `path`.
    """
    name = path if shown is None else shown
    if not path.exists():
        raise StoreError(f"episode store {name} does not exist; run `simic collect` first")
    if not path.is_file():
        raise NotAStoreError(f"{name} is not a Simic episode store (not a regular file)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(48)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise StoreError(f"cannot read episode store {name}: {exc.strerror or exc}") from None
    if head[:8] != _HDF5_SIGNATURE:
        raise NotAStoreError(f"{name} is not a Simic episode store (not an HDF5 file)")
    # No HDF5 superblock is shorter than 48 bytes: an HDF5 signature followed by less is a cut file.
    if len(head) < 48:
        raise StoreError(f"episode store {name} is truncated ({size} bytes; its HDF5 superblock "
                         "alone needs 48); restore it from a copy or collect into a new store")
    # Superblock v2/v3: signature, version, offset size, length size, flags, then base address,
    # extension address, end-of-file address, root address (8 bytes each in files h5py writes).
    if head[8] < 3 or head[9] != 8:
        raise NotAStoreError(f"{name} is an HDF5 file but not a Simic episode store")
    base, _ext, eof, _root = struct.unpack("<4Q", head[12:44])
    if base + eof > size:
        raise StoreError(f"episode store {name} is truncated ({size} of {base + eof} bytes); "
                         "restore it from a copy or collect into a new store")


# How often a SWMR reader re-reads a piece of metadata whose checksum fails. HDF5 retries because
# a live writer may be rewriting that piece, sleeping 1 ns, 2 ns, 4 ns, ... between tries; its
# default of 100 tries sums to centuries of sleep, spent uninterruptibly inside HDF5 on one flipped
# byte. 24 tries sleep at most ~17 ms per piece: room for a torn read of a write in flight, while a
# damaged store fails in milliseconds.
_SWMR_READ_ATTEMPTS = 24


def _read_attempts_setter() -> Any:
    """HDF5's H5Pset_metadata_read_attempts, which h5py does not wrap; None where not found.

    Looked up through an h5py extension module's handle, so it is the very HDF5 library that
    h5py uses (its own copy in a wheel, or the system one), whatever its file name.
    """
    try:
        setter = ctypes.CDLL(h5p.__file__).H5Pset_metadata_read_attempts
    except (OSError, AttributeError):  # e.g. a platform whose loader keeps dependencies private
        return None
    setter.argtypes = [ctypes.c_int64, ctypes.c_uint]  # (hid_t, unsigned), HDF5 >= 1.10
    setter.restype = ctypes.c_int
    return setter


_SET_READ_ATTEMPTS = _read_attempts_setter()


def _file_access(name: Path) -> h5p.PropFAID:
    """File access settings of every SWMR open, read or write: both retry failed checksums."""
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    if _SET_READ_ATTEMPTS is not None and _SET_READ_ATTEMPTS(fapl.id, _SWMR_READ_ATTEMPTS) < 0:
        raise StoreError(f"cannot open episode store {name}: HDF5 refused a read setting")
    return fapl


def _open_swmr(path: Path, shown: Path | None = None) -> h5py.File:
    """Open a store for reading; works while a writer is live and after a writer crashed.

    HDF5's own file locking is off: it would make a reader block the writer (and vice versa);
    the lock file serialises writers and SWMR makes concurrent reads safe. Errors name `shown`
    (the path as the user gave it) if given.
    """
    name = path if shown is None else shown
    _check_file(path, name)
    try:
        f = h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ,
                               fapl=_file_access(name)))
    except (OSError, RuntimeError) as exc:
        # Left by a program that wrote the file without SWMR (never by Simic) and crashed.
        hint = (f"; if no program is writing it, `h5clear -s {name}` clears the flag"
                if "not already open for SWMR" in str(exc) else "")
        raise StoreError(f"cannot open episode store {name}: {_hdf5_reason(exc)}{hint}") from None
    try:
        _check_header(f, name)
    except StoreError:
        f.close()
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # a damaged header
        f.close()
        raise StoreError(f"episode store {name} is damaged: {_hdf5_reason(exc)}") from None
    except BaseException:
        f.close()
        raise
    return f


def _hdf5_reason(exc: BaseException) -> str:
    """The useful part of an h5py error, on one line."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str() would quote it
    reason = " ".join(str(text).split()) or type(exc).__name__
    if "checksum" in reason:  # HDF5 found a flipped byte in its own bookkeeping
        reason = f"HDF5 checksum mismatch, the file is corrupted ({reason})"
    return reason


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number behind an h5py error (HDF5 buries it in its message as "errno = 28")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


def _io_reason(exc: BaseException) -> str:
    """Why a write failed, on one line: the OS error when there is one, else HDF5's words."""
    code = _errno_of(exc)
    if code:
        return os.strerror(code) + (" (free some space, then re-run)" if code == errno.ENOSPC else "")
    return _hdf5_reason(exc)


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_header(f: h5py.File, path: Path) -> None:
    """Refuse anything that is not a store this build of Simic can read, with a clear reason."""
    if _attr_str(f.attrs.get("format", "")) != STORE_FORMAT:
        raise NotAStoreError(f"{path} is an HDF5 file but not a Simic episode store")
    version = int(f.attrs.get("store_version", -1))
    if version != STORE_VERSION:
        raise StoreError(f"episode store {path} has store version {version}; "
                         f"this Simic reads version {STORE_VERSION}")
    name = _attr_str(f.attrs.get("schema_name", ""))
    schema = int(f.attrs.get("schema_version", -1))
    if name != SCHEMA_NAME or schema not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(f"episode store {path} holds observation schema {name} v{schema}; "
                         f"this Simic uses {SCHEMA_NAME} v{SCHEMA_VERSION}")
    features = tuple(_attr_str(x) for x in f.attrs.get("feature_names", ()))
    if features != FEATURE_NAMES:
        raise StoreError(f"episode store {path} has different observation features than "
                         f"{SCHEMA_NAME} v{SCHEMA_VERSION} ({len(features)} vs {N_FEATURES})")


def _open_swmr_write(path: Path) -> h5py.File:
    """Open a store for appending, in SWMR-write mode from the start.

    Not `h5py.File(path, "r+")` then `swmr_mode = True`: a kill between the two leaves the file
    flagged "open for write, not SWMR", which SWMR readers refuse and no recovery can read.
    """
    fapl = _file_access(path)  # no HDF5 file locking: see _open_swmr; the lock file guards writers
    fapl.set_cache(0, 0, 0, 0.75)  # no chunk cache: see _NO_CHUNK_CACHE
    fid = h5f.open(os.fsencode(path), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE, fapl=fapl)
    return h5py.File(fid)


# Writers keep no chunk cache: a full disk must fail the write call itself, leaving no dataset
# with unwritten rows. Cached rows would fail in a later flush and stay pending, and HDF5 retries
# them when closing and at exit, where a failure crashes the process. Unfiltered chunks lose
# nothing by it: HDF5 writes a partial chunk in place, without reading it.
_NO_CHUNK_CACHE = {"rdcc_nbytes": 0, "rdcc_nslots": 0}


def _create_store(path: Path, tmp: Path, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write a complete store to `tmp`, then atomically move it to `path`.

    A kill at any moment leaves either no store or a whole one, never a half-made file; any
    other failure (a full disk) removes `tmp` and leaves `path` as it was.
    `arrays` (recovery) holds the committed rows of every dataset; None makes an empty store.
    """
    try:
        _write_new_store(tmp, arrays or {})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_new_store(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with h5py.File(tmp, "w", libver="latest", **_NO_CHUNK_CACHE) as f:
        f.attrs["format"] = STORE_FORMAT
        f.attrs["store_version"] = STORE_VERSION
        f.attrs["schema_name"] = SCHEMA_NAME
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["feature_names"] = np.array([n.encode() for n in FEATURE_NAMES])
        counts = {}
        for name, (dtype, tail, chunk, field) in _LAYOUT.items():
            data = arrays.get(name, np.zeros((0, *tail), dtype=dtype))
            fill = {"fillvalue": _OPTIONAL[name]} if name in _OPTIONAL else {}
            f.create_dataset(name, data=data, dtype=dtype, maxshape=(None, *tail),
                             chunks=(chunk, *tail), **fill)
            counts[field] = len(data)
        f.create_dataset("commit", data=np.array(_Counts(**counts), dtype=np.int64))


def _real_path(path: Path) -> Path:
    """The file `path` names, through any symlinks (the path itself when nothing exists there)."""
    real = Path(os.path.realpath(path))
    if real.is_symlink():  # realpath stops at a loop or an unreadable link
        raise StoreError(f"episode store {path} is a symlink that leads nowhere (a loop?)")
    return real


_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


def _write_error(what: str, exc: BaseException, tail: str = "") -> StoreError:
    """A one-line error for a failed write: StoreWriteError (exit 1) when the job failed for want
    of space or I/O, StoreError (exit 2) when the path cannot be written at all (permissions)."""
    failed = _errno_of(exc) in _WRITE_FAILURES or isinstance(exc, RuntimeError)
    return (StoreWriteError if failed else StoreError)(f"{what}: {_io_reason(exc)}{tail}")


# ----------------------------------------------------------------------------- encoding
@dataclass
class _Batch:
    """Rows to append for some episodes, and the commit that makes them visible."""

    rows: dict[str, np.ndarray]  # dataset path -> new rows
    counts: _Counts
    blueprints: list[str]
    keys: set[tuple[str, int, int]]


def _finite(values: list[float], what: str) -> np.ndarray:
    # A column vector: check_finite names features only for rows of N_FEATURES values.
    array = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    check_finite(array, what)
    return array.reshape(-1)


def _observations(episode: Episode, what: str) -> np.ndarray:
    obs = np.zeros((len(episode.decisions), N_FEATURES), dtype=np.float32)
    for t, d in enumerate(episode.decisions):
        vec = np.asarray(d.observation, dtype=np.float32)
        if vec.shape != (N_FEATURES,):
            raise ValueError(f"{what} observation {t} has shape {vec.shape}, expected ({N_FEATURES},)")
        obs[t] = vec
    check_finite(obs, f"{what} observation")
    return obs


def _blueprint_code(name: str | None, vocab: dict[str, int], names: list[str]) -> int:
    """The code of a blueprint name, adding it to the (batch-local) vocabulary if new."""
    if name is None:
        return -1
    if name not in vocab:
        if len(name.encode()) > _BLUEPRINT_NAME_BYTES or not name:
            raise ValueError(f"blueprint name {name!r} must be 1 to {_BLUEPRINT_NAME_BYTES} bytes")
        vocab[name] = len(names)
        names.append(name)
    return vocab[name]


def _decision_rows(episode: Episode, what: str, reason_start: int, vocab: dict[str, int],
                   names: list[str]) -> tuple[dict[str, np.ndarray], bytes]:
    """One episode's decision columns (validated) and its packed reasons."""
    recs = episode.decisions
    floats = {
        "confidence": [d.confidence for d in recs],
        "accuracy_change": [d.outcome.accuracy_change for d in recs],
        "loss_change": [d.outcome.loss_change for d in recs],
        "val_accuracy_after": [d.outcome.val_accuracy for d in recs],
        "reward": [d.outcome.reward for d in recs],
    }
    expert = [int(d.expert_action) for d in recs]
    if any(not -1 <= e < N_ACTIONS for e in expert):
        raise ValueError(f"{what} expert_action must be -1 or 0..{N_ACTIONS - 1}")
    probs = [-1.0 if d.behaviour_prob is None else float(d.behaviour_prob) for d in recs]
    if any(not (p == -1.0 or 0.0 <= p <= 1.0) for p in probs):
        raise ValueError(f"{what} behaviour_prob must be between 0 and 1 (or None)")
    reasons = [d.reason.encode() for d in recs]
    lengths = np.array([len(r) for r in reasons], dtype=np.int64)
    rows = {
        "observations": _observations(episode, what),
        **{k: _finite(v, f"{what} {k}") for k, v in floats.items()},
        "actions": np.array([int(Action(d.action)) for d in recs], dtype=np.int8),
        "expert_actions": np.array(expert, dtype=np.int8),
        "valid": np.array([bool(d.valid) for d in recs], dtype=np.uint8),
        "blueprint": np.array([_blueprint_code(d.blueprint, vocab, names) for d in recs],
                              dtype=np.int16),
        "seed_alive": np.array([bool(d.outcome.seed_alive) for d in recs], dtype=np.uint8),
        "stage_after": np.array([int(SeedStage(d.outcome.stage_after)) for d in recs],
                                dtype=np.int8),
        "reason_offset": reason_start + np.cumsum(lengths) - lengths,
        "reason_length": lengths,
        "behaviour_prob": np.array(probs, dtype=np.float64),
    }
    return rows, b"".join(reasons)


def _final_observation(episode: Episode, what: str) -> np.ndarray | None:
    if episode.final_observation is None:
        return None
    vec = np.asarray(episode.final_observation, dtype=np.float32)
    if vec.shape != (N_FEATURES,):
        raise ValueError(f"{what} final observation has shape {vec.shape}, expected ({N_FEATURES},)")
    check_finite(vec, f"{what} final observation")
    return vec


def _episode_meta(episode: Episode, episode_id: str, key: str) -> bytes:
    """The episode's JSON: everything that is not a number column, and the exact accuracies."""
    what = f"episode {episode_id}:"
    _finite([episode.final_accuracy, episode.best_accuracy, episode.test_accuracy], f"{what} accuracy")
    meta = {
        "id": episode_id,
        "key": key,
        "seed": int(episode.seed),
        "index": int(episode.index),
        "rng_seed": int(episode.rng_seed),
        "policy": episode.policy,
        "policy_version": episode.policy_version,
        "expert": episode.expert,
        "config": episode.config.to_dict(),
        "final_accuracy": float(episode.final_accuracy),
        "best_accuracy": float(episode.best_accuracy),
        "test_accuracy": float(episode.test_accuracy),
        "seeds": [s.to_dict() for s in episode.seeds],
    }
    try:
        return json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise ValueError(f"{what} metadata is not finite JSON ({exc})") from None


def _encode(episodes: list[Episode], counts: _Counts, blueprints: list[str]) -> _Batch:
    """Validate and lay out episodes as rows after `counts`. Raises before anything is written."""
    names = list(blueprints)
    vocab = {name: i for i, name in enumerate(names)}
    decision_parts: list[dict[str, np.ndarray]] = []
    episode_rows: dict[str, list[Any]] = {name: [] for name in _EPISODE_COLUMNS}
    reasons: list[bytes] = []
    metas: list[bytes] = []
    n_dec, n_reason, n_meta = counts.n_decisions, counts.n_reason_bytes, counts.n_meta_bytes
    keys = set()
    for ep in episodes:
        key, episode_id = ep.key, ep.id  # each hashes the config: compute once
        rows, reason_blob = _decision_rows(ep, f"episode {episode_id}:", n_reason, vocab, names)
        meta = _episode_meta(ep, episode_id, key)
        final = _final_observation(ep, f"episode {episode_id}:")
        n = len(ep.decisions)
        values = {
            "offset": n_dec, "length": n, "seed": ep.seed, "index": ep.index,
            "rng_seed": ep.rng_seed, "key": key.encode(),
            "final_accuracy": ep.final_accuracy, "best_accuracy": ep.best_accuracy,
            "test_accuracy": ep.test_accuracy, "seeds_created": ep.seeds_created,
            "seeds_fossilized": ep.seeds_fossilized, "seeds_culled": ep.seeds_culled,
            "meta_offset": n_meta, "meta_length": len(meta),
            "final_observation": np.zeros(N_FEATURES, dtype=np.float32) if final is None else final,
            "has_final_observation": final is not None,
        }
        for name, value in values.items():
            episode_rows[name].append(value)
        decision_parts.append(rows)
        reasons.append(reason_blob)
        metas.append(meta)
        keys.add((key, int(ep.seed), int(ep.index)))
        n_dec, n_reason, n_meta = n_dec + n, n_reason + len(reason_blob), n_meta + len(meta)

    out: dict[str, np.ndarray] = {}
    for name, (dtype, _tail) in _DECISION_COLUMNS.items():
        out[f"decisions/{name}"] = np.concatenate([p[name] for p in decision_parts]).astype(dtype)
    for name, (dtype, tail) in _EPISODE_COLUMNS.items():
        out[f"episodes/{name}"] = np.array(episode_rows[name], dtype=dtype).reshape(-1, *tail)
    out["reason_bytes"] = np.frombuffer(b"".join(reasons), dtype=np.uint8)
    out["meta_bytes"] = np.frombuffer(b"".join(metas), dtype=np.uint8)
    out["blueprint_names"] = np.array([n.encode() for n in names[len(blueprints):]],
                                      dtype=f"S{_BLUEPRINT_NAME_BYTES}")
    new_counts = _Counts(counts.n_episodes + len(episodes), n_dec, n_meta, n_reason, len(names))
    return _Batch(out, new_counts, names, keys)


# ----------------------------------------------------------------------------- the writer
def _put_rows(ds: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Make `rows` the dataset's rows from `start` on (resizing it), via h5py's low-level API.

    High-level resize and slice assignment cost ~0.2 ms each in Python, which over 31 datasets
    was most of a one-episode commit.
    """
    ds.id.set_extent((start + len(rows), *rows.shape[1:]))
    if len(rows):
        file_space = ds.id.get_space()
        file_space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
        ds.id.write(h5s.create_simple(rows.shape), file_space, np.ascontiguousarray(rows))


class MissingIndices:
    """Episode indices 0..n-1 except the done ones, produced lazily.

    A run may ask for a billion episodes: a plan listing them would take gigabytes before the
    first episode starts, so only the done indices are held and the rest are walked on demand.
    """

    def __init__(self, n: int, done: Iterable[int] = ()) -> None:
        self.n = max(0, int(n))
        self._done = sorted({int(i) for i in done if 0 <= int(i) < self.n})

    def __len__(self) -> int:
        return self.n - len(self._done)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[int]:
        start = 0
        for d in self._done:
            yield from range(start, d)
            start = d + 1
        yield from range(start, self.n)

    def __contains__(self, i: object) -> bool:
        try:
            i = operator.index(i)  # numpy integers too
        except TypeError:
            return False
        if not 0 <= i < self.n:
            return False
        k = bisect.bisect_left(self._done, i)
        return not (k < len(self._done) and self._done[k] == i)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MissingIndices):
            return (self.n, self._done) == (other.n, other._done)
        if isinstance(other, (list, tuple, range)):  # small plans compare like the list they stand for
            return len(other) == len(self) and list(other) == list(self)
        return NotImplemented

    def __repr__(self) -> str:
        return f"MissingIndices(n={self.n}, done={len(self._done)})"


class _StaleLock(Exception):
    """The lock file was deleted (by the writer closing) between our opening and locking it."""


#: Tries to lock a store whose lock file a closing writer keeps deleting under us.
_LOCK_ATTEMPTS = 8


class EpisodeWriter:
    """Appends episodes to a store, one atomic commit per `append`; one writer at a time.

    Creates the store (and its directory) if missing; recovers it if a previous writer was killed
    (`recovered` is then True). A path holding anything but a Simic store is never modified.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 0.0) -> None:
        self.path = Path(path)
        # The file a symlink points to is the store: its lock, its recovery, its replacement. A
        # lock on the link's name would not exclude a writer of the target, and a recovery would
        # replace the link with a copy, splitting the store in two.
        self.real_path = _real_path(self.path)
        self.recovered = False
        #: True when the store predated the optional columns and was rewritten to hold them.
        self.upgraded = False
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._commit: h5py.Dataset | None = None
        if self.real_path.exists():
            # Refuse what is plainly not a store before a lock file appears next to it.
            _check_file(self.real_path)
        lock_path = self._lock_path = self._sibling("lock")
        # thread_local=False: the writer may be closed from another thread than the one that opened it.
        # A closing writer deletes the lock file (no litter next to a store, even after a kill: the
        # next writer's close removes it), so a lock is ours only if it is still the file at the path.
        self._lock = FileLock(lock_path, thread_local=False, on_acquired=self._check_lock_file)
        try:
            self.real_path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(_LOCK_ATTEMPTS):
                try:
                    self._lock.acquire(timeout=lock_timeout)
                    break
                except _StaleLock:  # the holder deleted it as we locked it: lock the file there now
                    continue
            else:
                raise Timeout(str(lock_path))
        except Timeout:  # before OSError: filelock's Timeout is one
            raise StoreLockedError(f"episode store {self.path} is locked: another process is "
                                   "writing it (wait for it to finish)") from None
        except OSError as exc:
            raise _write_error(f"cannot write episode store {self.path}", exc) from None
        try:
            self._open()
        except BaseException as exc:
            self._close_file()
            self._lock_path.unlink(missing_ok=True)  # held: see close()
            self._lock.release()
            if isinstance(exc, (OSError, RuntimeError)):  # permissions, disk full, ...
                raise _write_error(f"cannot write episode store {self.path}", exc) from None
            raise

    def _check_lock_file(self, fd: int) -> None:
        """Refuse a lock taken on a lock file that a closing writer has just deleted: a newcomer may
        already hold the file now at the path, and two writers must never both think they hold it."""
        try:
            current = os.stat(self._lock_path)
        except FileNotFoundError:
            raise _StaleLock from None
        if not os.path.samestat(os.fstat(fd), current):
            raise _StaleLock

    def _sibling(self, suffix: str) -> Path:
        return self.real_path.with_name(f"{self.real_path.name}.{suffix}")

    def _open(self) -> None:
        # We hold the lock, so leftovers of an interrupted create/recover are ours and stale.
        for tmp in (self._sibling("create.tmp"), self._sibling("recover.tmp")):
            tmp.unlink(missing_ok=True)
        path = self.real_path
        if not path.exists():
            _create_store(path, self._sibling("create.tmp"))
        # Validate read-only first: a file that is not a readable store is never opened for writing.
        with EpisodeReader(path) as reader:
            if reader.schema_version != SCHEMA_VERSION:  # one store, one meaning per feature
                raise StoreError(f"episode store {self.path} holds {SCHEMA_NAME} v{reader.schema_version} "
                                 f"observations; this Simic writes v{SCHEMA_VERSION}: collect into a new store")
            # HDF5's "open for write" flag is set, yet we hold the lock: the last writer crashed,
            # and a normal open would refuse the file. Keep its committed data, drop the rest.
            crashed = _superblock_flags(path) != 0
            # A store from before the optional columns gets them now: the same whole rewrite.
            upgrade = bool(reader.absent)
            arrays = reader._committed_arrays() if crashed or upgrade else None
        if arrays is not None:
            try:
                _create_store(path, self._sibling("recover.tmp"), arrays)
            except (OSError, RuntimeError) as exc:
                raise _write_error(f"recovering episode store {self.path} after an interrupted "
                                   "write failed", exc, "; the store is unchanged") from None
            self.recovered = crashed
            self.upgraded = upgrade
        try:
            self._file = _open_swmr_write(path)
        except OSError as exc:
            hint = (" (an EpisodeReader in this process has it open; close it first)"
                    if "already open for read-only" in str(exc) else "")
            raise StoreError(f"cannot open episode store {self.path} for writing: "
                             f"{_hdf5_reason(exc)}{hint}") from None
        self._datasets = {name: self._file[name] for name in _LAYOUT}
        self._commit = self._file["commit"]
        self._counts = _Counts(*(int(x) for x in self._commit[()]))
        self._blueprints = [_attr_str(b) for b in
                            self._datasets["blueprint_names"][: self._counts.n_blueprints]]
        n = self._counts.n_episodes
        keys = self._datasets["episodes/key"][:n]
        seeds = self._datasets["episodes/seed"][:n]
        indices = self._datasets["episodes/index"][:n]
        self._keys = {(k.decode(), int(s), int(i)) for k, s, i in zip(keys, seeds, indices)}

    def missing(self, key: str, seed: int, episodes: int) -> Iterable[int]:
        """Indices 0..episodes-1 of run (key, seed) not committed yet: what a resumed run still owes.

        A lazy, sized `MissingIndices` (len, iteration, `in`): the plan of a huge run
        costs memory for the committed episodes only, never one entry per index.
        """
        return MissingIndices(episodes, (i for k, s, i in self._keys if k == key and s == seed))

    def append(self, episode: Episode) -> None:
        """Commit one episode atomically. Raises ValueError (nothing written) on NaN/inf data."""
        self.append_many([episode])

    def append_many(self, episodes: Iterable[Episode]) -> None:
        """Commit many episodes at once (all or none visible): cheaper than one append each."""
        if self._file is None:
            raise StoreError(f"episode store {self.path} writer is closed")
        episodes = list(episodes)
        if not episodes:
            return
        batch = _encode(episodes, self._counts, self._blueprints)
        try:
            self._write(batch)
        except (OSError, RuntimeError) as exc:  # h5py raises either, e.g. for a full disk
            # The last commit still stands on disk. HDF5 is left half-failed, so close the file
            # now rather than leave it to the exit handlers, which could crash the process.
            self.close(quiet=True)
            raise _write_error(f"writing episode store {self.path} failed", exc,
                               f"; its {self.n_episodes} committed episodes are kept") from None
        self._counts, self._blueprints = batch.counts, batch.blueprints
        self._keys |= batch.keys

    def _write(self, batch: _Batch) -> None:
        for name, rows in batch.rows.items():
            # Start at the committed count: overwrites whatever a failed append left behind.
            _put_rows(self._datasets[name], getattr(self._counts, _LAYOUT[name][3]), rows)
        self._file.flush()  # every row is on disk before the commit record points at it
        self._commit[:] = np.array(batch.counts, dtype=np.int64)
        self._file.flush()

    @property
    def n_episodes(self) -> int:
        """Committed episodes."""
        return self._counts.n_episodes

    def close(self, *, quiet: bool = False) -> None:
        """Close the file (clearing its "open for write" flag) and release the lock. Idempotent.

        Raises StoreWriteError when HDF5 cannot finish the file (e.g. disk full), unless `quiet`;
        every committed episode is kept either way, and the next writer recovers the file.
        """
        if self._file is None:
            return
        try:
            problem = self._close_file()
        finally:
            # Deleted while still held, so no writer can lock this file after we let it go.
            self._lock_path.unlink(missing_ok=True)
            self._lock.release()
        if problem is not None and not quiet:
            raise _write_error(f"closing episode store {self.path} failed", problem,
                               f"; its {self.n_episodes} committed episodes are kept")

    def _close_file(self) -> BaseException | None:
        """Close the HDF5 file now, whatever state a failed write left; the error, if any."""
        f, self._file = self._file, None
        # Dataset handles go first, while their file is whole: one that outlives a failed file
        # close is destroyed by HDF5's exit handler after the file, which crashes the process.
        self._datasets, self._commit = {}, None
        if f is None:
            return None
        try:
            f.close()
        except (OSError, RuntimeError) as exc:
            return exc
        return None

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(quiet=exc is not None)  # an error in flight says more than a failed close


# ----------------------------------------------------------------------------- the reader
class EpisodeReader:
    """Reads the episodes committed to a store when it was opened (a consistent snapshot).

    Safe while a writer appends (SWMR) and after a writer crashed. Raises StoreError (missing,
    truncated, unreadable, other schema) or NotAStoreError (not HDF5 / not a Simic store).

    Attributes: `path`, `n_episodes`, `n_decisions`, `feature_names`, `schema_name`,
    `schema_version`, `blueprint_names` (what the 'blueprint' decision codes index).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.real_path = _real_path(self.path)  # the same file a writer through this path locks
        self._file: h5py.File | None = _open_swmr(self.real_path, self.path)
        try:
            self._load()
        except StoreError:
            self.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            self.close()
            raise self._damaged(_hdf5_reason(exc)) from None

    def _damaged(self, what: str) -> StoreError:
        return StoreError(f"episode store {self.path} is damaged: {what}")

    def _load(self) -> None:
        f = self._file
        commit = f["commit"]
        commit.refresh()  # SWMR: the writer's latest commit, not a cached one
        values = commit[()]
        if values.shape != (len(_Counts._fields),) or (values < 0).any():
            raise self._damaged(f"impossible commit record {values.tolist()}")
        self._counts = _Counts(*(int(x) for x in values))
        self._check_datasets()
        self.schema_name = _attr_str(f.attrs["schema_name"])
        self.schema_version = int(f.attrs["schema_version"])
        self.feature_names = tuple(_attr_str(x) for x in f.attrs["feature_names"])
        self.n_episodes = self._counts.n_episodes
        self.n_decisions = self._counts.n_decisions
        self._index = {name: self._read(f"episodes/{name}") for name in _EPISODE_COLUMNS}
        self.blueprint_names = tuple(_attr_str(b) for b in self._read("blueprint_names"))
        self._check_index()
        self._meta_blob: bytes | None = None

    def _check_datasets(self) -> None:
        """Open every dataset's header now. A damaged one is refused here, at open, rather than
        met by a writer mid-append or by a command after its work (a writer validates the store
        through a reader, which otherwise touches only the datasets it reads)."""
        absent = set()
        for name, (dtype, tail, _chunk, _field) in _LAYOUT.items():
            if name in _OPTIONAL and name not in self._file:
                absent.add(name)
                continue
            try:
                ds = self._file[name]
                found = (ds.dtype, ds.shape[1:])
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise self._damaged(f"{name}: {_hdf5_reason(exc)}") from None
            if found != (np.dtype(dtype), tail):
                raise self._damaged(f"{name} holds {found[0]} {found[1]} rows, "
                                    f"expected {np.dtype(dtype)} {tail}")
        #: Optional datasets this store lacks (written before they existed): they read as absent.
        self.absent = frozenset(absent)

    def _read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed rows [start, stop) of a dataset (stop defaults to the committed count)."""
        if self._file is None:
            raise StoreError(f"episode store {self.path} reader is closed")
        committed = getattr(self._counts, _LAYOUT[name][3])
        stop = committed if stop is None else stop
        dtype, tail = _LAYOUT[name][:2]
        if name in self.absent:
            return np.full((max(stop - start, 0), *tail), _OPTIONAL[name], dtype=dtype)
        try:
            ds = self._file[name]
            if ds.shape[0] < committed:
                ds.refresh()  # SWMR: the cached extent may predate the commit we read
            if ds.shape[0] < committed and name in _OPTIONAL:
                # A writer that predates this column committed rows without it: absent there.
                have = ds[start:min(stop, ds.shape[0])]
                pad = np.full((max(stop - start, 0) - len(have), *tail), _OPTIONAL[name], dtype=dtype)
                rows = np.concatenate([have.astype(dtype), pad])
            elif ds.shape[0] < committed:
                raise self._damaged(f"{name} has {ds.shape[0]} rows, the commit record "
                                    f"says {committed}")
            else:
                rows = ds[start:stop]
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # HDF5 saw damage
            raise self._damaged(f"{name}: {_hdf5_reason(exc)}") from None
        if rows.shape[1:] != tail or rows.dtype != np.dtype(dtype):
            raise self._damaged(f"{name} holds {rows.dtype} {rows.shape[1:]} rows, "
                                f"expected {np.dtype(dtype)} {tail}")
        return rows

    def _check_index(self) -> None:
        """Episodes must tile the decision and metadata arrays exactly (catches corruption)."""
        for first, length, total in (("offset", "length", self.n_decisions),
                                     ("meta_offset", "meta_length", self._counts.n_meta_bytes)):
            lengths = self._index[length].astype(np.int64)
            expected = np.cumsum(lengths) - lengths
            if ((lengths < 0).any() or not np.array_equal(self._index[first], expected)
                    or lengths.sum() != total):
                raise self._damaged("inconsistent episode index")

    def index(self) -> dict[str, np.ndarray]:
        """The episode index: one entry per committed episode in every column; 'key' as str.

        'final_observation' (float32, n x N_FEATURES) is the observation after the episode's last
        epoch where 'has_final_observation' (bool) says the store knows it, zeros elsewhere.
        """
        out = {name: col.copy() for name, col in self._index.items()}
        out["has_final_observation"] = out["has_final_observation"].astype(bool)
        try:
            out["key"] = out["key"].astype(str)
        except UnicodeDecodeError:
            raise self._damaged("an episode key is not text") from None
        return out

    def decisions(self, episodes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every decision column for the given episode positions (None: all), in store order.

        Adds 'episode' (each row's episode position). 'valid' and 'seed_alive' are bool,
        'blueprint' codes index `blueprint_names`. Reasons are not included (see `episode`).
        One read per column, however many episodes are selected.
        """
        lengths = self._index["length"].astype(np.int64)
        if episodes is None:
            out = {name: self._read(f"decisions/{name}") for name in _DECISION_COLUMNS}
            out["episode"] = np.repeat(np.arange(self.n_episodes, dtype=np.int64), lengths)
        else:
            positions = self._positions(episodes)
            starts, counts = self._index["offset"][positions], lengths[positions]
            lo = int(starts.min()) if len(positions) else 0
            hi = int((starts + counts).max()) if len(positions) else 0
            # Row numbers (relative to lo) of every selected decision, without a per-episode loop.
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            rows = np.repeat(starts - lo, counts) + within
            out = {name: self._read(f"decisions/{name}", lo, hi)[rows] for name in _DECISION_COLUMNS}
            out["episode"] = np.repeat(positions, counts)
        self._check_decisions(out)
        for name in _BOOL_COLUMNS:
            out[name] = out[name].astype(bool)
        return out

    def _check_decisions(self, cols: dict[str, np.ndarray]) -> None:
        """Coded columns must hold codes this Simic knows: a damaged byte must not become an
        IndexError (or a wrong class) far from the store that holds it."""
        bounds = {"actions": (0, N_ACTIONS - 1), "expert_actions": (-1, N_ACTIONS - 1),
                  "blueprint": (-1, len(self.blueprint_names) - 1),
                  "stage_after": (min(SeedStage), max(SeedStage))}
        for name, (low, high) in bounds.items():
            col = cols[name]
            bad = (col < low) | (col > high)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                where = f"episode {int(cols['episode'][row])}, " if "episode" in cols else ""
                raise self._damaged(f"decisions/{name} holds {int(col[row])} ({where}"
                                    f"expected {low}..{high})")
        probs = cols["behaviour_prob"]
        bad = ~((probs == -1.0) | ((probs >= 0.0) & (probs <= 1.0)))
        if bad.any():
            raise self._damaged(f"decisions/behaviour_prob holds {float(probs[bad][0])} (expected 0..1, "
                                "or -1 for unknown)")
        offsets = cols["reason_offset"].astype(np.int64)
        ends = offsets + cols["reason_length"]
        if ((offsets < 0) | (cols["reason_length"] < 0) | (ends > self._counts.n_reason_bytes)).any():
            raise self._damaged("decisions/reason_offset points outside the reason text")

    def columns(self, episodes: np.ndarray | Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """One row per decision, every column a numpy array of the same length (store order).

        For analysis and offline RL; `pandas.DataFrame` takes every column but the 2-D
        'observation' (one column per name in `feature_names`) and 'action_mask'. `episodes`
        selects episode positions (None: all). Columns:

        - 'episode_id' (str), 'episode' (int64 position in the store), 'step' (0, 1, ... within
          the episode), 'last' (bool: the episode's final decision);
        - 'observation' (float32, N x len(feature_names));
        - 'action_mask' (bool, N x 4, `contracts.Action` order): the actions valid in the state
          the observation describes (`policy.valid_action_mask`, the rule the environment
          applies), derived, not stored: what an offline learner masks its choices with;
        - 'action' (int8, index into contracts.ACTION_NAMES), 'valid' (bool: the action was
          applicable), 'confidence' (float64), 'expert_action' (int8, -1: no expert label);
        - 'reward' and the outcome measured after the decision's epoch: 'accuracy_change',
          'loss_change', 'val_accuracy_after' (float64), 'seed_alive' (bool), 'stage_after'
          (int8, contracts.SeedStage), 'blueprint' (str; '' when the action germinated none);
        - 'behaviour_prob' (float64): the probability the behaviour policy gave the action taken
          (1 for a deterministic policy without exploration); NaN where the store does not know
          (episodes collected before it was recorded).

        Reasons (free text) are left out: `episode(i)` has them; `next_observations` gives the
        observation after each decision (complete transitions).
        """
        selected = np.arange(self.n_episodes) if episodes is None else self._positions(episodes)
        cols = self.decisions(None if episodes is None else selected)
        counts = self._index["length"].astype(np.int64)[selected]
        step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = np.array([self.episode_meta(i)["id"] for i in range(self.n_episodes)], dtype=str)
        names = np.array([*self.blueprint_names, ""])  # code -1 picks the trailing ''
        probs = cols["behaviour_prob"].copy()
        probs[probs < 0] = np.nan
        return {
            "episode_id": ids[cols["episode"]],
            "episode": cols["episode"],
            "step": step,
            "last": step == np.repeat(counts, counts) - 1,
            "observation": cols["observations"],
            "action_mask": valid_action_mask(cols["observations"]),
            "action": cols["actions"],
            "valid": cols["valid"],
            "confidence": cols["confidence"],
            "expert_action": cols["expert_actions"],
            "reward": cols["reward"],
            "accuracy_change": cols["accuracy_change"],
            "loss_change": cols["loss_change"],
            "val_accuracy_after": cols["val_accuracy_after"],
            "seed_alive": cols["seed_alive"],
            "stage_after": cols["stage_after"],
            "blueprint": names[cols["blueprint"]],
            "behaviour_prob": probs,
        }

    def next_observations(self, episodes: np.ndarray | Iterable[int] | None = None) -> np.ndarray:
        """The observation after each decision, rows aligned with `columns(episodes)` (float32).

        Within an episode it is the next decision's observation; after its last decision, the
        episode's final observation, or a row of NaN where the store does not know it (episodes
        collected before final observations were stored).
        """
        selected = np.arange(self.n_episodes) if episodes is None else self._positions(episodes)
        obs = self.decisions(None if episodes is None else selected)["observations"]
        counts = self._index["length"].astype(np.int64)[selected]
        following = np.empty_like(obs)
        following[:-1] = obs[1:]  # within an episode the next row is the next observation
        ends = np.cumsum(counts)[counts > 0] - 1
        owners = selected[counts > 0]
        known = self._index["has_final_observation"][owners].astype(bool)
        following[ends[known]] = self._index["final_observation"][owners[known]]
        following[ends[~known]] = np.nan
        return following

    def _positions(self, episodes: np.ndarray | Iterable[int]) -> np.ndarray:
        positions = np.asarray(episodes)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_episodes):
            raise IndexError(f"episode positions must be in 0..{self.n_episodes - 1}")
        return positions

    def _position(self, i: int) -> int:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range: the store holds {self.n_episodes}")
        return i % self.n_episodes

    def episode_meta(self, i: int) -> dict[str, Any]:
        """The parsed JSON metadata of episode i (id, policy, config, seeds, rng_seed, ...)."""
        i = self._position(i)
        if self._meta_blob is None:  # one read serves a loop over every episode
            self._meta_blob = self._read("meta_bytes").tobytes()
        start = int(self._index["meta_offset"][i])
        raw = self._meta_blob[start: start + int(self._index["meta_length"][i])]
        try:
            meta = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise self._damaged(f"the metadata of episode {i} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
            raise self._damaged(f"the metadata of episode {i} is not an episode record")
        return meta

    def episode(self, i: int) -> Episode:
        """Episode i, reconstructed: equal to what was appended (reasons, seeds, config too)."""
        i = self._position(i)
        try:
            return self._episode(i)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # UnicodeDecodeError too
            raise self._damaged(f"episode {i} cannot be rebuilt ({type(exc).__name__}: "
                                f"{_hdf5_reason(exc)})") from None

    def _episode(self, i: int) -> Episode:
        meta = self.episode_meta(i)
        start = int(self._index["offset"][i])
        stop = start + int(self._index["length"][i])
        cols = {name: self._read(f"decisions/{name}", start, stop) for name in _DECISION_COLUMNS}
        self._check_decisions(cols)
        first, blob = 0, b""
        if stop > start:
            first = int(cols["reason_offset"][0])
            last = int(cols["reason_offset"][-1] + cols["reason_length"][-1])
            blob = self._read("reason_bytes", first, last).tobytes()
        decisions = []
        for t in range(stop - start):
            a = int(cols["reason_offset"][t]) - first
            code = int(cols["blueprint"][t])
            decisions.append(DecisionRecord(
                observation=cols["observations"][t],
                action=Action(int(cols["actions"][t])),
                valid=bool(cols["valid"][t]),
                confidence=float(cols["confidence"][t]),
                reason=blob[a: a + int(cols["reason_length"][t])].decode(),
                blueprint=self.blueprint_names[code] if code >= 0 else None,
                outcome=Outcome(
                    accuracy_change=float(cols["accuracy_change"][t]),
                    loss_change=float(cols["loss_change"][t]),
                    val_accuracy=float(cols["val_accuracy_after"][t]),
                    seed_alive=bool(cols["seed_alive"][t]),
                    stage_after=SeedStage(int(cols["stage_after"][t])),
                    reward=float(cols["reward"][t]),
                ),
                expert_action=int(cols["expert_actions"][t]),
                behaviour_prob=float(cols["behaviour_prob"][t]) if cols["behaviour_prob"][t] >= 0 else None,
            ))
        return Episode(
            seed=int(self._index["seed"][i]),
            index=int(self._index["index"][i]),
            rng_seed=int(self._index["rng_seed"][i]),
            config=EpisodeConfig.from_dict(meta["config"]),
            policy=meta["policy"],
            policy_version=meta["policy_version"],
            decisions=decisions,
            final_accuracy=meta["final_accuracy"],
            best_accuracy=meta["best_accuracy"],
            test_accuracy=meta["test_accuracy"],
            seeds=[SeedLifecycle.from_dict(s) for s in meta["seeds"]],
            expert=meta["expert"],
            final_observation=(self._index["final_observation"][i].copy()
                               if self._index["has_final_observation"][i] else None),
        )

    def summary(self) -> dict[str, Any]:
        """Store-wide totals: episodes, decisions, action mix, seed fates, accuracy, schema, and how
        many episodes keep a final observation and decisions a behaviour probability."""
        actions = self._read("decisions/actions").astype(np.int64)
        if len(actions) and (actions.min() < 0 or actions.max() >= N_ACTIONS):
            bad = int(actions[(actions < 0) | (actions >= N_ACTIONS)][0])
            raise self._damaged(f"decisions/actions holds {bad} (expected 0..{N_ACTIONS - 1})")
        counts = np.bincount(actions, minlength=N_ACTIONS)
        final = self._index["final_accuracy"]
        return {
            "path": str(self.path),
            "n_episodes": self.n_episodes,
            "n_decisions": self.n_decisions,
            "action_counts": {name: int(counts[a]) for a, name in enumerate(ACTION_NAMES)},
            "seeds_created": int(self._index["seeds_created"].sum()),
            "seeds_fossilized": int(self._index["seeds_fossilized"].sum()),
            "seeds_culled": int(self._index["seeds_culled"].sum()),
            "mean_final_accuracy": float(final.mean()) if len(final) else None,
            "schema_name": self.schema_name,
            "schema_version": self.schema_version,
            # Complete transitions and off-policy data need these; older episodes lack them.
            "episodes_with_final_observation": int(self._index["has_final_observation"].sum()),
            "decisions_with_behaviour_prob": int((self._read("decisions/behaviour_prob") >= 0).sum()),
        }

    def _committed_arrays(self) -> dict[str, np.ndarray]:
        """Every dataset's committed rows (what a recovery rewrites)."""
        return {name: self._read(name) for name in _LAYOUT}

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EpisodeReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _superblock_flags(path: Path) -> int:
    """HDF5's file consistency flags (superblock v3): 0 once the last writer closed cleanly."""
    with open(path, "rb") as fh:
        return fh.read(12)[11]
