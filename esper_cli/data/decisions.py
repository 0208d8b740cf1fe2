"""The decisions of an episode store as a training set: loaded in a few columnar reads, grouped
by episode, checked, and split into training and validation *by episode*.

Never split by decision: the decisions of one episode are correlated, so a per-decision split
leaks. Every class found in two or more episodes gets one on each side of the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import (
    ACTION_NAMES,
    FEATURE_NAMES,
    N_ACTIONS,
    N_FEATURES,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    engine_of,
    engines_text,
)


class DataError(Exception):
    """The store cannot be trained or evaluated on (empty, too small, NaN, a class missing...).

    `option` names the parameter at fault (e.g. "class_weights"), if one is: a CLI names its own
    flag for it; the message itself stands alone.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass
class DecisionData:
    """All decisions of a store, grouped by episode and in epoch order within each episode."""

    store: Path
    observations: np.ndarray  # (N, 27) float32, raw
    labels: np.ndarray  # (N,) int64: the action to imitate
    episode: np.ndarray  # (N,) int64: episode position (canonical order: run seed, index, id)
    episode_ids: list[str]  # per episode position
    starts: np.ndarray  # (E,) first decision of each episode
    lengths: np.ndarray  # (E,) decisions per episode
    episode_meta: list[dict[str, Any]] | None = None  # per episode position (config, rng seed, ...)
    schema_version: int = SCHEMA_VERSION  # of the store's observations (see `require_schema`)
    rows: np.ndarray | None = None  # (N,) each decision's row in the store's columns (to gather more of them)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ids)

    def engine_versions(self) -> dict[int, int]:
        """Episodes per engine version (`EpisodeConfig.engine`), ascending; empty without metadata."""
        found: dict[int, int] = {}
        for meta in self.episode_meta or []:
            engine = engine_of(meta["config"])
            found[engine] = found.get(engine, 0) + 1
        return dict(sorted(found.items()))

    def rows_of(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The decision rows of the given episode positions, in position order (as `select` keeps them)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        if not len(positions):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(self.starts[p], self.starts[p] + self.lengths[p]) for p in positions])

    def select(self, positions: Sequence[int] | np.ndarray) -> DecisionData:
        """The sub-dataset made of the given episode positions (kept in their order)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        rows = self.rows_of(positions)
        lengths = self.lengths[positions]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(positions) else lengths
        episode = np.repeat(np.arange(len(positions)), lengths)
        metas = [self.episode_meta[p] for p in positions] if self.episode_meta is not None else None
        return DecisionData(self.store, self.observations[rows], self.labels[rows], episode,
                            [self.episode_ids[p] for p in positions], starts, lengths, metas, self.schema_version,
                            self.rows[rows] if self.rows is not None else None)

    def sequences(self) -> list[np.ndarray]:
        """Per-episode row indices, in order (for sequence models and stateful replay)."""
        return [np.arange(s, s + n) for s, n in zip(self.starts, self.lengths)]


def imitation_labels(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The action to imitate per decision: the expert's label where one was recorded (DAgger
    stores, expert_actions >= 0), otherwise the action the acting policy took."""
    actions = np.asarray(columns["actions"], dtype=np.int64)
    expert = columns.get("expert_actions")
    if expert is None:
        return actions
    expert = np.asarray(expert, dtype=np.int64)
    return np.where(expert >= 0, expert, actions)


