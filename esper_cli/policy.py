"""The Tamiyo policy contract: what every policy plugin, built-in or third-party, implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .contracts import FEATURE_NAMES, N_ACTIONS, Action, Decision, TrainingSnapshot

if TYPE_CHECKING:
    from .plugins import Registry


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


def describe(policy: Any) -> str:
    return getattr(policy, "name", type(policy).__name__)


def policy_version(registry: Registry, name: str, agent: Any = None) -> str:
    """The version an episode records for policy `name`: the built `agent`'s own `version` (a
    learned policy names its checkpoint there), else its plugin's distribution version, else
    "unknown"."""
    own = getattr(agent, "version", None)
    if own:
        return str(own)
    plugin = registry.plugin_of("policy", name)
    return str(plugin.version) if plugin is not None and plugin.version else "unknown"


def valid_actions(obs: TrainingSnapshot) -> list[Action]:
    """The actions that are not no-ops in the state `obs` describes, in action order."""
    return [a for a, ok in zip(Action, valid_action_mask(obs.to_vector())) if ok]


_ACTIVE, _SLOTS = FEATURE_NAMES.index("has_active_seed"), FEATURE_NAMES.index("available_slots")


def valid_action_mask(observations: np.ndarray) -> np.ndarray:
    """`valid_actions` for raw observation vectors, (N, 27) or (27,): a boolean (N, 4) or (4,) mask."""
    x = np.asarray(observations)
    active, free = x[..., _ACTIVE] > 0.5, x[..., _SLOTS] > 0.5
    mask = np.zeros((*x.shape[:-1], N_ACTIONS), dtype=bool)
    mask[..., Action.WAIT] = True
    mask[..., Action.GERMINATE] = ~active & free
    mask[..., Action.ADVANCE] = active
    mask[..., Action.CULL] = active
    return mask
