"""Run one episode: a policy drives a morphogenetic training run; every decision is recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .blueprints import BlueprintFactory
from .contracts import Action, Decision, DecisionRecord, Episode, EpisodeConfig, episode_rng_seed
from .environment import MorphogeneticEnv
from .policy import EpisodeContext, Policy
from .tasks import Task


class PolicyError(Exception):
    """A policy raised or answered nonsense; the episode is abandoned, the store untouched."""


def _ask(policy: Policy, name: str, obs: Any, context: EpisodeContext, where: str) -> Decision:
    try:
        decision = policy.decide(obs, context)
    except Exception as exc:  # noqa: BLE001 - any policy bug becomes one clear message
        raise PolicyError(f"policy '{name}' raised in decide() {where}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(decision, Decision):
        try:
            decision = Decision(Action(int(decision)))  # a bare action is accepted
        except (TypeError, ValueError):
            raise PolicyError(f"policy '{name}' returned {decision!r} {where}; expected a Decision") from None
    try:
        Action(int(decision.action))
    except (TypeError, ValueError):
        raise PolicyError(f"policy '{name}' returned unknown action {decision.action!r} {where}") from None
    return decision


def run_episode(
    policy: Policy,
    config: EpisodeConfig,
    seed: int,
    index: int,
    *,
    task: Task,
    blueprints: Mapping[str, BlueprintFactory],
    policy_name: str,
    policy_version: str = "",
) -> Episode:
    """Run episode `index` of a run seeded `seed`. Same inputs, same episode (on CPU)."""
    rng_seed = episode_rng_seed(seed, index)
    env = MorphogeneticEnv(config, task, blueprints)
    obs = env.reset(rng_seed)
    context = EpisodeContext(task=config.task, max_epochs=config.epochs, blueprints=tuple(blueprints),
                             n_slots=len(env.slots), rng_seed=rng_seed)
    try:
        policy.reset(context)
    except Exception as exc:  # noqa: BLE001
        raise PolicyError(f"policy '{policy_name}' raised in reset(): {type(exc).__name__}: {exc}") from exc
    records: list[DecisionRecord] = []
    while not env.done:
        where = f"at epoch {env.epoch} of episode {index} (seed {seed})"
        decision = _ask(policy, policy_name, obs, context, where)
        vector = obs.to_vector()
        step = env.step(decision)
        reason = decision.reason if step.valid else f"{decision.reason} [no-op: {step.message}]".strip()
        records.append(DecisionRecord(
            observation=vector, action=Action(int(decision.action)), valid=step.valid,
            confidence=float(decision.confidence), reason=reason, blueprint=step.blueprint,
            outcome=step.outcome,
        ))
        obs = step.observation
    final, best, test = env.finish()
    return Episode(
        seed=seed, index=index, rng_seed=rng_seed, config=config, policy=policy_name,
        policy_version=policy_version, decisions=records, final_accuracy=final,
        best_accuracy=best, test_accuracy=test, seeds=env.seeds,
    )
