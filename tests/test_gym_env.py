"""`simic/Morphogenetic-v0`: Gymnasium's own checker passes, and the env is `run_episode`'s
environment step for step (same observations, rewards and applied actions on one seed)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import esper_cli.gym_env  # noqa: F401  (registers the id)
from esper_cli.contracts import FEATURE_NAMES, Action, Decision, EpisodeConfig, SeedStage
from esper_cli.gym_env import ENV_ID, MorphogeneticGymEnv
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.episode import run_episode
from esper_cli.tasks import BUILTIN_TASKS

# An invalid ADVANCE first (no seed yet), then a seed's whole life and a CULL of the next one.
SCRIPT = [Action.ADVANCE, Action.GERMINATE, Action.ADVANCE, Action.ADVANCE, Action.WAIT, Action.CULL]


class Scripted:
    """Plays SCRIPT by epoch: a deterministic policy whose every action is known in advance."""

    name = "scripted"

    def reset(self, context) -> None:
        pass

    def decide(self, obs, context) -> Decision:
        return Decision(SCRIPT[obs.epoch])


def test_check_env_passes_without_warnings():
    env = gym.make(ENV_ID, epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gymnasium reports soft problems as warnings: none allowed
        check_env(env.unwrapped)
    assert env.observation_space.shape == (27,) and env.observation_space.dtype == np.float32
    assert env.action_space == gym.spaces.Discrete(4)


def test_matches_run_episode_step_for_step():
    config = EpisodeConfig(epochs=len(SCRIPT))
    episode = run_episode(Scripted(), config, 3, 1, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS,
                          policy_name="scripted")
    env = gym.make(ENV_ID, epochs=len(SCRIPT))
    obs, info = env.reset(seed=3, options={"index": 1})
    assert info["rng_seed"] == episode.rng_seed
    for t, record in enumerate(episode.decisions):
        np.testing.assert_array_equal(obs, record.observation)
        assert info["action_mask"][int(record.action)] == record.valid
        obs, reward, terminated, truncated, info = env.step(int(record.action))
        assert reward == record.outcome.reward
        assert info["valid"] == record.valid and info["blueprint"] == (record.blueprint or "")
        assert terminated == (t == len(SCRIPT) - 1) and not truncated
    assert not episode.decisions[0].valid and all(d.valid for d in episode.decisions[1:])
    assert episode.decisions[-1].outcome.stage_after == SeedStage.CULLED
    assert info["seed_stage"] == obs[FEATURE_NAMES.index("seed_stage")] == SeedStage.DORMANT  # none managed
    np.testing.assert_array_equal(obs, episode.final_observation)
    assert (info["final_accuracy"], info["test_accuracy"]) == (episode.final_accuracy, episode.test_accuracy)


def test_reset_reproduces_and_walks_the_run():
    env = MorphogeneticGymEnv(epochs=2)
    first, info = env.reset(seed=5)
    assert (info["run_seed"], info["index"]) == (5, 0)
    steps = [env.step(1)[:2] for _ in range(2)]
    _, info = env.reset()  # the next episode of the same run
    assert (info["run_seed"], info["index"]) == (5, 1)
    again, _ = env.reset(seed=5)
    np.testing.assert_array_equal(first, again)
    for obs, reward in steps:
        got = env.step(1)[:2]
        np.testing.assert_array_equal(got[0], obs)
        assert got[1] == reward


def test_bad_actions_and_settings_are_refused():
    env = MorphogeneticGymEnv(epochs=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="0..3"):
        env.step(7)
    with pytest.raises(ValueError, match="unknown task"):
        MorphogeneticGymEnv(task="nope")
    with pytest.raises(ValueError, match="explore"):
        MorphogeneticGymEnv(explore=0.5)


def test_registered_by_module_reference():
    # Gymnasium imports the module named before the colon, which registers the id.
    env = gym.make(f"esper_cli.gym_env:{ENV_ID}", epochs=1)
    assert isinstance(env.unwrapped, MorphogeneticGymEnv)


def test_spec_max_episode_steps_is_the_episode_length():
    # Not a registered constant: the epochs kwarg of make() sets it, so no TimeLimit cuts a run short.
    assert gym.make(ENV_ID).spec.max_episode_steps == 25
    env = gym.make(ENV_ID, epochs=3)
    assert env.spec.max_episode_steps == 3
    again = gym.make(env.spec)  # as Minari's recover_environment rebuilds it: with a TimeLimit of 3
    again.reset(seed=0)
    ends = [again.step(0)[2:4] for _ in range(3)]
    # The run ends at its last epoch, not before (TimeLimit flags its bound as truncated too).
    assert [terminated for terminated, _ in ends] == [False, False, True] and not any(t for _, t in ends[:2])


def test_reset_takes_numpy_integers():
    # Minari's HDF5 backend reads stored seeds and options back as numpy integers.
    env = MorphogeneticGymEnv(epochs=1)
    first, info = env.reset(seed=np.int64(4), options={"index": np.int64(2)})
    assert (info["run_seed"], info["index"]) == (4, 2)
    np.testing.assert_array_equal(first, env.reset(seed=4, options={"index": 2})[0])
    with pytest.raises(TypeError):
        env.reset(seed=1.5)
