"""The morphogenetic training environment: Tolaria's epoch loop under Kasmina's seed mechanics,
for N episodes at once.

One `step(decisions)` = apply each member's action, train every member's host (and seeds) for one
epoch as one fused computation (`engine.FusedHosts`), validate, and return each member's new
observation plus the outcome its action caused. A member is one episode: every random choice
(initial weights, data order, seed initialisation) is drawn from its own rng seed, one stream per
draw (`contracts.RngStream`), and data order never depends on the actions taken, so runs of
different policies from one seed are paired, and a member's episode is the same whichever members
share its batch (`engine` says how). N=1 is the same code.

The seed signal (schema v2's `seed_improvement`, see `contracts.FEATURE_MEANINGS`) is measured in
the same validation pass as the host, once per epoch: the managed slot's counterfactual path (the
TRAINING probe, or the BLENDING slot at alpha 0) runs beside the host's from that slot on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..contracts import (
    ENGINE_VERSION,
    HISTORY_LEN,
    Action,
    Decision,
    EpisodeConfig,
    Outcome,
    RngStream,
    SeedLifecycle,
    SeedStage,
    TrainingSnapshot,
    growth_charge,
    sanitize_loss,
)
from ..kasmina import HostCNN, SlotState
from ..policy import valid_actions as observed_valid_actions
from ..tasks import Task, TaskData
from .blueprints import BlueprintFactory
from .engine import FusedHosts, SlotGroups

#: The fields members of one batch must share: they fix the tensors' shapes and the lockstep.
SHARED_FIELDS = ("task", "data_dir", "device", "epochs", "batch_size")


@dataclass(frozen=True)
class StepResult:
    observation: TrainingSnapshot
    outcome: Outcome
    valid: bool
    blueprint: str | None  # the blueprint germinated by this step, if any
    message: str  # why an invalid action was a no-op ("" when valid)


def _torch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint32)[0])


class Member:
    """One episode's state in the batch: its lifecycle, metrics and records (the tensors live in
    the engine, one row per member)."""

    def __init__(self, index: int, config: EpisodeConfig, rng_seed: int, channels: Sequence[int]) -> None:
        self.index = index
        self.config = config
        self.rng_seed = rng_seed
        self.slots = [SlotState(i, c) for i, c in enumerate(channels)]
        self.epoch = 0
        self.global_step = 0
        self.seeds: list[SeedLifecycle] = []
        self._slot_record: dict[int, SeedLifecycle] = {}
        # The rotation starts at a point drawn from the episode's seed: every blueprint is grown
        # first in some episodes, and paired runs of different policies start at the same point.
        start_rng = np.random.default_rng(np.random.SeedSequence([rng_seed, RngStream.ROTATION_START]))
        self._rotation = int(start_rng.integers(len(config.rotation)))
        self._stage_epochs: dict[int, int] = {}
        self.worth: dict[int, float] = {}  # per slot: the seed's measured worth (points)
        self._embargo: dict[int, int] = {}
        self.blend_steps: dict[int, int] = {}

    def start(self, train: tuple[float, float], val: tuple[float, float]) -> None:
        """Epoch 0: the untrained host's losses seed the histories and bests."""
        # The same boundary rule as `end_epoch`: an untrained host can diverge too.
        train_loss, val_loss = sanitize_loss(train[0]), sanitize_loss(val[0])
        self.train_loss, self.train_acc = train_loss, train[1]
        self.val_loss, self.val_acc = val_loss, val[1]
        self.prev_val_loss, self.prev_val_acc = val_loss, val[1]
        self.best_val_acc, self.best_val_loss = val[1], val_loss
        self.plateau_epochs = 0
        self.loss_history: deque[float] = deque([val_loss] * HISTORY_LEN, maxlen=HISTORY_LEN)
        self.acc_history: deque[float] = deque([val[1]] * HISTORY_LEN, maxlen=HISTORY_LEN)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def active_slot(self) -> SlotState | None:
        return next((s for s in self.slots if s.is_active), None)

    def available_slots(self) -> int:
        return sum(s.stage == SeedStage.DORMANT for s in self.slots)

    def valid_actions(self) -> list[Action]:
        """The actions `apply` would carry out now (the rest are recorded no-ops), in action order.

        Read from the observation by `policy.valid_actions`, the rule a policy and an offline
        dataset's action mask use too, so the three cannot disagree. GERMINATE counts as valid
        with the rotation's blueprint (an unknown named one is not).
        """
        return observed_valid_actions(self.observe())

    def observe(self) -> TrainingSnapshot:
        """The 27-feature snapshot of the current state (end of the last trained epoch)."""
        slot = self.active_slot()
        return TrainingSnapshot(
            epoch=self.epoch,
            global_step=self.global_step,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            loss_delta=self.prev_val_loss - self.val_loss,
            train_accuracy=self.train_acc,
            val_accuracy=self.val_acc,
            accuracy_delta=self.val_acc - self.prev_val_acc,
            plateau_epochs=self.plateau_epochs,
            best_val_accuracy=self.best_val_acc,
            best_val_loss=self.best_val_loss,
            loss_history_5=tuple(self.loss_history),
            accuracy_history_5=tuple(self.acc_history),
            has_active_seed=slot is not None,
            seed_stage=slot.stage if slot else SeedStage.DORMANT,
            seed_epochs_in_stage=self._stage_epochs.get(slot.index, 0) if slot else 0,
            seed_alpha=slot.alpha if slot else 0.0,
            seed_improvement=self.worth.get(slot.index, 0.0) if slot else 0.0,
            available_slots=self.available_slots(),
        )

    # ----------------------------------------------------------------------------------- actions
    def _enter_stage(self, slot: SlotState, stage: SeedStage) -> None:
        slot.transition(stage)
        self._stage_epochs[slot.index] = 0
        self._slot_record[slot.index].stages.append((stage.name, self.epoch))

    def germinate(self, blueprint: str | None, known: Mapping[str, BlueprintFactory]) -> tuple[bool, str | None, str]:
        """Germinate in the first free slot: (valid, blueprint, why not). The caller builds the
        seed's module (`seed_torch_seed` says under which torch seed)."""
        if self.active_slot() is not None:
            return False, None, "GERMINATE while a seed is active"
        slot = next((s for s in self.slots if s.stage == SeedStage.DORMANT), None)
        if slot is None:
            return False, None, "GERMINATE with no available slot"
        if blueprint is None:
            blueprint = self.config.rotation[self._rotation % len(self.config.rotation)]
        elif blueprint not in known:
            return False, None, f"GERMINATE with unknown blueprint '{blueprint}'"
        self._rotation += 1
        seed_id = len(self.seeds)
        slot.germinate(blueprint)
        record = SeedLifecycle(seed_id=seed_id, blueprint=blueprint, slot=slot.index,
                               stages=[(SeedStage.GERMINATED.name, self.epoch)])
        self.seeds.append(record)
        self._slot_record[slot.index] = record
        self._stage_epochs[slot.index] = 0
        self.worth[slot.index] = 0.0
        self.blend_steps[slot.index] = 0
        return True, blueprint, ""

    def seed_torch_seed(self, seed_id: int) -> int:
        return _torch_seed(self.rng_seed, RngStream.SEED_WEIGHTS, seed_id)

    def advance(self) -> tuple[bool, str]:
        slot = self.active_slot()
        if slot is None:
            return False, "ADVANCE with no active seed"
        nxt = {SeedStage.GERMINATED: SeedStage.TRAINING, SeedStage.TRAINING: SeedStage.BLENDING,
               SeedStage.BLENDING: SeedStage.FOSSILIZED}[slot.stage]
        self._enter_stage(slot, nxt)
        if nxt == SeedStage.FOSSILIZED:
            self._slot_record[slot.index].fate = "fossilized"
        return True, ""

    def cull(self) -> tuple[bool, str]:
        slot = self.active_slot()
        if slot is None:
            return False, "CULL with no active seed"
        record = self._slot_record[slot.index]
        if slot.stage in (SeedStage.TRAINING, SeedStage.BLENDING):
            # Its worth as last measured (nothing trained since): the probe's edge over the host in
            # TRAINING, the counterfactual contribution in BLENDING.
            record.contribution = self.worth.get(slot.index, 0.0)
        self.worth.pop(slot.index, None)
        slot.cull()
        record.stages.append((SeedStage.CULLED.name, self.epoch))
        record.fate = "culled"
        self._embargo[slot.index] = self.config.embargo_epochs
        if self.config.embargo_epochs <= 0:
            slot.release()
        return True, ""

    # ------------------------------------------------------------------------------- the epoch
    def alphas_this_epoch(self, slot: SlotState, steps: int) -> list[float]:
        """The slot's alpha at each optimiser step of the coming epoch: BLENDING ramps per step
        (no jumps) over `blending_epochs`, FOSSILIZED is 1."""
        if slot.stage == SeedStage.FOSSILIZED:
            return [1.0] * steps
        ramp = max(self.config.blending_epochs * steps, 1)
        start = self.blend_steps[slot.index]
        return [min(1.0, (start + j + 1) / ramp) for j in range(steps)]

    def end_training(self, steps: int) -> None:
        self.global_step += steps
        for slot in self.slots:
            if slot.stage == SeedStage.BLENDING:
                ramp = max(self.config.blending_epochs * steps, 1)
                self.blend_steps[slot.index] += steps
                slot.alpha = min(1.0, self.blend_steps[slot.index] / ramp)

    def end_epoch(self, train: tuple[float, float], val: tuple[float, float], worth: float | None) -> None:
        """Record the epoch's measurements and count it, exactly once."""
        if worth is not None:
            self.worth[self.active_slot().index] = worth  # type: ignore[union-attr]
        self.epoch += 1
        self.prev_val_loss, self.prev_val_acc = self.val_loss, self.val_acc
        self.train_loss, self.train_acc = sanitize_loss(train[0]), train[1]
        self.val_loss, self.val_acc = sanitize_loss(val[0]), val[1]
        gain = self.val_acc - self.prev_val_acc
        self.plateau_epochs = self.plateau_epochs + 1 if gain < self.config.plateau_threshold else 0
        self.best_val_acc = max(self.best_val_acc, self.val_acc)
        self.best_val_loss = min(self.best_val_loss, self.val_loss)
        self.loss_history.append(self.val_loss)
        self.acc_history.append(self.val_acc)
        for slot in self.slots:
            if slot.is_active:
                self._stage_epochs[slot.index] += 1
            elif slot.stage == SeedStage.CULLED:
                self._embargo[slot.index] -= 1
                if self._embargo[slot.index] <= 0:
                    slot.release()


