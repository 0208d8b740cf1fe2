"""`simic dagger` resumes at round granularity and logs one TensorBoard step per round.

A run stopped after a round (in process) or killed with SIGKILL at several points (a real
process: during the bootstrap collection, between rounds, during a later round) ends, when the
same command is run again, with the uninterrupted run's checkpoint tensors and per-round results;
a changed configuration is refused in one line; --restart starts over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import invoke, one_line_error
from safetensors.torch import load_file

from esper_cli.learning import dagger_loop
from esper_cli.learning.dagger_state import run_state_path
from esper_cli.learning.event_log import read_scalars
from esper_cli.learning.run_state import load_run_state

EPOCHS, SEED = 12, 5  # the tiny settings of test_dagger


def dagger_args(tmp: Path, *extra: object) -> list[str]:
    return [str(a) for a in (
        "dagger", "--rounds", 1, "--store", tmp / "agg.h5", "--out", tmp / "ckpt" / "mlp.safetensors",
        "--bootstrap-episodes", 2, "--seed", SEED, "--episodes-per-round", 2, "--compare-episodes", 1,
        "--epochs", EPOCHS, "--train-epochs", 5, "--allow-missing-classes", "--json", *extra)]


def run(tmp: Path, *extra: object) -> dict:
    result = invoke(*dagger_args(tmp, *extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def comparable(report: dict) -> list[dict]:
    """The per-round results without the paths (each run has its own folder)."""
    return [{k: v for k, v in r.items() if k != "checkpoint"} for r in report["rounds"]]


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("reference")
    return tmp, run(tmp, "--tensorboard", tmp / "tb")


def test_a_finished_run_logs_each_round_once_and_says_it_did_not_resume(uninterrupted):
    tmp, report = uninterrupted
    assert report["resumed"] is False and report["resumed_from_round"] is None
    curves = read_scalars(tmp / "tb")
    assert {"dagger/on_policy_agreement", "dagger/learner_final_accuracy", "dagger/final_accuracy_diff"} <= set(curves)
    for tag, points in curves.items():
        assert [step for step, _ in points] == [0, 1], tag
    _, state = load_run_state(run_state_path(tmp / "ckpt" / "mlp.safetensors"))
    assert [r["round"] for r in state["rounds"]] == [0, 1] and state["eval_seed"] == report["eval_seed"]


def stop_after_round_0(monkeypatch, tmp: Path) -> None:
    """Run the tiny DAgger in `tmp` until round 0's state is saved, then stop it (Ctrl-C)."""
    save = dagger_loop.save_dagger_state

    def stop(path, cfg, resume):
        size = save(path, cfg, resume)
        if len(resume.results) == 1:
            raise KeyboardInterrupt
        return size

    with monkeypatch.context() as patched:
        patched.setattr(dagger_loop, "save_dagger_state", stop)
        stopped = invoke(*dagger_args(tmp, "--tensorboard", tmp / "tb"))
    assert stopped.exit_code == 130 and "continues from round 1" in stopped.stderr


def test_a_run_stopped_after_round_0_resumes_at_round_1_and_ends_the_same(uninterrupted, tmp_path, monkeypatch):
    ref_tmp, ref = uninterrupted
    stop_after_round_0(monkeypatch, tmp_path)
    report = run(tmp_path, "--tensorboard", tmp_path / "tb")
    assert report["resumed"] is True and report["resumed_from_round"] == 1
    assert comparable(report) == comparable(ref) and report["eval_seed"] == ref["eval_seed"]
    same_tensors(tmp_path / "ckpt" / "mlp.safetensors", ref_tmp / "ckpt" / "mlp.safetensors")
    curves = read_scalars(tmp_path / "tb")
    assert curves["dagger/on_policy_agreement"] == read_scalars(ref_tmp / "tb")["dagger/on_policy_agreement"]
    # finished: the same command again runs nothing and reports the same rounds
    again = run(tmp_path)
    assert again["resumed_from_round"] == 2 and comparable(again) == comparable(ref)


def test_a_changed_configuration_or_checkpoint_is_refused_and_restart_starts_over(tmp_path, monkeypatch):
    stop_after_round_0(monkeypatch, tmp_path)
    eval_seed = load_run_state(run_state_path(tmp_path / "ckpt" / "mlp.safetensors"))[1]["eval_seed"]
    one_line_error(invoke(*dagger_args(tmp_path, "--train-epochs", 6)),
                   "another configuration", "train_epochs: 5 -> 6", "--restart")
    one_line_error(invoke(*dagger_args(tmp_path, "--eval-seed", eval_seed + 1)), "eval_seed")
    round_0 = tmp_path / "ckpt" / "mlp.dagger-r0.safetensors"
    round_0.write_bytes(round_0.read_bytes() + b" ")  # not the file round 0 wrote
    one_line_error(invoke(*dagger_args(tmp_path)), "not the one round 0 wrote")
    report = run(tmp_path, "--restart", "--tensorboard", tmp_path / "tb")
    assert report["resumed"] is False and [r["round"] for r in report["rounds"]] == [0, 1]
    for tag, points in read_scalars(tmp_path / "tb").items():
        assert [step for step, _ in points] == [0, 1], tag


def _process(tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "esper_cli", *dagger_args(tmp, "--tensorboard", tmp / "tb")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _rounds_saved(state: Path) -> int:
    try:
        loaded = load_run_state(state)
    except Exception:
        return -1
    return -1 if loaded is None else len(loaded[1]["rounds"])


def _episodes(store: Path) -> int:
    return dagger_loop.store_episodes(store)[0] if store.exists() else 0


def _kill_when(tmp: Path, ready) -> None:
    proc = _process(tmp)
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, "the run ended before its kill point"
        assert time.monotonic() < deadline, "dagger made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_at_several_points_then_the_same_command_ends_with_the_uninterrupted_tensors(uninterrupted, tmp_path):
    ref_tmp, ref = uninterrupted
    state, store = run_state_path(tmp_path / "ckpt" / "mlp.safetensors"), tmp_path / "agg.h5"
    _kill_when(tmp_path, lambda: _episodes(store) >= 1)  # during the bootstrap collection
    _kill_when(tmp_path, lambda: _rounds_saved(state) == 1)  # just as round 0's state is written
    _kill_when(tmp_path, lambda: _episodes(store) >= 4)  # round 1 collected: while it trains or compares
    result = subprocess.run([sys.executable, "-m", "esper_cli", *dagger_args(tmp_path, "--tensorboard", tmp_path / "tb")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resumed"] is True and comparable(report) == comparable(ref)
    same_tensors(tmp_path / "ckpt" / "mlp.safetensors", ref_tmp / "ckpt" / "mlp.safetensors")
    for tag, points in read_scalars(tmp_path / "tb").items():
        assert [step for step, _ in points] == [0, 1], tag
