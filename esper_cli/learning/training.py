"""Simic policy learning: behaviour cloning of a Tamiyo policy from an episode store.

Reads top to bottom, like the training loop it is:

1. `load_decisions`   - every decision of a store in a few columnar reads, grouped by episode.
2. `split_episodes`   - a seeded train/validation split *by episode* (never by decision: decisions
                         of one episode are correlated, so a per-decision split leaks); every
                         class in two or more episodes gets one on each side.
3. `fit_normaliser`   - feature mean/std and range (`fit_range`) fitted on the training episodes
                         only; every other observation is clipped to that range first.
4. `class_weights`    - sklearn's balanced weights (WAIT is ~94% of decisions).
5. `train_policy`     - Adam + weighted cross-entropy on shuffled mini-batches (MLP) or whole
                         episodes in order (GRU), plus a group lasso over the input layer's
                         per-feature weights (`feature_group_lasso`); the epoch with the lowest
                         weighted validation loss is kept and saved as a safetensors checkpoint.
                         With `objective="outcome"` the labels are the actions taken and each
                         decision's loss is scaled by its advantage weight (`offline.py`, AWR).
6. `classification_metrics` - accuracy, balanced accuracy, per-class P/R/F1, confusion matrix,
                         and the classes without support (a score that leaves them out says so).

`train_policy(store, TrainConfig("mlp", epochs=...)) -> (checkpoint_path, metrics)` is the reusable
entry point (DAgger loops call it); `simic train` is a thin CLI around it. A `TrainConfig` is
frozen and typed: a misspelt option fails where it is written, and no reader changes it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from ..checkpoint import check_writable_checkpoint, save_checkpoint
from ..contracts import (
    ACTION_NAMES,
    FEATURE_NAMES,
    N_ACTIONS,
    N_FEATURES,
    SCHEMA_VERSION,
    TASK_DEPENDENT_FEATURES,
    EpisodeRef,
)
from ..data.decisions import (
    DataError,
    DecisionData,
    classes_per_episode,
    load_decisions,
    rarest_action_per_episode,
    require_one_engine,
    require_schema,
    split_episodes,
)
from ..data.preprocess import class_weights, fit_normaliser, fit_range, ignore_features, parse_class_weights
from ..paths import default_checkpoint_path
from ..plugins import Registry, build_registry
from ..trainable import TrainablePolicy, network_hparams
from .metrics import LABELS, classification_metrics
from .offline import (
    AWR,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_TEMPERATURE,
    advantage_weights,
    check_awr_options,
    explored,
    load_outcomes,
)

IGNORE = -100  # label of padded time steps in a batch of episodes (ignored by the loss)
SELECTIONS = ("loss", "balanced_accuracy")
OBJECTIVES = ("bc", "outcome")
#: Class weights of `objective="outcome"` when none are given. AWR's target is
#: mu(a|s) exp(A/T): balancing the classes on top pushes every rare action (CULL, exploratory
#: GERMINATEs) up whatever its advantage, which on held-out seeds only widened the spread.
OUTCOME_CLASS_WEIGHTS = "none"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one `train_policy` run (all stored in the checkpoint).

    Frozen: `prepare_training` resolves the defaults left as None into a new config (the one the
    checkpoint records) and never changes the caller's."""

    policy: str = "mlp"
    epochs: int = 1000
    lr: float | None = None  # None = the trainable policy's default (1e-3 MLP, 3e-3 GRU)
    batch_size: int | None = None  # decisions, or episodes for a sequence network; None = its default
    hidden: Any = None  # MLP: list of sizes; GRU: one size; None = default (64/32, 16)
    layers: int | None = None  # GRU layers
    seed: int = 0
    val_fraction: float = 0.2
    class_weights: str | None = None  # None = "auto" for bc, OUTCOME_CLASS_WEIGHTS for outcome
    patience: int | None = None  # stop after this many epochs without a lower validation loss; None = never
    allow_missing_classes: bool = False
    objective: str = "bc"  # "bc": imitate the labels; "outcome": advantage-weighted regression
    temperature: float = DEFAULT_TEMPERATURE  # outcome: AWR temperature, in accuracy points
    max_weight: float = DEFAULT_MAX_WEIGHT  # outcome: cap on a decision's AWR weight
    feature_penalty: float | None = None  # group lasso on the input weights; None = the trainable's default
    select: str = "loss"  # the kept epoch: lowest weighted val "loss", or highest "balanced_accuracy"
    clip_inputs: bool = True  # clip validation and deployment inputs to the training range
    ignore_features: tuple[str, ...] = TASK_DEPENDENT_FEATURES  # pinned to 0 in the input (`ignore_features`)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_balanced_accuracy: float
    best_epoch: int
    best_balanced_accuracy: float
    best_val_loss: float = math.nan  # the kept epoch's validation loss (outcome keeps the lowest)
    val_recall: tuple[float | None, ...] = ()  # per action (WAIT..CULL); None where validation holds none


