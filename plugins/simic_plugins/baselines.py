"""Baseline Tamiyos: what every comparison table needs beside the heuristic.

- `wait`: never grows anything (the host trained alone; paired against it, any other policy's
  difference is what its growing, culling and grafting did).
- `random`: a uniform choice among the actions valid in the current state, drawn from the
  episode's rng seed, so a run reproduces exactly and paired runs are comparable.
- `eager`: the simplest rule that grows: germinate whenever a slot is free, advance as soon as
  that is valid, never cull. It fills every slot as early as the lifecycle allows; on the default
  task it beats the heuristic on fresh seeds (README), so it is a bar a learned policy must clear
  too, not only the heuristic.

Valid actions, read from the observation as the environment defines them: WAIT always;
GERMINATE with no active seed and a DORMANT slot; ADVANCE and CULL with an active seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from esper_cli import hookimpl
from esper_cli.contracts import Action, Decision, RngStream, TrainingSnapshot
from esper_cli.policy import EpisodeContext, valid_actions


class WaitTamiyo:
    """Never grows: WAIT at every epoch."""

    name = "wait"
    version = "1.0"

    def reset(self, context: EpisodeContext) -> None:
        """Nothing to reset."""

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        return Decision(Action.WAIT, "baseline: never grow", 1.0)


class RandomTamiyo:
    """A uniform valid action per epoch, from a generator seeded by the episode's rng seed."""

    name = "random"
    version = "1.0"

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed  # optional extra entropy: random(seed=1) is another random policy
        self._rng = np.random.default_rng(0)

    def reset(self, context: EpisodeContext) -> None:
        parts = [int(context.rng_seed), RngStream.RANDOM_POLICY] + ([] if self._seed is None else [int(self._seed)])
        self._rng = np.random.default_rng(np.random.SeedSequence(parts))

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        choices = valid_actions(obs)
        action = choices[int(self._rng.integers(len(choices)))]
        probabilities = tuple(1.0 / len(choices) if a in choices else 0.0 for a in Action)
        return Decision(action, f"baseline: uniform among {len(choices)} valid actions", 1.0 / len(choices),
                        probabilities=probabilities)


class EagerTamiyo:
    """Germinate whenever a slot is free, advance as soon as valid, never cull."""

    name = "eager"
    version = "1.0"

    def reset(self, context: EpisodeContext) -> None:
        """Stateless: nothing to reset."""

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        choices = valid_actions(obs)
        if Action.ADVANCE in choices:
            return Decision(Action.ADVANCE, "baseline: advance as soon as valid", 1.0)
        if Action.GERMINATE in choices:
            return Decision(Action.GERMINATE, "baseline: germinate into a free slot", 1.0)
        return Decision(Action.WAIT, "baseline: nothing to grow", 1.0)


@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("wait", WaitTamiyo)
    register("random", RandomTamiyo)
    register("eager", EagerTamiyo)
