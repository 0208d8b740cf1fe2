"""Run episodes: policies drive morphogenetic training runs, many stepped together; every decision
is recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    TrainingSnapshot,
    episode_rng_seed,
)
from ..policy import EpisodeContext, Policy, describe
from ..tasks import Task
from .blueprints import BlueprintFactory
from .environment import Member, MorphogeneticEnv, StepResult


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


@dataclass
class EpisodeSpec:
    """One episode of a batch: who drives it, which episode it is, who else is asked."""

    policy: Policy
    config: EpisodeConfig
    seed: int
    index: int
    policy_name: str
    policy_version: str = ""
    expert: Policy | None = None
    expert_name: str | None = None
    observers: Mapping[str, Policy] | None = None


class _Driver:
    """One member's side of the loop: asks its policies, applies DAgger's coin and exploration,
    keeps its records. A policy that raises fails this member only (`error`); it WAITs after."""

    def __init__(self, spec: EpisodeSpec, n_slots: int, blueprints: Sequence[str]) -> None:
        self.spec = spec
        config = spec.config
        self.rng_seed = episode_rng_seed(spec.seed, spec.index)
        self.expert_name = None
        if spec.expert is not None:
            self.expert_name = spec.expert_name or config.expert or describe(spec.expert)
        self.context = EpisodeContext(task=config.task, max_epochs=config.epochs, blueprints=tuple(blueprints),
                                      n_slots=n_slots, rng_seed=self.rng_seed)
        self.coin = np.random.default_rng(np.random.SeedSequence([self.rng_seed, RngStream.DAGGER_COIN]))
        self.beta = float(config.beta) if spec.expert is not None else 0.0
        self.explore_rng = np.random.default_rng(np.random.SeedSequence([self.rng_seed, RngStream.EXPLORATION]))
        self.eps = float(config.explore)
        self.shadow: dict[str, list[int]] = {name: [] for name in (spec.observers or {})}
        self.records: list[DecisionRecord] = []
        self.error: PolicyError | None = None
        self._pending: tuple[Decision, np.ndarray, int, float] | None = None
        others: dict[str, Policy] = {}
        if spec.expert is not None:
            others[f"expert '{self.expert_name}'"] = spec.expert
        for name, observer in (spec.observers or {}).items():
            others[f"shadow policy '{name}'"] = observer
        for label, p in [(f"policy '{spec.policy_name}'", spec.policy), *others.items()]:
            try:
                p.reset(self.context)
            except Exception as exc:
                self.error = PolicyError(f"{label} raised in reset(): {type(exc).__name__}: {exc}")
                return

    def decide(self, obs: TrainingSnapshot, valid: list[Action], epoch: int) -> Decision:
        """The decision to apply at this state (WAIT for a failed member)."""
        if self.error is not None:
            return Decision(Action.WAIT)
        try:
            acting, behaviour_prob, label = self._decide(obs, valid, epoch)
        except PolicyError as exc:
            self.error = exc
            return Decision(Action.WAIT)
        self._pending = (acting, obs.to_vector(), label, behaviour_prob)
        return acting

    def _decide(self, obs: TrainingSnapshot, valid: list[Action], epoch: int) -> tuple[Decision, float, int]:
        spec = self.spec
        where = f"at epoch {epoch} of episode {spec.index} (seed {spec.seed})"
        decision = _ask(spec.policy, spec.policy_name, obs, self.context, where)
        label = -1
        acting = decision
        mixture = decision.action_probabilities()
        if spec.expert is not None:
            advice = _ask(spec.expert, str(self.expert_name), obs, self.context, where)
            label = int(advice.action)
            if self.beta > 0.0:
                mixture = (1.0 - self.beta) * mixture + self.beta * advice.action_probabilities()
            if self.beta > 0.0 and self.coin.random() < self.beta:
                learner = Action(int(decision.action)).name
                acting = Decision(advice.action, f"[expert {self.expert_name}, learner {learner}] {advice.reason}",
                                  advice.confidence, advice.blueprint)
        for name, observer in (spec.observers or {}).items():
            self.shadow[name].append(int(_ask(observer, name, obs, self.context, where).action))
        acting, behaviour_prob = _explore(acting, mixture, valid, self.eps, self.explore_rng)
        return acting, behaviour_prob, label

    def record(self, step: StepResult) -> None:
        if self.error is not None or self._pending is None:
            return
        acting, vector, label, behaviour_prob = self._pending
        self._pending = None
        reason = acting.reason if step.valid else f"{acting.reason} [no-op: {step.message}]".strip()
        self.records.append(DecisionRecord(
            observation=vector, action=Action(int(acting.action)), valid=step.valid,
            confidence=float(acting.confidence), reason=reason, blueprint=step.blueprint,
            outcome=step.outcome, expert_action=label, behaviour_prob=behaviour_prob,
        ))

    def episode(self, member: Member, final: float, best: float, test: float) -> Episode | PolicyError:
        if self.error is not None:
            return self.error
        spec = self.spec
        episode = Episode(
            seed=spec.seed, index=spec.index, rng_seed=self.rng_seed, config=spec.config, policy=spec.policy_name,
            policy_version=spec.policy_version, decisions=self.records, final_accuracy=final,
            best_accuracy=best, test_accuracy=test, seeds=member.seeds, expert=self.expert_name,
            final_observation=member.observe().to_vector(),
        )
        if spec.observers:
            episode.shadow = self.shadow
        return episode


def run_episodes(specs: Sequence[EpisodeSpec], *, task: Task,
                 blueprints: Mapping[str, BlueprintFactory]) -> list[Episode | PolicyError]:
    """Run the episodes of `specs` together, one fused training computation for all (see
    `environment.MorphogeneticEnv`); each entry of the result is that spec's episode, or the
    `PolicyError` that ended it. An episode is the same whichever episodes share its batch.

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
    if not specs:
        return []
    for s in specs:
        if s.config.expert is not None and s.expert is None:
            raise ValueError(f"config names the expert {s.config.expert!r} but no expert policy was given")
    env = MorphogeneticEnv([s.config for s in specs], task, blueprints)
    observations = env.reset([episode_rng_seed(s.seed, s.index) for s in specs])
    drivers = [_Driver(s, env.engine.n_slots, tuple(blueprints)) for s in specs]
    while not env.done:
        decisions = [d.decide(obs, m.valid_actions(), m.epoch)
                     for d, obs, m in zip(drivers, observations, env.members)]
        steps = env.step(decisions)
        for d, step in zip(drivers, steps):
            d.record(step)
        observations = [step.observation for step in steps]
    ends = env.finish()
    return [d.episode(m, *end) for d, m, end in zip(drivers, env.members, ends)]


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
    """Run episode `index` of a run seeded `seed` on its own (`run_episodes` of one); raises the
    `PolicyError` that ended it. Same inputs, same episode (on CPU), as in any batch."""
    spec = EpisodeSpec(policy, config, seed, index, policy_name, policy_version, expert, expert_name, observers)
    result = run_episodes([spec], task=task, blueprints=blueprints)[0]
    if isinstance(result, PolicyError):
        raise result
    return result
