"""The library under `simic collect` and `simic dagger`, called directly (no CliRunner).

`collect_episodes` runs only the episodes a store lacks and reports through its callbacks;
`run_dagger` returns one result per round, writes each round's checkpoint and follows the store;
`policy_version` is the one answer to "which version recorded this episode".
"""

from __future__ import annotations

import pytest
from simic_plugins.heuristic import HeuristicTamiyo

from esper_cli.contracts import EpisodeConfig
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.learning.dagger_loop import (
    DaggerConfig,
    DaggerProgress,
    avoided_rng_seeds,
    round_checkpoint,
    run_dagger,
    store_episodes,
)
from esper_cli.plugins import build_registry
from esper_cli.policy import policy_version
from esper_cli.running.collection import CollectConfig, collect_episodes
from esper_cli.running.runner import make_runner

EPOCHS = 12
SEED = 5  # episode 1 of run seed 5 grows a seed within 12 epochs


@pytest.fixture(scope="module")
def reg():
    return build_registry()


class CountingHeuristic(HeuristicTamiyo):
    """The heuristic, counting the episodes it is reset for."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes = 0

    def reset(self, context) -> None:
        self.episodes += 1
        super().reset(context)


def collect(reg, store, episodes, **kw):
    started, seen = [], []
    with EpisodeWriter(store) as writer:
        plan = CollectConfig(episode=EpisodeConfig(epochs=4), policy="heuristic", seed=SEED, episodes=episodes,
                             version="2.0")
        with make_runner(registry=reg) as runner:
            result = collect_episodes(writer, runner, plan, on_start=lambda *a: started.append(a),
                                      on_episode=seen.append, **kw)
    return result, started, seen


def test_collect_runs_only_the_missing_episodes_and_reports_each(reg, tmp_path):
    store = tmp_path / "s.h5"
    agent = CountingHeuristic()
    first, started, seen = collect(reg, store, 2, agent=agent)
    assert (first.added, first.present, first.lost) == (2, 0, [])
    assert started == [(2, None)] and [e.index for e in seen] == [0, 1]
    assert agent.episodes == 1  # the policy already built drives the first episode; the next is built fresh
    more, started, seen = collect(reg, store, 3)
    assert (more.added, more.present) == (1, 2) and started == [(1, None)] and [e.index for e in seen] == [2]
    again, started, seen = collect(reg, store, 3)
    assert (again.added, again.present) == (0, 3) and started == [(0, None)] and seen == []
    with EpisodeReader(store) as reader:
        eps = [reader.episode(i) for i in range(reader.n_episodes)]
    assert sorted(e.index for e in eps) == [0, 1, 2] and {e.policy_version for e in eps} == {"2.0"}


def test_policy_version_prefers_the_agent_then_the_plugin(reg):
    assert policy_version(reg, "heuristic", HeuristicTamiyo()) == "2.0"
    core = reg.plugin_of("policy", "heuristic")
    assert policy_version(reg, "heuristic") == (str(core.version) if core and core.version else "unknown")
    assert policy_version(reg, "no-such-policy") == "unknown"


def test_run_dagger_returns_a_result_per_round_and_keeps_each_checkpoint(reg, tmp_path):
    store, final = tmp_path / "agg.h5", tmp_path / "ckpt" / "mlp.safetensors"
    cfg = DaggerConfig(policy="mlp", expert="heuristic", episode=EpisodeConfig(epochs=EPOCHS), store=store,
                       checkpoint=final, rounds=1, episodes_per_round=2, bootstrap_episodes=2, seed=SEED,
                       compare_episodes=1, train_epochs=5, allow_missing_classes=True)
    avoided = avoided_rng_seeds(cfg)  # an empty store: the bootstrap's and round 1's episodes
    assert len(avoided) == 4
    stages, episodes, epochs, rounds = [], [], [], []
    progress = DaggerProgress(on_stage=lambda d, n: stages.append((d, n)), on_episode=lambda: episodes.append(1),
                              on_train_epoch=epochs.append, on_round=rounds.append)
    results = run_dagger(cfg, reg, progress)
    assert [r["round"] for r in results] == [0, 1] and [r["beta"] for r in results] == [None, 0.5]
    assert rounds == results
    assert stages == [("round 0: collect heuristic", 2), ("round 0: train mlp", 5),
                      ("round 0: compare heuristic vs mlp", 2), ("round 1: collect mlp+heuristic beta 0.5", 2),
                      ("round 1: train mlp", 5), ("round 1: compare heuristic vs mlp", 1)]
    assert len(episodes) == 2 + 2 + 2 + 1 and epochs and epochs[-1].epoch <= 5
    for r in results:
        assert r["checkpoint"] == str(round_checkpoint(final, r["round"])) and round_checkpoint(final, r["round"]).is_file()
        assert 0.0 <= r["on_policy_agreement"] <= 1.0 and r["expert_labelled_decisions"] == EPOCHS
    assert [r["store_episodes"] for r in results] == [2, 4] and store_episodes(store) == (4, 4 * EPOCHS)
    with EpisodeReader(store) as reader:
        eps = [reader.episode(i) for i in range(reader.n_episodes)]
    assert [e.policy for e in eps] == ["heuristic"] * 2 + ["mlp"] * 2
    assert all(e.expert == "heuristic" and e.config.beta == 0.5 for e in eps[2:])
    assert {e.rng_seed for e in eps} == avoided
