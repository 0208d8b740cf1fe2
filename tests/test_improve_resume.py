"""`simic improve` resumes: the run state saved after every update, real processes killed with
SIGKILL at several points, each re-run ending with the uninterrupted run's checkpoint tensors;
a changed configuration refused; TensorBoard curves that hold each update once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_line_error

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import EpisodeConfig
from esper_cli.learning.event_log import read_scalars
from esper_cli.learning.ppo import ImproveConfig, improve
from esper_cli.learning.ppo_state import state_path
from esper_cli.learning.run_state import RunStateError, load_run_state
from esper_cli.plugins import build_registry

ARGS = ["--epochs", "3", "--bootstrap-episodes", "4", "--episodes", "8", "--episodes-per-update", "2", "--group", "2",
        "--select-episodes", "2"]
UPDATES = 4


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def command(folder: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "-m", "esper_cli", "improve", "--out", str(folder / "mlp.safetensors"),
            "--tensorboard", str(folder / "tb"), "--json", *ARGS, *extra]
    return args, {**os.environ, "SIMIC_HOME": str(folder)}


def run_to_end(folder: Path, *extra: str) -> dict:
    args, env = command(folder, *extra)
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def state_id(folder: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the run state: every save replaces the file, so this changes."""
    try:
        st = os.stat(folder / "mlp.run.safetensors")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def kill_when(folder: Path, ready: Callable[[], bool], delay: float = 0.0) -> None:
    """Start the command, SIGKILL it once `ready()` (polled every millisecond) and `delay` later;
    it must not have finished by then."""
    args, env = command(folder)
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL, "the run ended before the kill point"
    finally:
        child.kill()


def saved_update(folder: Path) -> int | None:
    loaded = load_run_state(folder / "mlp.run.safetensors")
    return None if loaded is None else loaded[1]["next_update"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("whole")
    return folder, run_to_end(folder)


@pytest.mark.slow
def test_sigkill_anywhere_then_the_same_command_ends_with_the_uninterrupted_checkpoint(uninterrupted, tmp_path):
    whole, summary = uninterrupted
    assert summary["resumed_from"] is None and summary["updates"] == UPDATES and summary["episodes_used"] == 4 + 8 + 2 * 2  # bootstrap, updates, 2 candidates x 2 seeds

    # 1. while the first state is written (after the bootstrap and update 0): no state is left,
    #    so the re-run behaviour-clones again from the kept bootstrap episodes.
    kill_when(tmp_path, lambda: any(p.name.startswith(".mlp.run.safetensors.") for p in tmp_path.iterdir()))
    assert saved_update(tmp_path) is None
    # 2. right after an update's state is saved (the next update's PPO or its episodes start).
    kill_when(tmp_path, lambda: state_id(tmp_path) is not None)
    # 3. while an update's episodes run (a fraction of the ~0.3 s its two episodes take).
    before = state_id(tmp_path)
    kill_when(tmp_path, lambda: state_id(tmp_path) not in (None, before), delay=0.1)
    resumed = saved_update(tmp_path)
    assert resumed is not None and 1 <= resumed < UPDATES

    final = run_to_end(tmp_path)
    assert final["resumed_from"] == resumed and final["episodes_used"] == summary["episodes_used"]
    assert final["history"] == [{**r, "episodes_per_second": f["episodes_per_second"]}
                                for r, f in zip(summary["history"], final["history"])]
    assert same_tensors(tmp_path / "mlp.safetensors", whole / "mlp.safetensors")
    assert same_tensors(tmp_path / "mlp.bc.safetensors", whole / "mlp.bc.safetensors")

    # Every curve holds each update once, with the uninterrupted run's numbers.
    curves, reference = read_scalars(tmp_path / "tb"), read_scalars(whole / "tb")
    assert len(curves) == 12 and curves.keys() == reference.keys()
    for tag, points in curves.items():
        steps = [0, 3] if tag == "select/score" else list(range(UPDATES))  # candidates: the first and the last
        assert [step for step, _ in points] == steps, tag
        if tag != "speed/episodes_per_second":
            assert points == reference[tag], tag


@pytest.mark.slow
def test_a_complete_run_is_not_run_again_a_changed_one_is_refused_and_restart_starts_over(uninterrupted, tmp_path):
    whole, summary = uninterrupted
    for f in whole.glob("mlp*"):  # a moved folder still resumes (its state names no path that matters)
        shutil.copy2(f, tmp_path / f.name)
    again = run_to_end(tmp_path, "--plot", str(tmp_path / "curve.png"))
    assert again["resumed_from"] == UPDATES and again["history"] == summary["history"]
    assert (tmp_path / "curve.png").stat().st_size > 0  # the whole curve, from the state
    assert same_tensors(tmp_path / "mlp.safetensors", whole / "mlp.safetensors")

    args, env = command(tmp_path, "--seed", "1")
    refused = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "seed: 0 -> 1" in lines[0] and "--restart" in lines[0], refused.stderr

    restarted = run_to_end(tmp_path, "--restart")
    assert restarted["resumed_from"] is None and restarted["episodes_used"] == summary["episodes_used"]
    assert same_tensors(tmp_path / "mlp.safetensors", whole / "mlp.safetensors")


def test_a_resumed_run_is_refused_a_changed_configuration_before_any_work(tmp_path):
    out = tmp_path / "mlp.safetensors"
    cfg = ImproveConfig(episode=EpisodeConfig(epochs=3), out=out, episodes=2, episodes_per_update=2, group=2,
                        bootstrap_episodes=2)
    improve(cfg, build_registry())
    assert load_run_state(state_path(cfg))[1]["next_update"] == 1
    changed = ImproveConfig(**{**cfg.__dict__, "lr": 0.5})
    with pytest.raises(RunStateError, match=r"lr: 0\.001 -> 0\.5") as refused:
        improve(changed, build_registry())
    assert "\n" not in str(refused.value)
    # Workers and backend do not change a number of the result: such a run resumes (here: complete).
    assert improve(ImproveConfig(**{**cfg.__dict__, "workers": 1}), build_registry()).resumed_from == 1


def test_restart_never_removes_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "mlp.safetensors"
    notes = tmp_path / "mlp.run.safetensors"
    notes.write_text("my notes")
    assert "not a Simic run state" in one_line_error(invoke("improve", "--out", out, "--restart", *ARGS))
    assert "unreadable" in one_line_error(invoke("improve", "--out", out, *ARGS))
    assert notes.read_text() == "my notes"


def test_tensorboard_without_the_extra_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    line = one_line_error(invoke("improve", "--out", tmp_path / "mlp.safetensors", "--tensorboard", tmp_path / "tb"))
    assert "simic[tensorboard]" in line
    assert not list(tmp_path.iterdir())  # refused before any work
