"""Offline outcome learning (`simic train --objective outcome`, AWR): returns-to-go, advantage
weights, and the command on a small real store collected with exploration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error
from simic_plugins.mlp import MLPTamiyo

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import TrainingSnapshot
from esper_cli.data.decisions import DataError, load_decisions
from esper_cli.data.store import EpisodeReader
from esper_cli.learning.offline import awr_weights, effective_sample_size, load_outcomes, returns_to_go
from esper_cli.learning.training import TrainConfig, train_policy
from esper_cli.policy import valid_action_mask

OUTCOME = ("--objective", "outcome", "--epochs", 8, "--allow-missing-classes")


@pytest.fixture(scope="session")
def explore_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "explore.h5"
    result = invoke("collect", "--episodes", 6, "--epochs", 12, "--explore", 0.3, "--store", path)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def outcome_run(explore_store, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ckpt") / "outcome.safetensors"
    result = invoke("train", "--store", explore_store, "--out", out, *OUTCOME, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


# ----------------------------------------------------------------------------- the math
def test_returns_to_go_sum_each_episodes_remaining_rewards():
    rewards = np.array([1.0, 2.0, -0.5, 4.0, 0.25, 3.0, -1.0])
    starts, lengths = np.array([0, 3, 4]), np.array([3, 1, 3])  # episodes of 3, 1 and 3 decisions
    g = returns_to_go(rewards, starts, lengths)
    np.testing.assert_allclose(g, [2.5, 1.5, -0.5, 4.0, 2.25, 2.0, -1.0])
    assert returns_to_go(np.zeros(0), np.zeros(0, dtype=int), np.zeros(0, dtype=int)).shape == (0,)


def test_returns_to_go_of_a_store_is_final_minus_current_val_accuracy(explore_store):
    """reward = next epoch's val accuracy change (minus penalties), so G telescopes."""
    data = load_decisions(explore_store)
    outcomes = load_outcomes(data)
    np.testing.assert_array_equal(outcomes.actions, data.labels)  # rows aligned (no expert labels here)
    g = returns_to_go(outcomes.rewards, data.starts, data.lengths)
    with EpisodeReader(explore_store) as reader:
        cols = reader.columns()
    order = data.rows  # each decision's row in the store's columns
    after, valid = cols["val_accuracy_after"][order], cols["valid"][order]
    val_acc = data.observations[:, 6].astype(np.float64)  # val_accuracy at the decision's epoch
    final = np.repeat(after[data.starts + data.lengths - 1], data.lengths)
    clean = np.repeat(np.logical_and.reduceat(valid, data.starts), data.lengths)  # no penalty in the episode
    assert clean.any()
    np.testing.assert_allclose(g[clean], (final - val_acc)[clean], atol=1e-3)


def test_awr_weights_are_monotone_in_the_advantage_and_capped():
    adv = np.linspace(-10.0, 10.0, 201)
    w = awr_weights(adv, temperature=2.0, max_weight=20.0)
    assert w.dtype == np.float32 and np.isfinite(w).all() and (w > 0).all()
    assert (np.diff(w) >= 0).all()
    assert w.max() == pytest.approx(20.0) and w[adv == 0.0][0] == pytest.approx(1.0)
    assert np.exp(-5.0) == pytest.approx(float(w[0]), rel=1e-5)
    assert awr_weights(np.array([1e6]), 1.0, 5.0)[0] == pytest.approx(5.0)  # no overflow
    assert effective_sample_size(np.ones(10)) == pytest.approx(10.0)
    assert effective_sample_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the command
def test_outcome_training_writes_an_mlp_checkpoint_that_never_acts_invalidly(explore_store, outcome_run):
    out, report = outcome_run
    assert report["objective"] == "outcome" and report["checkpoint"] == str(out)
    awr = report["outcome"]
    assert awr["temperature"] == 1.0 and awr["max_weight"] == 20.0
    assert 0 < awr["weights"]["effective_sample_size"] <= awr["weights"]["n_train"]
    history = load_checkpoint(out).meta["history"]
    assert report["val_weighted_loss"] == min(h["val_loss"] for h in history)  # kept: the lowest

    policy = MLPTamiyo(checkpoint=out)
    meta = policy.checkpoint.meta
    assert meta["objective"] == "outcome" and meta["mask_invalid"] is True
    assert meta["outcome"]["method"] == "awr" and meta["class_weights"]["spec"] == "none"
    assert meta["train_config"]["objective"] == "outcome"
    assert {tuple(e) for e in meta["split"]["episodes"]}  # compare keeps its seeds off these
    obs = load_decisions(explore_store).observations
    actions = policy.decide_batch(obs)
    assert valid_action_mask(obs)[np.arange(len(obs)), actions].all()
    for o in obs[::5]:
        a = int(policy.decide(TrainingSnapshot.from_vector(o)).action)
        assert valid_action_mask(o)[a]


def test_bc_stays_the_default_and_unmasked(explore_store, tmp_path):
    path, bc = train_policy(explore_store, TrainConfig("mlp", epochs=2, allow_missing_classes=True),
                            out=tmp_path / "bc.safetensors")
    meta = load_checkpoint(path).meta
    assert bc["objective"] == meta["objective"] == "bc" and "outcome" not in bc
    assert "mask_invalid" not in meta and meta["class_weights"]["spec"] == "auto"


def test_outcome_training_is_seeded(explore_store, outcome_run, tmp_path):
    again = tmp_path / "again.safetensors"
    result = invoke("train", "--store", explore_store, "--out", again, *OUTCOME)
    assert result.exit_code == 0, result.output
    a, b = load_checkpoint(outcome_run[0]), load_checkpoint(again)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k])
    assert a.meta["outcome"] == b.meta["outcome"] and a.meta["split"] == b.meta["split"]


def test_a_store_without_exploration_warns(tmp_path):
    store = tmp_path / "plain.h5"
    assert invoke("collect", "--episodes", 3, "--epochs", 8, "--store", store).exit_code == 0
    result = invoke("train", "--store", store, "--out", tmp_path / "o.safetensors", *OUTCOME, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert "no exploration" in result.stderr and "--explore 0.2" in result.stderr


def test_bad_objective_and_options_are_one_line_exit_2(explore_store, tmp_path):
    out = tmp_path / "x.safetensors"
    one_line_error(invoke("train", "--store", explore_store, "--out", out, "--objective", "ppo"),
                   "--objective", "ppo", "bc or outcome")
    one_line_error(invoke("train", "--store", explore_store, "--out", out, "--objective", "outcome",
                          "--policy", "gru"), "--objective", "sequence")
    one_line_error(invoke("train", "--store", explore_store, "--out", out, *OUTCOME, "--temperature", 0),
                   "--temperature")
    one_line_error(invoke("train", "--store", explore_store, "--out", out, *OUTCOME, "--max-weight", 0.5),
                   "--max-weight")
    assert not out.exists()
    with pytest.raises(DataError) as exc:
        train_policy(explore_store, TrainConfig("mlp", objective="awr"), out=out)
    assert exc.value.option == "objective"
