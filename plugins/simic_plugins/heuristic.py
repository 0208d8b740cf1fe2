"""Heuristic Tamiyo: the hand-written controller whose decisions Simic learns to imitate.

Every rule reads only the 27-feature observation, so a learned policy can in principle match it
exactly. "Improvement" is `seed_improvement`: validation accuracy now minus at the start of the
seed's current stage, in points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from esper_cli import hookimpl
from esper_cli.contracts import Action, Decision, SeedStage, TrainingSnapshot
from esper_cli.policy import EpisodeContext


@dataclass(frozen=True)
class HeuristicConfig:
    """The original's thresholds (all configurable)."""

    min_epochs_before_germinate: int = 5
    plateau_epochs_to_germinate: int = 3
    min_training_epochs: int = 3
    advance_improvement: float = 1.0  # points since TRAINING started
    cull_after_epochs: int = 5
    cull_below_improvement: float = -2.0
    max_training_epochs: int = 10  # a TRAINING seed must not wait forever
    blending_epochs: int = 5


class HeuristicTamiyo:
    """Rule-based Tamiyo. Stateless: each decision depends on the observation alone."""

    name = "heuristic"
    version = "1.0"

    def __init__(self, **overrides: Any) -> None:
        known = {f.name for f in fields(HeuristicConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown heuristic option(s): {', '.join(sorted(unknown))}")
        self.config = HeuristicConfig(**{k: type(getattr(HeuristicConfig, k))(v) for k, v in overrides.items()})

    def reset(self, context: EpisodeContext) -> None:
        """Nothing to reset: the heuristic keeps no per-episode state."""

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        """Apply the rules of DESIGN section 4 to one observation."""
        c = self.config
        stage = SeedStage(int(obs.seed_stage)) if obs.has_active_seed else SeedStage.DORMANT
        n, imp = obs.seed_epochs_in_stage, obs.seed_improvement
        if stage == SeedStage.DORMANT:
            if obs.epoch < c.min_epochs_before_germinate:
                return Decision(Action.WAIT, f"epoch {obs.epoch} < {c.min_epochs_before_germinate}: let the host warm up", 1.0)
            if obs.available_slots <= 0:
                return Decision(Action.WAIT, "no slot available", 1.0)
            if obs.plateau_epochs >= c.plateau_epochs_to_germinate:
                return Decision(Action.GERMINATE, f"plateau for {obs.plateau_epochs} epochs: grow a seed",
                                min(1.0, 0.5 + 0.1 * obs.plateau_epochs))
            return Decision(Action.WAIT, f"still improving (plateau {obs.plateau_epochs} epochs)", 0.8)
        if stage == SeedStage.GERMINATED:
            return Decision(Action.ADVANCE, "germinated: start isolated training", 1.0)
        if stage == SeedStage.TRAINING:
            if n < c.min_training_epochs:
                return Decision(Action.WAIT, f"training {n}/{c.min_training_epochs} epochs minimum", 0.9)
            if imp >= c.advance_improvement:
                return Decision(Action.ADVANCE, f"improved {imp:+.2f} points: start blending", 0.9)
            if n >= c.cull_after_epochs and imp < c.cull_below_improvement:
                return Decision(Action.CULL, f"worse by {imp:.2f} points after {n} epochs", 0.9)
            if n >= c.max_training_epochs:
                return Decision(Action.CULL, f"no progress after {n} epochs of training", 0.8)
            return Decision(Action.WAIT, f"training: {imp:+.2f} points so far", 0.6)
        if stage == SeedStage.BLENDING:
            if n < c.blending_epochs:
                return Decision(Action.WAIT, f"blending {n}/{c.blending_epochs} epochs", 0.9)
            if imp > 0:
                return Decision(Action.ADVANCE, f"blending helped ({imp:+.2f} points): fossilize", 0.9)
            return Decision(Action.CULL, f"blending did not help ({imp:+.2f} points)", 0.9)
        return Decision(Action.WAIT, f"nothing to do in stage {stage.name}", 0.5)


@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("heuristic", HeuristicTamiyo)
