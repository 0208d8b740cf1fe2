"""Learned Tamiyo: data, split, weights, metrics, MLP/GRU training, checkpoints, train/eval CLI.

One small real store (collected by the heuristic through the CLI) is shared by the session; the
trainings are tiny (a few epochs), since these tests check behaviour, not reach quality.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error
from simic_plugins.gru import GRUTamiyo
from simic_plugins.heuristic import HeuristicTamiyo
from simic_plugins.mlp import MLPTamiyo
from simic_plugins.networks import GRUNet, MLPNet
from sklearn.utils.class_weight import compute_class_weight

from esper_cli.checkpoint import CheckpointError, digest, load_checkpoint, save_checkpoint
from esper_cli.contracts import ACTION_NAMES, FEATURE_NAMES, N_FEATURES, TASK_DEPENDENT_FEATURES, TrainingSnapshot
from esper_cli.data.decisions import DataError, load_decisions, split_episodes
from esper_cli.data.preprocess import class_weights, fit_normaliser, parse_class_weights
from esper_cli.data.replay import replay, select_split
from esper_cli.learning.metrics import classification_metrics
from esper_cli.learning.ppo import BOOTSTRAP_TRAINING
from esper_cli.learning.training import TrainConfig, build_network, prepare_training, train_policy

TINY = {"epochs": 4, "allow_missing_classes": True}  # a 12-epoch episode rarely culls a seed




@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "heuristic.h5"
    result = invoke("collect", "--episodes", 6, "--epochs", 12, "--store", path)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def single_episode_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "one.h5"
    assert invoke("collect", "--episodes", 1, "--epochs", 6, "--store", path).exit_code == 0
    return path


@pytest.fixture(scope="session")
def mlp_checkpoint(store, tmp_path_factory) -> Path:
    path, _ = train_policy(store, TrainConfig("mlp", **TINY), out=tmp_path_factory.mktemp("ckpt") / "mlp.safetensors")
    return path


@pytest.fixture(scope="session")
def gru_checkpoint(store, tmp_path_factory) -> Path:
    path, _ = train_policy(store, TrainConfig("gru", **TINY), out=tmp_path_factory.mktemp("ckpt") / "gru.safetensors")
    return path


# ----------------------------------------------------------------------------- data and split
def test_load_decisions_groups_episodes_in_order(store):
    data = load_decisions(store)
    assert data.n_episodes == 6 and data.observations.shape == (6 * 12, N_FEATURES)
    assert data.lengths.tolist() == [12] * 6
    for rows in data.sequences():  # epoch feature counts 0..11 within each episode
        assert data.observations[rows, 0].tolist() == list(range(12))
    assert len(set(data.episode_ids)) == 6


def test_split_is_seeded_disjoint_and_by_episode():
    train, val = split_episodes(50, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and set(train) | set(val) == set(range(50))
    again = split_episodes(50, 0.2, seed=3)
    assert train.tolist() == again[0].tolist()
    assert val.tolist() != split_episodes(50, 0.2, seed=4)[1].tolist()
    assert len(split_episodes(2, 0.01, 0)[1]) == 1  # both sides always get an episode
    with pytest.raises(DataError, match="at least 2"):
        split_episodes(1, 0.2, 0)
    with pytest.raises(DataError, match="validation fraction") as raised:
        split_episodes(10, 1.0, 0)
    assert raised.value.option == "val_fraction"  # the CLI words it as --val-fraction


def test_normaliser_leaves_constant_features_unscaled():
    x = np.zeros((10, N_FEATURES), dtype=np.float32)
    x[:, 0] = np.arange(10)
    x[:, 5] = 7.0
    mean, std = fit_normaliser(x)
    assert std[5] == 1.0 and mean[5] == 7.0 and std[0] == pytest.approx(np.arange(10).std())


def test_class_weights_auto_balanced_and_finite_when_a_class_is_absent():
    y = np.array([0] * 90 + [1] * 6 + [2] * 4)  # no CULL
    w = class_weights(y, "auto")
    assert np.isfinite(w).all() and w[3] == 1.0
    np.testing.assert_allclose(w[:3], compute_class_weight("balanced", classes=np.arange(3), y=y), rtol=1e-6)
    assert class_weights(y, "none").tolist() == [1, 1, 1, 1]
    assert class_weights(y, "1,2,3,4").tolist() == [1, 2, 3, 4]
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,-1", "0,0,0,0", "1,2,3,nan"):
        with pytest.raises(DataError, match="class weights"):
            parse_class_weights(bad)


def test_metrics_follow_the_definitions():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 + 0) / 4)
    assert m["confusion_matrix"][0] == [3, 1, 0, 0] and m["confusion_matrix"][3] == [1, 0, 0, 0]
    assert m["per_class"]["GERMINATE"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["CULL"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["labels"] == list(ACTION_NAMES)


# ----------------------------------------------------------------------------- training
def test_train_mlp_writes_a_complete_checkpoint(store, mlp_checkpoint):
    ckpt = load_checkpoint(mlp_checkpoint, expect_policy="mlp")
    meta = ckpt.meta
    data = load_decisions(store)
    split = meta["split"]
    assert set(split["train_ids"]) | set(split["val_ids"]) == set(data.episode_ids)
    assert not set(split["train_ids"]) & set(split["val_ids"])
    assert meta["hparams"]["hidden"] == [64, 32]
    assert meta["feature_schema"]["features"][0] == "epoch" and meta["feature_schema"]["version"] >= 1
    assert len(meta["normalisation"]["mean"]) == N_FEATURES
    assert np.isfinite(meta["class_weights"]["values"]).all()
    assert {"torch", "numpy", "scikit-learn", "safetensors"} <= set(meta["versions"])
    assert 1 <= meta["metrics"]["best_epoch"] <= len(meta["history"]) == 4
    assert 0.0 <= meta["metrics"]["val"]["balanced_accuracy"] <= 1.0


def test_training_is_seeded(store, tmp_path):
    a, _ = train_policy(store, TrainConfig("mlp", seed=1, **TINY), out=tmp_path / "a.safetensors")
    b, _ = train_policy(store, TrainConfig("mlp", seed=1, **TINY), out=tmp_path / "b.safetensors")
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for k in ca.tensors:
        assert torch.equal(ca.tensors[k], cb.tensors[k])
    assert ca.meta["split"] == cb.meta["split"]


def test_every_epoch_runs_and_the_lowest_validation_loss_is_kept(store, tmp_path):
    path, metrics = train_policy(store, TrainConfig("mlp", epochs=30, allow_missing_classes=True),
                                 out=tmp_path / "all.safetensors")
    history = load_checkpoint(path).meta["history"]
    assert metrics["epochs_run"] == len(history) == 30
    assert metrics["best_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]

    _, early = train_policy(store, TrainConfig("mlp", epochs=500, patience=5, allow_missing_classes=True),
                            out=tmp_path / "early.safetensors")
    assert early["epochs_run"] == early["best_epoch"] + 5 < 500
    with pytest.raises(DataError, match="patience must be positive"):
        train_policy(store, TrainConfig("mlp", patience=0, allow_missing_classes=True), out=tmp_path / "never.safetensors")


def test_a_train_config_is_typed_and_training_never_changes_it(store, tmp_path):
    with pytest.raises(TypeError, match="epoch"):
        TrainConfig("mlp", epoch=3)  # misspelt: refused where it is written, not deep in training
    config = TrainConfig("mlp", **TINY)
    with pytest.raises(FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    prep = prepare_training(store, config, out=tmp_path / "x.safetensors")
    assert config == TrainConfig("mlp", **TINY) and config.lr is None and config.class_weights is None
    assert prep.cfg.lr == 1e-3 and prep.cfg.class_weights == "auto" and prep.cfg.feature_penalty is not None
    assert replace(prep.cfg, lr=None, class_weights=None, feature_penalty=None) == config


def test_an_unknown_feature_to_ignore_is_a_one_line_error(store, tmp_path):
    with pytest.raises(DataError, match="unknown feature.*no_such_feature"):
        train_policy(store, TrainConfig("mlp", ignore_features=("no_such_feature",), **TINY),
                     out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_simic_improves_bootstrap_recipe_keeps_plain_behaviour_cloning(store, tmp_path):
    path, metrics = train_policy(store, replace(BOOTSTRAP_TRAINING, epochs=30), out=tmp_path / "boot.safetensors")
    ckpt = load_checkpoint(path)
    assert ckpt.meta["train_config"]["feature_penalty"] == 0.0
    # No clipping to the training range: only the task-dependent features are pinned (to 0).
    low, high = ckpt.input_range
    pinned = [FEATURE_NAMES.index(n) for n in TASK_DEPENDENT_FEATURES]
    free = [i for i in range(N_FEATURES) if i not in pinned]
    assert (low[pinned] == 0).all() and (high[pinned] == 0).all()
    assert (low[free] == np.finfo(np.float32).min).all() and (high[free] == np.finfo(np.float32).max).all()
    history = ckpt.meta["history"]
    best = max(history, key=lambda h: (round(h["val_balanced_accuracy"], 9), -h["val_loss"]))
    assert metrics["best_epoch"] == best["epoch"]
    with pytest.raises(DataError, match="unknown selection"):
        train_policy(store, TrainConfig("mlp", select="accuracy", allow_missing_classes=True),
                     out=tmp_path / "never.safetensors")


def test_mlp_policy_matches_the_trained_torch_network(store, mlp_checkpoint):
    policy = MLPTamiyo(checkpoint=mlp_checkpoint)
    ckpt = policy.checkpoint
    net = MLPNet(ckpt.meta["hparams"]["hidden"])
    net.load_state_dict(ckpt.tensors)
    obs = load_decisions(store).observations
    mean, std = ckpt.normalisation
    seen = np.clip(obs, *ckpt.input_range)  # the validation episodes may leave the training range
    with torch.no_grad():
        expected = net(torch.from_numpy(((seen - mean) / std).astype(np.float32))).numpy()
    np.testing.assert_allclose(policy.logits(obs), expected, atol=1e-4)
    batch = policy.decide_batch(obs)
    single = [policy.decide(TrainingSnapshot.from_vector(o)) for o in obs[:30]]
    assert [int(d.action) for d in single] == batch[:30].tolist()
    assert all(0.25 <= d.confidence <= 1.0 and d.reason.startswith("mlp p=") for d in single)
    assert policy.name == "mlp" and policy.version.startswith("1.0+")


def test_gru_live_decisions_equal_whole_episode_replay(store, gru_checkpoint):
    policy = GRUTamiyo(checkpoint=gru_checkpoint)
    ckpt = policy.checkpoint
    net = build_network("gru", ckpt.meta["hparams"])
    assert isinstance(net, GRUNet)
    net.load_state_dict(ckpt.tensors)
    data = load_decisions(store)
    mean, std = ckpt.normalisation
    for rows in data.sequences()[:3]:
        obs = data.observations[rows]
        seen = np.clip(obs, *ckpt.input_range)
        with torch.no_grad():
            logits = net(torch.from_numpy(((seen - mean) / std).astype(np.float32))[None])
        policy.reset(None)
        live = [int(policy.decide(TrainingSnapshot.from_vector(o)).action) for o in obs]
        assert live == logits[0].argmax(1).tolist() == policy.decide_episode(obs).tolist()
    # The hidden state is carried: the same observation after a different history may differ,
    # and reset() restores the fresh state.
    policy.reset(None)
    first = policy.decide(TrainingSnapshot.from_vector(data.observations[0]))
    policy.reset(None)
    assert policy.decide(TrainingSnapshot.from_vector(data.observations[0])) == first


def test_gru_defaults_and_old_checkpoints_without_dropout(store, mlp_checkpoint, gru_checkpoint, tmp_path):
    gru = load_checkpoint(gru_checkpoint).meta
    assert gru["hparams"] == {"hidden": 16, "layers": 1, "head": 64, "dropout": 0.5, "batch_size": 1}
    assert gru["train_config"]["lr"] == 3e-3
    mlp = load_checkpoint(mlp_checkpoint).meta  # the MLP's defaults are its own
    assert mlp["hparams"] == {"hidden": [64, 32], "batch_size": 32} and mlp["train_config"]["lr"] == 1e-3
    # A checkpoint from before dropout was a hyper-parameter loads as dropout 0 (inactive at inference anyway).
    ckpt = load_checkpoint(gru_checkpoint)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "feature_schema", "versions")}
    meta["hparams"] = {k: v for k, v in meta["hparams"].items() if k != "dropout"}
    old = save_checkpoint(tmp_path / "old.safetensors", ckpt.tensors, meta)
    net = build_network("gru", load_checkpoint(old).meta["hparams"])
    assert isinstance(net, GRUNet) and net.dropout == 0.0
    obs = load_decisions(store).observations[:12]
    assert (GRUTamiyo(checkpoint=old).decide_episode(obs) == GRUTamiyo(checkpoint=gru_checkpoint).decide_episode(obs)).all()


def test_heuristic_replay_scores_100_percent(store):
    data = load_decisions(store)
    pred = replay(HeuristicTamiyo(), data)
    assert classification_metrics(data.labels, pred)["accuracy"] == 1.0


def test_select_split_val_means_not_trained_on(store, mlp_checkpoint):
    data = load_decisions(store)
    trained = load_checkpoint(mlp_checkpoint).meta["split"]
    val, note = select_split(data, "val", trained)
    assert sorted(data.episode_ids[i] for i in val) == sorted(trained["val_ids"]) and "held-out" in note
    other = dict(trained, train_ids=["elsewhere"], val_ids=["elsewhere-2"])
    val, note = select_split(data, "val", other)
    assert len(val) == 6 and "not used in training" in note
    everything, note = select_split(data, "val", None, "heuristic")
    assert len(everything) == 6 and "no checkpoint" in note
    with pytest.raises(DataError, match="no checkpoint"):
        select_split(data, "train", None, "heuristic")


# ----------------------------------------------------------------------------- bad data
def test_missing_class_and_tiny_store_are_refused(store, single_episode_store, tmp_path):
    waits = tmp_path / "wait.h5"
    assert invoke("collect", "--policy", "wait", "--episodes", 2, "--epochs", 4, "--store", waits).exit_code == 0
    with pytest.raises(DataError, match="no GERMINATE/ADVANCE/CULL decisions"):
        train_policy(waits, TrainConfig("mlp", epochs=1), out=tmp_path / "x.safetensors")
    with pytest.raises(DataError, match="at least 2"):
        train_policy(single_episode_store, TrainConfig("mlp", **TINY), out=tmp_path / "x.safetensors")
    with pytest.raises(DataError):
        train_policy(tmp_path / "nope.h5", TrainConfig("mlp", **TINY), out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_nan_observations_are_refused(store, monkeypatch):
    from esper_cli.data import store as store_mod

    original = store_mod.EpisodeReader.decisions

    def poisoned(self, *args, **kwargs):
        cols = dict(original(self, *args, **kwargs))
        obs = np.array(cols["observations"], copy=True)
        obs[3, 2] = np.nan
        cols["observations"] = obs
        return cols

    monkeypatch.setattr(store_mod.EpisodeReader, "decisions", poisoned)
    with pytest.raises(DataError, match="NaN or inf .*train_loss"):
        load_decisions(store)


# ----------------------------------------------------------------------------- checkpoints
def _resign(path: Path, meta_edit) -> None:
    """Rewrite a checkpoint's metadata *with a valid digest* (a forged, not a corrupted, file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["simic"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta_edit(meta)
    meta_json = json.dumps(meta, sort_keys=True)
    save_file(tensors, str(path), metadata={"simic": meta_json, "sha256": digest(meta_json, tensors)})


