"""Leyline: the data contracts every part of Simic shares.

Observation (`TrainingSnapshot`), actions, seed stages, decisions, outcomes and episodes live here
and nowhere else, so the environment, the policies, the store and the CLI agree by construction.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

#: Bumped whenever the observation's features change meaning, order or count. Stored in every
#: episode store and every checkpoint so a mismatch is a clear error instead of silent garbage.
#: v2 (same names and order as v1): `seed_improvement` is the seed's own measured worth; in v1 it
#: was val accuracy now minus at the start of the seed's stage (the host's drift, in TRAINING).
SCHEMA_VERSION = 2
SCHEMA_NAME = "tamiyo-snapshot"
#: Schema versions this build still reads (`simic info`, `simic eval` of a policy without a
#: checkpoint). Training, checkpoints and appending use SCHEMA_VERSION only: never mixed.
READABLE_SCHEMA_VERSIONS = (1, 2)
#: The engine that trains an episode's host, part of every episode's identity. 1: one host per
#: process, `torch.optim.Adam` (stores before the batched engine); 2: the fused engine
#: (`simulation.engine`), whose float sums differ from 1's in the last bits. Only the current
#: engine can run episodes; episodes of two engines are never mixed in a store or training set.
ENGINE_VERSION = 2

HISTORY_LEN = 5

#: Losses are clamped into [0, LOSS_CAP] and a non-finite loss (a diverged run) is mapped to
#: LOSS_CAP at the environment boundary: the store never holds NaN or inf.
LOSS_CAP = 1.0e4


class Action(enum.IntEnum):
    """What Tamiyo can do at each epoch."""

    WAIT = 0
    GERMINATE = 1
    ADVANCE = 2
    CULL = 3


ACTION_NAMES: tuple[str, ...] = tuple(a.name for a in Action)
N_ACTIONS = len(Action)


class SeedStage(enum.IntEnum):
    """Kasmina lifecycle stage of a slot's seed (DORMANT = empty slot)."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    FOSSILIZED = 4
    CULLED = 5


#: Stages in which a seed is "active", i.e. still managed by Tamiyo.
ACTIVE_STAGES = frozenset({SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING})


def _feature(meaning: str, decode: Callable[[float], Any] = float, length: int = 1) -> Any:
    """A TrainingSnapshot field: what it means (schema v2), how a stored float decodes back, and
    how many vector entries it fills (the histories fill HISTORY_LEN)."""
    return field(metadata={"meaning": meaning, "decode": decode, "length": length})


