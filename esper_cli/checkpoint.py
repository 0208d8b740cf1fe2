"""Learned-policy checkpoints: weights in safetensors, everything else as JSON in its header.

A checkpoint is one `.safetensors` file. Its string->string metadata header holds:

- `simic`: a JSON object (policy type, hyper-parameters, feature schema, normalisation, split,
  class weights, metrics, package versions), readable by any safetensors tool;
- `sha256`: a digest of that JSON *and* every tensor (name, dtype, shape, bytes), so an edited
  weight or an edited normalisation statistic is detected.

Loading never unpickles: the file's header is checked by hand first (it must be a well-formed
safetensors header: a plausible length, then a JSON object; only a file that is *not* one and
starts like a pickle or a zip written by `torch.save` is called one), then read with
`safetensors`, which only decodes raw arrays. Every problem is a `CheckpointError` with a
one-line message; the CLI turns it into exit code 2.

Writing never clobbers: `check_writable_checkpoint` (called before training starts, and again by
`save_checkpoint`) only lets a checkpoint create a file that is absent or replace a regular file
that is recognisably a Simic checkpoint (a parseable safetensors header whose metadata has a
`simic` entry; its integrity is not required, so a damaged checkpoint can be retrained in place).
Anything else (a store, a text file, a device, a directory) is refused; symlinks are resolved
first, so the check and the write apply to the real file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from .contracts import FEATURE_NAMES, N_FEATURES, SCHEMA_NAME, SCHEMA_VERSION
from .paths import default_checkpoint_path
from .trainable import network_hparams

if TYPE_CHECKING:  # torch takes seconds to import; loading a plugin module must not pay for it
    import torch

FORMAT = "simic-checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER = 16 * 1024 * 1024  # a Simic header is a few KiB; anything huge is not ours


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, tampered with, or for another feature schema."""


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint: `tensors` (torch, by name: the network's `state_dict()`),
    the `meta` JSON object, and views of it: `hparams`, `normalisation`, `input_range`."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str

    @property
    def policy(self) -> str:
        """The policy type it was trained for (`meta["policy"]`, e.g. "mlp")."""
        return str(self.meta["policy"])

    @property
    def hparams(self) -> dict[str, Any]:
        """The network's hyper-parameters, ready for `TrainablePolicy.network(**hparams)`: the
        stored `meta["hparams"]` without the training-only keys (`batch_size`)."""
        return network_hparams(self.meta.get("hparams") or {})

    @property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) fitted on the training episodes, float64."""
        norm = self.meta["normalisation"]
        return np.asarray(norm["mean"], dtype=np.float64), np.asarray(norm["std"], dtype=np.float64)

    @property
    def input_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(low, high) per feature, float32: the range of the training episodes, to which a policy
        clips each observation before normalising it. None for a checkpoint saved without one."""
        norm = self.meta["normalisation"]
        if "low" not in norm and "high" not in norm:
            return None
        try:
            low, high = (np.asarray(norm[k], dtype=np.float32) for k in ("low", "high"))
        except (KeyError, TypeError, ValueError):
            low = high = np.empty(0, dtype=np.float32)
        if low.shape != (N_FEATURES,) or high.shape != (N_FEATURES,) or not (
                np.isfinite(low).all() and np.isfinite(high).all() and (low <= high).all()):
            raise CheckpointError(f"checkpoint {self.path} has an invalid input range")
        return low, high


def feature_schema() -> dict[str, Any]:
    """The observation schema this build of Simic reads (stored in, and checked against, checkpoints)."""
    return {"name": SCHEMA_NAME, "version": SCHEMA_VERSION, "features": list(FEATURE_NAMES)}


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint, for provenance."""
    found = {}
    for pkg in ("simic", "torch", "numpy", "scikit-learn", "safetensors", "h5py"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "unknown"
    return found


def digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata JSON and every tensor in name order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _encoded(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (contiguous, on the CPU) and the safetensors header of a checkpoint of `meta`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "feature_schema": feature_schema(),
            "versions": package_versions(), **meta}
    meta_json = json.dumps(meta, sort_keys=True)
    return tensors, {"simic": meta_json, "sha256": digest(meta_json, tensors)}


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file + rename): a crash never leaves half a file.

    Refuses (`CheckpointError`) to replace anything but an existing Simic checkpoint; through a
    symlink, the real file is replaced and the link kept. Returns `path` as given.
    """
    from safetensors.torch import save_file  # imports torch: only writers pay for it

    path = Path(path)
    real = _real_path(path)
    _check_replaceable(real, path)  # again at write time: the file may have appeared since the check
    tensors, header = _encoded(tensors, meta)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, real)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    return path


