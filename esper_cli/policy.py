"""The Tamiyo policy contract: what every policy plugin, built-in or third-party, implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .contracts import Decision, TrainingSnapshot


@dataclass(frozen=True)
class EpisodeContext:
    """What a policy may know about the episode besides the observation."""

    task: str
    max_epochs: int
    blueprints: tuple[str, ...]  # registered blueprint names, in the environment's rotation order
    n_slots: int
    rng_seed: int  # the episode's seed; a stochastic policy should draw from it


@runtime_checkable
class Policy(Protocol):
    """A Tamiyo controller.

    `reset` is called once before each episode (a stateful policy, e.g. a GRU, clears its hidden
    state there); `decide` once per epoch. Optional: `decide_batch(observations: np.ndarray) ->
    np.ndarray` of actions for many independent observations at once.
    """

    def reset(self, context: EpisodeContext) -> None: ...

    def decide(self, observation: TrainingSnapshot, context: EpisodeContext) -> Decision: ...


#: A plugin registers `register(name, factory)`; the factory builds a fresh policy from keyword
#: options (e.g. `checkpoint=` for a learned policy).
PolicyFactory = Callable[..., Policy]


def decide_batch(policy: Policy, observations: np.ndarray, context: EpisodeContext) -> np.ndarray:
    """Actions for a batch of independent observations, via the policy's fast path if it has one."""
    fast = getattr(policy, "decide_batch", None)
    if fast is not None:
        return np.asarray(fast(observations), dtype=np.int64)
    return np.asarray(
        [int(policy.decide(TrainingSnapshot.from_vector(o), context).action) for o in observations],
        dtype=np.int64,
    )


def describe(policy: Any) -> str:
    return getattr(policy, "name", type(policy).__name__)
