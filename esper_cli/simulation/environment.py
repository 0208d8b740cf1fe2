"""The morphogenetic training environment: Tolaria's epoch loop under Kasmina's seed mechanics.

One `step(decision)` = apply Tamiyo's action, train the host (and any seed) for one epoch,
validate, and return the new observation plus the outcome the action caused. Every random choice
(initial weights, data order, seed initialisation) is drawn from the episode's rng seed, and data
order never depends on the actions taken, so runs of different policies from one seed are paired.
Each draw has its own stream of the episode's seed (`contracts.RngStream`).

The seed signal (schema v2's `seed_improvement`, see `contracts.FEATURE_MEANINGS`) is measured in
the same validation pass as the host, once per epoch: the managed slot's counterfactual path (the
TRAINING probe, or the BLENDING slot at alpha 0) runs beside the host's from that slot on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contracts import (
    HISTORY_LEN,
    Action,
    Decision,
    EpisodeConfig,
    Outcome,
    RngStream,
    SeedLifecycle,
    SeedStage,
    TrainingSnapshot,
    sanitize_loss,
)
from ..kasmina import HostCNN, SeedSlot
from ..policy import valid_actions as observed_valid_actions
from ..tasks import Task, TaskData
from .blueprints import BlueprintFactory


@dataclass(frozen=True)
class StepResult:
    observation: TrainingSnapshot
    outcome: Outcome
    valid: bool
    blueprint: str | None  # the blueprint germinated by this step, if any
    message: str  # why an invalid action was a no-op ("" when valid)


def _torch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint32)[0])


class MorphogeneticEnv:
    """A host network trained epoch by epoch while a policy grows, grafts and culls seeds."""

    def __init__(self, config: EpisodeConfig, task: Task, blueprints: Mapping[str, BlueprintFactory]) -> None:
        missing = [b for b in config.rotation if b not in blueprints]
        if not config.rotation or missing:
            raise ValueError(f"blueprint rotation names unregistered blueprints: {', '.join(missing) or '(empty)'}")
        self.config = config
        self.task = task
        self.blueprints = dict(blueprints)
        self.device = torch.device(config.device)

    # ----------------------------------------------------------------------------- episode start
    def reset(self, rng_seed: int) -> TrainingSnapshot:
        """Build the host from `rng_seed`, evaluate it untrained, return the epoch-0 observation."""
        cfg = self.config
        self.rng_seed = rng_seed
        data: TaskData = self.task.load(cfg.data_dir, 0)
        dev = self.device
        self.data = TaskData(*(t.to(dev) for t in (data.train_x, data.train_y, data.val_x,
                                                    data.val_y, data.test_x, data.test_y)))
        torch.manual_seed(_torch_seed(rng_seed, RngStream.HOST_WEIGHTS))
        self.model: HostCNN = self.task.build_host().to(dev)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.steps_per_epoch = -(-len(self.data.train_y) // cfg.batch_size)
        self.epoch = 0
        self.global_step = 0
        self.seeds: list[SeedLifecycle] = []
        self._slot_record: dict[int, SeedLifecycle] = {}
        # The rotation starts at a point drawn from the episode's seed: every blueprint is grown
        # first in some episodes, and paired runs of different policies start at the same point.
        start_rng = np.random.default_rng(np.random.SeedSequence([rng_seed, RngStream.ROTATION_START]))
        self._rotation = int(start_rng.integers(len(cfg.rotation)))
        self._stage_epochs: dict[int, int] = {}
        self._worth: dict[int, float] = {}  # per slot: the seed's measured worth (points)
        self._embargo: dict[int, int] = {}
        self._blend_steps: dict[int, int] = {}

        train_loss, train_acc = self._evaluate(self.data.train_x, self.data.train_y)
        val_loss, val_acc = self._evaluate(self.data.val_x, self.data.val_y)
        # The same boundary rule as `step`: an untrained host can diverge too, and epoch 0's
        # losses seed the histories and best_val_loss that every later observation carries.
        train_loss, val_loss = sanitize_loss(train_loss), sanitize_loss(val_loss)
        self.train_loss, self.train_acc = train_loss, train_acc
        self.val_loss, self.val_acc = val_loss, val_acc
        self.prev_val_loss, self.prev_val_acc = val_loss, val_acc
        self.best_val_acc, self.best_val_loss = val_acc, val_loss
        self.plateau_epochs = 0
        self.loss_history: deque[float] = deque([val_loss] * HISTORY_LEN, maxlen=HISTORY_LEN)
        self.acc_history: deque[float] = deque([val_acc] * HISTORY_LEN, maxlen=HISTORY_LEN)
        return self.observe()

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    @property
    def slots(self) -> list[SeedSlot]:
        return list(self.model.slots)  # type: ignore[arg-type]

    def active_slot(self) -> SeedSlot | None:
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

    # ------------------------------------------------------------------------------ observation
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
            seed_improvement=self._worth.get(slot.index, 0.0) if slot else 0.0,
            available_slots=self.available_slots(),
        )

    # ----------------------------------------------------------------------------------- actions
    def _enter_stage(self, slot: SeedSlot, stage: SeedStage) -> None:
        slot.transition(stage)
        self._stage_epochs[slot.index] = 0
        self._slot_record[slot.index].stages.append((stage.name, self.epoch))

    def _germinate(self, blueprint: str | None) -> tuple[bool, str | None, str]:
        if self.active_slot() is not None:
            return False, None, "GERMINATE while a seed is active"
        slot = next((s for s in self.slots if s.stage == SeedStage.DORMANT), None)
        if slot is None:
            return False, None, "GERMINATE with no available slot"
        if blueprint is None:
            blueprint = self.config.rotation[self._rotation % len(self.config.rotation)]
        elif blueprint not in self.blueprints:
            return False, None, f"GERMINATE with unknown blueprint '{blueprint}'"
        self._rotation += 1
        seed_id = len(self.seeds)
        torch.manual_seed(_torch_seed(self.rng_seed, RngStream.SEED_WEIGHTS, seed_id))
        module: nn.Module = self.blueprints[blueprint](slot.channels).to(self.device)
        slot.germinate(blueprint, module)
        self.optimizer.add_param_group({"params": list(module.parameters())})
        record = SeedLifecycle(seed_id=seed_id, blueprint=blueprint, slot=slot.index,
                               stages=[(SeedStage.GERMINATED.name, self.epoch)])
        self.seeds.append(record)
        self._slot_record[slot.index] = record
        self._stage_epochs[slot.index] = 0
        self._worth[slot.index] = 0.0
        self._blend_steps[slot.index] = 0
        return True, blueprint, ""

    def _advance(self) -> tuple[bool, str]:
        slot = self.active_slot()
        if slot is None:
            return False, "ADVANCE with no active seed"
        nxt = {SeedStage.GERMINATED: SeedStage.TRAINING, SeedStage.TRAINING: SeedStage.BLENDING,
               SeedStage.BLENDING: SeedStage.FOSSILIZED}[slot.stage]
        self._enter_stage(slot, nxt)
        if nxt == SeedStage.FOSSILIZED:
            record = self._slot_record[slot.index]
            record.fate = "fossilized"
        return True, ""

    def _cull(self) -> tuple[bool, str]:
        slot = self.active_slot()
        if slot is None:
            return False, "CULL with no active seed"
        record = self._slot_record[slot.index]
        if slot.stage in (SeedStage.TRAINING, SeedStage.BLENDING):
            # Its worth as last measured (nothing trained since): the probe's edge over the host in
            # TRAINING, the counterfactual contribution in BLENDING.
            record.contribution = self._worth.get(slot.index, 0.0)
        self._worth.pop(slot.index, None)
        module = slot.seed
        assert module is not None
        ids = {id(p) for p in module.parameters()}
        for p in module.parameters():
            self.optimizer.state.pop(p, None)
        self.optimizer.param_groups = [g for g in self.optimizer.param_groups
                                       if not any(id(p) in ids for p in g["params"])]
        slot.cull()
        record.stages.append((SeedStage.CULLED.name, self.epoch))
        record.fate = "culled"
        self._embargo[slot.index] = self.config.embargo_epochs
        if self.config.embargo_epochs <= 0:
            slot.release()
        return True, ""

    def apply(self, decision: Decision) -> tuple[bool, str | None, str]:
        """Apply an action. An invalid one is a no-op reported as (False, None, why), not a crash."""
        action = Action(int(decision.action))
        if action == Action.WAIT:
            return True, None, ""
        if action == Action.GERMINATE:
            return self._germinate(decision.blueprint)
        if action == Action.ADVANCE:
            ok, why = self._advance()
        else:
            ok, why = self._cull()
        return ok, None, why

    # ---------------------------------------------------------------------------------- training
    def _train_epoch(self) -> tuple[float, float]:
        """One pass over the training data in an order fixed by (rng_seed, epoch)."""
        cfg, data, model = self.config, self.data, self.model
        model.train()
        gen = torch.Generator().manual_seed(_torch_seed(self.rng_seed, RngStream.DATA_ORDER, self.epoch))
        order = torch.randperm(len(data.train_y), generator=gen).to(self.device)
        blending = [s for s in self.slots if s.stage == SeedStage.BLENDING]
        ramp = max(cfg.blending_epochs * self.steps_per_epoch, 1)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = data.train_x[idx], data.train_y[idx]
            for slot in blending:  # alpha ramps per optimizer step: no jumps
                self._blend_steps[slot.index] += 1
                slot.alpha = min(1.0, self._blend_steps[slot.index] / ramp)
            logits, probes = model.forward_train(x)
            loss = F.cross_entropy(logits, y)
            objective = loss + sum(F.cross_entropy(p, y) for p in probes) if probes else loss
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
            self.global_step += 1
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        n = len(order)
        return float(total_loss) / n, 100.0 * float(correct) / n

    @torch.no_grad()
    def _validate(self, chunk: int = 2048) -> tuple[float, float, float | None]:
        """(val loss, val accuracy, the managed seed's worth in points or None without one).

        One pass: where a TRAINING or BLENDING seed is active, `HostCNN.forward_worth` also runs
        its counterfactual from the slot on (TRAINING: probe minus host; BLENDING: host at the
        current alpha minus at alpha 0), on the same validation images.
        """
        slot = self.active_slot()
        if slot is None or slot.stage not in (SeedStage.TRAINING, SeedStage.BLENDING):
            return (*self._evaluate(self.data.val_x, self.data.val_y, chunk), None)
        self.model.eval()
        x, y = self.data.val_x, self.data.val_y
        loss, correct, other = 0.0, 0, 0
        for i in range(0, len(y), chunk):
            logits, counterfactual = self.model.forward_worth(x[i : i + chunk], slot.index)
            loss += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
            other += int((counterfactual.argmax(1) == y[i : i + chunk]).sum())
        n = len(y)
        acc, acc_other = 100.0 * correct / n, 100.0 * other / n
        worth = acc_other - acc if slot.stage == SeedStage.TRAINING else acc - acc_other
        return loss / n, acc, worth

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple[float, float]:
        self.model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(y), chunk):
            logits = self.model(x[i : i + chunk])
            loss += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
        return loss / len(y), 100.0 * correct / len(y)

    def seed_contribution(self, slot: SeedSlot) -> float:
        """Validation accuracy with the seed at its alpha minus with alpha 0 (points)."""
        with_seed = self._evaluate(self.data.val_x, self.data.val_y)[1]
        alpha, stage = slot.alpha, slot.stage
        slot.alpha = 0.0
        without = self._evaluate(self.data.val_x, self.data.val_y)[1]
        slot.alpha = alpha
        assert slot.stage == stage
        return with_seed - without

    def step(self, decision: Decision) -> StepResult:
        """Apply `decision`, train one epoch, validate; the outcome is measured after the epoch."""
        if self.done:
            raise RuntimeError("episode is over: call reset()")
        acc_before, loss_before = self.val_acc, self.val_loss
        before = self.active_slot()
        valid, blueprint, why = self.apply(decision)
        target = self.active_slot() or before  # the slot the action concerned, even once it left
        target_index = target.index if target else None

        train_loss, train_acc = self._train_epoch()
        val_loss, val_acc, worth = self._validate()
        if worth is not None:
            self._worth[self.active_slot().index] = worth  # type: ignore[union-attr]
        self.epoch += 1
        self.prev_val_loss, self.prev_val_acc = self.val_loss, self.val_acc
        self.train_loss, self.train_acc = sanitize_loss(train_loss), train_acc
        self.val_loss, self.val_acc = sanitize_loss(val_loss), val_acc
        self.plateau_epochs = self.plateau_epochs + 1 if val_acc - self.prev_val_acc < self.config.plateau_threshold else 0
        self.best_val_acc = max(self.best_val_acc, val_acc)
        self.best_val_loss = min(self.best_val_loss, self.val_loss)
        self.loss_history.append(self.val_loss)
        self.acc_history.append(val_acc)
        for slot in self.slots:  # each epoch is counted exactly once, here
            if slot.is_active:
                self._stage_epochs[slot.index] += 1
            elif slot.stage == SeedStage.CULLED:
                self._embargo[slot.index] -= 1
                if self._embargo[slot.index] <= 0:
                    slot.release()

        stage_after = self.slots[target_index].stage if target_index is not None else SeedStage.DORMANT
        outcome = Outcome(
            accuracy_change=val_acc - acc_before,
            loss_change=loss_before - self.val_loss,
            val_accuracy=val_acc,
            seed_alive=any(s.seed is not None for s in self.slots),
            stage_after=stage_after,
            reward=(val_acc - acc_before) - (0.0 if valid else self.config.invalid_action_penalty),
        )
        return StepResult(self.observe(), outcome, valid, blueprint, why)

    def finish(self) -> tuple[float, float, float]:
        """(final val accuracy, best val accuracy, test accuracy); measures surviving seeds."""
        for slot in self.slots:
            record = self._slot_record.get(slot.index)
            if record is not None and slot.seed is not None and slot.alpha > 0:
                record.contribution = self.seed_contribution(slot)
        test_acc = self._evaluate(self.data.test_x, self.data.test_y)[1]
        return self.val_acc, self.best_val_acc, test_acc
