"""Parallel collection: the episode runner (serial, local worker processes, Ray) and `collect --workers`.

Worker processes load plugins from entry points like any Simic process, so the test policy that
crashes its worker is a real installed distribution: a `.dist-info` plus a module in a temporary
folder that is on `sys.path` here (spawned workers inherit it) and on `PYTHONPATH` for Ray's
workers. One local Ray cluster (2 CPUs) serves every Ray test of this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke as simic

from esper_cli.contracts import EpisodeConfig, episode_rng_seed
from esper_cli.data.store import EpisodeReader
from esper_cli.plugins import reset_plugin_manager
from esper_cli.running.runner import EpisodeJob, JobFailed, ProcessRunner, RayRunner, SerialRunner, parse_workers

TINY = ["--epochs", "4"]
CONFIG = EpisodeConfig(epochs=4)
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='the ray extra is not installed (pip install -e ".[ray]")')

CRASHY_PLUGIN = '''
"""A test-only Tamiyo policy that kills its own worker process (or raises) on chosen episodes."""
import os
from pathlib import Path

from esper_cli import hookimpl
from esper_cli.contracts import Action, Decision


class Crashy:
    name = "crashy"
    version = "1.0"

    def __init__(self, die_at=None, mode=None, marker_dir=None, always=None):
        env = os.environ.get

        def seeds(value, var):
            value = value if value is not None else (env(var) or "").split(",")
            return {int(x) for x in value if str(x).strip()}

        self.die_at = seeds(die_at, "CRASHY_DIE_AT")  # rng seeds of the episodes to die on
        self.always = seeds(always, "CRASHY_ALWAYS")  # ... and to die on every time
        self.mode = mode or env("CRASHY_MODE", "exit")  # exit | raise
        self.marker_dir = marker_dir or env("CRASHY_MARKER_DIR")  # set: die once per episode

    def reset(self, context):
        if context.rng_seed not in self.die_at | self.always:
            return
        if self.marker_dir and context.rng_seed not in self.always:
            marker = Path(self.marker_dir) / f"died-{context.rng_seed}"
            if marker.exists():
                return
            marker.touch()
        if self.mode == "raise":
            raise RuntimeError("crashy refuses this episode")
        os._exit(3)

    def decide(self, obs, context):
        if obs.epoch == 1 and not obs.has_active_seed:
            return Decision(Action.GERMINATE, "grow one", 0.9)
        if obs.has_active_seed and obs.seed_stage in (1, 2):
            return Decision(Action.ADVANCE, "advance", 0.8)
        return Decision(Action.WAIT, "wait", 0.5)


@hookimpl
def register_policies(register):
    register("crashy", Crashy)
'''


def jobs(n: int, policy: str = "heuristic", seed: int = 3, **kw) -> list[EpisodeJob]:
    return [EpisodeJob(policy=policy, config=CONFIG, seed=seed, index=i, **kw) for i in range(n)]


def assert_same_episode(a, b) -> None:
    assert (a.seed, a.index, a.rng_seed, a.policy, a.config) == (b.seed, b.index, b.rng_seed, b.policy, b.config)
    assert np.array_equal(np.stack([d.observation for d in a.decisions]),
                          np.stack([d.observation for d in b.decisions]))
    assert [(d.action, d.valid, d.confidence, d.reason, d.blueprint, d.outcome) for d in a.decisions] == \
        [(d.action, d.valid, d.confidence, d.reason, d.blueprint, d.outcome) for d in b.decisions]
    assert (a.final_accuracy, a.best_accuracy, a.test_accuracy) == (b.final_accuracy, b.best_accuracy, b.test_accuracy)
    assert [s.to_dict() for s in a.seeds] == [s.to_dict() for s in b.seeds]


def by_index(pairs) -> dict:
    """The episodes of `runner.run`'s (job, episode) pairs, by (seed, index); each beside its own job."""
    got = {}
    for job, e in pairs:
        assert (job.seed, job.index) == (e.seed, e.index)
        got[(e.seed, e.index)] = e
    return got


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def crashy_site(tmp_path_factory) -> Path:
    """A folder holding the `simic-test-crashy` distribution (not yet on any path)."""
    site = tmp_path_factory.mktemp("crashy-site")
    info = site / "simic_test_crashy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: simic-test-crashy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[simic]\ncrashy = simic_test_crashy\n")
    (site / "simic_test_crashy.py").write_text(textwrap.dedent(CRASHY_PLUGIN))
    return site