def test_checkpoints_refuse_tampering_and_other_schemas(mlp_checkpoint, tmp_path):
    # Pickles are refused unread in test_training_inputs.py.
    tampered = tmp_path / "tampered.safetensors"
    raw = bytearray(mlp_checkpoint.read_bytes())
    raw[-3] ^= 0x55  # flip bits in the last weight
    tampered.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(tampered)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(mlp_checkpoint.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)

    other = tmp_path / "schema.safetensors"
    other.write_bytes(mlp_checkpoint.read_bytes())
    _resign(other, lambda m: m["feature_schema"].update(version=99))
    with pytest.raises(CheckpointError, match="feature schema"):
        load_checkpoint(other)

    with pytest.raises(CheckpointError, match="not 'gru'"):
        GRUTamiyo(checkpoint=mlp_checkpoint)
    with pytest.raises(CheckpointError, match="simic train --policy mlp"):
        MLPTamiyo()  # no default checkpoint in this test's SIMIC_HOME


def test_policies_clip_observations_to_the_training_range(store, mlp_checkpoint, gru_checkpoint, tmp_path):
    data = load_decisions(store)
    ckpt = load_checkpoint(mlp_checkpoint)
    train = data.select([data.episode_ids.index(i) for i in ckpt.meta["split"]["train_ids"]])
    low, high = ckpt.input_range
    pinned = [FEATURE_NAMES.index(n) for n in TASK_DEPENDENT_FEATURES]  # 0 always (global_step)
    seen = train.observations.copy()
    seen[:, pinned] = 0.0
    np.testing.assert_array_equal(low, seen.min(axis=0))
    np.testing.assert_array_equal(high, seen.max(axis=0))

    # A state far outside the training range decides as its nearest state in range does.
    far = data.observations.copy()
    far[:, :21] = far[:, :21] * 50 - 1000  # the host's numbers (accuracies, losses, plateau), not the seed's
    for policy in (MLPTamiyo(checkpoint=mlp_checkpoint), GRUTamiyo(checkpoint=gru_checkpoint)):
        decide = policy.decide_batch if isinstance(policy, MLPTamiyo) else policy.decide_episode
        np.testing.assert_array_equal(decide(far[:25]), decide(np.clip(far[:25], low, high)))

    # A task-dependent feature (global_step: steps per epoch times epochs) never sways a decision.
    scaled = data.observations[:40].copy()
    scaled[:, FEATURE_NAMES.index("global_step")] *= 7.0
    mlp = MLPTamiyo(checkpoint=mlp_checkpoint)
    np.testing.assert_array_equal(mlp.logits(scaled), mlp.logits(data.observations[:40]))

    # A checkpoint saved without a range (before it was recorded) loads and decides unclipped.
    old = tmp_path / "old.safetensors"
    old.write_bytes(mlp_checkpoint.read_bytes())
    _resign(old, lambda m: [m["normalisation"].pop(k) for k in ("low", "high")])
    policy = MLPTamiyo(checkpoint=old)
    assert policy.input_range is None
    assert not np.array_equal(policy.logits(far[:25]), policy.logits(np.clip(far[:25], low, high)))

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mlp_checkpoint.read_bytes())
    _resign(bad, lambda m: m["normalisation"].update(low=m["normalisation"]["high"], high=m["normalisation"]["low"]))
    with pytest.raises(CheckpointError, match="invalid input range"):
        MLPTamiyo(checkpoint=bad)


