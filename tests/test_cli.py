"""`simic collect` and `simic info` end to end: real runs, real HDF5 stores, real processes."""

from __future__ import annotations

import signal
import time

import h5py
import numpy as np
import pytest
from cli_helpers import committed_episodes, info_json, simic_process, wait_for_episodes
from cli_helpers import invoke as simic
from cli_helpers import one_line_error as assert_one_line_error

from esper_cli.data.store import EpisodeReader

TINY = ["--epochs", "6"]


def test_collect_then_info_reports_every_episode(tmp_path):
    store = tmp_path / "s.h5"
    result = simic("collect", "--episodes", "3", "--store", str(store), *TINY)
    assert result.exit_code == 0, result.output
    assert "episodes added" in result.stdout and "3" in result.stdout
    report = info_json(store)
    assert report["n_episodes"] == 3 and report["n_decisions"] == 18
    assert sum(report["action_counts"].values()) == 18 and set(report["action_counts"]) == {
        "WAIT", "GERMINATE", "ADVANCE", "CULL"}
    ids = [e["id"] for e in report["episodes"]]
    assert len(set(ids)) == 3
    for e in report["episodes"]:
        assert e["seed"] == 0 and e["n_decisions"] == 6 and 0 < e["final_accuracy"] <= 100
        assert sum(e["action_counts"].values()) == 6
    table = simic("info", "--store", str(store))
    assert table.exit_code == 0 and "decisions" in table.stdout and "tamiyo-snapshot" in table.stdout


def test_defaults_work_with_no_options(simic_home, monkeypatch):
    # the default store lives under SIMIC_HOME; tiny epochs keep the test fast
    result = simic("collect", "--episodes", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert (simic_home / "episodes.h5").exists()
    assert simic("info").exit_code == 0


def test_rerun_completes_missing_episodes_without_duplicates(tmp_path):
    store = tmp_path / "s.h5"
    assert simic("collect", "--episodes", "2", "--store", str(store), *TINY).exit_code == 0
    result = simic("collect", "--episodes", "4", "--store", str(store), *TINY)
    assert result.exit_code == 0
    assert "2 of 4 episodes already" in result.stderr
    report = info_json(store)
    assert sorted(e["index"] for e in report["episodes"]) == [0, 1, 2, 3]
    # a different config is a different run, not a duplicate
    assert simic("collect", "--episodes", "1", "--store", str(store), "--epochs", "5").exit_code == 0
    assert info_json(store)["n_episodes"] == 5


def test_same_seed_gives_identical_episodes(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for store in (a, b):
        assert simic("collect", "--episodes", "2", "--seed", "7", "--store", str(store), *TINY).exit_code == 0
    with EpisodeReader(a) as ra, EpisodeReader(b) as rb:
        da, db = ra.decisions(), rb.decisions()
        assert np.array_equal(da["observations"], db["observations"])
        assert np.array_equal(da["actions"], db["actions"])
        assert ra.episode_meta(1) == rb.episode_meta(1)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["collect", "--episodes", "-1"], ["--episodes"]),
        (["collect", "--epochs", "0"], ["--epochs"]),
        (["collect", "--policy", "nope"], ["--policy", "nope", "heuristic"]),
        (["collect", "--task", "imagenet"], ["--task", "imagenet", "digits"]),
        (["collect", "--task", "cifar10"], ["--data-dir"]),
        (["collect", "--task", "cifar10", "--data-dir", "/no/such/dir"], ["/no/such/dir"]),
        (["collect", "--device", "tpu9"], ["--device"]),
        (["info", "--store", "/no/such/store.h5"], ["/no/such/store.h5", "does not exist"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragments):
    assert_one_line_error(simic(*args), *fragments)


def test_a_file_that_is_not_a_store_is_never_overwritten(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("my precious notes\n")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.arange(10)
    for path in (text, other):
        before = path.read_bytes()
        assert_one_line_error(simic("collect", "--episodes", "1", "--store", str(path), *TINY), str(path))
        assert_one_line_error(simic("info", "--store", str(path)), str(path))
        assert path.read_bytes() == before


def test_truncated_store_is_reported_not_overwritten(tmp_path):
    store = tmp_path / "s.h5"
    assert simic("collect", "--episodes", "1", "--store", str(store), *TINY).exit_code == 0
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    before = store.read_bytes()
    assert_one_line_error(simic("info", "--store", str(store)), str(store))
    assert_one_line_error(simic("collect", "--episodes", "2", "--store", str(store), *TINY), str(store))
    assert store.read_bytes() == before


@pytest.mark.slow
def test_second_writer_gets_a_clear_lock_error(tmp_path):
    store = tmp_path / "s.h5"
    proc = simic_process("collect", "--episodes", "40", "--store", str(store), "--epochs", "4", "--envs-per-worker", "2")
    try:
        wait_for_episodes(store, 1, proc)
        result = simic("collect", "--episodes", "1", "--store", str(store), *TINY)
        assert_one_line_error(result, str(store), "another process")
        assert committed_episodes(store) >= 1  # readers are never locked out
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigkill_at_any_moment_keeps_every_committed_episode(tmp_path):
    store = tmp_path / "s.h5"
    epochs, total = 4, 12
    args = ["collect", "--episodes", str(total), "--store", str(store), "--epochs", str(epochs), "--envs-per-worker", "3"]
    # kill right at start-up, mid-episode, and just as episodes are being committed
    for wait_for, extra_delay in ((0, 0.05), (1, 0.0), (2, 0.15), (4, 0.0), (5, 0.07)):
        proc = simic_process(*args)
        if wait_for:
            wait_for_episodes(store, min(committed_episodes(store) + 1, total), proc)
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not store.exists():
            continue
        with EpisodeReader(store) as reader:
            index = reader.index()
            assert reader.n_decisions == int(index["length"].sum()) == reader.n_episodes * epochs
            decisions = reader.decisions()
            assert len(decisions["actions"]) == reader.n_decisions
            assert np.isfinite(decisions["observations"]).all()
            assert len(set(zip(index["seed"], index["index"]))) == reader.n_episodes
            for i in range(reader.n_episodes):
                assert reader.episode(i).decisions[-1].observation.shape == (27,)
    # the same command completes the run: every index once, none lost, none duplicated
    result = simic(*args)
    assert result.exit_code == 0, result.output
    report = info_json(store)
    assert sorted(e["index"] for e in report["episodes"]) == list(range(total))


@pytest.mark.slow
def test_ctrl_c_keeps_completed_episodes_and_exits_130(tmp_path):
    store = tmp_path / "s.h5"
    # batches of 2: episodes commit a batch at a time, so the interrupt lands mid-collection
    proc = simic_process("collect", "--episodes", "30", "--store", str(store), "--epochs", "4", "--envs-per-worker", "2")
    wait_for_episodes(store, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    kept = committed_episodes(store)
    assert kept >= 2
    with EpisodeReader(store) as reader:
        assert reader.n_decisions == kept * 4