@dataclass(frozen=True)
class TrainingSnapshot:
    """The 27-feature observation Tamiyo sees after each epoch: the one definition of the vector.

    The field order is the vector order; each field's metadata says what it means in schema v2
    (collected in `FEATURE_MEANINGS`). Accuracies are in percent (0-100) of the validation split,
    losses are mean cross-entropy; "the seed" is the managed seed (the slot whose seed is
    GERMINATED, TRAINING or BLENDING), if any.
    """

    epoch: int = _feature("epochs trained so far (0 = the untrained host)", int)
    global_step: int = _feature("optimizer steps taken so far", int)
    train_loss: float = _feature("mean training loss of the last epoch (clamped to [0, LOSS_CAP])")
    val_loss: float = _feature("validation loss after the last epoch (clamped to [0, LOSS_CAP])")
    loss_delta: float = _feature("previous val_loss minus val_loss (positive = better)")
    train_accuracy: float = _feature("training accuracy of the last epoch (running, in train mode)")
    val_accuracy: float = _feature("validation accuracy after the last epoch")
    accuracy_delta: float = _feature("val_accuracy minus the previous epoch's")
    plateau_epochs: int = _feature("consecutive epochs whose accuracy gain was under the plateau threshold", int)
    best_val_accuracy: float = _feature("best val_accuracy so far")
    best_val_loss: float = _feature("best val_loss so far")
    loss_history_5: tuple[float, ...] = _feature(
        "val_loss {ago}", length=HISTORY_LEN)
    accuracy_history_5: tuple[float, ...] = _feature(
        "val_accuracy {ago}", length=HISTORY_LEN)
    has_active_seed: bool = _feature("1 if a seed is GERMINATED, TRAINING or BLENDING, else 0", bool)
    seed_stage: SeedStage = _feature("the seed's SeedStage code (DORMANT = 0 without one)",
                                     lambda x: SeedStage(int(x)))
    seed_epochs_in_stage: int = _feature("epochs the seed has trained in its current stage", int)
    seed_alpha: float = _feature("the seed's blending weight (0 until BLENDING, ramps to 1)")
    seed_improvement: float = _feature(
        "the seed's own measured worth, in points, on the validation split after the last epoch. "
        "TRAINING: accuracy through the isolated probe (the seed at full strength on the detached host) "
        "minus the host's. BLENDING: accuracy at the current alpha minus at alpha 0 (its counterfactual "
        "contribution). GERMINATED or no seed: 0")
    available_slots: int = _feature("empty (DORMANT) slots a GERMINATE could use", int)

    def to_vector(self) -> np.ndarray:
        """The raw float32 vector in `FEATURE_NAMES` order; raises on any non-finite value."""
        values: list[float] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.metadata["length"] > 1:
                if len(v) != f.metadata["length"]:
                    raise ValueError(f"{f.name} must have {f.metadata['length']} values, got {len(v)}")
                values.extend(float(x) for x in v)
            else:
                values.append(float(v))
        vec = np.asarray(values, dtype=np.float32)
        check_finite(vec, "observation")
        return vec

    @classmethod
    def from_vector(cls, vec: np.ndarray | list[float]) -> TrainingSnapshot:
        """Inverse of `to_vector` (used to replay stored observations through a policy)."""
        v = [float(x) for x in np.asarray(vec, dtype=np.float64).reshape(-1)]
        if len(v) != N_FEATURES:
            raise ValueError(f"observation must have {N_FEATURES} features, got {len(v)}")
        kwargs: dict[str, Any] = {}
        at = 0
        for f in fields(cls):
            n, decode = f.metadata["length"], f.metadata["decode"]
            kwargs[f.name] = tuple(decode(x) for x in v[at: at + n]) if n > 1 else decode(v[at])
            at += n
        return cls(**kwargs)


def _feature_meanings() -> dict[str, str]:
    """Feature name -> meaning, in vector order, from the TrainingSnapshot fields."""
    out: dict[str, str] = {}
    for f in fields(TrainingSnapshot):
        n, meaning = f.metadata["length"], f.metadata["meaning"]
        if n == 1:
            out[f.name] = meaning
        else:  # loss_history_5 -> loss_history_0..4
            stem = f.name.rsplit("_", 1)[0]
            # Oldest first; the last entry is the current value.
            ago = [f"{n - 1 - i} epoch(s) ago (epoch 0's while fewer have passed)" for i in range(n - 1)] + ["now"]
            out.update({f"{stem}_{i}": meaning.format(ago=ago[i]) for i in range(n)})
    return out


#: What every feature means in schema v2, in vector order: the one place it is written (above).
FEATURE_MEANINGS: dict[str, str] = _feature_meanings()
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_MEANINGS)
N_FEATURES = len(FEATURE_NAMES)

#: Features whose scale is set by the task rather than by the state of training: `global_step`
#: is epochs times the steps per epoch (the training set's size over the batch size), so 300 means
#: epoch 9 on digits and epoch 50 on a quarter of it. Learned policies are trained with these
#: pinned to 0 (`TrainConfig.ignore_features`), so one learned on one task reads another's states
#: on the same scale; `epoch` says the same thing task-independently.
TASK_DEPENDENT_FEATURES: tuple[str, ...] = ("global_step",)


def feature_table() -> str:
    """The features as a Markdown table (index, name, meaning), in vector order: what
    docs/plugins.md shows between its `features` markers, so the docs cannot drift from the code.
    `python -m esper_cli.contracts` prints it."""
    cell = {name: meaning.replace("|", r"\|") for name, meaning in FEATURE_MEANINGS.items()}
    rows = [f"| {i} | `{name}` | {cell[name]} |" for i, name in enumerate(FEATURE_NAMES)]
    return "\n".join(["| # | feature | meaning |", "|---|---|---|", *rows])


