"""Tolaria's tasks: a dataset with train/validation/test splits plus the host model to train on it.

`digits` (default) is scikit-learn's bundled 8x8 digits: no download, tiny, and the host is
deliberately narrow (2 then 6 channels): it plateaus within a few epochs, below what the task
allows, so a seed that adds capacity at a slot raises accuracy and one that does not is visible.
The CIFAR-10 host follows the same logic at its scale: narrow stages (16, 32, 64) that seeds widen. `cifar10` reads the standard python batches
(`cifar-10-batches-py`) from a local folder; nothing is downloaded at run time.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .kasmina import HostCNN


class TaskError(Exception):
    """A task cannot be loaded (missing or malformed data); the message is one line."""


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
    """A dataset loader plus a host factory (built under the episode's torch seed)."""

    name: str
    description: str
    load: Callable[[str | None, int], TaskData]  # (data_dir, split_seed) -> TaskData
    build_host: Callable[[], HostCNN]


def _split(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int, seed: int) -> TaskData:
    """A seeded three-way split: validation is separate from test, always."""
    order = np.random.default_rng(seed).permutation(len(x))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]

    def t(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x[idx]).float(), torch.from_numpy(y[idx]).long()

    return TaskData(*t(train), *t(val), *t(test))


@lru_cache(maxsize=4)
def load_digits(data_dir: str | None = None, split_seed: int = 0) -> TaskData:
    """scikit-learn's bundled digits (1,797 8x8 images): 60% train, 20% validation, 20% test."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    n = len(x)
    return _split(x, y, n_val=n // 5, n_test=n // 5, seed=split_seed)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise TaskError(f"CIFAR-10 batch {path} is missing (expected the standard cifar-10-batches-py files)")
    try:
        with path.open("rb") as fh:
            # The standard CIFAR-10 distribution is pickled dicts; the user points us at it.
            batch = pickle.load(fh, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
        raise TaskError(f"CIFAR-10 batch {path} is not a valid batch file: {exc}") from None
    return data, labels


def _cifar_dir(data_dir: str | None) -> Path:
    if data_dir is None:
        raise TaskError("task cifar10 needs --data-dir pointing at a folder with cifar-10-batches-py")
    root = Path(data_dir).expanduser()
    inner = root / "cifar-10-batches-py"
    if inner.is_dir():
        root = inner
    if not root.is_dir():
        raise TaskError(f"--data-dir {data_dir} is not a directory")
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

    def t(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(norm(a)), torch.from_numpy(b)

    return TaskData(*t(x[train], y[train]), *t(x[val], y[val]), *t(test_x, test_y))


BUILTIN_TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        description="scikit-learn's bundled 8x8 digits (no download); narrow CNN host (2, 6 channels), 2 slots",
        load=load_digits,
        build_host=lambda: HostCNN(in_channels=1, widths=(2, 6), num_classes=10),
    ),
    "cifar10": Task(
        name="cifar10",
        description="CIFAR-10 from local cifar-10-batches-py (--data-dir); narrow 3-stage CNN host, 3 slots",
        load=load_cifar10,
        build_host=lambda: HostCNN(in_channels=3, widths=(16, 32, 64), num_classes=10),
    ),
}
