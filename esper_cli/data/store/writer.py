"""The store's writer: one at a time (a lock file next to the store), one atomic commit per append.

An append writes all its rows, flushes, and only then advances ``/commit`` (and flushes again), so
a ``kill -9`` at any point leaves every committed episode and no partial one. Opening recovers a
store whose last writer crashed and upgrades one that predates the optional columns, both by
rewriting its committed rows into a fresh file. Durability against power loss is not promised:
commits are flushed, not fsynced.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np
from filelock import FileLock, Timeout
from h5py import h5s

from ...contracts import SCHEMA_NAME, SCHEMA_VERSION, Episode, engines_text
from .encoding import Batch, encode
from .errors import EngineMismatchError, StoreError, StoreLockedError, hdf5_reason, write_error
from .files import attr_str, check_file, create_store, open_swmr_write, real_path, superblock_flags
from .layout import LAYOUT, Counts
from .reader import EpisodeReader


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


def refuse_other_engines(path: str | os.PathLike[str], held: Mapping[int, int], adding: Iterable[int]) -> None:
    """Raise `EngineMismatchError` when episodes of the engines `adding` would make the store at
    `path` (holding `held`: episodes per engine) hold more than one engine's episodes."""
    adding = set(adding)
    if len(set(held) | adding) <= 1:
        return
    if not held:
        raise EngineMismatchError(f"episode store {path}: the episodes to append are of {engines_text(adding)}; "
                                  "one store holds one engine's episodes")
    raise EngineMismatchError(f"episode store {path} holds {engines_text(held)} episodes and these are "
                              f"{engines_text(adding)}'s: one store never mixes engines (their numbers "
                              "differ); use a new store for them")


def check_store_engine(path: str | os.PathLike[str], engine: int) -> None:
    """Refuse (`EngineMismatchError`) a run of `engine` that would append to the store at `path`
    when it holds another engine's episodes; nothing is opened for writing (a missing store is fine)."""
    if not Path(path).exists():
        return
    with EpisodeReader(path) as reader:
        held = reader.engine_versions()
    refuse_other_engines(path, held, [engine])


class _StaleLock(Exception):
    """The lock file was deleted (by the writer closing) between our opening and locking it."""


#: Tries to lock a store whose lock file a closing writer keeps deleting under us.
_LOCK_ATTEMPTS = 8


