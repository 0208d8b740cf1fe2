"""Tolaria's tasks: a dataset with train/validation/test splits plus the host model to train on it.

`digits` (default) is scikit-learn's bundled 8x8 digits: no download, tiny, and the host is
deliberately narrow (2 then 6 channels): it plateaus within a few epochs, below what the task
allows, so a seed that adds capacity at a slot raises accuracy and one that does not is visible.
The CIFAR-10 host follows the same logic at its scale: narrow stages (16, 32, 64) that seeds widen. `cifar10` reads the standard python batches
(`cifar-10-batches-py`) from a local folder; nothing is downloaded at run time.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch takes seconds to import: only loading data or building a host needs it
    import torch

    from .contracts import EpisodeConfig
    from .kasmina import HostCNN


class TaskError(Exception):
    """A task cannot be loaded (missing or malformed data); the message is one line.

    `option` names the parameter at fault ("data_dir"), if one is, for a CLI to name its flag.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class TaskData:
    """Tensors of one task, split three ways. The test split is only read at the episode's end."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass(frozen=True)
class Task:
    """A dataset loader plus a host factory (built under the episode's torch seed).

    `episode_defaults` are `EpisodeConfig` fields the task sets unless the caller does (a price
    on growth, `growth_cost`): they are written into every episode's config, so they are part of
    its identity and a store records them.
    """

    name: str
    description: str
    load: Callable[[str | None, int], TaskData]  # (data_dir, split_seed) -> TaskData
    build_host: Callable[[], HostCNN]
    episode_defaults: Mapping[str, Any] = field(default_factory=dict)


def task_config(name: str, task: Any, **fields: Any) -> EpisodeConfig:
    """The episode config of the task registered as `name`: its `episode_defaults` (if it has
    any) under the caller's `fields`."""
    from .contracts import EpisodeConfig

    return EpisodeConfig(task=name, **{**getattr(task, "episode_defaults", {}), **fields})


def _split(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int, seed: int) -> TaskData:
    """A seeded three-way split: validation is separate from test, always."""
    order = np.random.default_rng(seed).permutation(len(x))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]

    import torch

    def t(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x[idx]).float(), torch.from_numpy(y[idx]).long()

    return TaskData(*t(train), *t(val), *t(test))


@lru_cache(maxsize=4)
def load_digits(data_dir: str | None = None, split_seed: int = 0) -> TaskData:
    """scikit-learn's bundled digits (1,797 8x8 images): 60% train, 20% validation, 20% test."""
    from sklearn.datasets import load_digits as sk_digits  # a second to import: only when loading data

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    n = len(x)
    return _split(x, y, n_val=n // 5, n_test=n // 5, seed=split_seed)


#: The only globals a CIFAR-10 batch may name: what numpy needs to rebuild an array (old and new
#: module paths, protocol 2 to 5) and `_codecs.encode`, which Python 3's protocol 2 uses for bytes.
#: Anything else (os.system, builtins.exec, subprocess.Popen, ...) could run code when loaded.
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})
_CIFAR_PIXELS = 3 * 32 * 32


class _CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch without running code: dicts, lists, bytes, str, ints and numpy
    arrays only; any other global is refused before it is imported."""

    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise TaskError(f"CIFAR-10 batch {self.path} names {module}.{name}, which a CIFAR-10 batch never "
                            "holds (only dicts, lists, bytes, str, ints and numpy arrays are read); refused")
        with warnings.catch_warnings():  # numpy 2 warns on its numpy.core alias, which real files name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch's images (N, 3, 32, 32) uint8 and labels (N,) int64, checked here so that bad data
    is a one-line error when the task loads, not a failure in the middle of an episode."""
    if not path.is_file():
        raise TaskError(f"CIFAR-10 batch {path} is missing (expected the standard cifar-10-batches-py files)")
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, path).load()
        if not isinstance(batch, dict):
            raise TypeError(f"holds a {type(batch).__name__}, not a dict")
        raw = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except TaskError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything; all mean the same
        raise TaskError(f"CIFAR-10 batch {path} is not a valid batch file: {type(exc).__name__}: {exc}") from None
    if raw.dtype.kind not in "iu" or raw.size == 0 or raw.size % _CIFAR_PIXELS \
            or int(raw.min()) < 0 or int(raw.max()) > 255:
        raise TaskError(f"CIFAR-10 batch {path}: data is {raw.size} {raw.dtype} values, expected rows of "
                        f"{_CIFAR_PIXELS} bytes (3x32x32 images)")
    data = raw.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)
    if labels.shape != (len(data),):
        raise TaskError(f"CIFAR-10 batch {path}: {labels.size} labels for {len(data)} images")
    bad = labels[(labels < 0) | (labels > 9)]
    if len(bad):
        raise TaskError(f"CIFAR-10 batch {path}: label {int(bad[0])} outside 0..9")
    return data, labels


def _cifar_dir(data_dir: str | None) -> Path:
    if data_dir is None:
        raise TaskError("task cifar10 needs a data directory: a folder holding cifar-10-batches-py", option="data_dir")
    root = Path(data_dir).expanduser()
    inner = root / "cifar-10-batches-py"
    if inner.is_dir():
        root = inner
    if not root.is_dir():
        raise TaskError(f"{data_dir} is not a directory", option="data_dir")
    return root


@lru_cache(maxsize=2)
def load_cifar10(data_dir: str | None, split_seed: int = 0) -> TaskData:
    """CIFAR-10 from `data_batch_1..5` and `test_batch`; 10% of training held out for validation."""
    root = _cifar_dir(data_dir)
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(root / "test_batch")
    mean = np.array([125.3, 123.0, 113.9], dtype=np.float32)[None, :, None, None]
    std = np.array([63.0, 62.1, 66.7], dtype=np.float32)[None, :, None, None]
    norm = lambda a: (a.astype(np.float32) - mean) / std  # noqa: E731
    order = np.random.default_rng(split_seed).permutation(len(x))
    n_val = max(len(x) // 10, 1)
    val, train = order[:n_val], order[n_val:]

    import torch

    def t(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(norm(a)), torch.from_numpy(b)

    return TaskData(*t(x[train], y[train]), *t(x[val], y[val]), *t(test_x, test_y))


def _host(in_channels: int, widths: tuple[int, ...]) -> Callable[[], HostCNN]:
    """A host factory for a 10-class task (imports Kasmina, and torch, when a host is built)."""

    def build() -> HostCNN:
        from .kasmina import HostCNN

        return HostCNN(in_channels=in_channels, widths=widths, num_classes=10)

    return build


BUILTIN_TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        description="scikit-learn's bundled 8x8 digits (no download); narrow CNN host (2, 6 channels), 2 slots",
        load=load_digits,
        build_host=_host(1, (2, 6)),
    ),
    "cifar10": Task(
        name="cifar10",
        description="CIFAR-10 from local cifar-10-batches-py (--data-dir); narrow 3-stage CNN host, 3 slots",
        load=load_cifar10,
        build_host=_host(3, (16, 32, 64)),
    ),
}