def check_finite(array: np.ndarray, what: str) -> None:
    """Reject NaN/inf at a boundary with a message naming the offending feature(s)."""
    bad = ~np.isfinite(array)
    if bad.any():
        cols = np.nonzero(bad.reshape(-1, array.shape[-1]).any(axis=0))[0] if array.ndim else []
        names = [FEATURE_NAMES[i] for i in cols if array.shape[-1] == N_FEATURES]
        detail = f" (features: {', '.join(names)})" if names else ""
        raise ValueError(f"{what} contains NaN or inf{detail}")


def sanitize_loss(value: float) -> float:
    """Documented boundary rule: clamp a loss into [0, LOSS_CAP]; NaN/inf become LOSS_CAP."""
    if not math.isfinite(value):
        return LOSS_CAP
    return min(max(value, 0.0), LOSS_CAP)


@dataclass(frozen=True)
class Decision:
    """A policy's answer: the action, optionally a blueprint for GERMINATE, and why."""

    action: Action
    reason: str = ""
    confidence: float = 1.0
    blueprint: str | None = None
    #: A policy that samples its action says from what: the probability of every action (in
    #: `Action` order) it drew from. None: the action is a deterministic function of the state.
    #: The store's behaviour probabilities (off-policy learning) are computed from it.
    probabilities: tuple[float, ...] | None = None

    def action_probabilities(self) -> np.ndarray:
        """The distribution the action was drawn from: `probabilities`, else one-hot on `action`."""
        if self.probabilities is None:
            p = np.zeros(N_ACTIONS)
            p[int(self.action)] = 1.0
            return p
        return np.asarray(self.probabilities, dtype=np.float64)


@dataclass(frozen=True)
class Outcome:
    """What the action caused, measured at the end of the epoch *after* it took effect."""

    accuracy_change: float  # val accuracy after the next epoch minus val accuracy at decision time
    loss_change: float  # val loss at decision time minus val loss after (positive = better)
    val_accuracy: float  # val accuracy after the next epoch
    seed_alive: bool  # an active or fossilized seed exists after the step
    stage_after: SeedStage  # the managed slot's stage after the step
    reward: float  # accuracy_change minus a small penalty for an invalid action


@dataclass(frozen=True)
class DecisionRecord:
    """One decision point: observation at epoch t, the action taken, its outcome."""

    observation: np.ndarray  # float32 (27,)
    action: Action  # the action the acting policy chose (applied or attempted)
    valid: bool  # False: the action was invalid in that state and was a recorded no-op
    confidence: float
    reason: str
    blueprint: str | None  # the blueprint germinated, when the action germinated one
    outcome: Outcome
    expert_action: int = -1  # the expert's label where one was asked for (DAgger); -1 = none
    #: The probability the behaviour policy (the acting policy, mixed with an expert and with
    #: exploration where set) gave the action taken; None = unknown (stores written before it).
    behaviour_prob: float | None = None


@dataclass
class SeedLifecycle:
    """Everything that happened to one seed: blueprint, slot, stages with epochs, fate."""

    seed_id: int
    blueprint: str
    slot: int
    stages: list[tuple[str, int]] = field(default_factory=list)  # (stage name, epoch entered)
    fate: str = "active"  # fossilized | culled | active (still active when the episode ended)
    #: Its measured worth (points): fossilized or still blending at the end, val accuracy at its
    #: alpha minus at alpha 0 after the last epoch; culled, the `seed_improvement` last measured
    #: before the cull (the probe's edge over the host in TRAINING); None if never measured.
    contribution: float | None = None
    #: Its module's parameter count (what a task's growth cost charges); None in older stores.
    params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.params is None:  # seeds stored before the count was kept read back unchanged
            d.pop("params")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedLifecycle:
        d = dict(d)
        d["stages"] = [tuple(s) for s in d.get("stages", [])]
        return cls(**d)


def growth_charge(cost: float, seeds: Sequence[SeedLifecycle]) -> float:
    """The price, in accuracy points, of the seeds a network holds (every seed not culled) at
    `cost` points per 1,000 parameters (`EpisodeConfig.growth_cost`)."""
    if cost == 0.0:
        return 0.0
    return cost * sum(s.params or 0 for s in seeds if s.fate != "culled") / 1000.0


def engine_of(config: Mapping[str, Any]) -> int:
    """The engine of an episode config as stored (`EpisodeConfig.to_dict`): a config written
    before the engine had a version (or of engine 1, whose keys leave it out) is engine 1's."""
    return int(config.get("engine", 1))


