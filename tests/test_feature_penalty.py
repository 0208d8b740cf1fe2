"""The feature penalty (group lasso on the input layer): the trained policy reads the features its
labels depend on and ignores the rest, so it stays right on states whose other features leave the
training range; the option is recorded, shown and checked.

Stores are real HDF5 files of hand-made episodes whose label is a threshold on one feature
(`seed_improvement`) while the other 26 are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error
from simic_plugins.mlp import FEATURE_PENALTY, MLPTamiyo

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import (
    FEATURE_NAMES,
    N_FEATURES,
    Action,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    Outcome,
    SeedStage,
)
from esper_cli.data.decisions import DataError
from esper_cli.data.store import EpisodeWriter
from esper_cli.learning.training import TrainConfig, feature_group_lasso, features_read, train_policy
from esper_cli.plugins import build_registry
from esper_cli.trainable import TrainablePolicy

WORTH = FEATURE_NAMES.index("seed_improvement")
# Every feature is an input here (global_step too, as noise): the lasso alone must silence the noise.
TRAIN = {"epochs": 150, "patience": 150, "allow_missing_classes": True, "ignore_features": ()}


def observations(rng: np.random.Generator, n: int, noise_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(observations, labels): ADVANCE when the seed's worth is positive, else WAIT."""
    x = (rng.normal(size=(n, N_FEATURES)) * noise_scale).astype(np.float32)
    x[:, WORTH] = rng.uniform(-2.0, 2.0, size=n)
    return x, np.where(x[:, WORTH] > 0, int(Action.ADVANCE), int(Action.WAIT))


def write_store(path: Path, n_episodes: int = 20, length: int = 15) -> Path:
    rng = np.random.default_rng(0)
    with EpisodeWriter(path) as writer:
        for i in range(n_episodes):
            x, y = observations(rng, length)
            decisions = [DecisionRecord(observation=obs, action=Action(int(a)), valid=True, confidence=1.0,
                                        reason="crafted", blueprint=None,
                                        outcome=Outcome(0.0, 0.0, 50.0, False, SeedStage.DORMANT, 0.0))
                         for obs, a in zip(x, y)]
            writer.append(Episode(seed=0, index=i, rng_seed=i, config=EpisodeConfig(epochs=length), policy="heuristic",
                                  policy_version="test", decisions=decisions, final_accuracy=50.0, best_accuracy=50.0,
                                  test_accuracy=50.0, seeds=[]))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("stores") / "threshold.h5")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> dict[float, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {p: train_policy(store, TrainConfig("mlp", feature_penalty=p, **TRAIN), out=folder / f"mlp-{p}.safetensors")
            for p in (0.0, FEATURE_PENALTY)}


def test_group_lasso_is_the_sum_of_the_feature_columns_norms():
    w = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, -1.0]])
    assert float(feature_group_lasso(w)) == pytest.approx(5.0 + 0.0 + 2 ** 0.5)


def test_the_penalised_policy_reads_the_labels_feature_and_drops_the_noise(trained):
    norms = trained[FEATURE_PENALTY][1]["input_feature_norms"]
    assert list(norms)[0] == "seed_improvement"
    assert features_read(norms) == ["seed_improvement"]
    noise = max(n for name, n in norms.items() if name != "seed_improvement")
    assert noise < 0.05 * norms["seed_improvement"]
    free = trained[0.0][1]["input_feature_norms"]  # unpenalised: the noise columns keep real weight
    assert max(n for name, n in free.items() if name != "seed_improvement") > 0.2 * free["seed_improvement"]


def test_the_penalised_policy_stays_right_where_the_other_features_leave_the_training_range(trained):
    def accuracy(path: Path, noise_scale: float) -> float:
        x, y = observations(np.random.default_rng(1), 2000, noise_scale)
        margin = np.abs(x[:, WORTH]) > 0.1  # a learned threshold sits near, not exactly at, 0
        return float((MLPTamiyo(checkpoint=path).decide_batch(x)[margin] == y[margin]).mean())

    penalised, free = trained[FEATURE_PENALTY][0], trained[0.0][0]
    assert accuracy(penalised, 1.0) >= 0.99  # new states like the training ones
    assert accuracy(penalised, 3.0) >= 0.95  # every other feature three times as spread
    assert accuracy(penalised, 3.0) > accuracy(free, 3.0) + 0.1


def test_the_penalty_is_recorded_defaulted_and_shown(store, tmp_path):
    out = tmp_path / "mlp.safetensors"
    result = invoke("train", "--store", store, "--out", out, "--epochs", 3, "--allow-missing-classes", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["feature_penalty"] == FEATURE_PENALTY  # the mlp's default
    assert set(metrics["input_feature_norms"]) == set(FEATURE_NAMES)
    assert load_checkpoint(out).meta["train_config"]["feature_penalty"] == FEATURE_PENALTY

    result = invoke("train", "--store", store, "--out", out, "--epochs", 3, "--allow-missing-classes",
                    "--feature-penalty", 0, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["feature_penalty"] == 0.0
    assert load_checkpoint(out).meta["train_config"]["feature_penalty"] == 0.0

    table = invoke("train", "--store", store, "--out", out, "--epochs", 3, "--allow-missing-classes")
    assert table.exit_code == 0 and "features read (penalty 0.01)" in table.output


def test_bad_penalties_are_one_line_errors_naming_the_option(store, tmp_path):
    out = tmp_path / "x.safetensors"
    for bad in ("-0.1", "nan", "inf"):
        msg = one_line_error(invoke("train", "--store", store, "--out", out, "--allow-missing-classes",
                                    "--feature-penalty", bad))
        assert "--feature-penalty" in msg
    msg = one_line_error(invoke("train", "--store", store, "--policy", "gru", "--out", out, "--allow-missing-classes",
                                "--feature-penalty", "0.1"))
    assert "--feature-penalty" in msg and "gru" in msg
    assert not out.exists()


def test_a_trainable_whose_input_weight_does_not_read_the_features_is_refused(store, tmp_path):
    registry = build_registry()
    registry.trainables["mlp"] = TrainablePolicy(registry.trainables["mlp"].network, {"hidden": [8], "batch_size": 32},
                                                 input_weight="layers.1.weight", feature_penalty=0.1)
    with pytest.raises(DataError, match="not a \\(out, 27\\) parameter"):
        train_policy(store, TrainConfig("mlp", **TRAIN), out=tmp_path / "x.safetensors", registry=registry)
    assert not (tmp_path / "x.safetensors").exists()
