"""Data for off-policy and offline RL: exploration (`collect --explore`) with the behaviour
probability of every action taken, and each episode's final observation, in real stores; stores
written before either existed still open and say the values are absent."""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pytest
from cli_helpers import invoke, one_line_error
from episode_helpers import make_episode
from simic_plugins.baselines import RandomTamiyo, valid_actions

from esper_cli.contracts import Action, Decision, EpisodeConfig, TrainingSnapshot
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.episode import run_episode
from esper_cli.tasks import BUILTIN_TASKS

EPOCHS = 6
# A deterministic policy that tries every action, some of them invalid where they are played.
PLAN = [Action.GERMINATE, Action.ADVANCE, Action.WAIT, Action.CULL, Action.GERMINATE, Action.ADVANCE]


class Crafted:
    name = "crafted"

    def reset(self, context) -> None:
        pass

    def decide(self, obs, context) -> Decision:
        return Decision(PLAN[obs.epoch])


def run(policy, explore: float, index: int = 0):
    return run_episode(policy, EpisodeConfig(epochs=EPOCHS, explore=explore), 0, index,
                       task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS, policy_name=policy.name)


def expected_prob(record, eps: float) -> float:
    """(1 - eps) * [a == the policy's action] + eps * [a valid] / |valid|."""
    obs = TrainingSnapshot.from_vector(record.observation)
    valid = valid_actions(obs)
    policy_action = PLAN[obs.epoch]
    return (1 - eps) * (record.action == policy_action) + eps * (record.action in valid) / len(valid)


def test_without_exploration_a_deterministic_policy_has_probability_one_and_the_same_identity():
    episode = run(Crafted(), 0.0)
    assert [d.action for d in episode.decisions] == PLAN
    assert [d.behaviour_prob for d in episode.decisions] == [1.0] * EPOCHS
    assert "explore" not in episode.config.to_dict()
    assert episode.key == EpisodeConfig(epochs=EPOCHS).key("crafted")  # old ids are unchanged
    assert episode.final_observation is not None and episode.final_observation[0] == EPOCHS


def test_full_exploration_is_uniform_over_valid_actions_and_reproducible():
    episode = run(Crafted(), 1.0)
    for record in episode.decisions:
        n_valid = len(valid_actions(TrainingSnapshot.from_vector(record.observation)))
        assert record.valid and record.behaviour_prob == pytest.approx(1 / n_valid)
    again = run(Crafted(), 1.0)
    assert [d.action for d in again.decisions] == [d.action for d in episode.decisions]
    assert episode.key != run(Crafted(), 0.0).key  # eps is part of the identity once set


def test_partial_exploration_probabilities_follow_the_mixture():
    episodes = [run(Crafted(), 0.5, index) for index in range(2)]
    records = [d for ep in episodes for d in ep.decisions]
    assert any(d.action != PLAN[t % EPOCHS] for t, d in enumerate(records))  # it explored
    assert any(d.action == PLAN[t % EPOCHS] for t, d in enumerate(records))  # and followed
    for record in records:
        assert record.behaviour_prob == pytest.approx(expected_prob(record, 0.5))


def test_a_sampling_policy_reports_its_own_probability():
    episode = run(RandomTamiyo(), 0.0)
    for record in episode.decisions:
        n_valid = len(valid_actions(TrainingSnapshot.from_vector(record.observation)))
        assert record.behaviour_prob == pytest.approx(1 / n_valid)


def test_final_observation_and_behaviour_prob_round_trip(tmp_path):
    episode = run(Crafted(), 0.5)
    path = tmp_path / "s.h5"
    with EpisodeWriter(path) as writer:
        writer.append(episode)
        writer.append(make_episode(1))  # a record without either (made by hand): absent
    with EpisodeReader(path) as reader:
        back = reader.episode(0)
        np.testing.assert_array_equal(back.final_observation, episode.final_observation)
        assert [d.behaviour_prob for d in back.decisions] == [d.behaviour_prob for d in episode.decisions]
        assert reader.episode(1).final_observation is None
        assert reader.episode(1).decisions[0].behaviour_prob is None
        cols = reader.columns()
        following = reader.next_observations()
        assert np.isnan(reader.next_observations([1])).all(axis=1).tolist() == [False] * 4 + [True]
        summary = reader.summary()
    n = EPOCHS
    np.testing.assert_array_equal(following[: n - 1], cols["observation"][1:n])
    np.testing.assert_array_equal(following[n - 1], episode.final_observation)
    assert np.isnan(following[-1]).all() and np.isnan(cols["behaviour_prob"][n:]).all()
    np.testing.assert_allclose(cols["behaviour_prob"][:n], [d.behaviour_prob for d in episode.decisions])
    assert summary["episodes_with_final_observation"] == 1 and summary["decisions_with_behaviour_prob"] == n


