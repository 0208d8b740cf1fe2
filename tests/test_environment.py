"""The environment's semantics on real training runs of the digits task."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from simic_plugins.baselines import RandomTamiyo
from simic_plugins.heuristic import HeuristicTamiyo

from esper_cli.contracts import (
    LOSS_CAP,
    Action,
    Decision,
    EpisodeConfig,
    EpisodeRef,
    RngStream,
    SeedStage,
    TrainingSnapshot,
    sanitize_loss,
)
from esper_cli.policy import valid_action_mask
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.simulation.episode import EpisodeSpec, run_episode, run_episodes
from esper_cli.tasks import BUILTIN_TASKS

W, G, A, C = Action.WAIT, Action.GERMINATE, Action.ADVANCE, Action.CULL


def make_env(**kw) -> MorphogeneticEnv:
    cfg = EpisodeConfig(**{"epochs": 12, **kw})
    return MorphogeneticEnv(cfg, BUILTIN_TASKS[cfg.task], BUILTIN_BLUEPRINTS)


class Scripted:
    """Plays a fixed list of actions, then WAITs."""

    name = "scripted"

    def __init__(self, actions):
        self.actions = list(actions)

    def reset(self, context):
        self.t = 0

    def decide(self, obs, context):
        a = self.actions[self.t] if self.t < len(self.actions) else W
        self.t += 1
        return Decision(a, "scripted")


def episode(actions, epochs=12, seed=0, index=0, **kw):
    cfg = EpisodeConfig(epochs=epochs, **kw)
    return run_episode(Scripted(actions), cfg, seed, index, task=BUILTIN_TASKS["digits"],
                       blueprints=BUILTIN_BLUEPRINTS, policy_name="scripted")


def test_full_lifecycle_is_recorded_and_counted_once_per_epoch():
    # germinate, start training, wait 2, blend, wait 5 (ramp), fossilize, germinate again, cull it
    actions = [G, A, W, W, A, W, W, W, W, W, A, G, A, C]
    ep = episode(actions, epochs=17, embargo_epochs=2, blending_epochs=5)
    obs = [TrainingSnapshot.from_vector(d.observation) for d in ep.decisions]
    assert all(d.valid for d in ep.decisions)
    first, second = ep.seeds
    rotation = EpisodeConfig().rotation
    start = rotation.index(first.blueprint)  # drawn from the episode's seed...
    assert second.blueprint == rotation[(start + 1) % len(rotation)]  # ...then the rotation's order
    assert [s for s, _ in first.stages] == ["GERMINATED", "TRAINING", "BLENDING", "FOSSILIZED"]
    assert [e for _, e in first.stages] == [0, 1, 4, 10]
    assert first.fate == "fossilized" and first.contribution is not None
    assert second.fate == "culled" and [s for s, _ in second.stages][-1] == "CULLED"
    assert (ep.seeds_created, ep.seeds_fossilized, ep.seeds_culled) == (2, 1, 1)
    # seed_epochs_in_stage counts each epoch exactly once
    assert [o.seed_epochs_in_stage for o in obs[2:5]] == [1, 2, 3]
    # blending alpha after k epochs is k/5, reaching 1 exactly when the ramp ends
    blending = [o.seed_alpha for o in obs[5:10]]
    assert blending == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # the fossilized seed keeps its slot: one slot left, then none while the culled one is embargoed
    assert obs[11].available_slots == 1 and not obs[11].has_active_seed
    assert obs[12].available_slots == 0
    after_cull = ep.decisions[13].outcome
    assert after_cull.stage_after == SeedStage.CULLED and after_cull.seed_alive  # fossil still there
    assert ep.decisions[10].outcome.stage_after == SeedStage.FOSSILIZED


def test_the_rotation_starts_where_the_episode_seed_says():
    starts = set()
    for rng_seed in range(12):
        env = make_env(epochs=1)
        env.reset([rng_seed])
        env.step([Decision(G)])
        again = make_env(epochs=1)
        again.reset([rng_seed])
        again.step([Decision(G)])
        first = env.members[0].seeds[0].blueprint
        assert first == again.members[0].seeds[0].blueprint  # paired runs grow the same first seed
        starts.add(first)
    assert len(starts) > 2


def test_alpha_ramps_per_step_without_jumps():
    env = make_env(epochs=9, blending_epochs=3)
    env.reset([123])
    alphas: list[float] = []
    for a in (G, A):
        env.step([Decision(a)])
    # The alpha the engine is handed at slot 0 on every optimiser step, as it computes with it.
    train_step = env.engine.train_step

    def recording(x, y, step_alphas, trained):
        alphas.append(float(step_alphas[0][0]))
        return train_step(x, y, step_alphas, trained)

    env.engine.train_step = recording
    for a in (A, W, W, W, W):
        env.step([Decision(a)])
    steps = 3 * env.steps_per_epoch
    diffs = np.diff([0.0] + alphas)
    # float32 on the way into the engine: a step of 1/steps, give or take its rounding
    assert alphas[0] > 0 and max(diffs) <= 1.0 / steps + 1e-6 and min(diffs) >= 0
    assert alphas[-1] == 1.0 and alphas.count(1.0) == len(alphas) - steps + 1


def test_invalid_actions_are_recorded_no_ops():
    ep = episode([A, C, G, G, A, A, A, A, A], epochs=9, embargo_epochs=0)
    valid = [d.valid for d in ep.decisions]
    assert valid == [False, False, True, False, True, True, True, False, False]
    assert "no-op" in ep.decisions[0].reason and "no active seed" in ep.decisions[0].reason
    assert ep.decisions[0].outcome.reward < ep.decisions[0].outcome.accuracy_change
    assert "seed is active" in ep.decisions[3].reason


class AnyAction:
    """A uniform draw over all four actions, valid or not: every kind of no-op gets tried."""

    name = "any"

    def reset(self, context):
        self.rng = np.random.default_rng(context.rng_seed)

    def decide(self, obs, context):
        return Decision(Action(int(self.rng.integers(len(Action)))), "any")


@pytest.mark.parametrize("policy, kw", [
    (AnyAction(), {}),
    (AnyAction(), {"embargo_epochs": 0}),
    (RandomTamiyo(), {"explore": 0.5}),
    (HeuristicTamiyo(), {}),
])
def test_the_observation_says_which_actions_the_environment_carries_out(policy, kw):
    # The policies, the exploration draws and the offline exports' action masks read validity off
    # the observation; the environment decides it from its state: on every state these episodes
    # reach (both slots, embargoes, a fossilized slot) the two must agree.
    cfg = EpisodeConfig(epochs=16, **kw)
    specs = [EpisodeSpec(type(policy)(), cfg, 0, index, policy.name) for index in range(3)]
    for index, ep in enumerate(run_episodes(specs, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS)):
        for d in ep.decisions:
            assert d.valid == valid_action_mask(d.observation)[int(d.action)], (index, d.observation, d.action)
    env = make_env(epochs=16, **kw)
    [obs] = env.reset([3])
    for action in [G, A, W, A, C, G, W, W, G, A, A, A, G, C]:
        assert env.members[0].valid_actions() == [a for a, ok in zip(Action, valid_action_mask(obs.to_vector())) if ok]
        obs = env.step([Decision(action)])[0].observation


def test_rng_streams_keep_their_numbers():
    # Stored episodes were drawn from these streams: renumbering one changes every episode.
    assert {s.name: int(s) for s in RngStream} == {
        "HOST_WEIGHTS": 0, "SEED_WEIGHTS": 1, "DATA_ORDER": 2, "DAGGER_COIN": 3,
        "ROTATION_START": 4, "RANDOM_POLICY": 5, "EXPLORATION": 6, "POLICY_SAMPLING": 7}


def test_an_episode_ref_is_the_json_list_checkpoints_hold():
    ref = EpisodeRef("digits", 3, 1, 12345)
    assert json.loads(json.dumps(ref)) == ["digits", 3, 1, 12345]
    assert EpisodeRef.parse(["digits", 3, 1, 12345]) == ref and EpisodeRef.parse(ref).rng_seed == 12345


def test_unknown_blueprint_is_an_invalid_no_op_and_named_blueprint_is_used():
    env = make_env(epochs=3)
    env.reset([1])
    [bad] = env.step([Decision(G, blueprint="no-such")])
    assert not bad.valid and "unknown blueprint" in bad.message
    [good] = env.step([Decision(G, blueprint="depthwise")])
    assert good.valid and good.blueprint == "depthwise" and env.members[0].seeds[0].blueprint == "depthwise"


def test_outcome_is_measured_after_the_action_not_reused_from_the_observation():
    ep = episode([], epochs=6)
    obs = [TrainingSnapshot.from_vector(d.observation) for d in ep.decisions]
    for t in range(len(obs) - 1):
        out = ep.decisions[t].outcome
        assert out.accuracy_change == pytest.approx(obs[t + 1].val_accuracy - obs[t].val_accuracy, abs=1e-4)
        assert out.val_accuracy == pytest.approx(obs[t + 1].val_accuracy, abs=1e-4)
        assert obs[t + 1].accuracy_delta == pytest.approx(out.accuracy_change, abs=1e-4)
    assert any(abs(ep.decisions[t].outcome.accuracy_change - obs[t].accuracy_delta) > 1e-3 for t in range(len(obs)))


def test_snapshot_features_are_tracked_consistently():
    ep = episode([], epochs=8)
    obs = [TrainingSnapshot.from_vector(d.observation) for d in ep.decisions]
    assert [o.epoch for o in obs] == list(range(8))
    assert obs[0].accuracy_history_5 == (obs[0].val_accuracy,) * 5  # left-padded with the first value
    assert obs[7].accuracy_history_5 == tuple(o.val_accuracy for o in obs[3:8])
    for prev, o in zip(obs, obs[1:]):
        assert o.best_val_accuracy == max(prev.best_val_accuracy, o.val_accuracy)
        assert o.best_val_loss == pytest.approx(min(prev.best_val_loss, o.val_loss))
        assert o.loss_delta == pytest.approx(prev.val_loss - o.val_loss, abs=1e-5)
        expected = prev.plateau_epochs + 1 if o.accuracy_delta < 0.5 else 0
        assert o.plateau_epochs == expected
        assert o.global_step > prev.global_step


def test_same_seed_same_episode_and_paired_runs_share_data_and_weights():
    a = episode([W, W, G, A], epochs=7, seed=3, index=2)
    b = episode([W, W, G, A], epochs=7, seed=3, index=2)
    assert np.array_equal(np.stack([d.observation for d in a.decisions]), np.stack([d.observation for d in b.decisions]))
    assert a.final_accuracy == b.final_accuracy and a.rng_seed == b.rng_seed
    # another policy from the same seed starts from the same weights and sees the same data order
    c = episode([], epochs=7, seed=3, index=2)
    assert np.array_equal(a.decisions[2].observation, c.decisions[2].observation)
    assert not np.array_equal(a.decisions[4].observation, c.decisions[4].observation)
    d = episode([], epochs=3, seed=3, index=3)
    assert d.rng_seed != a.rng_seed


def test_heuristic_episode_reaches_a_sensible_accuracy():
    cfg = EpisodeConfig(epochs=10)
    ep = run_episode(HeuristicTamiyo(), cfg, 0, 0, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS,
                     policy_name="heuristic")
    assert len(ep.decisions) == 10
    assert ep.final_accuracy > 60.0 and 0 < ep.test_accuracy <= 100
    assert ep.best_accuracy >= ep.final_accuracy


def test_validation_and_test_splits_are_separate_and_seeded():
    data = BUILTIN_TASKS["digits"].load(None, 0)
    n = len(data.train_y) + len(data.val_y) + len(data.test_y)
    assert n == 1797 and len(data.val_y) == len(data.test_y) == 359
    assert not torch.equal(data.val_x, data.test_x)
    again = BUILTIN_TASKS["digits"].load.__wrapped__(None, 0)
    assert torch.equal(again.val_x, data.val_x)


def test_non_finite_values_never_reach_an_observation():
    assert sanitize_loss(float("nan")) == LOSS_CAP and sanitize_loss(math.inf) == LOSS_CAP
    assert sanitize_loss(-1.0) == 0.0
    env = make_env(epochs=2)
    [obs] = env.reset([0])
    broken = TrainingSnapshot(**{**obs.__dict__, "val_loss": float("nan")})
    with pytest.raises(ValueError, match="val_loss"):
        broken.to_vector()


def _write_fake_cifar(root, n_per_batch=40):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    return root


def test_cifar10_task_reads_standard_python_batches(tmp_path):
    root = _write_fake_cifar(tmp_path)
    ep = episode([], epochs=2, task="cifar10", data_dir=str(root))
    assert len(ep.decisions) == 2
    data = BUILTIN_TASKS["cifar10"].load(str(root), 0)
    assert data.train_x.shape[1:] == (3, 32, 32) and len(data.val_y) == 20 and len(data.test_y) == 40