class MorphogeneticEnv:
    """N host networks trained epoch by epoch, together, while policies grow, graft and cull seeds.

    `configs` is one `EpisodeConfig` per member (or one for all); members must agree on
    `SHARED_FIELDS`. `reset(rng_seeds)` starts one episode per seed.
    """

    def __init__(self, configs: EpisodeConfig | Sequence[EpisodeConfig], task: Task,
                 blueprints: Mapping[str, BlueprintFactory]) -> None:
        configs = [configs] if isinstance(configs, EpisodeConfig) else list(configs)
        if not configs:
            raise ValueError("an environment needs at least one episode config")
        for cfg in configs:
            if cfg.engine != ENGINE_VERSION:
                raise ValueError(f"episodes of engine {cfg.engine} cannot be run by this version of Simic, "
                                 f"whose engine is {ENGINE_VERSION}: collect them anew")
            missing = [b for b in cfg.rotation if b not in blueprints]
            if not cfg.rotation or missing:
                raise ValueError(f"blueprint rotation names unregistered blueprints: {', '.join(missing) or '(empty)'}")
            differ = [f for f in SHARED_FIELDS if getattr(cfg, f) != getattr(configs[0], f)]
            if differ:
                raise ValueError(f"episodes of one batch must share {', '.join(differ)}")
        self.configs = configs
        self.config = configs[0]
        self.task = task
        self.blueprints = dict(blueprints)
        self.device = torch.device(self.config.device)

    # ----------------------------------------------------------------------------- episode start
    def reset(self, rng_seeds: Sequence[int]) -> list[TrainingSnapshot]:
        """Build each member's host from its rng seed, evaluate it untrained; the epoch-0 observations."""
        configs = self.configs * len(rng_seeds) if len(self.configs) == 1 else self.configs
        if len(rng_seeds) != len(configs) or not rng_seeds:
            raise ValueError(f"{len(rng_seeds)} rng seeds for {len(configs)} episode configs")
        cfg, dev = self.config, self.device
        data: TaskData = self.task.load(cfg.data_dir, 0)
        self.data = TaskData(*(t.to(dev) for t in (data.train_x, data.train_y, data.val_x,
                                                    data.val_y, data.test_x, data.test_y)))
        hosts: list[HostCNN] = []
        for seed in rng_seeds:
            torch.manual_seed(_torch_seed(seed, RngStream.HOST_WEIGHTS))
            hosts.append(self.task.build_host().to(dev))
        self.steps_per_epoch = -(-len(self.data.train_y) // cfg.batch_size)
        self.engine = FusedHosts(hosts, [c.lr for c in configs], dev, max_steps=cfg.epochs * self.steps_per_epoch)
        channels = self.engine.channels
        self.members = [Member(k, c, s, channels) for k, (c, s) in enumerate(zip(configs, rng_seeds))]
        train = self._evaluate(self.data.train_x, self.data.train_y)
        val = self._evaluate(self.data.val_x, self.data.val_y)
        for member, t, v in zip(self.members, train, val):
            member.start(t, v)
        return [m.observe() for m in self.members]

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def done(self) -> bool:
        return all(m.done for m in self.members)

    # ----------------------------------------------------------------------------------- actions
    def _apply(self, member: Member, decision: Decision) -> tuple[bool, str | None, str]:
        """Apply an action. An invalid one is a no-op reported as (False, None, why), not a crash."""
        action = Action(int(decision.action))
        if action == Action.WAIT:
            return True, None, ""
        if action == Action.GERMINATE:
            ok, blueprint, why = member.germinate(decision.blueprint, self.blueprints)
            if ok:
                slot = member.active_slot()
                assert slot is not None and blueprint is not None
                torch.manual_seed(member.seed_torch_seed(len(member.seeds) - 1))
                module: nn.Module = self.blueprints[blueprint](slot.channels).to(self.device)
                member.seeds[-1].params = sum(p.numel() for p in module.parameters())
                self.engine.germinate(member.index, slot.index, blueprint, module)
            return ok, blueprint, why
        ok, why = member.advance() if action == Action.ADVANCE else member.cull()
        return ok, None, why

    # ---------------------------------------------------------------------------------- training
    def _plan(self) -> None:
        """Which member's seed runs where this epoch (see `engine`)."""
        groups = [SlotGroups() for _ in range(self.engine.n_slots)]
        for m in self.members:
            for slot in m.slots:
                if slot.stage in (SeedStage.BLENDING, SeedStage.FOSSILIZED):
                    groups[slot.index].live.setdefault(slot.blueprint, []).append(m.index)  # type: ignore[arg-type]
                elif slot.stage == SeedStage.TRAINING:
                    groups[slot.index].probe.setdefault(slot.blueprint, []).append(m.index)  # type: ignore[arg-type]
        self.engine.groups = groups

    def _alphas_now(self, override: Mapping[int, float] | None = None) -> dict[int, torch.Tensor]:
        """Each slot's current alpha per member (N,), with `override[slot]` for every member."""
        table = [[slot.alpha for slot in m.slots] for m in self.members]
        alphas = torch.tensor(table, dtype=torch.float32).T.contiguous()
        for s, value in (override or {}).items():
            alphas[s] = value
        return {s: alphas[s].to(self.device) for s in range(self.engine.n_slots)}

    def _train_epoch(self) -> list[tuple[float, float]]:
        """One pass over the training data per member, in an order fixed by (its seed, epoch)."""
        cfg, data, engine = self.config, self.data, self.engine
        n_train, steps = len(data.train_y), self.steps_per_epoch
        orders = torch.stack([
            torch.randperm(n_train, generator=torch.Generator().manual_seed(
                _torch_seed(m.rng_seed, RngStream.DATA_ORDER, m.epoch)))
            for m in self.members]).to(self.device)
        ramps = torch.zeros(engine.n_slots, steps, self.n)
        trained: dict[tuple[int, str], torch.Tensor] = {}
        for m in self.members:
            for slot in m.slots:
                if slot.stage in (SeedStage.BLENDING, SeedStage.FOSSILIZED, SeedStage.TRAINING):
                    key = (slot.index, slot.blueprint)
                    if key not in trained:
                        trained[key] = torch.zeros(self.n, 1, dtype=torch.bool)
                    trained[key][m.index] = True  # type: ignore[index]
                if slot.stage in (SeedStage.BLENDING, SeedStage.FOSSILIZED):
                    ramps[slot.index, :, m.index] = torch.tensor(m.alphas_this_epoch(slot, steps))
        ramps = ramps.to(self.device)
        trained = {k: v.to(self.device) for k, v in trained.items()}  # type: ignore[misc]
        total_loss = torch.zeros(self.n, device=self.device)
        correct = torch.zeros(self.n, dtype=torch.long, device=self.device)
        for j, start in enumerate(range(0, n_train, cfg.batch_size)):
            idx = orders[:, start:start + cfg.batch_size].T  # (B, N): each member's own batch
            x = data.train_x[idx]
            x = x.reshape(x.shape[0], -1, *x.shape[3:])  # packed: members side by side in channels
            loss, hits = engine.train_step(x, data.train_y[idx], {s: ramps[s, j] for s in range(engine.n_slots)},
                                           trained)
            total_loss += loss * idx.shape[0]
            correct += hits
        for m in self.members:
            m.end_training(steps)
        losses, corrects = total_loss.tolist(), correct.tolist()
        return [(losses[k] / n_train, 100.0 * corrects[k] / n_train) for k in range(self.n)]

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor, override: Mapping[int, float] | None = None,
                  worth: Mapping[int, list[int]] | None = None) -> list[tuple[float, float]]:
        loss, correct, _ = self.engine.evaluate(x, y, self._alphas_now(override), worth)
        losses, corrects = loss.tolist(), correct.tolist()
        return [(losses[k] / len(y), 100.0 * corrects[k] / len(y)) for k in range(self.n)]

    def _validate(self) -> tuple[list[tuple[float, float]], list[float | None]]:
        """Each member's (val loss, val accuracy) and its managed seed's worth in points (None
        without one), in one pass (`engine.FusedHosts.evaluate`)."""
        worth_rows: dict[int, list[int]] = {}
        for m in self.members:
            slot = m.active_slot()
            if slot is not None and slot.stage in (SeedStage.TRAINING, SeedStage.BLENDING):
                worth_rows.setdefault(slot.index, []).append(m.index)
        x, y = self.data.val_x, self.data.val_y
        loss, correct, other = self.engine.evaluate(x, y, self._alphas_now(), worth_rows)
        losses, corrects, others = loss.tolist(), correct.tolist(), other.tolist()
        n = len(y)
        val, worths = [], []
        for m in self.members:
            acc = 100.0 * corrects[m.index] / n
            val.append((losses[m.index] / n, acc))
            slot = m.active_slot()
            if slot is None or slot.stage not in (SeedStage.TRAINING, SeedStage.BLENDING):
                worths.append(None)
                continue
            acc_other = 100.0 * others[m.index] / n
            worths.append(acc_other - acc if slot.stage == SeedStage.TRAINING else acc - acc_other)
        return val, worths

    def step(self, decisions: Sequence[Decision]) -> list[StepResult]:
        """Apply each member's decision, train one epoch, validate; outcomes measured after it."""
        if self.done:
            raise RuntimeError("episode is over: call reset()")
        if len(decisions) != self.n:
            raise ValueError(f"{len(decisions)} decisions for {self.n} episodes")
        before, applied, charged = [], [], []  # charged: the growth cost this action charged or refunded
        for m, decision in zip(self.members, decisions):
            slot = m.active_slot()
            charge = growth_charge(m.config.growth_cost, m.seeds)
            before.append((m.val_acc, m.val_loss, slot))
            valid, blueprint, why = self._apply(m, decision)
            charged.append(growth_charge(m.config.growth_cost, m.seeds) - charge)
            target = m.active_slot() or slot  # the slot the action concerned, even once it left
            applied.append((valid, blueprint, why, target.index if target else None))
        self._plan()
        train = self._train_epoch()
        val, worths = self._validate()
        results = []
        for m, t, v, w, (acc_before, loss_before, _), (valid, blueprint, why, target), price in zip(
                self.members, train, val, worths, before, applied, charged):
            m.end_epoch(t, v, w)
            stage_after = m.slots[target].stage if target is not None else SeedStage.DORMANT
            outcome = Outcome(
                accuracy_change=m.val_acc - acc_before,
                loss_change=loss_before - m.val_loss,
                val_accuracy=m.val_acc,
                seed_alive=any(s.has_seed for s in m.slots),
                stage_after=stage_after,
                reward=(m.val_acc - acc_before) - (0.0 if valid else m.config.invalid_action_penalty) - price,
            )
            results.append(StepResult(m.observe(), outcome, valid, blueprint, why))
        return results

    def finish(self) -> list[tuple[float, float, float]]:
        """Per member (final val accuracy, best val accuracy, test accuracy); measures surviving
        seeds' contributions (val accuracy at their alpha minus at alpha 0)."""
        x, y = self.data.val_x, self.data.val_y
        with_seeds = self._evaluate(x, y)
        for s in range(self.engine.n_slots):
            holders = [m for m in self.members if m.slots[s].has_seed and m.slots[s].alpha > 0]
            if not holders:
                continue
            without = self._evaluate(x, y, override={s: 0.0})
            for m in holders:
                m._slot_record[s].contribution = with_seeds[m.index][1] - without[m.index][1]
        test = self._evaluate(self.data.test_x, self.data.test_y)
        return [(m.val_acc, m.best_val_acc, test[m.index][1]) for m in self.members]

    def model(self, k: int) -> HostCNN:
        """Member `k`'s network as a plain module (a copy): its host with its seeds installed."""
        host = self.engine.host_module(k)
        for state, slot in zip(self.members[k].slots, host.slots):
            if state.has_seed:
                slot.seed = self.engine.seed_module(k, state.index, state.blueprint)  # type: ignore[arg-type]
            slot.stage, slot.blueprint, slot.alpha = state.stage, state.blueprint, state.alpha
        return host
