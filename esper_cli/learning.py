"""Simic policy learning: behaviour cloning of a Tamiyo policy from an episode store.

Reads top to bottom, like the training loop it is:

1. `load_decisions`   - every decision of a store in a few columnar reads, grouped by episode.
2. `split_episodes`   - a seeded train/validation split *by episode* (never by decision: decisions
                         of one episode are correlated, so a per-decision split leaks); every
                         class in two or more episodes gets one on each side.
3. `fit_normaliser`   - feature mean/std fitted on the training episodes only.
4. `class_weights`    - sklearn's balanced weights (WAIT is ~94% of decisions).
5. `train_policy`     - Adam + weighted cross-entropy on shuffled mini-batches (MLP) or whole
                         episodes in order (GRU); the epoch with the best validation balanced
                         accuracy is kept (early stopping) and saved as a safetensors checkpoint.
6. `classification_metrics` - accuracy, balanced accuracy, per-class P/R/F1, confusion matrix,
                         and the classes without support (a score that leaves them out says so).

`train_policy(store, policy="mlp") -> (checkpoint_path, metrics)` is the reusable entry point
(DAgger loops call it); `simic train` is a thin CLI around it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from .checkpoint import CheckpointError, check_writable_checkpoint, save_checkpoint
from .contracts import ACTION_NAMES, N_ACTIONS, N_FEATURES, SCHEMA_NAME, SCHEMA_VERSION
from .paths import default_checkpoint_path

LABELS = list(range(N_ACTIONS))
IGNORE = -100  # label of padded time steps in a batch of episodes (ignored by the loss)


class DataError(Exception):
    """The store cannot be trained or evaluated on (empty, too small, NaN, a class missing...)."""


# ================================================================================ 1. the data
@dataclass
class DecisionData:
    """All decisions of a store, grouped by episode and in epoch order within each episode."""

    store: Path
    observations: np.ndarray  # (N, 27) float32, raw
    labels: np.ndarray  # (N,) int64: the action to imitate
    episode: np.ndarray  # (N,) int64: episode position in the store
    episode_ids: list[str]  # per episode position
    starts: np.ndarray  # (E,) first decision of each episode
    lengths: np.ndarray  # (E,) decisions per episode
    episode_meta: list[dict[str, Any]] | None = None  # per episode position (config, rng seed, ...)
    schema_version: int = SCHEMA_VERSION  # of the store's observations (see `require_schema`)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ids)

    def select(self, positions: Sequence[int] | np.ndarray) -> DecisionData:
        """The sub-dataset made of the given episode positions (kept in store order)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        rows = np.concatenate([np.arange(self.starts[p], self.starts[p] + self.lengths[p]) for p in positions]) \
            if len(positions) else np.zeros(0, dtype=np.int64)
        lengths = self.lengths[positions]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(positions) else lengths
        episode = np.repeat(np.arange(len(positions)), lengths)
        metas = [self.episode_meta[p] for p in positions] if self.episode_meta is not None else None
        return DecisionData(self.store, self.observations[rows], self.labels[rows], episode,
                            [self.episode_ids[p] for p in positions], starts, lengths, metas, self.schema_version)

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
        from .contracts import FEATURE_NAMES

        names = ", ".join(FEATURE_NAMES[j] for j in np.nonzero(bad.any(axis=0))[0])
        raise DataError(f"store {store_path}: {int(bad.any(axis=1).sum())} observations contain NaN or inf "
                        f"(features: {names})")
    labels = imitation_labels(cols)
    if ((labels < 0) | (labels >= N_ACTIONS)).any():
        raise DataError(f"store {store_path}: actions outside 0..{N_ACTIONS - 1} ({', '.join(ACTION_NAMES)})")
    episode = np.asarray(cols["episode"], dtype=np.int64)
    order = np.argsort(episode, kind="stable")  # group by episode, keep epoch order within one
    obs, labels, episode = obs[order], labels[order], episode[order]
    lengths = np.bincount(episode, minlength=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = [str(m["id"]) for m in metas]
    return DecisionData(store_path, obs, labels, episode, ids, starts, lengths, metas, version)


def require_schema(data: DecisionData, version: int, what: str) -> None:
    """Refuse to mix observation schemas: `what` (training, a checkpoint) uses `version` only."""
    if data.schema_version != version:
        raise DataError(f"store {data.store} holds {SCHEMA_NAME} v{data.schema_version} observations; "
                        f"{what} uses v{version} (the features' meaning differs): collect a new store")


# ================================================================================ 2. the split
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
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
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


# ================================================================================ 3. normalisation
def fit_normaliser(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training observations (float32).

    A feature constant in training (std ~ 0) gets std 1, so it is only centred: dividing by a
    tiny std would turn a harmless difference at deployment into a huge input.
    """
    x = observations.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


# ================================================================================ 4. class weights
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
        raise DataError(f"--class-weights {spec!r}: expected auto, none, or {N_ACTIONS} non-negative numbers "
                        f"({','.join(a[0] for a in ACTION_NAMES)}), e.g. 1,10,10,50")
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


# ================================================================================ 5. the models
@dataclass(frozen=True)
class Architecture:
    """How to build and train one learned policy type."""

    name: str
    sequence: bool  # True: trained on whole episodes in order (stateful); False: on shuffled decisions
    defaults: dict[str, Any]
    build: Callable[..., nn.Module]
    lr: float = 1e-3  # default Adam learning rate (a training option, not a network hyper-parameter)


class MLPNet(nn.Module):
    """27 -> hidden... -> 4 with ReLU (the seed design: 27 -> 64 -> 32 -> 4). Inputs are normalised."""

    def __init__(self, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        sizes = [N_FEATURES, *hidden, N_ACTIONS]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class GRUNet(nn.Module):
    """A GRU over an episode's normalised observations, one logit vector per epoch.

    (B, T, 27) -> (B, T, 4). Causal: the decision at epoch t sees epochs 0..t only, so running
    the whole episode at once equals deciding live, step by step, with the hidden state carried.
    The head reads the hidden state *and* the current observation ([h_t, x_t] -> head -> 4):
    Tamiyo's rules are mostly sharp thresholds on the current features, which a head with a
    skip connection learns as easily as the MLP, while h_t carries what the history adds.
    `dropout` applies to the GRU outputs h_t fed to the head, in training only (inactive at
    inference, so the live numpy policy needs no change; checkpoints without it load with 0).
    """

    def __init__(self, hidden: int = 64, layers: int = 1, head: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.gru = nn.GRU(N_FEATURES, hidden, num_layers=layers, batch_first=True)
        self.dropout = float(dropout)
        self.head = nn.Sequential(nn.Linear(hidden + N_FEATURES, head), nn.ReLU(), nn.Linear(head, N_ACTIONS))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.gru(x, h)
        if self.training and self.dropout > 0:
            y = F.dropout(y, self.dropout)
        return self.head(torch.cat([y, x], dim=-1)), h


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture("mlp", False, {"hidden": [64, 32], "batch_size": 32},
                        lambda hidden=(64, 32), **_: MLPNet(hidden)),
    # GRU hidden 16: on held-out seeds it generalised better than 64 (which memorises trajectories).
    # One episode per batch, head 64, dropout 0.5 on h_t and lr 3e-3: more (and noisier) updates
    # per epoch; with batches of 4 episodes at lr 1e-3 the GRU was under-trained when early
    # stopping picked its epoch (held-out balanced accuracy 0.97-0.99 instead of >= 0.995).
    "gru": Architecture("gru", True, {"hidden": 16, "layers": 1, "head": 64, "dropout": 0.5, "batch_size": 1},
                        lambda hidden=16, layers=1, head=32, dropout=0.0, **_:
                            GRUNet(int(hidden), int(layers), int(head), float(dropout)),
                        lr=3e-3),
}


def build_net(policy: str, hparams: dict[str, Any]) -> nn.Module:
    """The network of a learned policy type from its hyper-parameters (as stored in a checkpoint),
    in eval mode (no dropout): ready to load the checkpoint's weights and decide."""
    if policy not in ARCHITECTURES:
        raise CheckpointError(f"unknown learned policy type {policy!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[policy].build(**hparams).eval()


# ================================================================================ 6. metrics
def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present in y_true), per-class
    precision/recall/F1/support and the confusion matrix (rows actual, columns predicted).

    `classes_without_support` names the classes absent from y_true: the balanced accuracy is
    then over `balanced_accuracy_classes` only and says nothing about the others (a 1.0 over
    three classes is not a perfect score over four); `balanced_accuracy_label` words it so.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        raise DataError("no decisions to score")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected, not news
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y_true, y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)
    scored = [name for i, name in enumerate(ACTION_NAMES) if s[i] > 0]
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": bal,
        "balanced_accuracy_classes": scored,
        "classes_without_support": [name for i, name in enumerate(ACTION_NAMES) if s[i] == 0],
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, name in enumerate(ACTION_NAMES)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=LABELS).tolist(),
        "labels": list(ACTION_NAMES),
        "n_decisions": int(len(y_true)),
    }