def class_recalls(labels: np.ndarray, pred: np.ndarray) -> tuple[float | None, ...]:
    """Recall of every action on one split, None for an action the split holds no example of."""
    return tuple(float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(N_ACTIONS))


@dataclass
class Tensors:
    """One side of the split as tensors: flat (MLP) or padded episodes (GRU)."""

    x: torch.Tensor
    y: torch.Tensor
    rows: np.ndarray | None = None  # GRU: (B, T) row index into the flat data, -1 for padding
    w: torch.Tensor | None = None  # per-decision loss weights (outcome learning); None = all 1


def to_tensors(data: DecisionData, mean: np.ndarray, std: np.ndarray, sequence: bool,
               sample_weights: np.ndarray | None = None,
               bounds: tuple[np.ndarray, np.ndarray] | None = None) -> Tensors:
    """Clip to `bounds` (the training range) and normalise once, up front; a sequence model gets
    episodes padded to the longest one."""
    obs = data.observations if bounds is None else np.clip(data.observations, *bounds)
    x = torch.from_numpy((obs - mean) / std)
    y = torch.from_numpy(data.labels)
    if not sequence:
        return Tensors(x, y, w=None if sample_weights is None else torch.from_numpy(sample_weights))
    if sample_weights is not None:
        raise ValueError("per-decision weights are not supported for sequence networks")
    t_max = int(data.lengths.max()) if len(data.lengths) else 0
    rows = np.full((data.n_episodes, t_max), -1, dtype=np.int64)
    for e, (s, n) in enumerate(zip(data.starts, data.lengths)):
        rows[e, :n] = np.arange(s, s + n)
    idx = torch.from_numpy(np.maximum(rows, 0))
    pad = torch.from_numpy(rows < 0)
    xs = x[idx].masked_fill(pad[..., None], 0.0)
    ys = y[idx].masked_fill(pad, IGNORE)
    return Tensors(xs, ys, rows)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           zero_weights: bool = True, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted mean cross-entropy (padding ignored) that is 0, not NaN, on a batch whose
    every label has weight 0 (torch's mean divides by the batch's total weight: 0/0 there).

    `zero_weights=False` promises every weight is positive: torch's own mean is then safe, and
    about twice as fast on the small batches of the training loop.

    `sample_weight` (one per row, flat inputs only) multiplies each row's class weight: the mean
    is then sum(c_y * s * CE) / sum(c_y * s), as torch weighs its class-weighted mean.
    """
    if sample_weight is not None:
        per_row = weight[y] * sample_weight
        total = (F.cross_entropy(logits, y, reduction="none") * per_row).sum()
        norm = per_row.sum()
        return total / norm if norm > 0 else total * 0.0
    if not zero_weights:
        return F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE)
    total = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, reduction="sum")
    norm = weight[y[y != IGNORE]].sum()
    return total / norm if norm > 0 else total * 0.0


def feature_group_lasso(weight: torch.Tensor) -> torch.Tensor:
    """Sum over the observation features of the L2 norm of each feature's input weights (a column
    of `weight`, shape (out, 27)): the group lasso (Yuan & Lin, 2006).

    It drives a feature's whole column toward zero unless the labels need it. Tamiyo's rules read a
    few features; a network that also leans on the others (accuracy levels, loss history) follows
    them off the training range, e.g. in an episode whose host never learns, and misplaces its
    thresholds on another seed's states. The inputs are standardised, so one penalty fits all.
    """
    return weight.norm(dim=0).sum()


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Tensors, weight: torch.Tensor,
                    batch_size: int, gen: torch.Generator, input_weight: torch.Tensor | None = None,
                    feature_penalty: float = 0.0) -> float:
    """One pass over shuffled mini-batches (of decisions, or of whole episodes for a GRU); returns the
    mean cross-entropy (the feature penalty is minimised with it but not part of the figure)."""
    model.train()
    perm = torch.randperm(len(data.x), generator=gen)
    total, count = 0.0, 0
    zero_weights = bool((weight == 0).any())
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        logits = model(data.x[idx])
        sample_weight = None if data.w is None else data.w[idx]
        loss = weighted_cross_entropy(logits.reshape(-1, N_ACTIONS), data.y[idx].reshape(-1), weight, zero_weights,
                                      sample_weight)
        penalised = loss + feature_penalty * feature_group_lasso(input_weight) if feature_penalty else loss
        opt.zero_grad(set_to_none=True)
        penalised.backward()
        opt.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / max(count, 1)


@torch.inference_mode()
def predict(model: nn.Module, data: Tensors, weight: torch.Tensor, sequence: bool) -> tuple[np.ndarray, float]:
    """(predicted actions in flat row order, weighted loss) for one side of the split."""
    model.eval()
    logits = model(data.x).reshape(-1, N_ACTIONS)
    y = data.y.reshape(-1)
    loss = float(weighted_cross_entropy(logits, y, weight, sample_weight=data.w))
    pred = logits.argmax(dim=1).numpy()
    if sequence:  # drop the padding, back to flat row order
        keep = data.rows.reshape(-1) >= 0
        pred_flat = np.empty(int(keep.sum()), dtype=np.int64)
        pred_flat[data.rows.reshape(-1)[keep]] = pred[keep]
        pred = pred_flat
    return pred, loss


def trainable_policy(name: str, registry: Registry | None = None) -> TrainablePolicy:
    """The registered `TrainablePolicy` of `name` (and a policy of that name to decide with its
    checkpoints), or a one-line `DataError` naming the trainable ones."""
    reg = registry or build_registry()
    trainable = reg.trainables.get(name)
    if trainable is None and name not in reg.policies:
        missing = reg.unknown("policy", name)
        if missing.startswith("policy unavailable"):  # a plugin that failed to load is recognisably why
            raise DataError(f"policy {name!r} cannot be trained: {missing}")
    if trainable is None or name not in reg.policies:
        known = ", ".join(n for n in sorted(reg.trainables) if n in reg.policies) or "none"
        why = "no plugin registers it as trainable" if trainable is None else "no policy of that name decides with it"
        raise DataError(f"policy {name!r} cannot be trained: {why} (trainable: {known})")
    return trainable


def build_network(name: str, hparams: dict[str, Any], registry: Registry | None = None) -> nn.Module:
    """The network of trainable policy `name` from its hyper-parameters (as a checkpoint stores
    them), in eval mode: ready to load the checkpoint's weights."""
    return trainable_policy(name, registry).network(**network_options(hparams)).eval()


