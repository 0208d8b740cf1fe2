"""Heuristic Tamiyo v2: the hand-written controller whose decisions Simic learns to imitate.

Every rule reads only the 27-feature observation (schema v2), so a learned policy can in
principle match it exactly. "Worth" is `seed_improvement`, the seed's own measured worth in points
of validation accuracy: in TRAINING the isolated probe's accuracy minus the host's, in BLENDING
accuracy at the current alpha minus at alpha 0 (see `esper_cli.contracts.FEATURE_MEANINGS`).

The rules, in order, with the `HeuristicConfig` field that sets each threshold:

- No active seed: WAIT before epoch `min_epochs_before_germinate` (the host's first fast epochs
  say nothing about a plateau); WAIT with no DORMANT slot; GERMINATE once `plateau_epochs` reaches
  `plateau_epochs_to_germinate`; else WAIT.
- GERMINATED: ADVANCE (start isolated training).
- TRAINING: WAIT for `min_training_epochs`; then ADVANCE (start blending) when the probe beats
  the host by at least `advance_improvement` points; CULL once the seed has trained
  `cull_after_epochs` epochs and still stays behind, worth under `cull_below_improvement`; CULL at
  `max_training_epochs` whatever the worth (a seed must not wait forever); else WAIT.
- BLENDING: WAIT for `blending_epochs` (the environment's alpha ramp has the same default length);
  then ADVANCE (fossilize) when the contribution is above `fossilize_above`, else CULL.

The defaults are tuned for the default digits task (25 epochs, 2 slots). A seed that adds
capacity helps most when grown early (the host's later layers then co-adapt with it), so growth
starts at the first plateau epoch after epoch 2, and the TRAINING verdict comes after two or three
epochs: a probe at least level with the host (`advance_improvement` 0) starts blending, one still
behind it after three epochs (`cull_below_improvement` 0; one validation image is 0.28 points) is
culled while it is isolated, where culling costs the host nothing. Blending decides on the
counterfactual contribution.
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
    """Heuristic Tamiyo v2's thresholds (all configurable; see the module docstring's rules)."""

    min_epochs_before_germinate: int = 2
    plateau_epochs_to_germinate: int = 1
    min_training_epochs: int = 2
    advance_improvement: float = 0.0  # probe minus host, points
    cull_after_epochs: int = 3
    cull_below_improvement: float = 0.0  # probe minus host, points
    max_training_epochs: int = 5
    blending_epochs: int = 3
    fossilize_above: float = 0.0  # contribution (alpha vs alpha 0), points


class HeuristicTamiyo:
    """Rule-based Tamiyo. Stateless: each decision depends on the observation alone."""

    name = "heuristic"
    version = "2.0"

    def __init__(self, **overrides: Any) -> None:
        known = {f.name for f in fields(HeuristicConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown heuristic option(s): {', '.join(sorted(unknown))}")
        self.config = HeuristicConfig(**{k: type(getattr(HeuristicConfig, k))(v) for k, v in overrides.items()})

    def reset(self, context: EpisodeContext) -> None:
        """Nothing to reset: the heuristic keeps no per-episode state."""

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        """Apply the rules of the module docstring to one observation."""
        c = self.config
        stage = SeedStage(int(obs.seed_stage)) if obs.has_active_seed else SeedStage.DORMANT
        n, worth = obs.seed_epochs_in_stage, obs.seed_improvement
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
            if worth >= c.advance_improvement:
                return Decision(Action.ADVANCE, f"probe beats the host by {worth:+.2f} points: start blending", 0.9)
            if n >= c.cull_after_epochs and worth < c.cull_below_improvement:
                return Decision(Action.CULL, f"probe stays behind ({worth:+.2f} points) after {n} epochs", 0.9)
            if n >= c.max_training_epochs:
                return Decision(Action.CULL, f"no clear gain after {n} epochs of training", 0.8)
            return Decision(Action.WAIT, f"training: probe {worth:+.2f} points vs the host", 0.6)
        if stage == SeedStage.BLENDING:
            if n < c.blending_epochs:
                return Decision(Action.WAIT, f"blending {n}/{c.blending_epochs} epochs", 0.9)
            if worth > c.fossilize_above:
                return Decision(Action.ADVANCE, f"contributes {worth:+.2f} points: fossilize", 0.9)
            return Decision(Action.CULL, f"contributes {worth:+.2f} points: cull", 0.9)
        return Decision(Action.WAIT, f"nothing to do in stage {stage.name}", 0.5)


@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("heuristic", HeuristicTamiyo)
