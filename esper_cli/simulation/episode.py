"""Run one episode: a policy drives a morphogenetic training run; every decision is recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..contracts import (
    N_ACTIONS,
    Action,
    Decision,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    RngStream,
    episode_rng_seed,
)
from ..policy import EpisodeContext, Policy, describe
from ..tasks import Task
from .blueprints import BlueprintFactory
from .environment import MorphogeneticEnv


class PolicyError(Exception):
    """A policy raised or answered nonsense; the episode is abandoned, the store untouched."""


def _ask(policy: Policy, name: str, obs: Any, context: EpisodeContext, where: str) -> Decision:
    try:
        decision = policy.decide(obs, context)
    except Exception as exc:
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
    if decision.probabilities is not None:
        p = np.asarray(decision.probabilities, dtype=np.float64)
        if (p.shape != (N_ACTIONS,) or not np.isfinite(p).all() or (p < 0).any()
                or abs(p.sum() - 1.0) > 1e-6 or p[int(decision.action)] <= 0):
            raise PolicyError(f"policy '{name}' returned probabilities {decision.probabilities!r} {where}; "
                              f"expected {N_ACTIONS} non-negative numbers summing to 1, positive for its action")
    return decision


def _explore(decision: Decision, mixture: np.ndarray, valid: list[Action], eps: float,
             rng: np.random.Generator) -> tuple[Decision, float]:
    """Epsilon-mix a uniform valid action into `decision`; (the decision to apply, its probability).

    `mixture` is the probability the driving policy (mixed with an expert) gave each action; the
    behaviour probability of the action applied is (1 - eps) * mixture[a] + eps * [a valid] / |valid|.
    One draw per decision (two when exploring), so an episode reproduces from its seed.
    """
    if eps > 0.0 and rng.random() < eps:
        action = valid[int(rng.integers(len(valid)))]
        if action != Action(int(decision.action)):
            chose = Action(int(decision.action)).name
            decision = Decision(action, f"explore (eps {eps:g}): uniform among {len(valid)} valid actions; "
                                f"policy chose {chose}", 1.0 / len(valid))
    a = Action(int(decision.action))
    return decision, float((1.0 - eps) * mixture[a] + (eps / len(valid) if a in valid else 0.0))


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
    expert: Policy | None = None,
    expert_name: str | None = None,
    observers: Mapping[str, Policy] | None = None,
) -> Episode:
    """Run episode `index` of a run seeded `seed`. Same inputs, same episode (on CPU).

    DAgger (Ross et al., 2011): with an `expert`, the expert is asked at every state (in order,
    after its own `reset`, so a stateful expert works) and its action is stored as the decision's
    `expert_action` label. The action applied is the expert's with probability `config.beta`,
    else the learner's; the coin flips come from the episode's rng seed, so the episode still
    reproduces exactly. The learner is asked at every state too (its hidden state stays in step).
    With `config.beta == 0` (the default) the learner always acts: on-policy expert labels.

    `observers` (shadow mode) are other policies asked on the same observations, each with its
    own state; their actions are returned in `Episode.shadow` (name -> list of actions) and
    never applied.

    Exploration (`config.explore` = eps > 0): with probability eps the action applied is a uniform
    draw among the actions valid in the current state instead (its own stream of the episode's
    seed). Every decision records `behaviour_prob`, the probability the behaviour policy gave the
    action applied: 1 for a deterministic policy without exploration or expert mixture.
    The episode keeps the observation after its last epoch (`final_observation`).
    """
    rng_seed = episode_rng_seed(seed, index)
    if config.expert is not None and expert is None:
        raise ValueError(f"config names the expert {config.expert!r} but no expert policy was given")
    if expert is not None:
        expert_name = expert_name or config.expert or describe(expert)
    env = MorphogeneticEnv(config, task, blueprints)
    obs = env.reset(rng_seed)
    context = EpisodeContext(task=config.task, max_epochs=config.epochs, blueprints=tuple(blueprints),
                             n_slots=len(env.slots), rng_seed=rng_seed)
    others: dict[str, Policy] = {}
    if expert is not None:
        others[f"expert '{expert_name}'"] = expert
    for name, observer in (observers or {}).items():
        others[f"shadow policy '{name}'"] = observer
    for label, p in [(f"policy '{policy_name}'", policy), *others.items()]:
        try:
            p.reset(context)
        except Exception as exc:
            raise PolicyError(f"{label} raised in reset(): {type(exc).__name__}: {exc}") from exc
    coin = np.random.default_rng(np.random.SeedSequence([rng_seed, RngStream.DAGGER_COIN]))
    beta = float(config.beta) if expert is not None else 0.0
    explore_rng = np.random.default_rng(np.random.SeedSequence([rng_seed, RngStream.EXPLORATION]))
    eps = float(config.explore)
    shadow: dict[str, list[int]] = {name: [] for name in (observers or {})}
    records: list[DecisionRecord] = []
    while not env.done:
        where = f"at epoch {env.epoch} of episode {index} (seed {seed})"
        decision = _ask(policy, policy_name, obs, context, where)
        label = -1
        acting = decision
        mixture = decision.action_probabilities()
        if expert is not None:
            advice = _ask(expert, str(expert_name), obs, context, where)
            label = int(advice.action)
            if beta > 0.0:
                mixture = (1.0 - beta) * mixture + beta * advice.action_probabilities()
            if beta > 0.0 and coin.random() < beta:
                learner = Action(int(decision.action)).name
                acting = Decision(advice.action, f"[expert {expert_name}, learner {learner}] {advice.reason}",
                                  advice.confidence, advice.blueprint)
        for name, observer in (observers or {}).items():
            shadow[name].append(int(_ask(observer, name, obs, context, where).action))
        acting, behaviour_prob = _explore(acting, mixture, env.valid_actions(), eps, explore_rng)
        vector = obs.to_vector()
        step = env.step(acting)
        reason = acting.reason if step.valid else f"{acting.reason} [no-op: {step.message}]".strip()
        records.append(DecisionRecord(
            observation=vector, action=Action(int(acting.action)), valid=step.valid,
            confidence=float(acting.confidence), reason=reason, blueprint=step.blueprint,
            outcome=step.outcome, expert_action=label, behaviour_prob=behaviour_prob,
        ))
        obs = step.observation
    final, best, test = env.finish()
    episode = Episode(
        seed=seed, index=index, rng_seed=rng_seed, config=config, policy=policy_name,
        policy_version=policy_version, decisions=records, final_accuracy=final,
        best_accuracy=best, test_accuracy=test, seeds=env.seeds, expert=expert_name,
        final_observation=obs.to_vector(),
    )
    if observers:
        episode.shadow = shadow
    return episode