def test_save_is_atomic_and_roundtrips(tmp_path):
    path = save_checkpoint(tmp_path / "deep" / "c.safetensors", {"w": torch.arange(6.0).reshape(2, 3)},
                           {"policy": "mlp", "hparams": {}})
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.tensors["w"], torch.arange(6.0).reshape(2, 3)) and ckpt.policy == "mlp"
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]  # no temp file left


# ----------------------------------------------------------------------------- the CLI
def test_cli_train_then_eval_by_policy_name(store, simic_home):
    result = invoke("train", "--store", store, "--epochs", 3, "--allow-missing-classes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    default = simic_home / "checkpoints" / "mlp.safetensors"
    assert report["checkpoint"] == str(default) and default.exists()
    assert report["epochs_run"] == 3 and "balanced_accuracy" in report["val"]

    result = invoke("eval", "--policy", "mlp", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    for key in ("accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "labels", "split",
                "n_episodes", "n_decisions"):
        assert key in ev
    assert ev["split"] == "val" and ev["n_episodes"] == report["n_val_episodes"]
    assert sum(map(sum, ev["confusion_matrix"])) == ev["n_decisions"]

    table = invoke("eval", "--store", store)  # no options: the mlp's default checkpoint
    assert table.exit_code == 0 and "Confusion matrix" in table.stdout and "balanced accuracy" in table.stdout


def test_cli_eval_heuristic_is_a_100_percent_sanity_check(store, tmp_path):
    result = invoke("eval", "--policy", "heuristic", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    assert ev["accuracy"] == 1.0 and ev["balanced_accuracy"] == 1.0 and ev["n_episodes"] == 6
    assert "no checkpoint" in ev["split_note"]
    # Agreement per seed stage covers every decision; the heuristic never departs from itself.
    assert sum(c["decisions"] for c in ev["by_stage"].values()) == ev["n_decisions"]
    assert "DORMANT" in ev["by_stage"] and all(c["disagreements"] == 0 for c in ev["by_stage"].values())
    wait = json.loads(invoke("eval", "--policy", "wait", "--store", store, "--json").stdout)
    # `wait` departs from the labels exactly where the heuristic germinated (all with no seed active).
    assert wait["by_stage"]["DORMANT"]["disagreements"] == ev["per_class"]["GERMINATE"]["support"] >= 1
    png = tmp_path / "cm.png"
    result = invoke("eval", "--policy", "heuristic", "--store", store, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "100.0%" in result.stdout


def test_cli_eval_gru_checkpoint_with_plot(store, gru_checkpoint, tmp_path):
    png = tmp_path / "gru.png"
    result = invoke("eval", "--checkpoint", gru_checkpoint, "--store", store, "--split", "all", "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000 and "gru" in result.stdout


def test_cli_bad_inputs_are_one_line_exit_2(store, single_episode_store, mlp_checkpoint, tmp_path):
    assert "at least 2" in one_line_error(invoke("train", "--store", single_episode_store, "--allow-missing-classes"))
    assert "CULL" in one_line_error(invoke("train", "--store", single_episode_store, "--epochs", 1))  # 6 epochs: no cull
    assert "class-weights" in one_line_error(invoke("train", "--store", store, "--class-weights", "1,2"))
    assert "heuristic" in one_line_error(invoke("train", "--store", store, "--policy", "heuristic"))
    one_line_error(invoke("train", "--store", tmp_path / "missing.h5"))
    one_line_error(invoke("eval", "--policy", "heuristic", "--store", tmp_path / "missing.h5"))
    assert "simic train --policy gru" in one_line_error(invoke("eval", "--policy", "gru", "--store", store))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    assert "pickle" in one_line_error(invoke("eval", "--checkpoint", evil, "--store", store))
    tampered = tmp_path / "t.safetensors"
    raw = bytearray(mlp_checkpoint.read_bytes())
    raw[-1] ^= 0x01
    tampered.write_bytes(bytes(raw))
    assert "integrity" in one_line_error(invoke("eval", "--checkpoint", tampered, "--store", store))

    # A failed train never overwrites an existing checkpoint.
    target = tmp_path / "keep.safetensors"
    target.write_bytes(mlp_checkpoint.read_bytes())
    one_line_error(invoke("train", "--store", single_episode_store, "--allow-missing-classes", "--out", target))
    assert target.read_bytes() == mlp_checkpoint.read_bytes()


def test_cli_plot_without_matplotlib_is_a_clear_error(store, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    msg = one_line_error(invoke("eval", "--policy", "heuristic", "--store", store, "--plot", tmp_path / "x.png"))
    assert "simic[plot]" in msg and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- schema versions
@pytest.fixture(scope="session")
def v1_store(store, tmp_path_factory) -> Path:
    """A copy of the session store relabelled as observation schema v1 (the old seed signal)."""
    import shutil

    import h5py

    path = tmp_path_factory.mktemp("stores") / "v1.h5"
    shutil.copy(store, path)
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["schema_version"] = 1
    return path


def test_v1_stores_open_in_info_and_eval_but_train_refuses_to_mix_schemas(v1_store, tmp_path):
    result = invoke("info", "--store", v1_store, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema_version"] == 1
    result = invoke("eval", "--policy", "heuristic", "--store", v1_store, "--json")
    assert result.exit_code == 0, result.output
    error = one_line_error(invoke("train", "--store", v1_store, "--out", tmp_path / "m.safetensors"))
    assert "v1" in error and "v2" in error
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(DataError, match="tamiyo-snapshot v1 observations; simic train uses v2"):
        train_policy(v1_store, TrainConfig("mlp", **TINY), out=tmp_path / "m.safetensors")


def test_a_checkpoint_refuses_a_store_of_another_schema_version(v1_store, mlp_checkpoint):
    error = one_line_error(invoke("eval", "--checkpoint", mlp_checkpoint, "--store", v1_store))
    assert "v1" in error and "checkpoint" in error