def checkpoint_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The bytes `save_checkpoint` would write, without a file (weights that travel with a job)."""
    from safetensors.torch import save

    tensors, header = _encoded(tensors, meta)
    return save(tensors, metadata=header)


def _safetensors_header(f: Any, size: int) -> dict[str, Any] | None:
    """The parsed JSON header of an open file if it is a well-formed safetensors one, else None.

    The structure decides, not the first byte: the 8-byte little-endian header length of a
    genuine checkpoint can begin with 0x80 or "PK" (about 1 in 256 files), like a pickle or zip.
    """
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > min(_MAX_HEADER, size - 8):
        return None
    raw = f.read(n)
    if len(raw) != n or raw[:1] != b"{":
        return None
    try:
        header = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return header if isinstance(header, dict) else None


def _check_container(path: Path) -> None:
    """Refuse anything that is not a plain safetensors file before a parser touches it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if _safetensors_header(f, size) is not None:
                return
            f.seek(0)
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    # Not safetensors: name what it looks like (0x80 opens pickle protocol 2+, a zip is torch.save's).
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(f"checkpoint {path} is a pickle/torch.save file, not safetensors; "
                              "Simic never unpickles (retrain with `simic train`)")
    if len(head) < 9 or (head[8:9] == b"{" and size - 8 < struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER):
        raise CheckpointError(f"checkpoint {path} is truncated or empty")
    raise CheckpointError(f"checkpoint {path} is not a safetensors file (bad header)")


def _real_path(path: Path) -> Path:
    """`path` with every symlink resolved: the file a write would really replace."""
    return Path(os.path.realpath(path))


def _is_simic_checkpoint(path: Path) -> bool:
    """A safetensors file whose metadata has a `simic` entry (integrity not checked)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = _safetensors_header(f, size)
    except OSError:
        return False
    meta = header.get("__metadata__") if header is not None else None
    return isinstance(meta, dict) and "simic" in meta


def _check_replaceable(real: Path, given: Path) -> None:
    """Refuse when `real` exists and is anything but a regular file holding a Simic checkpoint."""
    where = str(given) if real == Path(os.path.abspath(given)) else f"{given} (a link to {real})"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise CheckpointError(f"cannot write checkpoint {where}: a folder in its path is not a directory") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {where}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint path {where} is a directory; give a file path inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"refusing to write a checkpoint over {where}: it is not a regular file")
    if not _is_simic_checkpoint(real):
        raise CheckpointError(f"refusing to overwrite {where}: it exists and is not a Simic checkpoint "
                              "(remove it or choose another path)")


def check_writable_checkpoint(path: str | Path) -> Path:
    """Check, before any work, that a checkpoint may be written at `path`; return the real path.

    Allowed: an absent file whose directory exists and is writable, or can be created; or a
    regular file that already is a Simic checkpoint (see the module docstring). Symlinks are
    resolved first, so a link to a store is refused like the store itself. Anything else raises
    `CheckpointError` with a one-line message.
    """
    given = Path(path)
    real = _real_path(given)
    _check_replaceable(real, given)
    folder = real.parent
    while not folder.exists() and folder != folder.parent:  # the first folder that would be created in
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"cannot write checkpoint {given}: {folder} is not a directory")
    try:  # permissions alone do not tell (root, read-only mounts, /proc): try it
        fd, probe = tempfile.mkstemp(prefix=".simic-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {given}: directory {folder} is not writable "
                              f"(creating a file there failed: {exc.strerror or exc})") from None
    return real


def load_checkpoint(path: str | Path, expect_policy: str | None = None) -> Checkpoint:
    """Load and validate a checkpoint: container, format, integrity digest, feature schema.

    `expect_policy` (e.g. "mlp") also refuses a checkpoint trained for another policy type.
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; make one with `simic train --policy {expect_policy}`" if expect_policy else ""
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted: {first}") from None
    return _validated(path, header, tensors, expect_policy)


