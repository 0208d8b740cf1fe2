"""Held-out seeds, and inputs at their limits, on real files and real processes.

Covered: held-out compare seeds, seeds past the store's int64, malformed and malicious CIFAR-10
batches, a billion-episode plan, and the clamp of epoch-0 losses.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, one_line_error

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import LOSS_CAP, EpisodeConfig, episode_rng_seed
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.learning.training import TrainConfig, train_policy
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.tasks import BUILTIN_TASKS

TINY = ["--epochs", "2"]
TOO_BIG = str(2**63)  # one past the store's signed 64-bit seed column




def warning_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "Warning" in line]


# ============================================================================= held-out compare seeds
@pytest.fixture(scope="module")
def seed0_checkpoint(tmp_path_factory) -> Path:
    """An MLP trained (and validated) on a tiny store of `simic collect`'s default seed 0."""
    root = tmp_path_factory.mktemp("held-out")
    store = root / "seed0.h5"
    result = invoke("collect", "--episodes", 3, *TINY, "--store", store)
    assert result.exit_code == 0, result.output
    path, _ = train_policy(store, TrainConfig("mlp", epochs=3, allow_missing_classes=True), out=root / "mlp.safetensors")
    return path


def test_compare_by_default_runs_on_episodes_no_checkpoint_trained_on(seed0_checkpoint):
    result = invoke("compare", "heuristic", f"mlp={seed0_checkpoint}", "--episodes", 2, *TINY,
                    "--mode", "closed-loop", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    seed = report["seed"]
    assert seed != 0  # the store the checkpoint learned from is seed 0's
    split = load_checkpoint(seed0_checkpoint).meta["split"]
    trained = {episode_rng_seed(int(i.split("-s")[1].split("-")[0]), int(i.split("-i")[1].split("-")[0]))
               for i in split["train_ids"] + split["val_ids"]}
    assert len(trained) == 3
    assert not trained & {episode_rng_seed(seed, i) for i in range(2)}
    assert report["seed_choice"]["auto"] and report["seed_choice"]["held_out"]
    assert f"run seed {seed}" in result.stderr and not warning_lines(result)


def test_checkpoints_record_their_episodes_and_old_ones_are_read_from_ids(seed0_checkpoint):
    from esper_cli.evaluation.comparison import held_out_seed, trained_rng_seeds

    split = load_checkpoint(seed0_checkpoint).meta["split"]
    assert sorted((e[0], e[1], e[2]) for e in split["episodes"]) == [("digits", 0, i) for i in range(3)]
    recorded = trained_rng_seeds(split, "digits")
    old = {k: v for k, v in split.items() if k != "episodes"}  # a checkpoint written before the field
    assert trained_rng_seeds(old, "digits") == recorded == {episode_rng_seed(0, i) for i in range(3)}
    assert trained_rng_seeds(split, "cifar10") == trained_rng_seeds(old, "cifar10") == set()
    assert held_out_seed(recorded, 3) == 1 and held_out_seed(set(), 3) == 0


def test_an_explicit_overlapping_seed_warns_in_one_line(seed0_checkpoint):
    result = invoke("compare", "heuristic", f"mlp={seed0_checkpoint}", "--episodes", 2, "--seed", 0, *TINY,
                    "--mode", "closed-loop", "--json")
    assert result.exit_code == 0, result.output
    warnings = warning_lines(result)
    assert len(warnings) == 1 and "--seed 0" in warnings[0] and "0, 1" in warnings[0], result.stderr
    report = json.loads(result.stdout)
    assert report["seed"] == 0 and report["seed_choice"]["overlapping_indices"] == [0, 1]


def test_an_explicit_held_out_seed_prints_no_warning(seed0_checkpoint):
    result = invoke("compare", "heuristic", f"mlp={seed0_checkpoint}", "--episodes", 1, "--seed", 3, *TINY,
                    "--mode", "closed-loop", "--json")
    assert result.exit_code == 0, result.output
    assert not warning_lines(result), result.stderr
    assert json.loads(result.stdout)["seed"] == 3


def test_dagger_moves_its_eval_seed_off_the_episodes_its_rounds_collect(tmp_path):
    # --seed 999: round 1 collects run seed 1000, the old fixed --eval-seed.
    result = invoke("dagger", "--rounds", 1, "--seed", 999, "--bootstrap-episodes", 2, "--episodes-per-round", 1,
                    "--compare-episodes", 1, *TINY, "--train-epochs", 2, "--allow-missing-classes",
                    "--store", tmp_path / "agg.h5", "--out", tmp_path / "mlp.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval_seed"] == 1001
    assert "run seed 1001" in result.stderr


# ============================================================================= seeds past int64
def test_a_seed_past_int64_is_refused_before_any_episode(tmp_path):
    store = tmp_path / "s.h5"
    one_line_error(invoke("collect", "--episodes", 1, "--epochs", 1, "--seed", TOO_BIG, "--store", store), "--seed")
    assert not store.exists()
    one_line_error(invoke("compare", "heuristic", "--episodes", 1, "--epochs", 1, "--seed", TOO_BIG), "--seed")
    one_line_error(invoke("dagger", "--seed", TOO_BIG, "--store", store), "--seed")
    one_line_error(invoke("dagger", "--seed", 2**63 - 1, "--rounds", 1, "--store", store), "--seed")
    assert not store.exists()
    with pytest.raises(ValueError):
        episode_rng_seed(2**63, 0)


# ===================================================================================== CIFAR-10 batches
def _write_cifar(root: Path, n: int = 20, *, batch: bytes | None = None, protocol: int = 4) -> Path:
    """A cifar-10-batches-py folder like the real one (dicts of numpy uint8 data and int labels);
    `batch` replaces data_batch_1's bytes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
                   b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
    if batch is not None:
        (folder / "data_batch_1").write_bytes(batch)
    return root


def _collect_cifar(root: Path, store: Path):
    return invoke("collect", "--task", "cifar10", "--data-dir", root, "--episodes", 1, "--epochs", 1, "--store", store)


def _batch(**changes: object) -> bytes:
    rng = np.random.default_rng(1)
    content = {b"labels": rng.integers(0, 10, 20).tolist(), b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8)}
    content.update({k.encode(): v for k, v in changes.items()})
    return pickle.dumps(content, protocol=2)


@pytest.mark.parametrize("batch, fragment", [
    (b"cnosuchmodule\nthing\n(tR.", "nosuchmodule.thing"),  # names a module that does not exist
    (_batch(labels=list(range(10)) * 3), "30 labels for 20 images"),
    (_batch(labels=[57] + [1] * 19), "label 57"),
    (_batch(data=np.zeros((20, 3000), dtype=np.uint8)), "3x32x32"),
], ids=["unknown-module", "label-count", "label-57", "rows"])
def test_a_malformed_cifar_batch_is_one_line_before_any_episode(tmp_path, batch, fragment):
    root, store = _write_cifar(tmp_path / "data", batch=batch), tmp_path / "s.h5"
    one_line_error(_collect_cifar(root, store), "data_batch_1", fragment)
    assert not store.exists()


@pytest.mark.parametrize("module, name, argument", [
    ("os", "system", "touch {marker}"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
    ("subprocess", "Popen", None),
], ids=["os.system", "builtins.exec", "subprocess.Popen"])
def test_a_cifar_batch_cannot_run_code(tmp_path, module, name, argument):
    marker = tmp_path / "pwned"
    if argument is None:  # Popen(["touch", marker]): a list argument, protocol 0
        payload = f"c{module}\n{name}\n((lp0\nV/usr/bin/touch\naV{marker}\natR.".encode()
    else:
        payload = f"c{module}\n{name}\n(V{argument.format(marker=str(marker))}\ntR.".encode()
    root, store = _write_cifar(tmp_path / "data", batch=payload), tmp_path / "s.h5"
    result = _collect_cifar(root, store)
    time.sleep(0.2)  # a Popen would have started by now
    assert not marker.exists()
    one_line_error(result, "data_batch_1", f"{module}.{name}", "refused")
    assert not store.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_holding_numpy_arrays_still_load(tmp_path, protocol):
    root = _write_cifar(tmp_path / "data", protocol=protocol)
    folder = root / "cifar-10-batches-py"
    if protocol == 2:  # the real files were written by numpy 1: they name numpy.core, not numpy._core
        for f in folder.iterdir():
            f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = BUILTIN_TASKS["cifar10"].load(str(root), 0)
    assert data.train_x.shape[1:] == (3, 32, 32) and len(data.train_y) + len(data.val_y) == 100
    assert len(data.test_y) == 20 and int(data.train_y.max()) <= 9


# ============================================================================= a billion episodes
def test_missing_is_lazy_on_a_huge_run(tmp_path):
    store = tmp_path / "s.h5"
    assert invoke("collect", "--episodes", 1, "--epochs", 1, "--store", store).exit_code == 0
    key = EpisodeConfig(epochs=1).key("heuristic")
    with EpisodeWriter(store) as writer:
        tracemalloc.start()
        try:
            todo = writer.missing(key, 0, 10**7)
            assert len(todo) == 10**7 - 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000  # a list of 10 million indices takes hundreds of MB
        huge = writer.missing(key, 0, 10**18)
        assert len(huge) == 10**18 - 1 and bool(huge)
        it = iter(huge)
        assert [next(it) for _ in range(3)] == [1, 2, 3] and 0 not in huge and 5 * 10**17 in huge
        assert list(writer.missing(key, 0, 4)) == [1, 2, 3] and list(writer.missing(key, 1, 2)) == [0, 1]


def _index_of(job, context):
    """A stand-in job function (module-level, so spawned workers import it): no training."""
    return job.index


@pytest.mark.slow
def test_worker_runners_draw_jobs_as_they_go(tmp_path):
    from esper_cli.running.runner import EpisodeJob, ProcessRunner

    drawn = 0

    def jobs():
        nonlocal drawn
        for i in range(10**9):
            drawn += 1
            assert drawn <= 50, "the runner listed the whole plan before running it"
            yield EpisodeJob(policy="heuristic", config=EpisodeConfig(epochs=1), seed=0, index=i)

    got = []
    with ProcessRunner(2) as pool:
        for _job, index in pool.run(jobs(), fn=_index_of):
            got.append(index)
            if len(got) == 6:
                break
    assert len(set(got)) == 6 and max(got) < 10 and drawn <= 10  # completion order: any 6 of the first few


@pytest.mark.slow
def test_collect_a_billion_episodes_starts_within_a_small_memory_limit(tmp_path):
    store = tmp_path / "s.h5"
    limit = 2 * 2**30  # a normal one-episode collect runs under 1 GiB of address space

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1", "SIMIC_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "esper_cli", "collect", "--episodes", "1000000000",
                             "--epochs", "1", "--envs-per-worker", "2", "--store", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit_memory)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "collect committed no episode"
            try:
                with EpisodeReader(store) as reader:
                    if reader.n_episodes >= 1:
                        break
            except Exception:
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr and "MemoryError" not in stderr
    with EpisodeReader(store) as reader:
        assert reader.n_episodes >= 1 and reader.episode(0).index == 0


# ============================================================================== epoch-0 losses
def test_reset_clamps_the_untrained_hosts_losses():
    env = MorphogeneticEnv(EpisodeConfig(epochs=2), BUILTIN_TASKS["digits"], BUILTIN_BLUEPRINTS)
    losses = iter([math.nan, 1e30])  # train, then validation: a diverged untrained host
    env._evaluate = lambda x, y, override=None, worth=None: [(next(losses), 10.0)]
    [obs] = env.reset([episode_rng_seed(0, 0)])
    assert obs.train_loss == LOSS_CAP and obs.val_loss == LOSS_CAP and obs.best_val_loss == LOSS_CAP
    assert obs.loss_history_5 == (LOSS_CAP,) * 5 and obs.loss_delta == 0.0
    assert np.isfinite(obs.to_vector()).all()
