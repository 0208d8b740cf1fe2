"""Simic episode store: every decision of many episodes in one HDF5 file (h5py).

Columnar (one read per column however many episodes), crash-safe (a ``kill -9`` at any moment
leaves every committed episode and no partial one), one writer at a time (a lock file next to the
store), any number of readers, even while writing; the episodes of one engine
(`EpisodeConfig.engine`), never two. One module per job:

- `layout`: every dataset and column, declared once (the file's format);
- `files`: checks before HDF5 touches a file, SWMR opening, atomic creation;
- `encoding`: episodes to rows and back;
- `writer`: `EpisodeWriter` (lock, atomic commits, recovery after a crash, upgrade, one engine);
- `reader`: `EpisodeReader` (a committed snapshot, `columns()` for analysis and offline RL).
"""

from .errors import EngineMismatchError, NotAStoreError, StoreError, StoreLockedError, StoreWriteError
from .layout import STORE_FORMAT, STORE_VERSION
from .reader import EpisodeReader
from .writer import EpisodeWriter, MissingIndices, check_store_engine

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "EngineMismatchError",
    "EpisodeReader",
    "EpisodeWriter",
    "MissingIndices",
    "NotAStoreError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "check_store_engine",
]
