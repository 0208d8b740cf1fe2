"""Synthetic episodes for tests that need a store's contents without running training."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from esper_cli.contracts import (
    N_FEATURES,
    Action,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    Outcome,
    SeedLifecycle,
    SeedStage,
    episode_rng_seed,
)


def make_episode(index: int, n: int = 5, seed: int = 7, policy: str = "heuristic") -> Episode:
    """A deterministic synthetic episode: n decisions, two seeds, floats that need float64."""
    rng = np.random.default_rng([seed, index])
    decisions = []
    for t in range(n):
        action = Action(int(rng.integers(0, 4)))
        decisions.append(DecisionRecord(
            observation=rng.normal(size=N_FEATURES).astype(np.float32),
            action=action,
            valid=bool(t % 3),
            confidence=float(rng.random()),
            reason=f"epoch {t}: plateau {rng.random():.3f} ünïcode" if t % 4 else "",
            blueprint=("conv_enhance" if t % 2 else "attention") if action == Action.GERMINATE else None,
            outcome=Outcome(
                accuracy_change=float(rng.normal()),
                loss_change=float(rng.normal()) / 3,
                val_accuracy=100 * float(rng.random()),
                seed_alive=bool(t % 2),
                stage_after=SeedStage(t % 6),
                reward=float(rng.normal()) / 7,
            ),
            expert_action=int(rng.integers(-1, 4)),
        ))
    seeds = [
        SeedLifecycle(0, "conv_enhance", 0, [("GERMINATED", 1), ("TRAINING", 2), ("FOSSILIZED", 9)],
                      "fossilized", 1.0 / 3),
        SeedLifecycle(1, "attention", 1, [("GERMINATED", 4), ("CULLED", 6)], "culled", None),
    ]
    return Episode(
        seed=seed, index=index, rng_seed=episode_rng_seed(seed, index),
        config=EpisodeConfig(epochs=n, lr=0.1 / 3), policy=policy, policy_version="1.0",
        decisions=decisions, final_accuracy=90 + 1 / 3, best_accuracy=91 + 2 / 3,
        test_accuracy=89.1 + index, seeds=seeds, expert="heuristic" if index % 2 else None,
    )


def assert_same_episode(got: Episode, want: Episode) -> None:
    """Field-by-field equality (DecisionRecord holds arrays, so == on episodes is ambiguous)."""
    assert len(got.decisions) == len(want.decisions)
    for g, w in zip(got.decisions, want.decisions):
        np.testing.assert_array_equal(g.observation, w.observation)
        assert g.observation.dtype == np.float32
        assert (g.action, g.valid, g.confidence, g.reason, g.blueprint, g.outcome, g.expert_action) == \
               (w.action, w.valid, w.confidence, w.reason, w.blueprint, w.outcome, w.expert_action)
    if got.final_observation is None or want.final_observation is None:
        assert got.final_observation is want.final_observation
    else:
        np.testing.assert_array_equal(got.final_observation, want.final_observation)
    assert replace(got, decisions=[], final_observation=None) == replace(want, decisions=[], final_observation=None)
