"""What training reads and writes: checkpoint headers, episode splits, output paths, class weights.

Stores are real HDF5 files written by `EpisodeWriter` from hand-made episodes, so each test
controls exactly which episodes hold which actions; the CLI runs for real through typer's runner.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error

from esper_cli.checkpoint import CheckpointError, check_writable_checkpoint, load_checkpoint, save_checkpoint
from esper_cli.cli import common
from esper_cli.contracts import N_FEATURES, Action, DecisionRecord, Episode, EpisodeConfig, Outcome, SeedStage
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.learning.metrics import classification_metrics
from esper_cli.learning.training import TrainConfig, prepare_training, train_policy

W, G, A, C = (int(a) for a in Action)
ALL_FOUR = {W, G, A, C}




def make_episode(index: int, actions: list[int]) -> Episode:
    rng = np.random.default_rng(index)
    decisions = []
    for t, action in enumerate(actions):
        obs = rng.normal(size=N_FEATURES).astype(np.float32)
        obs[0] = t
        obs[-1] = 2.0
        decisions.append(DecisionRecord(
            observation=obs, action=Action(action), valid=True, confidence=1.0, reason="crafted", blueprint=None,
            outcome=Outcome(0.0, 0.0, 50.0, False, SeedStage.DORMANT, 0.0)))
    return Episode(seed=0, index=index, rng_seed=index, config=EpisodeConfig(epochs=len(actions)), policy="heuristic",
                   policy_version="test", decisions=decisions, final_accuracy=50.0, best_accuracy=50.0,
                   test_accuracy=50.0, seeds=[])


def write_store(path: Path, n_episodes: int, cull_in: set[int], advance_in: set[int] | None = None) -> Path:
    """`n_episodes` episodes of 8 decisions, mostly WAIT, one GERMINATE each; ADVANCE in
    `advance_in` (default: all) and CULL exactly in the episodes of `cull_in`."""
    advance_in = set(range(n_episodes)) if advance_in is None else advance_in
    with EpisodeWriter(path) as writer:
        for i in range(n_episodes):
            actions = [W, G, W, W, W, W, W, W]
            if i in advance_in:
                actions[3] = A
            if i in cull_in:
                actions[5] = C
            writer.append(make_episode(i, actions))
    return path


@pytest.fixture(scope="module")
def cull_twice(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("stores") / "cull2.h5", 10, {3, 7})


@pytest.fixture(scope="module")
def cull_once(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("stores") / "cull1.h5", 10, {4})


@pytest.fixture(scope="module")
def checkpoint(cull_twice, tmp_path_factory) -> Path:
    path, _ = train_policy(cull_twice, TrainConfig("mlp", epochs=2), out=tmp_path_factory.mktemp("ckpt") / "mlp.safetensors")
    return path


@pytest.fixture
def wide_tables(monkeypatch):
    """Tables wide enough that a row label is never wrapped (the assertions read whole labels)."""
    monkeypatch.setattr(common.out, "_width", 300)


# -------------------------------------------------------------- checkpoint headers
def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _checkpoint_with_header_length(path: Path, want) -> Path:
    """A real checkpoint whose safetensors header length satisfies `want`, by padding its metadata.

    The header is JSON padded with spaces to a multiple of 8; each extra pad character adds one
    byte of JSON, so the padding needed for a chosen length is computed from an unpadded save.
    """
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_checkpoint(path, tensors, {"policy": "mlp", "hparams": {}, "pad": ""})
    raw = path.read_bytes()
    json_len = len(raw[8 : 8 + _header_length(path)].rstrip(b" "))
    target = next(n for n in range(json_len, json_len + (1 << 17)) if want(n))
    save_checkpoint(path, tensors, {"policy": "mlp", "hparams": {}, "pad": "x" * (target - json_len)})
    assert _header_length(path) == target
    return path


def test_a_checkpoint_whose_header_length_starts_with_0x80_or_PK_loads(tmp_path):
    first = _checkpoint_with_header_length(tmp_path / "a.safetensors", lambda n: n % 8 == 0 and n & 0xFF == 0x80)
    assert first.read_bytes()[:1] == b"\x80"
    ckpt = load_checkpoint(first, expect_policy="mlp")
    assert torch.equal(ckpt.tensors["w"], torch.arange(6.0).reshape(2, 3))
    zip_like = _checkpoint_with_header_length(tmp_path / "b.safetensors", lambda n: n & 0xFFFF == 0x4B50)
    assert zip_like.read_bytes()[:2] == b"PK"
    assert load_checkpoint(zip_like).policy == "mlp"


class _Touch:
    marker: Path

    def __reduce__(self):  # what a malicious pickle does on load: run code
        return (Path.touch, (self.marker,))


def test_pickles_and_torch_save_files_are_still_refused_unread(tmp_path):
    payload = _Touch()
    payload.marker = tmp_path / "ran"
    for protocol in (2, 4, 5):
        evil = tmp_path / f"evil{protocol}.safetensors"
        evil.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(evil)
    zipped = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(2), "boom": payload}, zipped)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(zipped)
    assert not payload.marker.exists()


# ---------------------------------------------------------- splits and missing classes
def test_a_class_in_two_episodes_is_on_both_sides_of_every_split(cull_twice, tmp_path):
    for seed in range(20):
        prep = prepare_training(cull_twice, TrainConfig("mlp", seed=seed), out=tmp_path / "x.safetensors")
        assert set(prep.train.labels.tolist()) == ALL_FOUR, seed
        assert set(prep.val.labels.tolist()) == ALL_FOUR, seed
        assert not set(prep.train.episode_ids) & set(prep.val.episode_ids)
        assert prep.val.n_episodes == 2  # the validation size is kept


def test_the_split_covers_a_class_that_is_never_an_episodes_rarest(tmp_path):
    # ADVANCE (1 decision) is rarer than CULL (2) and shares episode 2 with CULL, which must stay
    # in training for ADVANCE: CULL's validation episode has to be episode 5.
    store = write_store(tmp_path / "s.h5", 10, cull_in={2, 5}, advance_in={2})
    for seed in range(20):
        prep = prepare_training(store, TrainConfig("mlp", seed=seed), out=tmp_path / "x.safetensors")
        assert set(prep.train.labels.tolist()) == ALL_FOUR, seed
        assert C in prep.val.labels, seed


def test_metrics_name_the_classes_without_support():
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 2]))
    assert m["balanced_accuracy"] == 1.0
    assert m["classes_without_support"] == ["CULL"]
    assert m["balanced_accuracy_classes"] == ["WAIT", "GERMINATE", "ADVANCE"]
    assert classification_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]))["classes_without_support"] == []


def test_train_and_eval_say_when_validation_has_no_cull(cull_once, tmp_path, wide_tables):
    ckpt = tmp_path / "mlp.safetensors"
    result = invoke("train", "--store", cull_once, "--out", ckpt, "--epochs", 3, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["val"]["classes_without_support"] == ["CULL"]
    assert report["train"]["classes_without_support"] == []
    assert "CULL" in result.stderr  # the warning before training

    table = invoke("train", "--store", cull_once, "--out", ckpt, "--epochs", 3)
    assert table.exit_code == 0, table.output
    assert "val balanced accuracy (3 of 4 classes; no CULL in validation)" in table.stdout
    assert not any(line.strip("│ ").startswith("val balanced accuracy ") and "classes" not in line
                   for line in table.stdout.splitlines())

    result = invoke("eval", "--checkpoint", ckpt, "--store", cull_once, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes_without_support"] == ["CULL"]
    table = invoke("eval", "--checkpoint", ckpt, "--store", cull_once)
    assert table.exit_code == 0, table.output
    assert "balanced accuracy (3 of 4 classes; no CULL in the scored episodes)" in table.stdout


# ---------------------------------------------------------------- output paths
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: a refused --out must be refused before any epoch."""
    from esper_cli.cli.commands import train as train_cmd

    def refuse(*args, **kwargs):
        raise AssertionError("training started although --out is refused")

    monkeypatch.setattr(train_cmd, "fit", refuse)