def load_decisions(store_path: str | Path) -> DecisionData:
    """Every decision of an episode store, validated (no NaN, known actions), grouped by episode."""
    from .store import EpisodeReader, StoreError  # the store pulls in h5py; import when needed

    store_path = Path(store_path)
    try:
        with EpisodeReader(store_path) as reader:
            n = reader.n_episodes
            if n == 0:
                raise DataError(f"store {store_path} holds no episodes; collect some with `simic collect --store {store_path}`")
            cols = reader.decisions()
            metas = [reader.episode_meta(i) for i in range(n)]
            version = reader.schema_version
    except StoreError as exc:
        raise DataError(str(exc)) from None
    obs = np.asarray(cols["observations"], dtype=np.float32)
    if obs.ndim != 2 or obs.shape[1] != N_FEATURES:
        raise DataError(f"store {store_path}: observations have shape {obs.shape}, expected (N, {N_FEATURES})")
    if len(obs) == 0:
        raise DataError(f"store {store_path} holds {n} episodes but no decisions")
    bad = ~np.isfinite(obs)
    if bad.any():
        names = ", ".join(FEATURE_NAMES[j] for j in np.nonzero(bad.any(axis=0))[0])
        raise DataError(f"store {store_path}: {int(bad.any(axis=1).sum())} observations contain NaN or inf "
                        f"(features: {names})")
    labels = imitation_labels(cols)
    if ((labels < 0) | (labels >= N_ACTIONS)).any():
        raise DataError(f"store {store_path}: actions outside 0..{N_ACTIONS - 1} ({', '.join(ACTION_NAMES)})")
    # Episodes in a canonical order (run seed, index, id), not the order they were committed in:
    # parallel workers commit in completion order, and training must not depend on it.
    canonical = sorted(range(n), key=lambda i: (int(metas[i]["seed"]), int(metas[i]["index"]), str(metas[i]["id"])))
    position = np.empty(n, dtype=np.int64)
    position[canonical] = np.arange(n)
    episode = position[np.asarray(cols["episode"], dtype=np.int64)]
    rows = np.argsort(episode, kind="stable")  # group by episode, keep epoch order within one
    obs, labels, episode = obs[rows], labels[rows], episode[rows]
    lengths = np.bincount(episode, minlength=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    metas = [metas[i] for i in canonical]
    ids = [str(m["id"]) for m in metas]
    return DecisionData(store_path, obs, labels, episode, ids, starts, lengths, metas, version, rows)


def require_schema(data: DecisionData, version: int, what: str) -> None:
    """Refuse to mix observation schemas: `what` (training, a checkpoint) uses `version` only."""
    if data.schema_version != version:
        raise DataError(f"store {data.store} holds {SCHEMA_NAME} v{data.schema_version} observations; "
                        f"{what} uses v{version} (the features' meaning differs): collect a new store")


def require_one_engine(data: DecisionData, what: str) -> None:
    """Refuse to mix engines: `what` (a training set) holds the episodes of one engine only, as an
    episode's numbers depend on the engine that trained its host (`contracts.ENGINE_VERSION`)."""
    engines = data.engine_versions()
    if len(engines) > 1:
        counts = ", ".join(f"{n} of engine {v}" for v, n in engines.items())
        raise DataError(f"store {data.store} mixes episodes of {engines_text(engines)} ({counts}); {what} "
                        "never mixes engines in one training set: train on a store of one engine's episodes")


def split_episodes(n_episodes: int, val_fraction: float, seed: int,
                   strata: np.ndarray | None = None,
                   classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of episode positions into (train, val); at least one episode on each side.

    With `strata` (one label per episode, e.g. the rarest action it contains) the split is
    stratified: each stratum sends round(val_fraction * size) of its episodes to validation but
    keeps at least one for training, and the remaining validation places are filled from the
    most common strata first. So a rare class (CULL appears in a handful of episodes) is never
    left out of training by an unlucky shuffle. Same inputs, same split.

    With `classes` (an (episodes, classes) boolean matrix: which classes each episode contains)
    the split is then repaired class by class, rarest first: every class keeps an episode in
    training, and every class found in at least two episodes also gets one in validation (a
    validation score over a missing class would silently leave it out). See `cover_classes`.
    """
    train, val = _split_stratified(n_episodes, val_fraction, seed, strata)
    if classes is None:
        return train, val
    in_val = np.zeros(n_episodes, dtype=bool)
    in_val[val] = True
    order = np.random.default_rng(seed).permutation(n_episodes)
    in_val = cover_classes(np.asarray(classes, dtype=bool), in_val, order)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def cover_classes(classes: np.ndarray, in_val: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Move episodes across a split so every class is on both sides where the data allows.

    `classes`: (episodes, classes) boolean; `in_val`: the split to repair; `order`: the seeded
    order in which episodes are considered. First each class without a training episode gets one
    back from validation; then each class (rarest first) in two or more episodes but none in
    validation gets one moved there, never taking a class's last training episode, and, to keep
    the validation size, one validation episode whose every class is also elsewhere in
    validation goes back to training. Returns the new `in_val`.
    """
    in_val = in_val.copy()
    rank = {int(e): i for i, e in enumerate(order)}
    n_with = classes.sum(axis=0)

    def ordered(mask: np.ndarray) -> list[int]:
        return sorted(np.flatnonzero(mask).tolist(), key=rank.__getitem__)

    for c in np.argsort(n_with, kind="stable"):  # every class keeps a training episode
        if n_with[c] and not (classes[:, c] & ~in_val).any() and in_val.sum() > 1:
            in_val[ordered(classes[:, c] & in_val)[0]] = False
    for c in np.argsort(n_with, kind="stable"):
        if n_with[c] < 2 or (classes[:, c] & in_val).any():
            continue
        train_count = (classes & ~in_val[:, None]).sum(axis=0)
        movable = [e for e in ordered(classes[:, c] & ~in_val)
                   if (train_count[classes[e]] >= 2).all() and (~in_val).sum() > 1]
        if not movable:
            continue  # each episode with c holds some class's last training example
        in_val[movable[0]] = True
        val_count = (classes & in_val[:, None]).sum(axis=0)
        back = [e for e in ordered(in_val) if e != movable[0] and (val_count[classes[e]] >= 2).all()]
        if back:
            in_val[back[-1]] = False
    return in_val


def _split_stratified(n_episodes: int, val_fraction: float, seed: int,
                      strata: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The seeded (train, val) split of `split_episodes`, before any class coverage repair."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1 (exclusive), got {val_fraction}",
                        option="val_fraction")
    if n_episodes < 2:
        raise DataError(f"the store holds {n_episodes} episode(s); at least 2 are needed to split by episode "
                        "into training and validation (collect more with `simic collect --episodes N`)")
    n_val = min(n_episodes - 1, max(1, round(val_fraction * n_episodes)))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_episodes)
    if strata is None:
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    strata = np.asarray(strata)[perm]  # members of each stratum in shuffled order
    groups = sorted((perm[strata == s] for s in np.unique(strata)), key=len)  # rarest first
    val = [g[: min(round(val_fraction * len(g)), len(g) - 1)] for g in groups]
    rest = [g[len(v) :] for g, v in zip(groups, val)]
    need = n_val - sum(len(v) for v in val)
    for g in reversed(rest):  # top up from the most common strata, keeping one of each for training
        take = min(need, len(g) - 1)
        val.append(g[:take])
        need -= take
    val_pos = np.sort(np.concatenate(val)).astype(np.int64)
    if need > 0 or len(val_pos) == 0:  # too few episodes to keep every stratum in training
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    return np.setdiff1d(np.arange(n_episodes), val_pos), val_pos


def rarest_action_per_episode(data: DecisionData) -> np.ndarray:
    """Each episode's rarest action (by frequency over the whole store): the stratum of its split."""
    freq = np.bincount(data.labels, minlength=N_ACTIONS)
    rank = np.argsort(np.argsort(freq, kind="stable"), kind="stable")  # 0 = rarest action
    per_row = rank[data.labels]
    rarest = np.full(data.n_episodes, N_ACTIONS, dtype=np.int64)
    np.minimum.at(rarest, data.episode, per_row)
    return rarest


def classes_per_episode(data: DecisionData) -> np.ndarray:
    """(episodes, actions) boolean: which actions occur among each episode's labels."""
    present = np.zeros((data.n_episodes, N_ACTIONS), dtype=bool)
    present[data.episode, data.labels] = True
    return present