def engines_text(versions: Iterable[int]) -> str:
    """'engine 1' or 'engines 1 and 2': some engine versions in words (ascending, no repeats)."""
    found = sorted({int(v) for v in versions})
    if len(found) == 1:
        return f"engine {found[0]}"
    return f"engines {', '.join(map(str, found[:-1]))} and {found[-1]}"


@dataclass(frozen=True)
class EpisodeConfig:
    """The knobs that define an episode; together with (seed, index, policy) they reproduce it."""

    task: str = "digits"
    epochs: int = 25
    device: str = "cpu"
    data_dir: str | None = None
    #: Tuned with the digits host (tasks.py) so that growth pays and the heuristic gets to it:
    #: 34 steps per epoch let the narrow host reach its plateau by epoch 3-8 and give a seed's
    #: isolated probe enough steps per epoch to show its worth; lr 0.01 keeps the 2-channel first
    #: stage alive (a larger step can switch every ReLU off: a host stuck at chance for the whole
    #: episode); a gain under 1 point (under four of 359 validation images) is a
    #: plateau epoch; blending ramps over 3 epochs.
    batch_size: int = 32
    lr: float = 0.01
    plateau_threshold: float = 1.0
    blending_epochs: int = 3
    embargo_epochs: int = 2
    invalid_action_penalty: float = 0.1
    #: GERMINATE without a named blueprint takes the next of these (the built-ins, in order),
    #: starting at a point drawn from the episode's seed; part of the episode's identity, so
    #: installing a plugin blueprint never changes old runs.
    rotation: tuple[str, ...] = ("conv_enhance", "attention", "norm", "depthwise", "pool_mixer")
    #: DAgger (Ross et al., 2011): the expert policy asked for a label at every decision, and the
    #: probability `beta` that the expert's action is the one applied (else the learner's). Part of
    #: the episode's identity; when `expert` is None both are left out of `to_dict` and `key`, so
    #: plain runs keep the keys they always had.
    expert: str | None = None
    beta: float = 0.0
    #: Exploration: the probability that a uniformly drawn valid action replaces the driving
    #: policy's (from the episode's seed). Part of the episode's identity only when set (> 0).
    explore: float = 0.0
    #: The engine that trains the episode (`ENGINE_VERSION`); a config read without one is 1's.
    engine: int = ENGINE_VERSION
    #: A price on growth: accuracy points per 1,000 seed parameters the network holds, charged in
    #: the reward when a seed is germinated and refunded when it is culled, so an episode's return
    #: is the accuracy it gained minus the price of what it kept (`Episode.growth_charge`). Set by
    #: a task (`Task.episode_defaults`) or by hand; part of the identity only when set (> 0).
    growth_cost: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be between 0 and 1, got {self.beta}")
        if self.expert is None and self.beta != 0.0:
            raise ValueError("beta mixes in an expert's actions: set expert too")
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"explore must be between 0 and 1, got {self.explore}")
        if not (math.isfinite(self.growth_cost) and self.growth_cost >= 0.0):
            raise ValueError(f"growth_cost must be a finite number >= 0, got {self.growth_cost}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rotation"] = list(self.rotation)
        if self.expert is None:
            d.pop("expert")
            d.pop("beta")
        if self.explore == 0.0:
            d.pop("explore")
        if self.engine == 1:  # the first engine's episodes keep the keys they were stored with
            d.pop("engine")
        if self.growth_cost == 0.0:
            d.pop("growth_cost")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeConfig:
        d = dict(d)
        if "rotation" in d:
            d["rotation"] = tuple(d["rotation"])
        d["engine"] = engine_of(d)
        return cls(**d)

    def key(self, policy: str) -> str:
        """A short digest of what makes episodes comparable; part of an episode's identity.

        The device and data location are excluded: they change where an episode runs, not what it
        is, so an interrupted CPU run can be completed on another machine.
        """
        d = self.to_dict()
        d.pop("device")
        d.pop("data_dir")
        d["policy"] = policy
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: The largest run seed (and episode index): the store keeps both as signed 64-bit integers, so a
#: larger one would only fail once its first episode had run, when the episode is committed.
MAX_SEED = 2**63 - 1