def balanced_accuracy_label(metrics: dict[str, Any], where: str) -> str:
    """How to name `metrics`' balanced accuracy: plainly when every class had support, else e.g.
    "balanced accuracy (3 of 4 classes; no CULL in validation)" (`where` names the decisions)."""
    missing = metrics.get("classes_without_support") or []
    if not missing:
        return "balanced accuracy"
    n_scored = len(metrics.get("labels", ACTION_NAMES)) - len(missing)
    return f"balanced accuracy ({n_scored} of {n_scored + len(missing)} classes; no {'/'.join(missing)} in {where})"


# ================================================================================ 7. evaluation
def select_split(data: DecisionData, split: str, trained: dict[str, Any] | None,
                 policy: str = "policy") -> tuple[np.ndarray, str]:
    """Episode positions of `split` (val | train | all) and a sentence saying what they are.

    `trained` is a checkpoint's `split` record (None for a policy without a checkpoint). "val"
    means every episode of this store the policy was *not* trained on: the checkpoint's own
    validation episodes when this is its training store, all episodes of any other store.
    """
    if split not in ("val", "train", "all"):
        raise DataError(f"--split {split!r}: expected val, train or all")
    everything = np.arange(data.n_episodes)
    if split == "all":
        return everything, f"all {data.n_episodes} episodes of the store"
    if trained is None:
        if split == "train":
            raise DataError(f"--split train: policy '{policy}' has no checkpoint, so no training episodes; "
                            "use --split val or all")
        return everything, (f"all {data.n_episodes} episodes: policy '{policy}' has no checkpoint, "
                            "so none was used in training")
    train_ids = set(trained.get("train_ids", []))
    in_train = np.array([i in train_ids for i in data.episode_ids], dtype=bool)
    if split == "train":
        if not in_train.any():
            raise DataError(f"--split train: no episode of {data.store} was used to train this checkpoint")
        return everything[in_train], f"{int(in_train.sum())} episodes the checkpoint was trained on"
    held = everything[~in_train]
    if len(held) == 0:
        raise DataError(f"every episode of {data.store} was used to train this checkpoint; nothing is held out "
                        "(use --split train or all, or another store)")
    val_ids = set(trained.get("val_ids", []))
    if not in_train.any() and not any(i in val_ids for i in data.episode_ids):
        return held, f"all {len(held)} episodes: this store was not used in training (trained on {trained.get('store')})"
    return held, f"{len(held)} held-out episodes (not used in training; split seed {trained.get('seed')})"


