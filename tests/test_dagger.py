"""DAgger: the learner acts (mixed with the expert by beta), the expert labels every state.

`run_episode(expert=...)`, the episode identity of DAgger runs, the store round trip, training on
expert labels, and `simic dagger --rounds 1` end to end (tiny).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from simic_plugins.heuristic import HeuristicTamiyo
from test_store import committed
from typer.testing import CliRunner

from esper_cli import hookimpl
from esper_cli.cli import app
from esper_cli.contracts import ENGINE_VERSION, Action, Decision, EpisodeConfig, TrainingSnapshot
from esper_cli.data.decisions import load_decisions
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.plugins import build_registry, registered_plugin
from esper_cli.simulation.episode import run_episode

runner = CliRunner()
EPOCHS = 12
SEED = 5  # episode 1 of run seed 5 grows a seed within 12 epochs


class AlwaysGerminate:
    """A learner that disagrees with the heuristic almost everywhere (so mixing is visible)."""

    name = "always-germinate"

    def __init__(self) -> None:
        self.seen = 0

    def reset(self, context) -> None:
        self.seen = 0

    def decide(self, obs, context=None) -> Decision:
        self.seen += 1
        return Decision(Action.GERMINATE, "always")


@pytest.fixture(scope="module")
def reg():
    return build_registry()


def episode(reg, learner, config, index=1, expert=None):
    return run_episode(learner, config, SEED, index, task=reg.tasks["digits"], blueprints=reg.blueprints,
                       policy_name=getattr(learner, "name", "learner"), expert=expert)


def test_plain_episode_keys_do_not_change_and_dagger_keys_do():
    # the v2 defaults under the first engine, with no DAgger fields: the key old stores were written with
    assert EpisodeConfig(engine=1).key("heuristic") == "e6fb07077d0600c7"
    assert "engine" not in EpisodeConfig(engine=1).to_dict()
    assert EpisodeConfig.from_dict(EpisodeConfig(engine=1).to_dict()).engine == 1
    # the engine is part of the identity: today's episodes never share a key with engine 1's
    assert EpisodeConfig().engine == ENGINE_VERSION != 1
    assert EpisodeConfig().key("heuristic") != "e6fb07077d0600c7"
    assert EpisodeConfig.from_dict(EpisodeConfig().to_dict()) == EpisodeConfig()
    assert "expert" not in EpisodeConfig().to_dict() and "beta" not in EpisodeConfig().to_dict()
    dagger = EpisodeConfig(expert="heuristic", beta=0.5)
    keys = {EpisodeConfig().key("mlp"), dagger.key("mlp"), EpisodeConfig(expert="heuristic", beta=0.25).key("mlp"),
            EpisodeConfig(expert="gru", beta=0.5).key("mlp")}
    assert len(keys) == 4
    assert EpisodeConfig.from_dict(dagger.to_dict()) == dagger
    with pytest.raises(ValueError, match="beta"):
        EpisodeConfig(beta=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        EpisodeConfig(expert="heuristic", beta=1.5)


def test_beta_mixes_reproducibly_and_the_expert_labels_every_state(reg):
    config = EpisodeConfig(epochs=EPOCHS, expert="heuristic", beta=0.5)
    learner = AlwaysGerminate()
    ep = episode(reg, learner, config, expert=HeuristicTamiyo())
    assert learner.seen == EPOCHS  # the learner is asked at every state, even where the expert acts
    assert ep.expert == "heuristic" and ep.config.expert == "heuristic"
    fresh = HeuristicTamiyo()
    labels = [int(fresh.decide(TrainingSnapshot.from_vector(d.observation)).action) for d in ep.decisions]
    assert [d.expert_action for d in ep.decisions] == labels
    by_expert = [d.reason.startswith("[expert heuristic, learner GERMINATE]") for d in ep.decisions]
    assert 0 < sum(by_expert) < EPOCHS  # both acted
    for d, expert_acted in zip(ep.decisions, by_expert):
        assert int(d.action) == (d.expert_action if expert_acted else int(Action.GERMINATE))
    again = episode(reg, AlwaysGerminate(), config, expert=HeuristicTamiyo())
    assert [int(d.action) for d in again.decisions] == [int(d.action) for d in ep.decisions]
    assert again.final_accuracy == ep.final_accuracy


def test_beta_one_is_the_expert_and_beta_zero_is_the_learner(reg):
    plain = episode(reg, HeuristicTamiyo(), EpisodeConfig(epochs=EPOCHS))
    full = episode(reg, AlwaysGerminate(), EpisodeConfig(epochs=EPOCHS, expert="heuristic", beta=1.0),
                   expert=HeuristicTamiyo())
    assert [int(d.action) for d in full.decisions] == [int(d.action) for d in plain.decisions]
    assert full.final_accuracy == plain.final_accuracy and plain.seeds_created >= 1
    alone = episode(reg, AlwaysGerminate(), EpisodeConfig(epochs=EPOCHS))
    labelled = episode(reg, AlwaysGerminate(), EpisodeConfig(epochs=EPOCHS), expert=HeuristicTamiyo())
    assert [int(d.action) for d in labelled.decisions] == [int(d.action) for d in alone.decisions]
    assert labelled.final_accuracy == alone.final_accuracy
    assert all(d.expert_action >= 0 for d in labelled.decisions) and all(d.expert_action == -1 for d in alone.decisions)
    with pytest.raises(ValueError, match="no expert policy"):
        episode(reg, AlwaysGerminate(), EpisodeConfig(epochs=EPOCHS, expert="heuristic", beta=0.5))


def test_dagger_episodes_keep_both_actions_in_the_store_and_train_on_the_labels(reg, tmp_path):
    store = tmp_path / "dagger.h5"
    config = EpisodeConfig(epochs=EPOCHS, expert="heuristic", beta=0.5)
    dagger = episode(reg, AlwaysGerminate(), config, expert=HeuristicTamiyo())
    plain = episode(reg, HeuristicTamiyo(), EpisodeConfig(epochs=EPOCHS), index=0)
    with EpisodeWriter(store) as writer:
        writer.append(plain)
        writer.append(dagger)
        assert len(committed(writer, [plain, dagger])) == 2
    with EpisodeReader(store) as reader:
        back = reader.episode(1)
        cols = reader.decisions()
    assert back.expert == "heuristic" and back.config == config and back.key == dagger.key != plain.key
    assert [int(d.action) for d in back.decisions] == [int(d.action) for d in dagger.decisions]
    assert [d.expert_action for d in back.decisions] == [d.expert_action for d in dagger.decisions]
    assert (cols["expert_actions"][:EPOCHS] == -1).all()
    data = load_decisions(store)
    labels = np.concatenate([[int(d.action) for d in plain.decisions], [d.expert_action for d in dagger.decisions]])
    assert data.labels.tolist() == labels.tolist()  # expert labels where recorded, else the action taken
    assert (data.labels[EPOCHS:] != np.array([int(d.action) for d in dagger.decisions])).any()


class LearnerPlugin:
    @hookimpl
    def register_policies(self, register):
        register("always-germinate", AlwaysGerminate)


def test_simic_collect_with_an_expert_stores_labels_and_is_a_run_of_its_own(tmp_path):
    store = tmp_path / "s.h5"
    args = ["collect", "--policy", "always-germinate", "--episodes", "2", "--epochs", str(EPOCHS), "--seed", str(SEED),
            "--store", str(store)]
    with registered_plugin(LearnerPlugin(), name="learner"):
        result = runner.invoke(app, [*args, "--expert", "heuristic", "--beta", "0.5"])
        assert result.exit_code == 0, result.output
        assert "heuristic / 0.5" in result.stdout
        again = runner.invoke(app, [*args, "--expert", "heuristic", "--beta", "0.5", "--episodes", "1"])
        assert again.exit_code == 0 and "1 of 1 episodes already in" in again.stderr  # resumable, as before
        bad = runner.invoke(app, [*args, "--beta", "0.5"])
        assert bad.exit_code == 2 and "--beta" in bad.stderr and "--expert" in bad.stderr
    with EpisodeReader(store) as reader:
        eps = [reader.episode(i) for i in range(reader.n_episodes)]
    assert len(eps) == 2 and all(e.expert == "heuristic" and e.config.beta == 0.5 for e in eps)
    fresh = HeuristicTamiyo()
    for e in eps:
        assert [d.expert_action for d in e.decisions] == [
            int(fresh.decide(TrainingSnapshot.from_vector(d.observation)).action) for d in e.decisions]
    acted = [int(d.action) for e in eps for d in e.decisions]
    assert Action.GERMINATE in acted and acted != [d.expert_action for e in eps for d in e.decisions]


def test_simic_dagger_runs_a_round_end_to_end(tmp_path):
    store, out = tmp_path / "agg.h5", tmp_path / "ckpt" / "mlp.safetensors"
    result = runner.invoke(app, [str(a) for a in (
        "dagger", "--rounds", 1, "--store", store, "--out", out, "--bootstrap-episodes", 2, "--seed", SEED,
        "--episodes-per-round", 2, "--compare-episodes", 1, "--eval-seed", SEED, "--epochs", EPOCHS,
        "--train-epochs", 5, "--allow-missing-classes", "--json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["round"] for r in report["rounds"]] == [0, 1] and report["rounds"][1]["beta"] == 0.5
    for r in report["rounds"]:
        assert 0.0 <= r["on_policy_agreement"] <= 1.0 and r["expert_labelled_decisions"] == EPOCHS
        assert r["final_accuracy_diff_mean"] is not None
    assert [r["store_episodes"] for r in report["rounds"]] == [2, 4]
    assert out.is_file() and (out.parent / "mlp.dagger-r0.safetensors").is_file()
    with EpisodeReader(store) as reader:
        eps = [reader.episode(i) for i in range(reader.n_episodes)]
    assert [e.policy for e in eps] == ["heuristic"] * 2 + ["mlp"] * 2
    assert all(e.expert == "heuristic" and e.config.beta == 0.5 for e in eps[2:])
    assert all(d.expert_action >= 0 for e in eps[2:] for d in e.decisions)


def test_simic_dagger_refuses_a_policy_it_cannot_train(tmp_path):
    result = runner.invoke(app, ["dagger", "--policy", "heuristic", "--store", str(tmp_path / "s.h5")])
    assert result.exit_code == 2 and "not a learned policy type" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