@pytest.fixture
def crashy(crashy_site, monkeypatch):
    """Install the crashy policy for this test: here, in spawned workers, in subprocesses."""
    monkeypatch.delenv("SIMIC_LOAD_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(crashy_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(crashy_site), os.environ.get("PYTHONPATH")])))
    importlib.invalidate_caches()
    reset_plugin_manager()
    yield crashy_site
    sys.modules.pop("simic_test_crashy", None)
    reset_plugin_manager()


@pytest.fixture(scope="module")
def serial_episodes():
    with SerialRunner() as runner:
        return by_index(runner.run(jobs(3)))


@pytest.fixture(scope="module")
def ray_cluster(crashy_site):
    """One local Ray cluster (2 CPUs) for the module; its workers can import the crashy plugin."""
    if not HAVE_RAY:
        pytest.skip('the ray extra is not installed (pip install -e ".[ray]")')
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(crashy_site), saved]))
    try:  # the raylet, and every worker it starts, inherits this environment
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------- determinism
@pytest.mark.slow
def test_two_local_workers_give_the_serial_episodes(serial_episodes):
    with ProcessRunner(2) as runner:
        got = by_index(runner.run(jobs(3)))
        assert runner.lost == [] and runner.retried == 0
    assert got.keys() == serial_episodes.keys()
    for key, episode in got.items():
        assert_same_episode(episode, serial_episodes[key])


@pytest.mark.slow
@needs_ray
def test_ray_gives_the_serial_episodes(ray_cluster, serial_episodes):
    with RayRunner() as runner:
        assert runner.parallelism == 2
        got = by_index(runner.run(jobs(3)))
    assert got.keys() == serial_episodes.keys()
    for key, episode in got.items():
        assert_same_episode(episode, serial_episodes[key])
    assert ray_cluster.is_initialized()  # a cluster the runner did not start is left running