def replay_context(data: DecisionData, position: int, blueprints: tuple[str, ...] = ()) -> Any:
    """The `EpisodeContext` a policy saw (as near as the store tells) while episode `position` ran."""
    from .policy import EpisodeContext

    meta = (data.episode_meta or [{}] * data.n_episodes)[position] or {}
    config = meta.get("config") or {}
    first = data.observations[data.starts[position]] if data.lengths[position] else np.zeros(N_FEATURES)
    return EpisodeContext(task=str(config.get("task", "digits")), max_epochs=int(config.get("epochs", data.lengths[position])),
                          blueprints=tuple(blueprints), n_slots=int(first[-1]),  # all slots free at epoch 0
                          rng_seed=int(meta.get("rng_seed", 0)))


def replay(policy: Any, data: DecisionData, blueprints: tuple[str, ...] = ()) -> np.ndarray:
    """Each stored observation replayed through `policy`: its actions, in flat row order.

    A policy with `decide_episode` (a fast stateful replay) or `decide_batch` (stateless) uses it;
    any other policy is `reset` per episode and asked `decide` for each epoch *in order*, so a
    stateful policy sees exactly what it would have seen live.
    """
    from .contracts import TrainingSnapshot

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


# ================================================================================ 8. training
@dataclass
class TrainConfig:
    """Hyper-parameters of one `train_policy` run (all stored in the checkpoint)."""

    policy: str = "mlp"
    epochs: int = 1000
    lr: float | None = None  # None = the architecture's default (1e-3 MLP, 3e-3 GRU)
    batch_size: int | None = None  # decisions (MLP) or episodes (GRU); None = the architecture's default
    hidden: Any = None  # MLP: list of sizes; GRU: one size; None = default (64/32, 16)
    layers: int | None = None  # GRU layers
    seed: int = 0
    val_fraction: float = 0.2
    class_weights: str = "auto"
    patience: int = 100  # stop after this many epochs without a better validation score
    allow_missing_classes: bool = False


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_balanced_accuracy: float
    best_epoch: int
    best_balanced_accuracy: float