def _episodes(store: Path) -> list[str]:
    with EpisodeReader(store) as reader:
        return [reader.episode_meta(i)["id"] for i in range(reader.n_episodes)]


def test_train_out_never_overwrites_the_store_or_other_files(tmp_path, no_training):
    store = write_store(tmp_path / "store.h5", 6, {1, 4})
    before, ids = store.read_bytes(), _episodes(store)
    assert "not a Simic checkpoint" in one_line_error(invoke("train", "--store", store, "--out", store))
    link = tmp_path / "link.safetensors"
    link.symlink_to(store)
    assert "not a Simic checkpoint" in one_line_error(invoke("train", "--store", store, "--out", link))
    assert link.is_symlink() and store.read_bytes() == before and _episodes(store) == ids

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    one_line_error(invoke("train", "--store", store, "--out", notes))
    assert notes.read_text() == "my notes\n"

    one_line_error(invoke("train", "--store", store, "--out", "/dev/null"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert "directory" in one_line_error(invoke("train", "--store", store, "--out", tmp_path))

    under_a_file = notes / "sub" / "mlp.safetensors"
    assert "not a directory" in one_line_error(invoke("train", "--store", store, "--out", under_a_file))
    if os.path.isdir("/proc/self"):
        assert "not writable" in one_line_error(invoke("train", "--store", store, "--out", "/proc/mlp.safetensors"))
    assert notes.read_text() == "my notes\n"


def test_train_out_replaces_an_existing_checkpoint(cull_twice, checkpoint, tmp_path):
    target = tmp_path / "old.safetensors"
    target.write_bytes(checkpoint.read_bytes())
    link = tmp_path / "current.safetensors"
    link.symlink_to(target)
    result = invoke("train", "--store", cull_twice, "--out", link, "--epochs", 3, "--seed", 5, "--json")
    assert result.exit_code == 0, result.output
    assert link.is_symlink()  # the real file was replaced, the link kept
    meta = load_checkpoint(target).meta
    assert meta["train_config"]["seed"] == 5 and len(meta["history"]) == 3
    assert check_writable_checkpoint(link) == target.resolve()


def test_the_library_refuses_to_write_over_a_store(cull_twice, tmp_path):
    store = write_store(tmp_path / "store.h5", 4, {1, 2})
    before = store.read_bytes()
    with pytest.raises(CheckpointError, match="not a Simic checkpoint"):
        train_policy(cull_twice, TrainConfig("mlp", epochs=1), out=store)
    with pytest.raises(CheckpointError, match="not a Simic checkpoint"):
        save_checkpoint(store, {"w": torch.zeros(1)}, {"policy": "mlp", "hparams": {}})
    assert store.read_bytes() == before


def test_dagger_out_is_checked_before_anything_runs(cull_twice, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    before = cull_twice.read_bytes()
    result = invoke("dagger", "--store", cull_twice, "--out", notes, "--rounds", 0, "--epochs", 8,
                    "--train-epochs", 1, "--compare-episodes", 1, "--allow-missing-classes")
    assert "not a Simic checkpoint" in one_line_error(result)
    assert notes.read_text() == "keep me\n" and cull_twice.read_bytes() == before
    assert not (tmp_path / "notes.dagger-r0.txt").exists()


# --------------------------------------------------------------- class weights
def test_class_weights_zero_on_every_training_class_are_refused(tmp_path):
    store = write_store(tmp_path / "no-cull.h5", 6, set())
    msg = one_line_error(invoke("train", "--store", store, "--out", tmp_path / "m.safetensors",
                                "--allow-missing-classes", "--class-weights", "0,0,0,1", "--epochs", 3))
    assert "--class-weights" in msg and "weight 0" in msg and "diverged" not in msg
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("weights", ["0,0,0,1", "0,1,1,1"])
def test_class_weights_with_zeros_train_when_a_weighted_class_is_present(cull_twice, tmp_path, weights):
    # A mini-batch holding only zero-weight labels used to make the mean loss 0/0 = NaN ("diverged").
    result = invoke("train", "--store", cull_twice, "--out", tmp_path / "m.safetensors",
                    "--class-weights", weights, "--epochs", 3, "--json")
    assert result.exit_code == 0, result.output
    history = load_checkpoint(tmp_path / "m.safetensors").meta["history"]
    assert len(history) == 3 and all(np.isfinite([h["train_loss"], h["val_loss"]]).all() for h in history)
    assert "weight 0" in result.stderr