def network_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters a network is built from (the batch size is the training loop's)."""
    return network_hparams(hparams)


def _hparams(cfg: TrainConfig, trainable: TrainablePolicy) -> dict[str, Any]:
    """The network's hyper-parameters: its defaults, with the run's overrides where it has the key."""
    hp = dict(trainable.defaults)
    if cfg.hidden is not None and "hidden" in hp:
        sizes = [int(h) for h in (cfg.hidden if isinstance(cfg.hidden, (list, tuple)) else [cfg.hidden])]
        hp["hidden"] = sizes if isinstance(hp["hidden"], (list, tuple)) else sizes[0]
    if cfg.layers is not None and "layers" in hp:
        hp["layers"] = int(cfg.layers)
    if cfg.batch_size is not None:
        hp["batch_size"] = int(cfg.batch_size)
    hp.setdefault("batch_size", 32)
    return hp


@dataclass
class Prepared:
    """Everything training needs, checked before any epoch runs (so bad input fails fast)."""

    cfg: TrainConfig
    trainable: TrainablePolicy
    hparams: dict[str, Any]
    out: Path
    data: DecisionData
    train: DecisionData
    val: DecisionData
    mean: np.ndarray
    std: np.ndarray
    bounds: tuple[np.ndarray, np.ndarray] | None  # the training episodes' range of each feature (None: no clipping)
    weights: np.ndarray
    awr: AWR | None = None  # objective "outcome": per-decision advantage weights of each side


def check_feature_penalty(cfg: TrainConfig, trainable: TrainablePolicy) -> float:
    """The feature penalty (None = the policy's default), refused in one line naming
    --feature-penalty when negative or for a network that names no input weight."""
    penalty = cfg.feature_penalty
    if penalty is None:
        penalty = trainable.feature_penalty if trainable.input_weight else 0.0
    if not (math.isfinite(penalty) and penalty >= 0):
        raise DataError(f"feature penalty {penalty}: expected a finite number >= 0", option="feature_penalty")
    if penalty > 0 and not trainable.input_weight:
        raise DataError(f"policy {cfg.policy!r} names no input weight to penalise (TrainablePolicy.input_weight); "
                        "train it with a feature penalty of 0", option="feature_penalty")
    return penalty


def input_weight(model: nn.Module, name: str | None, policy: str) -> torch.Tensor | None:
    """The parameter `name` of `model`, checked to read the 27 features (None without a name)."""
    if not name:
        return None
    param = dict(model.named_parameters()).get(name)
    if param is None or param.dim() != 2 or param.shape[1] != N_FEATURES:
        raise DataError(f"policy {policy!r}: its input weight {name!r} is not a (out, {N_FEATURES}) parameter of "
                        "its network", option="feature_penalty")
    return param


def input_feature_norms(weight: torch.Tensor, ignored: tuple[str, ...] = ()) -> dict[str, float]:
    """Each feature's input-weight norm (its column's L2 norm), largest first: which features the
    trained policy reads. An ignored feature (always 0 at the input) reads nothing: 0."""
    norms = weight.detach().norm(dim=0).tolist()
    norms = [0.0 if name in ignored else n for name, n in zip(FEATURE_NAMES, norms)]
    return dict(sorted(zip(FEATURE_NAMES, norms), key=lambda kv: -kv[1]))


def features_read(norms: dict[str, float], share: float = 0.1) -> list[str]:
    """The features whose input-weight norm is at least `share` of the largest, largest first."""
    top = max(norms.values(), default=0.0)
    return [name for name, n in norms.items() if top > 0 and n >= share * top]


def check_objective(cfg: TrainConfig, trainable: TrainablePolicy) -> None:
    """Refuse (one line, naming --objective) an unknown objective or outcome learning of a
    sequence network (its per-decision weights would have to follow the episode padding)."""
    if cfg.objective not in OBJECTIVES:
        raise DataError(f"unknown objective {cfg.objective!r} (choose {' or '.join(OBJECTIVES)})", option="objective")
    if cfg.objective == "outcome":
        if trainable.sequence:
            raise DataError(f"outcome learning supports non-sequence policies (e.g. mlp); {cfg.policy!r} is a "
                            "sequence policy: train it with --objective bc", option="objective")
        check_awr_options(cfg.temperature, cfg.max_weight)


def resolve_config(config: TrainConfig, trainable: TrainablePolicy, batch_size: int) -> TrainConfig:
    """`config` with its None defaults resolved for `trainable` (learning rate, feature penalty,
    class weights), checked with the network's `batch_size`; raises `DataError` (one line) for a
    value that cannot train."""
    lr = trainable.lr if config.lr is None else config.lr
    if config.epochs < 1 or batch_size < 1 or not lr > 0 or (config.patience is not None and config.patience < 1):
        raise DataError("the training epochs, the batch size, the learning rate and the patience must be positive")
    check_objective(config, trainable)
    penalty = check_feature_penalty(config, trainable)
    if config.select not in SELECTIONS:
        raise DataError(f"unknown selection {config.select!r} (choose {' or '.join(SELECTIONS)})")
    weights = config.class_weights
    if weights is None:
        weights = OUTCOME_CLASS_WEIGHTS if config.objective == "outcome" else "auto"
    return replace(config, lr=lr, feature_penalty=penalty, class_weights=weights)


def prepare_training(
    store_path: str | Path,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    registry: Registry | None = None,
) -> Prepared:
    """Load and check the store, split it by episode, fit the normaliser and the class weights.

    `config.policy` is looked up among the registered trainable policies of `registry` (default:
    every loaded plugin); `config` itself is left as given (`Prepared.cfg` is the resolved copy).
    Raises `DataError` (one line) for any bad input.
    """
    config = config or TrainConfig()
    trainable = trainable_policy(config.policy, registry)
    hp = _hparams(config, trainable)
    cfg = resolve_config(config, trainable, hp["batch_size"])
    outcome = cfg.objective == "outcome"
    weight_spec = parse_class_weights(cfg.class_weights)
    out_path = Path(out) if out is not None else default_checkpoint_path(cfg.policy)
    check_writable_checkpoint(out_path)  # before any work: never train for a file we may not write

    data = load_decisions(store_path)
    require_schema(data, SCHEMA_VERSION, "simic train")
    require_one_engine(data, "simic train")
    if outcome:  # learn from what was done and how it turned out, not from expert labels
        outcomes = load_outcomes(data)
        data = replace(data, labels=outcomes.actions)
        if not explored(outcomes.behaviour_prob) and log is not None:
            log(f"store {data.store} has no exploration (every behaviour probability is 1 or unknown): outcome "
                "learning needs actions that vary; collect with `simic collect --explore 0.2`")
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
    bounds = fit_range(train.observations) if cfg.clip_inputs else None
    mean, std, bounds = ignore_features(mean, std, bounds, tuple(cfg.ignore_features))
    weights = class_weights(train.labels, weight_spec)
    present = np.unique(train.labels)
    if not (weights[present] > 0).any():
        raise DataError(f"class weights {cfg.class_weights}: every class in the training episodes "
                        f"({'/'.join(ACTION_NAMES[c] for c in present)}) has weight 0, so the loss is "
                        "identically zero and nothing can be learned", option="class_weights")
    if log is not None and (weights[present] == 0).any():
        log(f"class weights {cfg.class_weights}: {'/'.join(ACTION_NAMES[c] for c in present if weights[c] == 0)} "
            "get weight 0, so the policy is not trained to predict them")
    awr = advantage_weights(data, outcomes, train_pos, val_pos, mean, std, seed=cfg.seed,
                            temperature=cfg.temperature, max_weight=cfg.max_weight) if outcome else None
    return Prepared(cfg, trainable, hp, out_path, data, train, val, mean, std, bounds, weights, awr)


def train_policy(
    store_path: str | Path,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    log: Callable[[str], None] | None = None,
    registry: Registry | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train the trainable `config.policy` (mlp, gru, or a plugin's) on a store, by behaviour
    cloning or outcome learning as `config.objective` says; write its checkpoint; return
    (path, metrics).

    `config` defaults to `TrainConfig()` (mlp, bc). Without `out` the checkpoint goes to
    `default_checkpoint_path(config.policy)`. Nothing is written unless training succeeded.
    Raises `DataError` / `CheckpointError` with one-line messages.
    """
    return fit(prepare_training(store_path, config, out=out, log=log, registry=registry), on_epoch)


@dataclass
class Trained:
    """What the epoch loop kept: the best epoch's weights and score, and every epoch's figures."""

    state: dict[str, torch.Tensor]
    epoch: int
    val_loss: float
    history: list[dict[str, float]]
    interrupted: bool
    seconds: float


def run_epochs(prep: Prepared, model: nn.Module, tr: Tensors, va: Tensors, weight_t: torch.Tensor,
               inputs: torch.Tensor | None, on_epoch: Callable[[EpochStats], None] | None) -> Trained:
    """Train epoch after epoch, keeping the best (Ctrl-C keeps the best so far, once there is one)."""
    cfg, val, sequence = prep.cfg, prep.val, prep.trainable.sequence
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Keep the epoch with the lowest (class- or advantage-) weighted validation loss, ties to the
    # better balanced accuracy (select="loss"). The validation split is a few episodes with a
    # handful of CULLs: its balanced accuracy moves in steps of one decision and reaches 1.0 long
    # before the model has settled, while the weighted loss is its smooth counterpart.
    history: list[dict[str, float]] = []
    best_key, best_epoch, best_state = (-math.inf, 0.0), 0, None
    best_val_loss, best_bal = math.nan, 0.0
    interrupted = False
    started = time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            train_loss = train_one_epoch(model, opt, tr, weight_t, prep.hparams["batch_size"], gen, inputs,
                                         cfg.feature_penalty or 0.0)
            if not math.isfinite(train_loss):
                raise DataError(f"training diverged at epoch {epoch} (loss {train_loss}); try a lower learning rate")
            pred, val_loss = predict(model, va, weight_t, sequence)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bal = float(balanced_accuracy_score(val.labels, pred))
            acc = float((pred == val.labels).mean())
            key = (-val_loss, round(bal, 9)) if cfg.select == "loss" else (round(bal, 9), -val_loss)
            if key > best_key:
                best_key, best_epoch, best_val_loss, best_bal = key, epoch, val_loss, bal
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "val_accuracy": acc, "val_balanced_accuracy": bal})
            if on_epoch is not None:
                on_epoch(EpochStats(epoch, train_loss, val_loss, acc, bal, best_epoch, best_bal, best_val_loss,
                                    class_recalls(val.labels, pred)))
            if cfg.patience is not None and epoch - best_epoch >= cfg.patience:
                break
    except KeyboardInterrupt:
        if best_state is None:
            raise
        interrupted = True  # keep the work done so far: the best epoch yet is saved
    assert best_state is not None
    return Trained(best_state, best_epoch, best_val_loss, history, interrupted, time.perf_counter() - started)


def checkpoint_meta(prep: Prepared, metrics: dict[str, Any], history: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint records besides its weights: the run's config, the normaliser, the split
    (so `simic compare` can keep off its episodes), the class weights, metrics and history."""
    cfg, train, val, bounds = prep.cfg, prep.train, prep.val, prep.bounds
    meta = {
        "policy": cfg.policy,
        "objective": cfg.objective,
        "hparams": prep.hparams,
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("hidden", "layers", "batch_size")},
        "normalisation": {"kind": "standardise" if bounds is None else "clip to [low, high], then standardise",
                          "fitted_on": "train episodes", "mean": prep.mean.tolist(), "std": prep.std.tolist(),
                          "ignored": list(cfg.ignore_features),
                          **({} if bounds is None else {"low": bounds[0].tolist(), "high": bounds[1].tolist()})},
        "split": {"by": "episode", "stratified_by": "rarest action", "seed": cfg.seed,
                  "val_fraction": cfg.val_fraction, "store": str(prep.data.store),
                  "train_ids": list(train.episode_ids), "val_ids": list(val.episode_ids),
                  # Every train and val episode: `simic compare` keeps its episodes off these
                  # (same rng seed = same host init and data order).
                  "episodes": [EpisodeRef(m["config"]["task"], int(m["seed"]), int(m["index"]), int(m["rng_seed"]))
                               for m in (train.episode_meta or []) + (val.episode_meta or [])]},
        "class_weights": {"spec": cfg.class_weights, "values": prep.weights.tolist(), "labels": list(ACTION_NAMES),
                          "train_counts": np.bincount(train.labels, minlength=N_ACTIONS).tolist()},
        "metrics": metrics,
        "history": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if prep.awr is not None:
        # Exploration took invalid actions only as no-ops; their advantages say nothing, so the
        # policy that decides from this checkpoint never picks one (the mlp plugin reads this).
        meta["mask_invalid"] = True
        meta["outcome"] = prep.awr.summary
    return meta


def fit(prep: Prepared, on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """The training loop on prepared data; writes the checkpoint of the best epoch."""
    cfg, train, val, awr = prep.cfg, prep.train, prep.val, prep.awr
    sequence = prep.trainable.sequence
    weight_t = torch.from_numpy(prep.weights)
    # Validation sees what deployment sees: observations clipped to the training range.
    tr = to_tensors(train, prep.mean, prep.std, sequence, None if awr is None else awr.train_weights, prep.bounds)
    va = to_tensors(val, prep.mean, prep.std, sequence, None if awr is None else awr.val_weights, prep.bounds)

    # Seeded: same store + seed + config = same checkpoint (on CPU).
    torch.manual_seed(cfg.seed)
    model = prep.trainable.network(**network_options(prep.hparams))
    inputs = input_weight(model, prep.trainable.input_weight, cfg.policy)
    trained = run_epochs(prep, model, tr, va, weight_t, inputs, on_epoch)
    model.load_state_dict(trained.state)

    # Final metrics of the kept epoch, then the checkpoint (written only now, atomically).
    train_pred, _ = predict(model, tr, weight_t, sequence)
    val_pred, _ = predict(model, va, weight_t, sequence)
    metrics = {
        "train": classification_metrics(train.labels, train_pred),
        "val": classification_metrics(val.labels, val_pred),
        "best_epoch": trained.epoch,
        "epochs_run": len(trained.history),
        "interrupted": trained.interrupted,
        "seconds": trained.seconds,
        "decisions_per_second": len(trained.history) * len(train.labels) / max(trained.seconds, 1e-9),
        "objective": cfg.objective,
        "feature_penalty": cfg.feature_penalty,
    }
    if inputs is not None:
        metrics["input_feature_norms"] = input_feature_norms(inputs, tuple(cfg.ignore_features))
    if awr is not None:  # the kept epoch's score, and how the advantages were made
        metrics["val_weighted_loss"] = trained.val_loss
        metrics["outcome"] = awr.summary
    path = save_checkpoint(prep.out, dict(model.state_dict()), checkpoint_meta(prep, metrics, trained.history))
    return path, {**metrics, "checkpoint": str(path), "n_train_episodes": train.n_episodes,
                  "n_val_episodes": val.n_episodes, "class_weights": prep.weights.tolist()}
