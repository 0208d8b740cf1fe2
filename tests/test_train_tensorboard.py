"""`simic train --tensorboard DIR`: one step per epoch run, read back with TensorBoard's own reader;
without TensorBoard the flag is a one-line error before any work."""

from __future__ import annotations

import importlib.util

from cli_helpers import invoke, one_line_error, succeed
from test_training_inputs import write_store

from esper_cli.contracts import ACTION_NAMES
from esper_cli.learning.event_log import read_scalars


def test_train_logs_losses_balanced_accuracy_and_recall_per_epoch(tmp_path):
    store = write_store(tmp_path / "s.h5", 10, {3, 7})
    logs = tmp_path / "tb"
    succeed("train", "--store", store, "--epochs", 3, "--out", tmp_path / "m.safetensors", "--tensorboard", logs, "--json")
    curves = read_scalars(logs)
    expected = {"train/loss", "val/loss", "val/accuracy", "val/balanced_accuracy"}
    assert expected <= set(curves)
    assert any(tag.startswith("val/recall/") for tag in curves)
    assert set(curves) <= expected | {f"val/recall/{a}" for a in ACTION_NAMES}
    for tag, points in curves.items():
        assert [step for step, _ in points] == [1, 2, 3], tag
    # the same command again: a new run whose curves replace the first's, each epoch once
    succeed("train", "--store", store, "--epochs", 2, "--out", tmp_path / "m.safetensors", "--tensorboard", logs, "--json")
    assert [step for step, _ in read_scalars(logs)["train/loss"]] == [1, 2]


def test_train_without_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    result = invoke("train", "--store", tmp_path / "missing.h5", "--tensorboard", tmp_path / "tb")
    one_line_error(result, "--tensorboard", "simic[tensorboard]")
    assert not (tmp_path / "tb").exists()