def test_an_older_store_opens_reads_as_absent_and_gains_the_columns_on_write(tmp_path):
    path = tmp_path / "old.h5"
    with EpisodeWriter(path) as writer:
        writer.append(replace(make_episode(0), final_observation=np.ones(27, dtype=np.float32)))
    with h5py.File(path, "r+") as f:  # what a store written before these columns holds
        for name in ("decisions/behaviour_prob", "episodes/final_observation", "episodes/has_final_observation"):
            del f[name]
    with EpisodeReader(path) as reader:
        assert reader.absent == {"decisions/behaviour_prob", "episodes/final_observation",
                                 "episodes/has_final_observation"}
        assert reader.episode(0).final_observation is None
        assert np.isnan(reader.columns()["behaviour_prob"]).all()
        before = reader.columns()["observation"]
    with EpisodeWriter(path) as writer:
        assert writer.upgraded and not writer.recovered
        writer.append(replace(make_episode(1), final_observation=np.full(27, 2, dtype=np.float32)))
    with EpisodeReader(path) as reader:
        assert not reader.absent and reader.n_episodes == 2
        assert reader.episode(0).final_observation is None
        np.testing.assert_array_equal(reader.episode(1).final_observation, np.full(27, 2))
        np.testing.assert_array_equal(reader.columns([0])["observation"], before)


def test_collect_explore_stores_eps_and_probabilities(tmp_path):
    store = tmp_path / "e.h5"
    result = invoke("collect", "-n", 2, "--epochs", 3, "--explore", 0.5, "--store", store)
    assert result.exit_code == 0, result.output
    with EpisodeReader(store) as reader:
        assert reader.episode_meta(0)["config"]["explore"] == 0.5
        probs = reader.columns()["behaviour_prob"]
        assert ((probs > 0) & (probs <= 1)).all() and (probs < 1).all()
        assert reader.index()["has_final_observation"].all()
    one_line_error(invoke("collect", "--explore", 1.5, "--store", store), "--explore")


class Expert(Crafted):
    """Another deterministic plan, so the learner and the expert disagree at some epochs."""

    name = "expert"

    def decide(self, obs, context) -> Decision:
        return Decision([Action.WAIT, Action.GERMINATE, Action.ADVANCE, Action.WAIT, Action.CULL,
                         Action.WAIT][obs.epoch])


def test_dagger_mixture_and_exploration_compose():
    beta, eps = 0.5, 0.25
    config = EpisodeConfig(epochs=EPOCHS, expert="expert", beta=beta, explore=eps)
    episode = run_episode(Crafted(), config, 0, 0, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS,
                          policy_name="crafted", expert=Expert(), expert_name="expert")
    for record in episode.decisions:
        obs = TrainingSnapshot.from_vector(record.observation)
        valid = valid_actions(obs)
        mixture = (1 - beta) * (record.action == PLAN[obs.epoch]) + beta * (record.action == record.expert_action)
        assert record.behaviour_prob == pytest.approx((1 - eps) * mixture + eps * (record.action in valid) / len(valid))


def test_columns_action_mask_is_what_the_environment_allowed(tmp_path):
    # Crafted plays invalid actions (ADVANCE/CULL with no seed): the mask says so in the states
    # where they were played, and allows every action the environment applied.
    path = tmp_path / "s.h5"
    with EpisodeWriter(path) as writer:
        writer.append_many([run(Crafted(), 0.0), run(Crafted(), 0.5, index=1)])
    with EpisodeReader(path) as reader:
        cols = reader.columns()
    mask = cols["action_mask"]
    assert mask.shape == (len(cols["action"]), 4) and mask.dtype == bool
    np.testing.assert_array_equal(mask[np.arange(len(mask)), cols["action"]], cols["valid"])
    assert not cols["valid"].all() and mask[:, Action.WAIT].all()
