"""Opening store files: cheap checks before HDF5 touches a file, SWMR opening for readers and the
writer, the one HDF5 setting h5py does not wrap (set through ctypes), atomic creation of a whole
store, and the superblock's consistency flags.

Crash safety rests on SWMR: the file is written in HDF5 SWMR mode, which keeps it consistent on
disk at every moment. A crashed writer leaves HDF5's "open for write" flag set; readers open in
SWMR-read mode, which ignores it, and the next writer rewrites the committed data into a clean
file (`create_store` with the committed rows).
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5f, h5p

from ...contracts import (
    FEATURE_NAMES,
    N_FEATURES,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
)
from .errors import NotAStoreError, StoreError, hdf5_reason
from .layout import LAYOUT, STORE_FORMAT, STORE_VERSION, Counts

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_file(path: Path, shown: Path | None = None) -> None:
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


def open_swmr(path: Path, shown: Path | None = None) -> h5py.File:
    """Open a store for reading; works while a writer is live and after a writer crashed.

    HDF5's own file locking is off: it would make a reader block the writer (and vice versa);
    the lock file serialises writers and SWMR makes concurrent reads safe. Errors name `shown`
    (the path as the user gave it) if given.
    """
    name = path if shown is None else shown
    check_file(path, name)
    try:
        f = h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ,
                               fapl=_file_access(name)))
    except (OSError, RuntimeError) as exc:
        # Left by a program that wrote the file without SWMR (never by Simic) and crashed.
        hint = (f"; if no program is writing it, `h5clear -s {name}` clears the flag"
                if "not already open for SWMR" in str(exc) else "")
        raise StoreError(f"cannot open episode store {name}: {hdf5_reason(exc)}{hint}") from None
    try:
        _check_header(f, name)
    except StoreError:
        f.close()
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # a damaged header
        f.close()
        raise StoreError(f"episode store {name} is damaged: {hdf5_reason(exc)}") from None
    except BaseException:
        f.close()
        raise
    return f


def attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_header(f: h5py.File, path: Path) -> None:
    """Refuse anything that is not a store this build of Simic can read, with a clear reason."""
    if attr_str(f.attrs.get("format", "")) != STORE_FORMAT:
        raise NotAStoreError(f"{path} is an HDF5 file but not a Simic episode store")
    version = int(f.attrs.get("store_version", -1))
    if version != STORE_VERSION:
        raise StoreError(f"episode store {path} has store version {version}; "
                         f"this Simic reads version {STORE_VERSION}")
    name = attr_str(f.attrs.get("schema_name", ""))
    schema = int(f.attrs.get("schema_version", -1))
    if name != SCHEMA_NAME or schema not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(f"episode store {path} holds observation schema {name} v{schema}; "
                         f"this Simic uses {SCHEMA_NAME} v{SCHEMA_VERSION}")
    features = tuple(attr_str(x) for x in f.attrs.get("feature_names", ()))
    if features != FEATURE_NAMES:
        raise StoreError(f"episode store {path} has different observation features than "
                         f"{SCHEMA_NAME} v{SCHEMA_VERSION} ({len(features)} vs {N_FEATURES})")


def open_swmr_write(path: Path) -> h5py.File:
    """Open a store for appending, in SWMR-write mode from the start.

    Not `h5py.File(path, "r+")` then `swmr_mode = True`: a kill between the two leaves the file
    flagged "open for write, not SWMR", which SWMR readers refuse and no recovery can read.
    """
    fapl = _file_access(path)  # no HDF5 file locking: see open_swmr; the lock file guards writers
    fapl.set_cache(0, 0, 0, 0.75)  # no chunk cache: see NO_CHUNK_CACHE
    fid = h5f.open(os.fsencode(path), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE, fapl=fapl)
    return h5py.File(fid)


# Writers keep no chunk cache: a full disk must fail the write call itself, leaving no dataset
# with unwritten rows. Cached rows would fail in a later flush and stay pending, and HDF5 retries
# them when closing and at exit, where a failure crashes the process. Unfiltered chunks lose
# nothing by it: HDF5 writes a partial chunk in place, without reading it.
NO_CHUNK_CACHE = {"rdcc_nbytes": 0, "rdcc_nslots": 0}


def create_store(path: Path, tmp: Path, arrays: dict[str, np.ndarray] | None = None) -> None:
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
    with h5py.File(tmp, "w", libver="latest", **NO_CHUNK_CACHE) as f:
        f.attrs["format"] = STORE_FORMAT
        f.attrs["store_version"] = STORE_VERSION
        f.attrs["schema_name"] = SCHEMA_NAME
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["feature_names"] = np.array([n.encode() for n in FEATURE_NAMES])
        counts = {}
        for name, ds in LAYOUT.items():
            data = arrays.get(name, np.zeros((0, *ds.shape), dtype=ds.dtype))
            fill = {} if ds.absent is None else {"fillvalue": ds.absent}
            f.create_dataset(name, data=data, dtype=ds.dtype, maxshape=(None, *ds.shape),
                             chunks=(ds.chunk, *ds.shape), **fill)
            counts[ds.counted_by] = len(data)
        f.create_dataset("commit", data=np.array(Counts(**counts), dtype=np.int64))


def real_path(path: Path) -> Path:
    """The file `path` names, through any symlinks (the path itself when nothing exists there)."""
    real = Path(os.path.realpath(path))
    if real.is_symlink():  # realpath stops at a loop or an unreadable link
        raise StoreError(f"episode store {path} is a symlink that leads nowhere (a loop?)")
    return real


def superblock_flags(path: Path) -> int:
    """HDF5's file consistency flags (superblock v3): 0 once the last writer closed cleanly."""
    with open(path, "rb") as fh:
        return fh.read(12)[11]