class EpisodeWriter:
    """Appends episodes to a store, one atomic commit per `append`; one writer at a time.

    Creates the store (and its directory) if missing; recovers it if a previous writer was killed
    (`recovered` is then True). A path holding anything but a Simic store is never modified.
    A store holds the episodes of one engine (`EpisodeConfig.engine`): appending another's is
    refused, and with `engine` a store holding another engine's episodes is refused at open.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 0.0,
                 engine: int | None = None) -> None:
        self.path = Path(path)
        #: The engine of the episodes about to be appended, if known: a store holding another
        #: engine's episodes is then refused at open, before a recovery or upgrade rewrites it.
        self._engine = engine
        #: Committed episodes per engine version (`EpisodeReader.engine_versions`).
        self.engine_versions: dict[int, int] = {}
        # The file a symlink points to is the store: its lock, its recovery, its replacement. A
        # lock on the link's name would not exclude a writer of the target, and a recovery would
        # replace the link with a copy, splitting the store in two.
        self.real_path = real_path(self.path)
        self.recovered = False
        #: True when the store predated the optional columns and was rewritten to hold them.
        self.upgraded = False
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._commit: h5py.Dataset | None = None
        if self.real_path.exists():
            # Refuse what is plainly not a store before a lock file appears next to it.
            check_file(self.real_path)
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
            raise write_error(f"cannot write episode store {self.path}", exc) from None
        try:
            self._open()
        except BaseException as exc:
            self._close_file()
            self._lock_path.unlink(missing_ok=True)  # held: see close()
            self._lock.release()
            if isinstance(exc, (OSError, RuntimeError)):  # permissions, disk full, ...
                raise write_error(f"cannot write episode store {self.path}", exc) from None
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
            create_store(path, self._sibling("create.tmp"))
        # Validate read-only first: a file that is not a readable store is never opened for writing.
        with EpisodeReader(path) as reader:
            if reader.schema_version != SCHEMA_VERSION:  # one store, one meaning per feature
                raise StoreError(f"episode store {self.path} holds {SCHEMA_NAME} v{reader.schema_version} "
                                 f"observations; this Simic writes v{SCHEMA_VERSION}: collect into a new store")
            self.engine_versions = reader.engine_versions()
            if self._engine is not None:
                self.require_engine(self._engine)
            # HDF5's "open for write" flag is set, yet we hold the lock: the last writer crashed,
            # and a normal open would refuse the file. Keep its committed data, drop the rest.
            crashed = superblock_flags(path) != 0
            # A store from before the optional columns gets them now: the same whole rewrite.
            upgrade = bool(reader.absent)
            arrays = reader.committed_arrays() if crashed or upgrade else None
        if arrays is not None:
            try:
                create_store(path, self._sibling("recover.tmp"), arrays)
            except (OSError, RuntimeError) as exc:
                raise write_error(f"recovering episode store {self.path} after an interrupted "
                                  "write failed", exc, "; the store is unchanged") from None
            self.recovered = crashed
            self.upgraded = upgrade
        try:
            self._file = open_swmr_write(path)
        except OSError as exc:
            hint = (" (an EpisodeReader in this process has it open; close it first)"
                    if "already open for read-only" in str(exc) else "")
            raise StoreError(f"cannot open episode store {self.path} for writing: "
                             f"{hdf5_reason(exc)}{hint}") from None
        self._datasets = {name: self._file[name] for name in LAYOUT}
        self._commit = self._file["commit"]
        self._counts = Counts(*(int(x) for x in self._commit[()]))
        self._blueprints = [attr_str(b) for b in
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

    def require_engine(self, engine: int) -> None:
        """Refuse (`EngineMismatchError`, one line) to add episodes of `engine` to a store that
        holds another engine's: what a run checks before its first episode runs."""
        refuse_other_engines(self.path, self.engine_versions, [engine])

    def append(self, episode: Episode) -> None:
        """Commit one episode atomically. Raises ValueError (nothing written) on NaN/inf data, and
        `EngineMismatchError` (nothing written) for an episode of another engine than the store's."""
        self.append_many([episode])

    def append_many(self, episodes: Iterable[Episode]) -> None:
        """Commit many episodes at once (all or none visible): cheaper than one append each."""
        if self._file is None:
            raise StoreError(f"episode store {self.path} writer is closed")
        episodes = list(episodes)
        if not episodes:
            return
        adding = [int(ep.config.engine) for ep in episodes]
        refuse_other_engines(self.path, self.engine_versions, adding)
        batch = encode(episodes, self._counts, self._blueprints)
        try:
            self._write(batch)
        except (OSError, RuntimeError) as exc:  # h5py raises either, e.g. for a full disk
            # The last commit still stands on disk. HDF5 is left half-failed, so close the file
            # now rather than leave it to the exit handlers, which could crash the process.
            self.close(quiet=True)
            raise write_error(f"writing episode store {self.path} failed", exc,
                              f"; its {self.n_episodes} committed episodes are kept") from None
        self._counts, self._blueprints = batch.counts, batch.blueprints
        self._keys |= batch.keys
        for engine in adding:
            self.engine_versions[engine] = self.engine_versions.get(engine, 0) + 1

    def _write(self, batch: Batch) -> None:
        for name, rows in batch.rows.items():
            # Start at the committed count: overwrites whatever a failed append left behind.
            _put_rows(self._datasets[name], getattr(self._counts, LAYOUT[name].counted_by), rows)
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
            raise write_error(f"closing episode store {self.path} failed", problem,
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
