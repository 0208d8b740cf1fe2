"""Online improvement of a learned Tamiyo: PPO on its own live episodes (`simic improve`).

Behaviour cloning copies a rule (`expert`); this fine-tunes the copy toward what the episodes reward:
each decision's reward is the validation accuracy it gained over the next epoch, so an episode's
return is the accuracy the controller added by its end. The loop, one update at a time:

1. `collect`  - the current policy, sampling its actions (`mlp` or `gru` with `sample=True`), drives
                `episodes_per_update` new episodes through the episode runner (this process,
                worker processes or Ray), `group` draws on each new seed; each decision records
                the probability of its action.
2. `batch`    - observations (normalised as the checkpoint says), actions, those probabilities,
                returns-to-go (undiscounted: the objective is the accuracy at the end).
3. `ppo_update` - advantages relative to the other draws on the same seed (`make_batch`; a
                learned state-value baseline when `group` is 1); PPO's clipped surrogate
                (Schulman et al., 2017) with an entropy bonus, a few epochs of minibatches; then the
                baseline is regressed on the returns.
4. the kept policy is chosen on the run's own validation seeds (`select_episodes` of them: episode
   indices from `VALIDATION_INDEX` on, never trained on and no evaluation's): after the first
   update and every `select_every`-th, the greedy policy drives them, and the one with the best
   mean final score (validation accuracy, net of any growth charge) so far is kept. Every
   candidate runs the same seeds, so the comparison is paired, and the start is a candidate, so a
   run never keeps a policy its own seeds say is worse. With `select_episodes` 0, the running mean
   return over the last `window` updates picks it instead (noisier: each update runs new seeds).
   The kept checkpoint is written to `out` (so Ctrl-C keeps it), an ordinary `mlp` (or `gru`)
   checkpoint.
5. the run state is saved beside `out` (`ppo_state`): the same run, killed at any moment,
   continues from its last completed update to the same checkpoint.

A recurrent policy (`gru`) is trained on whole episodes: each minibatch is a few episodes, run
through the network from their first epoch with the hidden state carried, and the backward pass
goes through the whole episode (truncated nowhere); the clipped surrogate is the same per decision.

The first update is different: the start policy (behaviour cloning of a deterministic expert) is
too sure of itself to explore, so its episodes only train the baseline and calibrate a softened
start (`soften`: its logits scaled to a target entropy, every greedy decision unchanged).

Written here rather than taken from a library: the environment is the episode runner (parallel,
reproducible, already crash-safe) and one update is a few dozen lines; Stable-Baselines3 would
need its own vectorised env and owns the network, so the result would not be a Simic checkpoint.

Reproducible per seed: episode k of a run is episode `bootstrap + k` of run seed `seed` (so it is
the same episode on any worker), its action draws come from its own seed, and the updates are
seeded; 1 worker, N workers and Ray give the same checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ..contracts import Action, Episode, EpisodeConfig
from ..data.decisions import DataError
from ..data.store import EpisodeWriter
from ..plugins import Registry
from ..policy import policy_version, valid_action_mask
from ..running.collection import CollectConfig, collect_episodes
from ..running.runner import DEFAULT_ENVS_PER_WORKER, BaseRunner, EpisodeJob, make_runner
from ..running.threads import use_threads
from ..running.weights import Weights
from .offline import returns_to_go, value_network
from .ppo_state import Saved, check_state, restore_state, save_state
from .training import TrainConfig, build_network, train_policy


@dataclass(frozen=True)
class ImproveConfig:
    """One `simic improve` run (every field is recorded in the checkpoint)."""

    episode: EpisodeConfig
    out: Path
    start: Path | None = None  # a checkpoint of `policy` to fine-tune; None: behaviour-clone `expert` first
    #: 384 live episodes: with the bootstrap's 50 and 4 candidates of 16 validation episodes, 498.
    episodes: int = 384  # live episodes for PPO (the bootstrap's and the validation's come on top)
    episodes_per_update: int = 32
    group: int = 4  # draws per seed within an update (1: every episode its own seed, a learned baseline)
    seed: int = 0  # run seed of every episode this run collects
    bootstrap_episodes: int = 50  # expert episodes behaviour cloning starts from (without `start`)
    bootstrap_store: Path | None = None  # where they are kept (default: next to `out`)
    #: The rule the bootstrap clones: `eager` (grow into every free slot at once) starts the run's
    #: own validation seeds about 3 points of final accuracy above the heuristic's clone.
    expert: str = "eager"
    lr: float = 1e-3
    value_lr: float = 1e-3
    clip: float = 0.2
    update_epochs: int = 4
    minibatch: int = 128
    entropy: float = 0.01
    explore: float = 0.0  # epsilon of uniform valid actions mixed into the sampling policy
    init_entropy: float = 0.3  # nats: the start policy's logits are scaled to this mean entropy (0: as is)
    window: int = 3  # updates in the running mean return that picks the best policy (select_episodes 0)
    select_episodes: int = 16  # greedy episodes on the run's validation seeds per candidate (0: running mean)
    select_every: int = 4  # a candidate after the first update and every this many
    credit: str = "episode"  # group advantage of a decision: its episode's return ("episode") or its return-to-go ("to-go")
    #: An `mlp` learns which blueprint a GERMINATE grows too (`MLPNet.blueprint_logits`, over the
    #: rotation's blueprints), trained with its actions: a GERMINATE's probability is the action's
    #: times the blueprint's. Its logits start equal: the rotation, as before.
    learn_blueprint: bool = True
    workers: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    threads: int = 1
    envs_per_worker: int = DEFAULT_ENVS_PER_WORKER
    policy: str = "mlp"  # the trainable policy fine-tuned: "mlp", or "gru" (sequence PPO)

    def __post_init__(self) -> None:
        # Each update runs whole groups: a count that is not a multiple of `group` would be rounded
        # up to one, silently spending more episodes than asked for.
        for option, value in (("episodes_per_update", self.episodes_per_update), ("episodes", self.episodes)):
            if value < 1 or value % self.group:
                raise DataError(f"{value} is not a positive multiple of the group ({self.group} draws per seed)",
                                option=option)
        if self.credit not in CREDITS:
            raise DataError(f"credit {self.credit!r}: expected one of {', '.join(CREDITS)}", option="credit")
        if self.select_episodes < 0 or self.select_every < 1:
            raise DataError(f"select_episodes {self.select_episodes} / select_every {self.select_every}: expected "
                            ">= 0 and >= 1", option="select_episodes" if self.select_episodes < 0 else "select_every")

    @property
    def updates(self) -> int:
        return math.ceil(self.episodes / self.episodes_per_update)

    @property
    def seeds_per_update(self) -> int:
        return self.episodes_per_update // self.group

    @property
    def selections(self) -> list[int]:
        """The updates after which the policy is a candidate (evaluated on the validation seeds)."""
        if not self.select_episodes:
            return []
        return sorted({0, self.updates - 1, *range(self.select_every - 1, self.updates, self.select_every)})

    @property
    def episodes_total(self) -> int:
        """Every environment episode the run uses: bootstrap, updates and validation."""
        boot = 0 if self.start is not None else self.bootstrap_episodes
        return boot + self.episodes + self.select_episodes * len(self.selections)

    def bootstrap_path(self) -> Path:
        return self.bootstrap_store or self.out.with_name(f"{self.out.stem}.bootstrap.h5")

    def bootstrap_checkpoint(self) -> Path:
        """Where the bootstrap's behaviour-cloned start is written (next to `out`)."""
        return self.out.with_name(f"{self.out.stem}.bc{self.out.suffix}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["episode"] = self.episode.to_dict()
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


#: How a group's draws are credited (`make_batch`).
CREDITS = ("episode", "to-go")

#: The first episode index of a run's validation seeds (the kept policy is chosen on them): far
#: above any index the bootstrap or the updates reach.
VALIDATION_INDEX = 1 << 40


def _nothing(*_: Any) -> None:
    return None


@dataclass
class ImproveProgress:
    """What `improve` reports as it works; every callback does nothing unless given."""

    on_stage: Callable[[str, int], None] = _nothing  # a stage begins: its description, its planned steps
    on_episode: Callable[[Episode], None] = _nothing  # one episode of the stage finished
    on_update: Callable[[dict[str, Any]], None] = _nothing  # an update finished: its row of the curve
    log: Callable[[str], None] = _nothing


@dataclass
class ImproveResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_update: int = -1
    episodes_used: int = 0  # every environment episode: bootstrap + live
    bootstrap_episodes: int = 0
    temperature: float = 1.0  # the start policy's logits were divided by this (`soften`)
    interrupted: bool = False
    seconds: float = 0.0  # wall time of this process (a resumed run's own part)
    resumed_from: int | None = None  # the first update this process ran, when it resumed a saved run
    state_bytes: int = 0  # size of the last run state written


# ================================================================================ networks
class ValueNet(nn.Module):
    """State-value baseline: normalised observation (B, 27) -> expected return-to-go (B,).

    Returns-to-go span tens of points (the host's own learning dominates early epochs), so the
    network predicts them standardised: V = shift + scale * net(x), with shift and scale the mean
    and std of the first batch's returns, fixed from then on.
    """

    def __init__(self, shift: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.net = value_network()
        self.shift, self.scale = float(shift), float(max(scale, 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift + self.scale * self.net(x).squeeze(-1)


# ================================================================================ 1-2. episodes -> batch
@dataclass
class Batch:
    obs: torch.Tensor  # (N, 27) normalised
    mask: torch.Tensor  # (N, 4) valid actions
    actions: torch.Tensor  # (N,)
    logp_old: torch.Tensor  # (N,) log of the behaviour probability of the action taken
    returns: torch.Tensor  # (N,) return-to-go
    advantages: torch.Tensor | None = None  # (N,) group-relative, when episodes share their seeds
    lengths: torch.Tensor | None = None  # (E,) decisions per episode, in the batch's order
    blueprints: torch.Tensor | None = None  # (N,) the blueprint the policy drew (its index), -1 elsewhere

    def episode_rows(self, episodes: torch.Tensor) -> torch.Tensor:
        """The decision rows of `episodes` (indices into `lengths`), one row per episode padded
        with -1 to the longest: (k, T), what a sequence network runs on."""
        assert self.lengths is not None
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        t = torch.arange(int(self.lengths[episodes].max()) if len(episodes) else 0)
        rows = starts[episodes, None] + t[None, :]
        return torch.where(t[None, :] < self.lengths[episodes, None], rows, torch.full_like(rows, -1))


def policy_logits(policy: nn.Module, obs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (M, 4), their decision rows (M,)) for the decisions `rows` names: flat rows (M,)
    for a feed-forward policy; padded episodes (k, T) (`Batch.episode_rows`) for a sequence one,
    each run from its first epoch so the hidden state at every decision is the one it acted with."""
    if rows.dim() == 1:
        return policy(obs[rows]), rows
    keep = rows >= 0
    return policy(obs[rows.clamp_min(0)])[keep], rows[keep]


def minibatches(batch: Batch, size: int, gen: torch.Generator, sequence: bool) -> list[torch.Tensor]:
    """One epoch's minibatches, shuffled: `size` decisions each, or for a sequence policy whole
    episodes, as many as make about `size` decisions (at least one)."""
    if not sequence:
        perm = torch.randperm(len(batch.actions), generator=gen)
        return [perm[i : i + size] for i in range(0, len(perm), size)]
    assert batch.lengths is not None
    per = max(1, size // max(int(batch.lengths.max()), 1))
    order = torch.randperm(len(batch.lengths), generator=gen)
    return [batch.episode_rows(order[i : i + per]) for i in range(0, len(order), per)]


def every_decision(batch: Batch, sequence: bool) -> torch.Tensor:
    """All of the batch's decisions, as `policy_logits` takes them."""
    if not sequence:
        return torch.arange(len(batch.actions))
    assert batch.lengths is not None
    return batch.episode_rows(torch.arange(len(batch.lengths)))


#: An episode with its draw: which of the policy's draws on its seed (episode index) it is.
Drawn = tuple[int, Episode]


def in_draw_order(drawn: Sequence[Drawn]) -> list[Episode]:
    """The episodes in (index, draw) order: sums over them do not depend on the workers."""
    return [ep for _, ep in sorted(drawn, key=lambda d: (d[1].index, d[0]))]


def make_batch(drawn: Sequence[Drawn], mean: np.ndarray, std: np.ndarray,
               bounds: tuple[np.ndarray, np.ndarray] | None = None, credit: str = "episode",
               blueprints: Sequence[str] = ()) -> Batch:
    """Every decision of the `drawn` episodes, in (index, draw) order so the batch is worker-independent.
    Observations are clipped to `bounds` (the start checkpoint's input range, as the policy that
    acted clipped them) and normalised.

    Episodes that share an index (a seed: the same initial weights and data order) form a group;
    with groups, each decision's advantage is its episode's return minus the mean return of its
    group. What the seed alone decides (an easy or a hard start) cancels out, and what is left is
    the effect of the policy's own draws: far less noise than against a learned baseline.

    `credit="to-go"` credits a decision at epoch t with its episode's return from t on minus the
    group's mean return from t on (the draws of a group share the seed, so they reach epoch t
    together): what a draw did before t, and the luck of the epochs before it, are not charged
    to the decisions after them.

    With `blueprints` (the policy's blueprint choices), each GERMINATE the policy drew and carried
    out records which of them it grew (`Batch.blueprints`); an explored one came from the rotation,
    not from the policy, and is left out.
    """
    ordered = in_draw_order(drawn)
    decisions = [d for ep in ordered for d in ep.decisions]
    rewards = np.array([d.outcome.reward for d in decisions], dtype=np.float64)
    lengths = np.array([len(ep.decisions) for ep in ordered], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    returns = returns_to_go(rewards, starts, lengths)
    totals_a = returns[starts] if len(rewards) else np.zeros(len(ordered))
    groups_a = np.array([ep.index for ep in ordered])
    raw = [d.observation for d in decisions]
    actions = [int(d.action) for d in decisions]
    probs = [d.behaviour_prob if d.behaviour_prob is not None else 1.0 for d in decisions]
    advantages = None
    if len(np.unique(groups_a)) < len(groups_a):
        if credit == "to-go":
            relative = _to_go_relative(returns, starts, lengths, groups_a)
        else:
            relative = np.repeat(totals_a - np.array([totals_a[groups_a == g].mean() for g in groups_a]), lengths)
        advantages = torch.from_numpy(relative.astype(np.float32))
    grown = [blueprints.index(d.blueprint) if d.blueprint in blueprints and d.valid and d.action == Action.GERMINATE
             and not d.reason.startswith("explore") else -1 for d in decisions]
    x = np.asarray(raw, dtype=np.float32)
    seen = x if bounds is None else np.clip(x, *bounds)
    return Batch(obs=torch.from_numpy(((seen - mean) / std).astype(np.float32)),
                 mask=torch.from_numpy(valid_action_mask(x)),
                 actions=torch.tensor(actions, dtype=torch.int64),
                 logp_old=torch.log(torch.tensor(probs, dtype=torch.float32).clamp_min(1e-8)),
                 returns=torch.from_numpy(returns.astype(np.float32)),
                 advantages=advantages, lengths=torch.from_numpy(lengths),
                 blueprints=torch.tensor(grown, dtype=torch.int64) if blueprints else None)


def _to_go_relative(returns: np.ndarray, starts: np.ndarray, lengths: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each decision's return-to-go minus the mean return-to-go of its group's draws at the same
    epoch (a draw shorter than t leaves that mean)."""
    out = np.empty_like(returns)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        t_max = int(lengths[members].max())
        table = np.full((len(members), t_max), np.nan)
        for row, e in enumerate(members):
            table[row, : lengths[e]] = returns[starts[e] : starts[e] + lengths[e]]
        mean = np.nanmean(table, axis=0)
        for row, e in enumerate(members):
            out[starts[e] : starts[e] + lengths[e]] = table[row, : lengths[e]] - mean[: lengths[e]]
    return out


# ================================================================================ the start policy
def mean_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of the masked policy whose logits are `logits`, divided by `temperature`."""
    logp = masked_log_probs(logits, mask, temperature)
    return float(-(logp.exp() * logp).sum(-1).mean())


def soften(policy: nn.Module, batch: Batch, target: float, sequence: bool = False) -> float:
    """Divide the policy's logits by the temperature that gives it `target` mean entropy on `obs`
    (by bisection; 1 if it is already that uncertain); returns the temperature.

    Behaviour cloning of a deterministic expert ends with huge logit gaps: sampled as it is, the
    policy never tries anything else and PPO has no signal. Scaling the last layer keeps every
    greedy decision as it was while the sampled ones explore.
    """
    with torch.no_grad():  # one forward pass: the bisection only rescales these logits
        logits, rows = policy_logits(policy, batch.obs, every_decision(batch, sequence))
    mask = batch.mask[rows]

    def entropy(temperature: float) -> float:
        return mean_entropy(logits, mask, temperature)

    if target <= 0 or entropy(1.0) >= target:
        return 1.0
    lo, hi = 1.0, 2.0
    while entropy(hi) < target and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(mid) < target else (lo, mid)
    last = [m for m in policy.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.div_(hi)
        last.bias.div_(hi)
    return hi


# ================================================================================ 3. the update
def masked_log_probs(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(. | s) over the valid actions only (an invalid action has probability 0), with the
    logits divided by `temperature`."""
    return F.log_softmax((logits / temperature).masked_fill(~mask, -1e9), dim=-1)


def value_step(value: ValueNet, value_opt: torch.optim.Optimizer, obs: torch.Tensor, returns: torch.Tensor) -> float:
    """One regression step of the baseline on returns (the loss in standardised units)."""
    loss = F.mse_loss(value(obs), returns) / value.scale**2
    value_opt.zero_grad(set_to_none=True)
    loss.backward()
    value_opt.step()
    return loss.item()


def ppo_update(policy: nn.Module, value: nn.Module, opt: torch.optim.Optimizer, value_opt: torch.optim.Optimizer,
               batch: Batch, cfg: ImproveConfig, gen: torch.Generator, sequence: bool = False) -> dict[str, float]:
    """PPO's clipped surrogate on one batch, then the baseline's regression; returns diagnostics.
    A `sequence` policy's minibatches are whole episodes (see `minibatches`)."""
    with torch.no_grad():
        adv = batch.advantages if batch.advantages is not None else batch.returns - value(batch.obs)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        # The blueprint draws' probabilities under the policy that acted: the one about to change.
        grown = None if batch.blueprints is None else batch.blueprints.clamp_min(0)
        grew = None if batch.blueprints is None else (batch.blueprints >= 0).float()
        blueprint_logp_old = None if grown is None else F.log_softmax(policy.blueprint_logits, 0)[grown]
    stats = {"policy_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "value_loss": 0.0}
    steps = 0
    # In eval mode throughout: the ratio compares the policy that acted (no dropout) with itself.
    for _ in range(cfg.update_epochs):
        for rows in minibatches(batch, cfg.minibatch, gen, sequence):
            logits, mb = policy_logits(policy, batch.obs, rows)
            logp_all = masked_log_probs(logits, batch.mask[mb])
            logp = logp_all.gather(1, batch.actions[mb, None]).squeeze(1)
            logp_old = batch.logp_old[mb]
            if grown is not None:  # a GERMINATE's probability: the action's times its blueprint's
                logp = logp + grew[mb] * F.log_softmax(policy.blueprint_logits, 0)[grown[mb]]
                logp_old = logp_old + grew[mb] * blueprint_logp_old[mb]
            ratio = torch.exp(logp - logp_old)
            surrogate = torch.min(ratio * adv[mb], ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv[mb])
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            loss = -surrogate.mean() - cfg.entropy * entropy.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            opt.step()

            value_loss = value_step(value, value_opt, batch.obs[mb], batch.returns[mb])

            with torch.no_grad():
                stats["policy_loss"] += float(-surrogate.mean())
                stats["entropy"] += float(entropy.mean())
                stats["clip_fraction"] += float(((ratio - 1).abs() > cfg.clip).float().mean())
                stats["approx_kl"] += float((logp_old - logp).mean())
                stats["value_loss"] += value_loss
            steps += 1
    return {k: v / max(steps, 1) for k, v in stats.items()}


def value_only_update(value: ValueNet, value_opt: torch.optim.Optimizer, batch: Batch, cfg: ImproveConfig,
                      gen: torch.Generator) -> dict[str, float]:
    """The baseline's regression alone (the update that starts a run); diagnostics like `ppo_update`'s."""
    losses = []
    for _ in range(cfg.update_epochs):
        perm = torch.randperm(len(batch.returns), generator=gen)
        for i in range(0, len(perm), cfg.minibatch):
            mb = perm[i : i + cfg.minibatch]
            losses.append(value_step(value, value_opt, batch.obs[mb], batch.returns[mb]))
    return {"policy_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0,
            "value_loss": float(np.mean(losses))}


#: How the bootstrap behaviour-clones the expert (its run's seed is set per run): no feature
#: penalty, no input clipping, the epoch with the best validation balanced accuracy, early
#: stopping after 100 epochs without one.
BOOTSTRAP_TRAINING = TrainConfig("mlp", class_weights="auto", allow_missing_classes=True, feature_penalty=0.0,
                                 clip_inputs=False, select="balanced_accuracy", patience=100)


# ================================================================================ the loop
def bootstrap(cfg: ImproveConfig, registry: Registry, runner: BaseRunner, progress: ImproveProgress) -> tuple[Path, int]:
    """Behaviour-clone the expert from `bootstrap_episodes` of its episodes; (checkpoint, episodes it learned from)."""
    store = cfg.bootstrap_path()
    progress.on_stage(f"bootstrap: collect {cfg.expert}", cfg.bootstrap_episodes)
    plan = CollectConfig(episode=cfg.episode, policy=cfg.expert, seed=cfg.seed, episodes=cfg.bootstrap_episodes,
                         version=policy_version(registry, cfg.expert), threads=cfg.threads)
    with EpisodeWriter(store, engine=cfg.episode.engine) as writer:
        collect_episodes(writer, runner, plan, strict=True, on_episode=progress.on_episode)
    ckpt = cfg.bootstrap_checkpoint()
    progress.on_stage("bootstrap: behaviour cloning", 1)
    # The start PPO fine-tunes is part of this recipe (the README's measured runs): plain behaviour
    # cloning, not `simic train`'s defaults, which are chosen to imitate on other seeds' states.
    path, metrics = train_policy(store, replace(BOOTSTRAP_TRAINING, policy=cfg.policy, seed=cfg.seed), out=ckpt, registry=registry,
                                 log=progress.log)
    if metrics["interrupted"]:  # Ctrl-C in behaviour cloning stops the run (its episodes are kept)
        raise KeyboardInterrupt
    return path, cfg.bootstrap_episodes


@dataclass
class _Learner:
    """What the updates change: the policy and its optimiser, the baseline (sized on the first
    batch), the seeded generator of the minibatches, and the episodes learned from so far."""

    base: Checkpoint  # the start checkpoint: architecture, normalisation, input range
    hparams: dict[str, Any]  # the network's (the base's, plus the blueprint choice when it is learned)
    policy: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    seen: list[list[Any]]  # [task, seed, index, rng seed] of every episode learned from (the split)
    sequence: bool = False  # a recurrent policy: trained on whole episodes
    credit: str = "episode"  # how a group's draws are credited (`make_batch`)
    value: ValueNet | None = None
    value_opt: torch.optim.Optimizer | None = None

    @classmethod
    def start(cls, path: Path, registry: Registry, cfg: ImproveConfig) -> _Learner:
        base = load_checkpoint(path, expect_policy=cfg.policy)
        hparams = dict(base.meta["hparams"])
        if cfg.learn_blueprint and cfg.policy == "mlp" and not hparams.get("blueprints"):
            hparams["blueprints"] = list(cfg.episode.rotation)
        policy = build_network(cfg.policy, hparams, registry)
        missing, unexpected = policy.load_state_dict(base.tensors, strict=False)
        if unexpected or set(missing) - {"blueprint_logits"}:
            raise CheckpointError(f"checkpoint {path} does not match a {cfg.policy} network of its hparams")
        return cls(base, hparams, policy, torch.optim.Adam(policy.parameters(), lr=cfg.lr),
                   torch.Generator().manual_seed(cfg.seed), list(base.meta.get("split", {}).get("episodes", [])),
                   sequence=registry.trainables[cfg.policy].sequence, credit=cfg.credit)

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the policy's weights as they are now (an update changes the policy in place)."""
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def batch(self, drawn: Sequence[Drawn]) -> Batch:
        mean, std = (a.astype(np.float32) for a in self.base.normalisation)
        return make_batch(drawn, mean, std, self.base.input_range, self.credit, self.hparams.get("blueprints", ()))

    def update(self, u: int, batch: Batch, cfg: ImproveConfig, result: ImproveResult) -> dict[str, float]:
        """Update `u` on `batch`: the first calibrates the start (see the module docstring)."""
        if self.value is None:  # seeded here: in-process episodes reseed torch's global generator
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                self.value = ValueNet(float(batch.returns.mean()), float(batch.returns.std()))
            self.value_opt = torch.optim.Adam(self.value.parameters(), lr=cfg.value_lr)
        assert self.value_opt is not None
        if u == 0 and cfg.init_entropy > 0:
            # The start policy drove these episodes too sure of itself to explore: they train
            # the baseline and calibrate the softened policy the updates start from.
            stats = value_only_update(self.value, self.value_opt, batch, cfg, self.gen)
            result.temperature = soften(self.policy, batch, cfg.init_entropy, self.sequence)
            return stats
        return ppo_update(self.policy, self.value, self.opt, self.value_opt, batch, cfg, self.gen, self.sequence)


def improve(cfg: ImproveConfig, registry: Registry, progress: ImproveProgress | None = None,
            runner: BaseRunner | None = None) -> ImproveResult:
    """Fine-tune a `cfg.policy` (mlp or gru) policy with PPO on its own episodes; the best policy so
    far is at `cfg.out`.

    After every update the run state is saved beside `cfg.out` (`ppo_state`); a run whose state
    is there continues from its last completed update and ends with the same checkpoint (a
    complete run's state makes it write the checkpoint again and run nothing). Raises
    `RunStateError` before any work for a damaged state or one saved with another configuration.
    Every episode (the bootstrap's and the updates') runs on `runner`, or on one runner opened
    from `cfg` for the whole run. Raises `JobFailed` when an episode fails or is lost,
    `CheckpointError` for an unusable start checkpoint. A `KeyboardInterrupt` ends the run early:
    the result says so, and `cfg.out` holds the best policy so far (if an update finished).
    """
    progress = progress or ImproveProgress()
    started = time.perf_counter()
    # Training runs in this process with the episodes' thread count whatever the runner: another
    # count changes the order of float sums, and so the checkpoint.
    use_threads(cfg.threads)
    result = ImproveResult(checkpoint=cfg.out)
    loaded = check_state(cfg)
    with ExitStack() as stack:
        if runner is None:
            runner = stack.enter_context(make_runner(cfg.backend, cfg.workers, ray_address=cfg.ray_address,
                                                     registry=registry, envs_per_worker=cfg.envs_per_worker))
        if cfg.start is not None:
            start, boot = cfg.start, 0
        elif loaded is not None and cfg.bootstrap_checkpoint().exists():  # the state's own start
            start, boot = cfg.bootstrap_checkpoint(), cfg.bootstrap_episodes
        else:
            start, boot = bootstrap(cfg, registry, runner, progress)
        result.bootstrap_episodes = result.episodes_used = boot
        learner = _Learner.start(start, registry, cfg)
        saved = restore_state(loaded, learner, result, cfg) if loaded is not None else Saved()
        best = _fine_tune(cfg, runner, learner, result, progress, saved)
    result.seconds = time.perf_counter() - started
    if best is None and not result.interrupted:  # no update ran (--episodes 0 is refused; kept safe)
        best = dict(learner.policy.state_dict())
    if best is not None:  # again, with the whole run in its metadata: every episode, the full curve
        save_checkpoint(cfg.out, best, _meta(learner, cfg, result))
    return result


def _fine_tune(cfg: ImproveConfig, runner: BaseRunner, learner: _Learner, result: ImproveResult,
               progress: ImproveProgress, saved: Saved) -> dict[str, torch.Tensor] | None:
    """The PPO updates from `saved.next_update` on, each on episodes of the policy as it was, the
    run state saved after each; the best acting policy's weights (None when no update finished).
    Ctrl-C stops it and sets `result.interrupted`."""
    try:
        for u in range(saved.next_update, cfg.updates):
            update_started = time.perf_counter()
            acting = learner.weights()
            drawn = _collect_update(cfg, runner, u, Weights.of(acting, _meta(learner, cfg, result, policy_only=True),
                                                                f"{cfg.out} (update {u}'s acting policy)"), progress)
            result.episodes_used += len(drawn)
            learner.seen += [ep.ref for draw, ep in sorted(drawn, key=lambda d: d[1].index) if draw == 0]
            stats = learner.update(u, learner.batch(drawn), cfg, result)
            row = _curve_row(u, drawn, stats, result.episodes_used)
            result.history.append(row)
            row["running_mean_return"] = float(np.mean([r["mean_return"] for r in result.history[-cfg.window:]]))
            if u in cfg.selections:  # the policy after this update, greedy, on the validation seeds
                candidate = learner.weights()
                row["select_score"] = _select_score(cfg, runner, learner, result, candidate, u, progress)
                if row["select_score"] > saved.best_score:
                    saved.best_score, result.best_update, saved.best = row["select_score"], u, candidate
                    save_checkpoint(cfg.out, saved.best, _meta(learner, cfg, result))
            row["episodes_per_second"] = len(drawn) / max(time.perf_counter() - update_started, 1e-9)
            # The policy that earned the recent returns is the one before this update (it drove
            # them), so the best is the episodes' own checkpoint; on disk at once for Ctrl-C.
            if not cfg.select_episodes and row["running_mean_return"] > saved.best_score:
                saved.best_score, result.best_update, saved.best = row["running_mean_return"], u, acting
                save_checkpoint(cfg.out, saved.best, _meta(learner, cfg, result))
            # Reported (and logged to TensorBoard) before the state is saved: a kill in between
            # repeats update u, whose logged step the resumed run's event log then replaces.
            progress.on_update(row)
            saved.next_update = u + 1
            result.state_bytes = save_state(cfg, learner, result, saved)
    except KeyboardInterrupt:
        result.interrupted = True
    return saved.best


def _select_score(cfg: ImproveConfig, runner: BaseRunner, learner: _Learner, result: ImproveResult,
                  weights: dict[str, torch.Tensor], u: int, progress: ImproveProgress) -> float:
    """Mean final score (validation accuracy net of the growth charge) of the greedy policy
    `weights` over the run's validation seeds; they join the checkpoint's split record."""
    acting = Weights.of(weights, _meta(learner, cfg, result, policy_only=True), f"{cfg.out} (candidate after update {u})")
    jobs = (EpisodeJob(policy=cfg.policy, config=cfg.episode, seed=cfg.seed, index=VALIDATION_INDEX + i,
                       policy_options={"checkpoint": acting}, policy_version=f"improve-select-u{u}",
                       threads=cfg.threads) for i in range(cfg.select_episodes))
    progress.on_stage(f"update {u + 1}/{cfg.updates}: select on {cfg.select_episodes} validation seeds",
                      cfg.select_episodes)
    episodes = []
    for _, ep in runner.run(jobs, strict=True):
        episodes.append(ep)
        progress.on_episode(ep)
    result.episodes_used += len(episodes)
    refs = [list(ep.ref) for ep in sorted(episodes, key=lambda e: e.index)]
    learner.seen += [r for r in refs if r not in learner.seen]
    return float(np.mean([ep.final_score for ep in episodes]))


def _collect_update(cfg: ImproveConfig, runner: BaseRunner, u: int, acting: Weights,
                    progress: ImproveProgress) -> list[Drawn]:
    """Update `u`'s episodes: `group` draws of the acting policy on each of its new seeds, the
    weights travelling with every job (a lost episode fails the run)."""
    n = min(cfg.episodes_per_update, cfg.episodes - u * cfg.episodes_per_update)
    seeds = n // cfg.group  # whole groups (the config's counts are multiples of the group)
    first = (cfg.bootstrap_episodes if cfg.start is None else 0) + u * cfg.seeds_per_update
    config = replace(cfg.episode, explore=cfg.explore)
    jobs = (EpisodeJob(policy=cfg.policy, config=config, seed=cfg.seed, index=first + i // cfg.group,
                       policy_options={"checkpoint": acting, "sample": True, "draw": i % cfg.group},
                       policy_version=f"improve-u{u}", threads=cfg.threads) for i in range(seeds * cfg.group))
    progress.on_stage(f"update {u + 1}/{cfg.updates}: collect", seeds * cfg.group)
    drawn: list[Drawn] = []
    for job, ep in runner.run(jobs, strict=True):
        drawn.append((int(job.policy_options["draw"]), ep))
        progress.on_episode(ep)
    return drawn


def _curve_row(u: int, drawn: Sequence[Drawn], stats: dict[str, float], used: int) -> dict[str, Any]:
    episodes = in_draw_order(drawn)
    returns = [sum(d.outcome.reward for d in ep.decisions) for ep in episodes]
    return {"update": u, "episodes_used": used, "mean_return": float(np.mean(returns)),
            "final_accuracy": float(np.mean([ep.final_accuracy for ep in episodes])),
            "test_accuracy": float(np.mean([ep.test_accuracy for ep in episodes])),
            "seeds_fossilized": float(np.mean([ep.seeds_fossilized for ep in episodes])),
            "seeds_culled": float(np.mean([ep.seeds_culled for ep in episodes])), **stats}


def _meta(learner: _Learner, cfg: ImproveConfig, result: ImproveResult, policy_only: bool = False) -> dict[str, Any]:
    """The improved checkpoint's metadata: the base's (architecture, normalisation) plus the run."""
    meta = {k: v for k, v in learner.base.meta.items() if k not in ("format", "format_version", "feature_schema", "versions")}
    meta["mask_invalid"] = True
    meta["objective"] = "ppo"
    meta["hparams"] = learner.hparams
    if policy_only:
        return meta
    meta["split"] = {**meta.get("split", {}), "episodes": list(learner.seen)}
    meta["improve"] = {"config": cfg.to_dict(), "start": str(cfg.start) if cfg.start else None,
                       "best_update": result.best_update, "episodes_used": result.episodes_used,
                       "start_temperature": result.temperature,
                       "bootstrap_episodes": result.bootstrap_episodes, "history": result.history}
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return meta