@dataclass
class Tensors:
    """One side of the split as tensors: flat (MLP) or padded episodes (GRU)."""

    x: torch.Tensor
    y: torch.Tensor
    rows: np.ndarray | None = None  # GRU: (B, T) row index into the flat data, -1 for padding


def to_tensors(data: DecisionData, mean: np.ndarray, std: np.ndarray, sequence: bool) -> Tensors:
    """Normalise once, up front; a sequence model gets episodes padded to the longest one."""
    x = torch.from_numpy((data.observations - mean) / std)
    y = torch.from_numpy(data.labels)
    if not sequence:
        return Tensors(x, y)
    t_max = int(data.lengths.max()) if len(data.lengths) else 0
    rows = np.full((data.n_episodes, t_max), -1, dtype=np.int64)
    for e, (s, n) in enumerate(zip(data.starts, data.lengths)):
        rows[e, :n] = np.arange(s, s + n)
    idx = torch.from_numpy(np.maximum(rows, 0))
    pad = torch.from_numpy(rows < 0)
    xs = x[idx].masked_fill(pad[..., None], 0.0)
    ys = y[idx].masked_fill(pad, IGNORE)
    return Tensors(xs, ys, rows)


def logits_of(model: nn.Module, x: torch.Tensor, sequence: bool) -> torch.Tensor:
    return model(x)[0] if sequence else model(x)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           zero_weights: bool = True) -> torch.Tensor:
    """Class-weighted mean cross-entropy (padding ignored) that is 0, not NaN, on a batch whose
    every label has weight 0 (torch's mean divides by the batch's total weight: 0/0 there).

    `zero_weights=False` promises every weight is positive: torch's own mean is then safe, and
    about twice as fast on the small batches of the training loop.
    """
    if not zero_weights:
        return F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE)
    total = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, reduction="sum")
    norm = weight[y[y != IGNORE]].sum()
    return total / norm if norm > 0 else total * 0.0


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Tensors, weight: torch.Tensor,
                    batch_size: int, gen: torch.Generator, sequence: bool) -> float:
    """One pass over shuffled mini-batches (of decisions, or of whole episodes for a GRU)."""
    model.train()
    perm = torch.randperm(len(data.x), generator=gen)
    total, count = 0.0, 0
    zero_weights = bool((weight == 0).any())
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        logits = logits_of(model, data.x[idx], sequence)
        loss = weighted_cross_entropy(logits.reshape(-1, N_ACTIONS), data.y[idx].reshape(-1), weight, zero_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / max(count, 1)


@torch.inference_mode()
def predict(model: nn.Module, data: Tensors, weight: torch.Tensor, sequence: bool) -> tuple[np.ndarray, float]:
    """(predicted actions in flat row order, weighted loss) for one side of the split."""
    model.eval()
    logits = logits_of(model, data.x, sequence).reshape(-1, N_ACTIONS)
    y = data.y.reshape(-1)
    loss = float(weighted_cross_entropy(logits, y, weight))
    pred = logits.argmax(dim=1).numpy()
    if sequence:  # drop the padding, back to flat row order
        keep = data.rows.reshape(-1) >= 0
        pred_flat = np.empty(int(keep.sum()), dtype=np.int64)
        pred_flat[data.rows.reshape(-1)[keep]] = pred[keep]
        pred = pred_flat
    return pred, loss


def _hparams(cfg: TrainConfig, arch: Architecture) -> dict[str, Any]:
    hp = dict(arch.defaults)
    if cfg.hidden is not None:
        hp["hidden"] = list(cfg.hidden) if arch.name == "mlp" else int(cfg.hidden if not isinstance(cfg.hidden, (list, tuple)) else cfg.hidden[0])
    if cfg.layers is not None and "layers" in hp:
        hp["layers"] = int(cfg.layers)
    if cfg.batch_size is not None:
        hp["batch_size"] = int(cfg.batch_size)
    return hp


@dataclass
class Prepared:
    """Everything training needs, checked before any epoch runs (so bad input fails fast)."""

    cfg: TrainConfig
    arch: Architecture
    hparams: dict[str, Any]
    out: Path
    data: DecisionData
    train: DecisionData
    val: DecisionData
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray


def prepare_training(
    store_path: str | Path,
    policy: str = "mlp",
    *,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Prepared:
    """Load and check the store, split it by episode, fit the normaliser and the class weights.

    `options` are `TrainConfig` fields. Raises `DataError` (one line) for any bad input.
    """
    cfg = TrainConfig(policy=policy, **options)
    if policy not in ARCHITECTURES:
        raise DataError(f"--policy {policy!r}: no learned policy of that type (trainable: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[policy]
    hp = _hparams(cfg, arch)
    if cfg.lr is None:
        cfg.lr = arch.lr
    if cfg.epochs < 1 or hp["batch_size"] < 1 or not cfg.lr > 0:
        raise DataError("--epochs, the batch size and the learning rate must be positive")
    weight_spec = parse_class_weights(cfg.class_weights)
    out_path = Path(out) if out is not None else default_checkpoint_path(policy)
    check_writable_checkpoint(out_path)  # before any work: never train for a file we may not write

    data = load_decisions(store_path)
    require_schema(data, SCHEMA_VERSION, "simic train")
    missing = [ACTION_NAMES[c] for c in LABELS if not (data.labels == c).any()]
    if missing and not cfg.allow_missing_classes:
        raise DataError(f"store {data.store} has no {'/'.join(missing)} decisions, so the policy could never learn "
                        f"{'it' if len(missing) == 1 else 'them'}; collect more episodes (or allow missing classes)")
    train_pos, val_pos = split_episodes(data.n_episodes, cfg.val_fraction, cfg.seed,
                                        rarest_action_per_episode(data), classes_per_episode(data))
    train, val = data.select(train_pos), data.select(val_pos)
    absent = [ACTION_NAMES[c] for c in LABELS if (data.labels == c).any() and not (train.labels == c).any()]
    if absent and log is not None:
        log(f"no {'/'.join(absent)} decision fell in the training episodes (split seed {cfg.seed}); "
            "it cannot be learned from this split")
    unscored = [ACTION_NAMES[c] for c in LABELS if (data.labels == c).any() and not (val.labels == c).any()]
    if unscored and log is not None:
        log(f"no {'/'.join(unscored)} decision is in the validation episodes (it occurs in too few episodes); "
            f"validation balanced accuracy covers {len(np.unique(val.labels))} of {N_ACTIONS} classes")
    mean, std = fit_normaliser(train.observations)  # training episodes only: no peeking at val
    weights = class_weights(train.labels, weight_spec)
    present = np.unique(train.labels)
    if not (weights[present] > 0).any():
        raise DataError(f"--class-weights {cfg.class_weights}: every class in the training episodes "
                        f"({'/'.join(ACTION_NAMES[c] for c in present)}) has weight 0, so the loss is "
                        "identically zero and nothing can be learned")
    if log is not None and (weights[present] == 0).any():
        log(f"--class-weights {cfg.class_weights}: {'/'.join(ACTION_NAMES[c] for c in present if weights[c] == 0)} "
            "get weight 0, so the policy is not trained to predict them")
    return Prepared(cfg, arch, hp, out_path, data, train, val, mean, std, weights)


def train_policy(
    store_path: str | Path,
    policy: str = "mlp",
    *,
    out: str | Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> tuple[Path, dict[str, Any]]:
    """Behaviour-clone `policy` ("mlp" | "gru") on a store; write its checkpoint; return (path, metrics).

    `options` are `TrainConfig` fields (epochs, lr, seed, val_fraction, class_weights, hidden, ...).
    Without `out` the checkpoint goes to `default_checkpoint_path(policy)`. Nothing is written
    unless training succeeded. Raises `DataError` / `CheckpointError` with one-line messages.
    """
    return fit(prepare_training(store_path, policy, out=out, log=log, **options), on_epoch)


def fit(prep: Prepared, on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """The training loop on prepared data; writes the checkpoint of the best epoch."""
    cfg, arch, hp, train, val = prep.cfg, prep.arch, prep.hparams, prep.train, prep.val
    weights, mean, std = prep.weights, prep.mean, prep.std
    weight_t = torch.from_numpy(weights)
    tr = to_tensors(train, mean, std, arch.sequence)  # normalised once, up front
    va = to_tensors(val, mean, std, arch.sequence)

    # -- model and optimiser, seeded: same store + seed + config = same checkpoint (on CPU)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = arch.build(**hp)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    # -- the loop: keep the epoch with the best validation balanced accuracy (ties: lower val loss)
    history: list[dict[str, float]] = []
    best_key, best_epoch, best_state = (-1.0, 0.0), 0, None
    interrupted = False
    started = time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            train_loss = train_one_epoch(model, opt, tr, weight_t, hp["batch_size"], gen, arch.sequence)
            if not math.isfinite(train_loss):
                raise DataError(f"training diverged at epoch {epoch} (loss {train_loss}); try a lower learning rate")
            pred, val_loss = predict(model, va, weight_t, arch.sequence)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bal = float(balanced_accuracy_score(val.labels, pred))
            acc = float((pred == val.labels).mean())
            key = (round(bal, 9), -val_loss)
            if key > best_key:
                best_key, best_epoch = key, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "val_accuracy": acc, "val_balanced_accuracy": bal})
            if on_epoch is not None:
                on_epoch(EpochStats(epoch, train_loss, val_loss, acc, bal, best_epoch, best_key[0]))
            if epoch - best_epoch >= cfg.patience:
                break
    except KeyboardInterrupt:
        if best_state is None:
            raise
        interrupted = True  # keep the work done so far: the best epoch yet is saved below
    seconds = time.perf_counter() - started
    assert best_state is not None
    model.load_state_dict(best_state)

    # -- final metrics of the kept epoch, then the checkpoint (written only now, atomically)
    train_pred, _ = predict(model, tr, weight_t, arch.sequence)
    val_pred, _ = predict(model, va, weight_t, arch.sequence)
    metrics = {
        "train": classification_metrics(train.labels, train_pred),
        "val": classification_metrics(val.labels, val_pred),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "interrupted": interrupted,
        "seconds": seconds,
        "decisions_per_second": len(history) * len(train.labels) / max(seconds, 1e-9),
    }
    meta = {
        "policy": arch.name,
        "hparams": hp,
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("hidden", "layers", "batch_size")},
        "normalisation": {"kind": "standardise", "fitted_on": "train episodes",
                          "mean": mean.tolist(), "std": std.tolist()},
        "split": {"by": "episode", "stratified_by": "rarest action", "seed": cfg.seed,
                  "val_fraction": cfg.val_fraction, "store": str(prep.data.store),
                  "train_ids": list(train.episode_ids), "val_ids": list(val.episode_ids),
                  # [task, run seed, index, rng seed] of every train and val episode: `simic compare`
                  # keeps its episodes off these (same rng seed = same host init and data order).
                  "episodes": [[m["config"]["task"], int(m["seed"]), int(m["index"]), int(m["rng_seed"])]
                               for m in (train.episode_meta or []) + (val.episode_meta or [])]},
        "class_weights": {"spec": cfg.class_weights, "values": weights.tolist(), "labels": list(ACTION_NAMES),
                          "train_counts": np.bincount(train.labels, minlength=N_ACTIONS).tolist()},
        "metrics": metrics,
        "history": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = save_checkpoint(prep.out, dict(model.state_dict()), meta)
    return path, {**metrics, "checkpoint": str(path), "n_train_episodes": train.n_episodes,
                  "n_val_episodes": val.n_episodes, "class_weights": weights.tolist()}


__all__ = [
    "ARCHITECTURES", "DataError", "DecisionData", "EpochStats", "GRUNet", "MLPNet", "TrainConfig",
    "Prepared", "balanced_accuracy_label", "build_net", "class_weights", "classes_per_episode",
    "classification_metrics", "cover_classes", "fit", "fit_normaliser",
    "imitation_labels", "load_decisions", "parse_class_weights", "prepare_training", "replay",
    "select_split", "split_episodes", "train_policy",
]