def _validated(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor],
               expect_policy: str | None) -> Checkpoint:
    """The checks every checkpoint passes, from a file or from bytes: format, digest, schema, policy."""
    if "simic" not in header or "sha256" not in header:
        raise CheckpointError(f"checkpoint {path} is a safetensors file but not a Simic checkpoint (no simic metadata)")
    try:
        meta = json.loads(header["simic"])
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata (tampered or corrupted)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a Simic checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"checkpoint {path} has malformed metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}; "
                              f"this Simic reads version {FORMAT_VERSION}")
    if digest(header["simic"], tensors) != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} failed its integrity check (sha256 mismatch): "
                              "weights or metadata were modified")
    schema = meta.get("feature_schema") or {}
    ours = feature_schema()
    if (schema.get("name"), schema.get("version")) != (ours["name"], ours["version"]) \
            or schema.get("features") != ours["features"]:
        raise CheckpointError(f"checkpoint {path} is for feature schema {schema.get('name')!r} "
                              f"v{schema.get('version')}; this Simic uses {ours['name']!r} v{ours['version']}")
    if expect_policy is not None and meta.get("policy") != expect_policy:
        raise CheckpointError(f"checkpoint {path} is a {meta.get('policy')!r} checkpoint, not {expect_policy!r}")
    return Checkpoint(path=path, tensors=tensors, meta=meta, sha256=header["sha256"])


def checkpoint_from_bytes(data: bytes, source: str | Path, expect_policy: str | None = None) -> Checkpoint:
    """`load_checkpoint` of a checkpoint's bytes (shipped with a job), with every check it makes;
    `source` (where the driver read it) names it in messages and is never opened."""
    from safetensors.torch import load

    path = Path(source)
    header = _safetensors_header(io.BytesIO(data), len(data))
    if header is None:
        raise CheckpointError(f"checkpoint {path} is not a safetensors file (bad header)")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted: {first}") from None
    meta = header.get("__metadata__")
    return _validated(path, meta if isinstance(meta, dict) else {}, tensors, expect_policy)


def load_policy_checkpoint(policy: str, checkpoint: str | Path | Checkpoint | None) -> Checkpoint:
    """What a learned policy's factory calls: the given checkpoint, or the policy's default one.

    `checkpoint` is a path, or a `Checkpoint` the framework already loaded and checked (how
    weights reach a worker on another machine: they travel with the job, never as a path).
    """
    if isinstance(checkpoint, Checkpoint):
        if checkpoint.meta.get("policy") != policy:
            raise CheckpointError(f"checkpoint {checkpoint.path} is a {checkpoint.meta.get('policy')!r} "
                                  f"checkpoint, not {policy!r}")
        return checkpoint
    return load_checkpoint(checkpoint if checkpoint is not None else default_checkpoint_path(policy),
                           expect_policy=policy)


def to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 numpy copies of every tensor (for the lean numpy forward pass of `decide`)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in tensors.items()}


@dataclass(frozen=True)
class CheckpointOrigin:
    """Which checkpoint a built policy decides with, as the framework knows it (never from the policy).

    `path` is the checkpoint handed to the policy's factory (or the default one a trainable
    policy's factory loads without one); `meta` is that file's metadata. `known` is False when the
    episodes it learned from cannot be told: the policy holds a checkpoint nobody handed it, or
    the checkpoint records no `split`. Then none of its episodes may be called held-out.
    """

    path: Path | None = None
    meta: dict[str, Any] | None = None
    known: bool = True

    @property
    def split(self) -> dict[str, Any] | None:
        """The checkpoint's `split` record (its training and validation episodes), if any."""
        split = (self.meta or {}).get("split")
        return split if isinstance(split, dict) and split else None


def checkpoint_origin(name: str, options: dict[str, Any], agent: Any, *, trainable: bool) -> CheckpointOrigin:
    """The checkpoint policy `name` was built from with factory `options` (see `CheckpointOrigin`).

    `trainable`: the name is a registered trainable policy, whose factory loads its default
    checkpoint (`load_policy_checkpoint`) when given none. Raises `CheckpointError` for a path that
    is not a readable checkpoint (the factory would have refused it too).
    """
    given = options.get("checkpoint")
    if given is not None:
        path = Path(given).expanduser()
    elif trainable and default_checkpoint_path(name).is_file():
        path = default_checkpoint_path(name)
    else:
        # Nothing was handed over. A trainable policy built anyway, or one holding a checkpoint,
        # found its weights by itself: what they learned from is unknown.
        return CheckpointOrigin(known=not (trainable or hasattr(agent, "checkpoint")))
    meta = load_checkpoint(path).meta
    origin = CheckpointOrigin(path=path, meta=meta)
    return origin if origin.split is not None else CheckpointOrigin(path=path, meta=meta, known=False)
