"""The task variants (`simic_plugins.tasks`) and the growth cost: registered through the entry-point
group, their data as documented, and a price on growth that is recorded, charged in the reward
and netted out of the scores."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import invoke
from simic_plugins.baselines import EagerTamiyo
from simic_plugins.tasks import SCARCE_NOISE, SCARCE_TRAIN, SHAPES, TASKS, load_scarce_digits, shapes_images

from esper_cli.contracts import Action, EpisodeConfig, growth_charge
from esper_cli.data.store import EpisodeReader
from esper_cli.evaluation.comparison import PolicyRuns, PolicySpec, closed_loop_summary
from esper_cli.plugins import build_registry
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.episode import EpisodeSpec, run_episodes
from esper_cli.tasks import BUILTIN_TASKS, load_digits, task_config


def test_the_variants_are_registered_through_the_entry_point_group():
    reg = build_registry()
    for name in ("digits-deep", "digits-scarce", "shapes", "digits-rent"):
        assert reg.tasks[name] is TASKS[name] and reg.plugin_of("task", name).name == "tasks"
    out = invoke("plugins")
    assert out.exit_code == 0 and "digits-rent" in out.output and "shapes" in out.output


def test_shapes_are_generated_from_the_seed_balanced_and_in_range():
    x, y = shapes_images(200, seed=3)
    again, labels = shapes_images(200, seed=3)
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, labels)
    assert not np.array_equal(shapes_images(200, seed=4)[0], x)
    assert x.shape == (200, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    assert np.bincount(y).tolist() == [20] * len(SHAPES)
    data = TASKS["shapes"].load(None, 0)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (1080, 360, 360)


def test_scarce_digits_keep_a_few_noisy_training_images_and_clean_evaluation_splits():
    digits, scarce = load_digits(None, 0), load_scarce_digits(None, 0)
    assert len(scarce.train_y) == SCARCE_TRAIN
    assert scarce.val_x is digits.val_x and scarce.test_y is digits.test_y  # validation and test: clean
    # Each kept image is one of digits' training images; about SCARCE_NOISE of its labels changed
    # (a redraw lands on the true class one time in ten).
    flat = digits.train_x.reshape(len(digits.train_x), -1)
    rows = [int((flat == img.reshape(1, -1)).all(dim=1).nonzero()[0, 0]) for img in scarce.train_x]
    changed = float((digits.train_y[rows] != scarce.train_y).float().mean())
    assert 0.5 * SCARCE_NOISE * 0.9 < changed < 1.5 * SCARCE_NOISE * 0.9


def test_the_deep_host_has_three_slots_and_eager_fills_them():
    task = TASKS["digits-deep"]
    config = task_config("digits-deep", task, epochs=12)
    [ep] = run_episodes([EpisodeSpec(EagerTamiyo(), config, 0, 0, "eager")], task=task, blueprints=BUILTIN_BLUEPRINTS)
    assert sorted(s.slot for s in ep.seeds) == [0, 1, 2] and ep.seeds_fossilized == 3
    assert all(d.valid for d in ep.decisions)


def test_a_task_sets_its_episode_defaults_under_the_callers_fields():
    rent = TASKS["digits-rent"]
    assert task_config("digits-rent", rent).growth_cost == 2.0
    assert task_config("digits-rent", rent, growth_cost=0.5).growth_cost == 0.5
    assert task_config("digits", BUILTIN_TASKS["digits"]) == EpisodeConfig()
    # Without a price the config's identity is what it always was; with one it is another.
    assert "growth_cost" not in EpisodeConfig().to_dict()
    assert EpisodeConfig(growth_cost=1.0).key("eager") != EpisodeConfig().key("eager")
    with pytest.raises(ValueError, match="growth_cost"):
        EpisodeConfig(growth_cost=-1.0)
    with pytest.raises(ValueError, match="growth_cost"):
        EpisodeConfig(growth_cost=float("nan"))


def test_growth_is_charged_in_the_reward_and_netted_out_of_the_score(tmp_path):
    store = tmp_path / "rent.h5"
    out = invoke("collect", "--task", "digits-rent", "--policy", "eager", "-n", "2", "--epochs", "6",
                 "--store", str(store))
    assert out.exit_code == 0, out.output
    with EpisodeReader(store) as reader:
        episodes = [reader.episode(i) for i in range(reader.n_episodes)]
    reg = build_registry()
    for ep in episodes:
        assert ep.config.growth_cost == 2.0  # recorded in the store
        # Each seed's parameter count is its module's.
        for s in ep.seeds:
            assert s.params == sum(p.numel() for p in reg.blueprints[s.blueprint]((2, 6)[s.slot]).parameters())
        assert ep.growth_charge > 0
        assert ep.growth_charge == pytest.approx(2.0 * sum(s.params for s in ep.seeds) / 1000)
        # The return telescopes: accuracy gained minus the price of what the network holds.
        start = ep.decisions[0].observation[6]  # val_accuracy at epoch 0
        total = sum(d.outcome.reward for d in ep.decisions)
        assert total == pytest.approx(ep.final_accuracy - start - ep.growth_charge, abs=1e-4)  # start is float32
        assert ep.test_score == pytest.approx(ep.test_accuracy - ep.growth_charge)
        germinate = next(d for d in ep.decisions if d.action == Action.GERMINATE)
        assert germinate.outcome.reward == pytest.approx(germinate.outcome.accuracy_change
                                                         - 2.0 * ep.seeds[0].params / 1000)


def test_a_cull_refunds_the_price_of_its_seed():
    seeds = [type("S", (), {"params": 500, "fate": "fossilized"})(), type("S", (), {"params": 300, "fate": "culled"})()]
    assert growth_charge(2.0, seeds) == pytest.approx(1.0)
    assert growth_charge(0.0, seeds) == 0.0


def test_comparisons_score_net_of_the_growth_charge():
    task = TASKS["digits-rent"]
    config = task_config("digits-rent", task, epochs=5)
    wait_specs = [EpisodeSpec(build_registry().policies["wait"](), config, 0, i, "wait") for i in range(2)]
    eager_specs = [EpisodeSpec(EagerTamiyo(), config, 0, i, "eager") for i in range(2)]
    eps = run_episodes(wait_specs + eager_specs, task=task, blueprints=BUILTIN_BLUEPRINTS)
    runs = {"wait": PolicyRuns(PolicySpec("wait", "wait"), False, dict(enumerate(eps[:2]))),
            "eager": PolicyRuns(PolicySpec("eager", "eager"), False, dict(enumerate(eps[2:])))}
    summary = closed_loop_summary(runs, "wait")["eager"]
    charges = [e.growth_charge for e in eps[2:]]
    assert min(charges) > 0 and summary["growth_charge_mean"] == pytest.approx(np.mean(charges))
    np.testing.assert_allclose(summary["test_score_diffs"],
                               np.asarray(summary["test_accuracy_diffs"]) - np.asarray(charges))