def episode_rng_seed(seed: int, index: int) -> int:
    """The RNG seed of episode `index` of a run seeded `seed`: independent of worker and order."""
    if not (0 <= seed <= MAX_SEED and 0 <= index <= MAX_SEED):
        raise ValueError(f"run seed {seed} / episode index {index} outside 0..{MAX_SEED}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


class RngStream(enum.IntEnum):
    """The streams of an episode's rng seed: `SeedSequence([rng_seed, stream, ...])`.

    Each random choice of an episode draws from its own stream, so adding a draw to one part never
    shifts another's, and paired runs of different policies share the environment's streams. The
    numbers are part of every stored episode's identity: never renumber, only append.
    """

    HOST_WEIGHTS = 0  # the host network's initial weights
    SEED_WEIGHTS = 1  # a germinated seed's initial weights (with the seed's id)
    DATA_ORDER = 2  # the training batches' order (with the epoch)
    DAGGER_COIN = 3  # DAgger's mixture: whether the expert's action is applied
    ROTATION_START = 4  # where the blueprint rotation starts
    RANDOM_POLICY = 5  # the `random` baseline's draws
    EXPLORATION = 6  # collect's exploration draws (epsilon, uniform valid action)
    POLICY_SAMPLING = 7  # a learned policy sampling its action (with its draw number)


class EpisodeRef(NamedTuple):
    """Which episode: what a checkpoint's split record lists per episode it was trained or
    validated on. A tuple, so it serialises to the JSON list `[task, seed, index, rng_seed]`
    that checkpoints have always held, and such a list reads back with `EpisodeRef.parse`."""

    task: str
    seed: int  # the run's seed
    index: int
    rng_seed: int

    @classmethod
    def parse(cls, item: Any) -> EpisodeRef:
        """An `EpisodeRef` from its JSON form (a 4-item list), with the types checked."""
        task, seed, index, rng_seed = item
        return cls(str(task), int(seed), int(index), int(rng_seed))


@dataclass
class Episode:
    """A complete morphogenetic training run driven by one policy."""

    seed: int  # the run's seed (collect --seed)
    index: int  # position in the run; (config key, seed, index) identifies an episode
    rng_seed: int  # the derived seed every random choice of this episode used
    config: EpisodeConfig
    policy: str
    policy_version: str
    decisions: list[DecisionRecord]
    final_accuracy: float
    best_accuracy: float
    test_accuracy: float
    seeds: list[SeedLifecycle]
    expert: str | None = None
    #: The observation after the last epoch (float32, N_FEATURES): with the decisions' observations
    #: the N+1 an offline-RL dataset needs. None where unknown (stores written before it).
    final_observation: np.ndarray | None = None
    #: Transient, never stored: shadow-mode observers' actions at each decision (name -> actions).
    shadow: dict[str, list[int]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.config.key(self.policy)

    @property
    def ref(self) -> EpisodeRef:
        return EpisodeRef(self.config.task, self.seed, self.index, self.rng_seed)

    @property
    def id(self) -> str:
        return f"{self.policy}-{self.config.task}-s{self.seed}-i{self.index}-{self.key[:8]}"

    @property
    def seeds_created(self) -> int:
        return len(self.seeds)

    @property
    def seeds_fossilized(self) -> int:
        return sum(s.fate == "fossilized" for s in self.seeds)

    @property
    def seeds_culled(self) -> int:
        return sum(s.fate == "culled" for s in self.seeds)

    @property
    def growth_charge(self) -> float:
        """What the episode's growth cost charged, in accuracy points: the price of the seeds its
        network holds at the end (0 on a task without a growth cost)."""
        return growth_charge(self.config.growth_cost, self.seeds)

    @property
    def final_score(self) -> float:
        """Final validation accuracy net of the growth charge (the accuracy without a cost)."""
        return self.final_accuracy - self.growth_charge

    @property
    def test_score(self) -> float:
        """Test accuracy net of the growth charge: the honest score on a task that prices growth."""
        return self.test_accuracy - self.growth_charge

    def action_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTION_NAMES, 0)
        for d in self.decisions:
            counts[Action(d.action).name] += 1
        return counts


if __name__ == "__main__":
    print(feature_table())
