"""What training fits on the training episodes before its loop: the feature normaliser and the
loss weight of each action (WAIT is most of the decisions, so unweighted imitation never CULLs)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from ..contracts import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, N_FEATURES
from .decisions import DataError


def fit_normaliser(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training observations (float32).

    A feature constant in training (std ~ 0) gets std 1, so it is only centred: dividing by a
    tiny std would turn a harmless difference at deployment into a huge input.
    """
    x = observations.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def fit_range(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature min and max of the training observations (float32).

    A policy clips every observation to this range before normalising it, in validation and when
    it decides: a network knows nothing of states beyond the ones it learned from, and a ReLU
    network extrapolates linearly, so a feature far outside (the accuracy of a host that never
    learns, a plateau three times as long) would otherwise sway a confident, wrong decision.
    """
    x = observations.astype(np.float32)
    return x.min(axis=0), x.max(axis=0)


def ignore_features(mean: np.ndarray, std: np.ndarray, bounds: tuple[np.ndarray, np.ndarray] | None,
                    names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Pin the named features to 0 in the policy's input: their range is [0, 0] (so every
    observation is clipped to 0) and their mean 0, std 1, so they reach the network as 0 always.

    For features whose scale is the task's, not the state's (`TASK_DEPENDENT_FEATURES`): a policy
    that read them would carry one task's scale to another. Without clipping bounds the others
    get the widest float32 range, so only the named ones are changed.
    """
    if not names:
        return mean, std, bounds
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise DataError(f"unknown feature(s) to ignore: {', '.join(unknown)}", option="ignore_features")
    idx = [FEATURE_NAMES.index(n) for n in names]
    big = np.finfo(np.float32).max
    low, high = (b.copy() for b in bounds) if bounds is not None else (
        np.full(N_FEATURES, -big, dtype=np.float32), np.full(N_FEATURES, big, dtype=np.float32))
    mean, std = mean.copy(), std.copy()
    low[idx] = high[idx] = mean[idx] = 0.0
    std[idx] = 1.0
    return mean, std, (low, high)


def parse_class_weights(spec: str) -> str | list[float]:
    """`auto`, `none`, or four comma-separated non-negative weights W,G,A,C."""
    s = spec.strip().lower()
    if s in ("auto", "none"):
        return s
    parts = [p.strip() for p in spec.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != N_ACTIONS or not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise DataError(f"class weights {spec!r}: expected auto, none, or {N_ACTIONS} non-negative numbers "
                        f"({','.join(a[0] for a in ACTION_NAMES)}), e.g. 1,10,10,50", option="class_weights")
    return values


def class_weights(labels: np.ndarray, spec: str | list[float] = "auto") -> np.ndarray:
    """Loss weight per action (float32, always finite).

    `auto`: sklearn's `compute_class_weight('balanced')` over the classes *present* in `labels`
    (n_samples / (n_present_classes * count)); a class absent from the training labels gets
    weight 1.0 - it contributes no loss term either way, and computing on all classes would
    divide by a zero count. `none`: all 1. A list: used as given.
    """
    if isinstance(spec, str):
        spec = parse_class_weights(spec)
    if spec == "none":
        return np.ones(N_ACTIONS, dtype=np.float32)
    if spec == "auto":
        weights = np.ones(N_ACTIONS, dtype=np.float64)
        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return weights.astype(np.float32)
    return np.asarray(spec, dtype=np.float32)
