"""Replaying stored episodes through a policy (`simic eval`): which episodes to score, and the
actions the policy takes on each stored observation, in the order it would have seen them live."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..contracts import FEATURE_NAMES, N_FEATURES, TrainingSnapshot
from ..policy import EpisodeContext
from .decisions import DataError, DecisionData


def select_split(data: DecisionData, split: str, trained: dict[str, Any] | None,
                 policy: str = "policy") -> tuple[np.ndarray, str]:
    """Episode positions of `split` (val | train | all) and a sentence saying what they are.

    `trained` is a checkpoint's `split` record (None for a policy without a checkpoint). "val"
    means every episode of this store the policy was *not* trained on: the checkpoint's own
    validation episodes when this is its training store, all episodes of any other store.
    """
    if split not in ("val", "train", "all"):
        raise DataError(f"split {split!r}: expected val, train or all", option="split")
    everything = np.arange(data.n_episodes)
    if split == "all":
        return everything, f"all {data.n_episodes} episodes of the store"
    if trained is None:
        if split == "train":
            raise DataError(f"split train: policy '{policy}' has no checkpoint, so no training episodes; "
                            "score val or all", option="split")
        return everything, (f"all {data.n_episodes} episodes: policy '{policy}' has no checkpoint, "
                            "so none was used in training")
    train_ids = set(trained.get("train_ids", []))
    in_train = np.array([i in train_ids for i in data.episode_ids], dtype=bool)
    if split == "train":
        if not in_train.any():
            raise DataError(f"split train: no episode of {data.store} was used to train this checkpoint", option="split")
        return everything[in_train], f"{int(in_train.sum())} episodes the checkpoint was trained on"
    held = everything[~in_train]
    if len(held) == 0:
        raise DataError(f"every episode of {data.store} was used to train this checkpoint; nothing is held out "
                        "(score train or all, or another store)", option="split")
    val_ids = set(trained.get("val_ids", []))
    if not in_train.any() and not any(i in val_ids for i in data.episode_ids):
        return held, f"all {len(held)} episodes: this store was not used in training (trained on {trained.get('store')})"
    return held, f"{len(held)} held-out episodes (not used in training; split seed {trained.get('seed')})"


_AVAILABLE_SLOTS = FEATURE_NAMES.index("available_slots")


def replay_context(data: DecisionData, position: int, blueprints: tuple[str, ...] = ()) -> Any:
    """The `EpisodeContext` a policy saw (as near as the store tells) while episode `position` ran."""

    meta = (data.episode_meta or [{}] * data.n_episodes)[position] or {}
    config = meta.get("config") or {}
    first = data.observations[data.starts[position]] if data.lengths[position] else np.zeros(N_FEATURES)
    return EpisodeContext(task=str(config.get("task", "digits")), max_epochs=int(config.get("epochs", data.lengths[position])),
                          blueprints=tuple(blueprints),
                          n_slots=int(first[_AVAILABLE_SLOTS]),  # all slots free at epoch 0
                          rng_seed=int(meta.get("rng_seed", 0)))


def replay(policy: Any, data: DecisionData, blueprints: tuple[str, ...] = ()) -> np.ndarray:
    """Each stored observation replayed through `policy`: its actions, in flat row order.

    A policy with `decide_episode` (a fast stateful replay) or `decide_batch` (stateless) uses it;
    any other policy is `reset` per episode and asked `decide` for each epoch *in order*, so a
    stateful policy sees exactly what it would have seen live.
    """

    pred = np.empty(len(data.labels), dtype=np.int64)
    if getattr(policy, "decide_episode", None) is None and getattr(policy, "decide_batch", None) is not None:
        pred[:] = np.asarray(policy.decide_batch(data.observations), dtype=np.int64).reshape(-1)
        return pred
    for e, rows in enumerate(data.sequences()):
        if getattr(policy, "decide_episode", None) is not None:
            pred[rows] = np.asarray(policy.decide_episode(data.observations[rows]), dtype=np.int64)
            continue
        context = replay_context(data, e, blueprints)
        policy.reset(context)
        for r in rows:
            decision = policy.decide(TrainingSnapshot.from_vector(data.observations[r]), context)
            pred[r] = int(getattr(decision, "action", decision))
    return pred
