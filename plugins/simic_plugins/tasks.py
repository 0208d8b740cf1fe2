"""Task variants: what a controller must adapt to when the task is not the default digits.

Registered through the `simic` entry-point group like any third-party task. Each differs from
`digits` in one thing a controller's timing and judgement depend on:

- `digits-deep`: a deeper host (three stages of 2, 4 and 6 channels), so three slots to fill and a
  third place where capacity can be missing.
- `digits-scarce`: the data regime. A sixth of the training images (180), a fifth of their labels
  replaced by a uniformly drawn class; validation and test are the clean digits splits. An epoch is
  6 optimiser steps instead of 34, so the host plateaus later and lower, `global_step` grows at a
  sixth of the rate, and a seed's isolated probe learns less per epoch.
- `shapes`: not derived from digits. Procedural 8x8 images of ten stroke patterns (bars, diagonals,
  squares, crosses, corners) at random positions and sizes, with random contrast and pixel noise,
  generated from the task's seed (the same images for every episode, so episodes pair and batch).
- `digits-rent`: growth has a price. The digits task with `growth_cost` 2 (accuracy points per
  1,000 seed parameters the network keeps), recorded in every episode's config: a `conv_enhance`
  seed after the second stage costs 5.2 points, one after the first 1.2, a `norm` seed 0.02 to 0.1.
  Filling every slot as early as possible (`eager`) is no longer the best policy; what a seed is
  worth against what it costs is the decision.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from esper_cli import hookimpl
from esper_cli.tasks import BUILTIN_TASKS, Task, TaskData, load_digits

#: Labels of the procedural `shapes` task, in class order.
SHAPES: tuple[str, ...] = ("horizontal bar", "vertical bar", "diagonal", "anti-diagonal", "hollow square",
                           "filled square", "plus", "cross", "corner", "tee")
SHAPES_IMAGES = 1800  # as many as digits (1,797), split the same way


def _stroke(kind: int, size: int) -> np.ndarray:
    """The (size, size) 0/1 pattern of shape class `kind`."""
    p = np.zeros((size, size), dtype=np.float32)
    mid, last = size // 2, size - 1
    eye = np.eye(size, dtype=np.float32)
    if kind == 0:
        p[mid, :] = 1
    elif kind == 1:
        p[:, mid] = 1
    elif kind == 2:
        p = eye
    elif kind == 3:
        p = eye[::-1].copy()
    elif kind == 4:
        p[0, :] = p[last, :] = p[:, 0] = p[:, last] = 1
    elif kind == 5:
        p[:] = 1
    elif kind == 6:
        p[mid, :] = p[:, mid] = 1
    elif kind == 7:
        p = np.maximum(eye, eye[::-1])
    elif kind == 8:
        p[:, 0] = p[last, :] = 1
    else:
        p[0, :] = p[:, mid] = 1
    return p


def shapes_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` procedural 8x8 images (n, 1, 8, 8) in [0, 1] and their labels (n,), from `seed`:
    each a stroke pattern of 4 to 7 pixels placed at random, at a random contrast, in noise."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EA9E5]))
    labels = np.arange(n, dtype=np.int64) % len(SHAPES)
    rng.shuffle(labels)
    images = np.zeros((n, 1, 8, 8), dtype=np.float32)
    for i, kind in enumerate(labels):
        size = int(rng.integers(4, 8))
        r, c = (int(v) for v in rng.integers(0, 8 - size + 1, size=2))
        images[i, 0, r:r + size, c:c + size] = _stroke(int(kind), size) * rng.uniform(0.4, 1.0)
    images += rng.normal(0.0, 0.3, size=images.shape).astype(np.float32)
    return np.clip(images, 0.0, 1.0), labels


@lru_cache(maxsize=2)
def load_shapes(data_dir: str | None = None, split_seed: int = 0) -> TaskData:
    """The `shapes` images (generated, nothing read from disk): 60% train, 20% validation, 20% test."""
    from esper_cli.tasks import _split

    x, y = shapes_images(SHAPES_IMAGES, split_seed)
    return _split(x, y, n_val=SHAPES_IMAGES // 5, n_test=SHAPES_IMAGES // 5, seed=split_seed)


SCARCE_TRAIN = 180  # a sixth of digits' 1,079 training images
SCARCE_NOISE = 0.2  # the fraction of their labels replaced by a uniformly drawn class


@lru_cache(maxsize=2)
def load_scarce_digits(data_dir: str | None = None, split_seed: int = 0) -> TaskData:
    """Digits with SCARCE_TRAIN training images, SCARCE_NOISE of their labels redrawn (a redraw
    can land on the true class); validation and test are digits' own, clean."""
    import torch

    full = load_digits(None, split_seed)
    rng = np.random.default_rng(np.random.SeedSequence([split_seed, 0x5CA5CE]))
    keep = torch.from_numpy(np.sort(rng.permutation(len(full.train_y))[:SCARCE_TRAIN]))
    labels = full.train_y[keep].clone()
    noisy = torch.from_numpy(rng.random(SCARCE_TRAIN) < SCARCE_NOISE)
    labels[noisy] = torch.from_numpy(rng.integers(0, 10, size=int(noisy.sum()))).long()
    return TaskData(full.train_x[keep].clone(), labels, full.val_x, full.val_y, full.test_x, full.test_y)


def _host(widths: tuple[int, ...]) -> Callable[[], Any]:
    def build() -> Any:
        from esper_cli.kasmina import HostCNN

        return HostCNN(in_channels=1, widths=widths, num_classes=10)

    return build


RENT = 2.0  # digits-rent's growth cost: accuracy points per 1,000 seed parameters kept

TASKS: dict[str, Task] = {
    "digits-deep": Task("digits-deep", "digits on a deeper host (2, 4, 6 channels): 3 slots",
                        load_digits, _host((2, 4, 6))),
    "digits-scarce": Task("digits-scarce", f"digits with {SCARCE_TRAIN} training images, "
                          f"{SCARCE_NOISE:.0%} of their labels noisy (clean validation and test)",
                          load_scarce_digits, BUILTIN_TASKS["digits"].build_host),
    "shapes": Task("shapes", "procedural 8x8 stroke patterns, 10 classes (generated, no download); "
                   "digits' narrow host, 2 slots", load_shapes, _host((2, 6))),
    "digits-rent": Task("digits-rent", f"digits where growth has a price: {RENT:g} points per 1,000 seed "
                        "parameters kept (growth_cost)", load_digits, BUILTIN_TASKS["digits"].build_host,
                        episode_defaults={"growth_cost": RENT}),
}


@hookimpl
def register_tasks(register: Callable[[str, Any], None]) -> None:
    for name, task in TASKS.items():
        register(name, task)
