"""Policies reach any Ray node: a worker node that cannot see the driver's disk runs every job.

The cluster is real and has two nodes on this machine: a head with no CPUs (so no task runs
beside the driver) and a worker node started inside its own mount namespace, where a tmpfs hides
the folder holding the driver's checkpoints. `simic compare` with a `NAME=PATH` checkpoint and a
small `simic improve` must succeed on it and give exactly the local result, which they can only
do if the weights travel with the jobs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from esper_cli.checkpoint import load_checkpoint

HAVE_RAY = importlib.util.find_spec("ray") is not None
EPOCHS = "4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_hide(folder: Path) -> bool:
    """Whether this machine lets us mount a tmpfs over `folder` in a private mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {folder} && test ! -e {folder}/probe"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def simic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esper_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=240, env=env)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a node we started, and everything in its process group (its raylet, its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_nodes(tmp_path):
    """(ray address, hidden checkpoint folder, env): a head with 0 CPUs, a blind worker node with 2."""
    if not HAVE_RAY:
        pytest.skip('the ray extra is not installed (pip install -e ".[ray]")')
    root = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # Ray's socket paths must fit in 107 bytes
    hidden = root / "ck"
    hidden.mkdir()
    (hidden / "probe").write_text("the driver's disk")
    if not _can_hide(hidden):
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs unshare and root)")
    env = {k: v for k, v in os.environ.items() if k != "SIMIC_LOAD_PLUGINS"}
    # No token: both nodes and the drivers are this machine's own processes.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", SIMIC_HOME=str(tmp_path / "home"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    ray = str(Path(sys.executable).with_name("ray"))
    nodes: list[subprocess.Popen] = []
    head_log, worker_log = (open(tmp_path / name, "wb") for name in ("head.log", "worker.log"))
    try:
        nodes.append(subprocess.Popen(
            [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
             f"--temp-dir={root / 'ray'}", "--disable-usage-stats"],
            env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True))
        worker = (f"mount -t tmpfs tmpfs {hidden} && exec {ray} start --block --address={address} --node-ip-address=127.0.0.1 "
                  "--num-cpus=2 --disable-usage-stats")
        nodes.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", worker],
                                      env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_for_cpus(address, 2, env, logs=(tmp_path / "head.log", tmp_path / "worker.log"))
        yield address, hidden, env
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        head_log.close()
        worker_log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_cpus(address: str, cpus: int, env: dict[str, str], logs: tuple[Path, ...],
                   timeout: float = 60.0) -> None:
    script = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
              "print(int(ray.cluster_resources().get('CPU', 0)))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run([sys.executable, "-c", script, address], capture_output=True, text=True,
                               timeout=60, env=env)
        if probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == [str(cpus)]:
            return
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in logs)
    pytest.fail(f"the two-node Ray cluster at {address} did not come up with {cpus} CPUs "
                f"(last probe: {probe.stdout[-300:]} {probe.stderr[-500:]})\n{tails}")


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_compare_and_improve_run_on_a_node_that_cannot_see_the_checkpoints(two_nodes):
    address, hidden, env = two_nodes
    store, ckpt = hidden / "h.h5", hidden / "mlp.safetensors"
    assert simic("collect", "-n", "3", "--epochs", EPOCHS, "--store", store, env=env).returncode == 0
    trained = simic("train", "--store", store, "--out", ckpt, "--epochs", "20", "--allow-missing-classes", env=env)
    assert trained.returncode == 0, trained.stderr

    compare = ["compare", "heuristic", f"mlp={ckpt}", "-n", "2", "--epochs", EPOCHS, "--seed", "0", "--json"]
    local = simic(*compare, env=env)
    assert local.returncode == 0, local.stderr
    remote = simic(*compare, "--backend", "ray", "--ray-address", address, env=env)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)

    improve = ["improve", "--from", ckpt, "-n", "4", "--episodes-per-update", "2", "--group", "2",
               "--epochs", EPOCHS, "--select-episodes", "2", "--json"]
    local = simic(*improve, "--out", hidden / "local.safetensors", env=env)
    assert local.returncode == 0, local.stderr
    remote = simic(*improve, "--out", hidden / "remote.safetensors", "--backend", "ray", "--ray-address", address,
                   env=env)
    assert remote.returncode == 0, remote.stderr
    assert same_tensors(hidden / "local.safetensors", hidden / "remote.safetensors")