@pytest.mark.slow
def test_collect_with_workers_matches_serial_and_resumes(tmp_path):
    serial, parallel = tmp_path / "serial.h5", tmp_path / "parallel.h5"
    assert simic("collect", "-n", "3", "--seed", "5", "--store", str(serial), *TINY).exit_code == 0
    assert simic("collect", "-n", "1", "--seed", "5", "--store", str(parallel), *TINY).exit_code == 0
    result = simic("collect", "-n", "3", "--seed", "5", "--store", str(parallel), "--workers", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "1 of 3 episodes already" in result.stderr and "2 local worker processes" in result.stderr
    with EpisodeReader(serial) as rs, EpisodeReader(parallel) as rp:
        assert rp.n_episodes == 3 and rp.n_decisions == 12
        a = {(e.seed, e.index): e for e in (rs.episode(i) for i in range(rs.n_episodes))}
        b = {(e.seed, e.index): e for e in (rp.episode(i) for i in range(rp.n_episodes))}
        assert a.keys() == b.keys() == {(5, i) for i in range(3)}
        for key in a:
            assert_same_episode(a[key], b[key])
            assert a[key].id == b[key].id and a[key].policy_version == b[key].policy_version


# ------------------------------------------------------------------------------------- failures
@pytest.mark.slow
def test_dead_workers_are_replaced_their_episode_rerun_or_reported(crashy, tmp_path, monkeypatch):
    once, always = episode_rng_seed(0, 1), episode_rng_seed(0, 3)
    monkeypatch.setenv("CRASHY_DIE_AT", str(once))  # dies the first time only
    monkeypatch.setenv("CRASHY_MARKER_DIR", str(tmp_path))
    monkeypatch.setenv("CRASHY_ALWAYS", str(always))  # dies every time
    store = tmp_path / "s.h5"
    # one episode a batch: a worker that dies loses its batch, here exactly the episode it ran
    result = simic("collect", "--policy", "crashy", "-n", "5", "--store", str(store), "--workers", "2",
                   "--envs-per-worker", "1", "--retries", "1", *TINY)
    assert result.exit_code == 1, result.output
    assert "died (exit code 3) while running episode 1 (seed 0); re-running it (retry 1 of 1)" in result.stderr
    assert "while running episode 3 (seed 0); giving up on it after 2 attempt(s)" in result.stderr
    assert (tmp_path / f"died-{once}").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "1 episode(s) failed" in errors[0] and "episode 3 (seed 0)" in errors[0]
    assert "4 episodes committed" in errors[0] and "re-run the same command" in errors[0]
    assert "episodes failed" in result.stdout
    with EpisodeReader(store) as reader:  # everything else is committed, whole
        assert sorted(reader.index()["index"]) == [0, 1, 2, 4] and reader.n_decisions == 16


@pytest.mark.slow
def test_a_policy_error_in_a_worker_is_not_retried_and_exits_1(crashy, tmp_path, monkeypatch):
    monkeypatch.setenv("CRASHY_DIE_AT", str(episode_rng_seed(0, 0)))
    monkeypatch.setenv("CRASHY_MODE", "raise")
    store = tmp_path / "s.h5"
    result = simic("collect", "--policy", "crashy", "-n", "6", "--store", str(store), "--workers", "2", *TINY)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    assert errors[0].startswith("Error: policy 'crashy' raised in reset(): RuntimeError: crashy refuses")
    assert "re-running" not in result.stderr
    with EpisodeReader(store) as reader:  # the episodes that finished are kept, whole; 0 is not there
        index = reader.index()
        assert 0 not in index["index"] and reader.n_decisions == 4 * reader.n_episodes < 24


@pytest.mark.slow
@needs_ray
def test_ray_reruns_an_episode_whose_worker_died(ray_cluster, tmp_path, serial_episodes):
    events: list[str] = []
    die = episode_rng_seed(3, 1)
    options = {"die_at": [die], "marker_dir": str(tmp_path)}
    with RayRunner(on_event=events.append) as runner:
        got = by_index(runner.run(jobs(2, policy="crashy", policy_options=options)))
        assert runner.retried == 1 and runner.lost == []
    assert (tmp_path / f"died-{die}").exists()
    assert sorted(got) == [(3, 0), (3, 1)] and "re-running it" in events[0]
    with pytest.raises(JobFailed, match="crashy refuses") as failed:  # a policy error: no retry
        with RayRunner() as runner:
            list(runner.run(jobs(2, policy="crashy", policy_options={"die_at": [die], "mode": "raise"})))
    assert failed.value.policy_error and failed.value.job.index == 1


# ------------------------------------------------------------------------------ usage and Ctrl-C
def test_workers_and_backend_options_are_checked(monkeypatch):
    assert parse_workers("auto") >= 1 and parse_workers("3") == 3 and parse_workers(None) is None
    for bad in ("0", "-2", "many"):
        result = simic("collect", "--workers", bad, *TINY)
        assert result.exit_code == 2 and "--workers" in result.stderr
    result = simic("collect", "--backend", "slurm", *TINY)
    assert result.exit_code == 2 and "--backend 'slurm'" in result.stderr and "ray" in result.stderr
    result = simic("collect", "--ray-address", "auto", *TINY)
    assert result.exit_code == 2 and "needs --backend ray" in result.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    result = simic("collect", "--backend", "ray", *TINY)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "simic[ray]"' in lines[0]


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_keeps_committed_episodes(tmp_path):
    store = tmp_path / "s.h5"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "esper_cli", "collect", "-n", "40", "--store", str(store),
                             "--workers", "2", "--envs-per-worker", "2", *TINY], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "collect made no progress"
        try:
            with EpisodeReader(store) as reader:
                if reader.n_episodes >= 2:
                    break
        except Exception:
            pass
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]  # every worker process is gone with it
    with EpisodeReader(store) as reader:
        assert reader.n_episodes >= 2 and reader.n_decisions == reader.n_episodes * 4


@needs_ray
@pytest.mark.slow
def test_ray_without_an_address_starts_its_own_cluster_past_a_dead_ones_address_file(tmp_path):
    # A cluster that died without `ray stop` leaves its address in <tmp>/ray/ray_current_cluster;
    # Ray's default `ray.init()` would try to join it. The temp dir is short: Ray's socket paths
    # must fit in 107 bytes.
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
    store = tmp_path / "ray.h5"
    env = {**os.environ, "TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-m", "esper_cli", "collect", "--backend", "ray", "--workers", "1",
                               "-n", "1", "--store", str(store), *TINY], env=env, capture_output=True, text=True,
                              timeout=240)
    finally:
        subprocess.run(["rm", "-rf", str(temp)], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with EpisodeReader(store) as reader:
        assert reader.n_episodes == 1
