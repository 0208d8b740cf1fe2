"""An example third-party Simic plugin: the `patience` Tamiyo policy, a `bottleneck` blueprint,
and `linear`, a policy `simic train --policy linear` can fit (see `linear.py`).

Everything a plugin needs is here: `@hookimpl` functions named after Simic's hook specs, listed
under the `simic` entry-point group in this distribution's pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from esper_cli import hookimpl
from esper_cli.contracts import Action, Decision, SeedStage, TrainingSnapshot
from esper_cli.policy import EpisodeContext

from .linear import LinearTamiyo
from .linear import trainable as linear_trainable

__version__ = "0.1.0"


# ------------------------------------------------------------------------------------ blueprint
class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand: a cheap residual with a wide receptive field.

    The last layer starts at zero, so a new seed is an identity change (the blueprint contract).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 2)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.expand(torch.relu(self.spatial(torch.relu(self.reduce(h)))))


# --------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class PatienceConfig:
    warmup_epochs: int = 3  # never germinate before this epoch
    patience: int = 2  # epochs without a new best validation accuracy before growing a seed
    min_delta: float = 0.25  # points: a smaller gain does not count as a new best
    gap_for_norm: float = 4.0  # train minus val accuracy (points) above which we ask for `norm`
    advance_at: float = 0.5  # TRAINING: advance once the seed's improvement reaches this (points)
    giveback: float = 1.0  # TRAINING: cull once improvement falls this far below its peak
    max_training_epochs: int = 6  # TRAINING: cull when still undecided after this many epochs
    blending_bailout: float = -1.5  # BLENDING: cull early if improvement drops below this


class PatienceTamiyo:
    """A patience-based Tamiyo with per-episode state.

    - Germinates after `patience` epochs without a new best validation accuracy (its own
      bookkeeping, not the environment's plateau counter), once past `warmup_epochs`.
    - Chooses the blueprint: `norm` when the model overfits (large train/val gap), else `bottleneck`
      (or the first registered blueprint if that one is absent); a blueprint culled earlier in the
      episode is not tried again while others remain.
    - TRAINING: advances at `advance_at` points of improvement, culls when improvement falls
      `giveback` points below its peak or after `max_training_epochs`.
    - BLENDING: bails out early below `blending_bailout`; once alpha reaches 1, fossilises if the
      seed helped (improvement >= 0), else culls.
    """

    name = "patience"
    version = __version__

    def __init__(self, **options: Any) -> None:
        known = {f.name: f.type for f in fields(PatienceConfig)}
        unknown = set(options) - set(known)
        if unknown:
            raise ValueError(f"unknown patience option(s): {', '.join(sorted(unknown))}")
        defaults = PatienceConfig()
        self.config = PatienceConfig(**{k: type(getattr(defaults, k))(v) for k, v in options.items()})
        self._clear()

    def _clear(self) -> None:
        self.best: float | None = None
        self.since_best = 0
        self.peak = 0.0
        self.culled: list[str] = []
        self.current: str | None = None  # blueprint we asked for in the last GERMINATE

    # The contract: reset once per episode, decide once per epoch.
    def reset(self, context: EpisodeContext) -> None:
        self._clear()

    def _track(self, obs: TrainingSnapshot) -> None:
        if self.best is None or obs.val_accuracy > self.best + self.config.min_delta:
            self.best = obs.val_accuracy
            self.since_best = 0
        else:
            self.since_best += 1

    def _blueprint(self, obs: TrainingSnapshot, available: tuple[str, ...]) -> tuple[str | None, str]:
        gap = obs.train_accuracy - obs.val_accuracy
        wanted = ["norm", "bottleneck"] if gap > self.config.gap_for_norm else ["bottleneck", "conv_enhance"]
        why = f"gap {gap:+.1f} pts"
        candidates = [b for b in wanted + list(available) if b in available and b not in self.culled]
        if not candidates:  # everything failed once: start over with the preferred order
            candidates = [b for b in wanted + list(available) if b in available]
        return (candidates[0] if candidates else None), why

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext) -> Decision:
        c = self.config
        self._track(obs)
        stage = SeedStage(int(obs.seed_stage)) if obs.has_active_seed else SeedStage.DORMANT
        imp, n = obs.seed_improvement, obs.seed_epochs_in_stage
        if stage == SeedStage.DORMANT:
            if obs.epoch < c.warmup_epochs:
                return Decision(Action.WAIT, f"warm-up ({obs.epoch}/{c.warmup_epochs})", 1.0)
            if obs.available_slots <= 0:
                return Decision(Action.WAIT, "no free slot", 1.0)
            if self.since_best < c.patience:
                return Decision(Action.WAIT, f"new best {self.since_best} epoch(s) ago", 0.7)
            blueprint, why = self._blueprint(obs, context.blueprints)
            self.current, self.peak = blueprint, 0.0
            return Decision(Action.GERMINATE, f"no new best for {self.since_best} epochs, {why}: grow {blueprint}",
                            min(1.0, 0.5 + 0.15 * self.since_best), blueprint=blueprint)
        if stage == SeedStage.GERMINATED:
            return Decision(Action.ADVANCE, "germinated: train it in isolation", 1.0)
        if stage == SeedStage.TRAINING:
            self.peak = max(self.peak, imp)
            if imp >= c.advance_at:
                return Decision(Action.ADVANCE, f"improved {imp:+.2f} pts: blend it in", 0.9)
            if n >= 2 and imp < self.peak - c.giveback:
                return self._cull(f"fell back {self.peak - imp:.2f} pts from its peak")
            if n >= c.max_training_epochs:
                return self._cull(f"undecided after {n} epochs")
            return Decision(Action.WAIT, f"training {n} epochs, {imp:+.2f} pts (peak {self.peak:+.2f})", 0.6)
        if stage == SeedStage.BLENDING:
            if n >= 1 and imp < c.blending_bailout:
                return self._cull(f"blending hurts ({imp:+.2f} pts)")
            if obs.seed_alpha < 1.0:
                return Decision(Action.WAIT, f"blending, alpha {obs.seed_alpha:.2f}", 0.8)
            if imp >= 0:
                return Decision(Action.ADVANCE, f"fully blended and {imp:+.2f} pts: fossilize", 0.9)
            return self._cull(f"fully blended but {imp:+.2f} pts")
        return Decision(Action.WAIT, f"nothing to do in {stage.name}", 0.5)

    def _cull(self, why: str) -> Decision:
        if self.current is not None:
            self.culled.append(self.current)
        return Decision(Action.CULL, why, 0.8)


# ---------------------------------------------------------------------------------------- hooks
@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("patience", PatienceTamiyo)
    register("linear", LinearTamiyo)


@hookimpl
def register_trainable_policies(register: Callable[[str, Any], None]) -> None:
    register("linear", linear_trainable())


@hookimpl
def register_blueprints(register: Callable[[str, Callable[[int], nn.Module]], None]) -> None:
    register("bottleneck", Bottleneck)
