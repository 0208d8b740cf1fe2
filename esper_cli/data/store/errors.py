"""The store's errors, and how an h5py or OS failure becomes a one-line message."""

from __future__ import annotations

import errno
import os
import re


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


class EngineMismatchError(StoreError):
    """Episodes of one engine (`EpisodeConfig.engine`) refused by a store holding another's: the
    engines' numbers differ, so one store (and so one training set) never mixes them."""


def hdf5_reason(exc: BaseException) -> str:
    """The useful part of an h5py error, on one line."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str() would quote it
    reason = " ".join(str(text).split()) or type(exc).__name__
    if "checksum" in reason:  # HDF5 found a flipped byte in its own bookkeeping
        reason = f"HDF5 checksum mismatch, the file is corrupted ({reason})"
    return reason


def errno_of(exc: BaseException) -> int | None:
    """The OS error number behind an h5py error (HDF5 buries it in its message as "errno = 28")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


def io_reason(exc: BaseException) -> str:
    """Why a write failed, on one line: the OS error when there is one, else HDF5's words."""
    code = errno_of(exc)
    if code:
        return os.strerror(code) + (" (free some space, then re-run)" if code == errno.ENOSPC else "")
    return hdf5_reason(exc)


_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


def write_error(what: str, exc: BaseException, tail: str = "") -> StoreError:
    """A one-line error for a failed write: StoreWriteError (exit 1) when the job failed for want
    of space or I/O, StoreError (exit 2) when the path cannot be written at all (permissions)."""
    failed = errno_of(exc) in _WRITE_FAILURES or isinstance(exc, RuntimeError)
    return (StoreWriteError if failed else StoreError)(f"{what}: {io_reason(exc)}{tail}")
