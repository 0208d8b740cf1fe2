"""`simic improve`: PPO on a policy's own live episodes (real episodes, tiny configs).

The win itself is measured by benchmarks and closed-loop comparisons, not here: these tests check
the machinery (the update's math, reproducibility across runners, the checkpoint, Ctrl-C).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error
from simic_plugins.mlp import MLPTamiyo

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import EpisodeConfig, TrainingSnapshot
from esper_cli.data.decisions import DataError
from esper_cli.learning.ppo import (
    VALIDATION_INDEX,
    Batch,
    ImproveConfig,
    ValueNet,
    improve,
    make_batch,
    masked_log_probs,
    ppo_update,
)
from esper_cli.plugins import build_registry
from esper_cli.policy import valid_action_mask

TINY = EpisodeConfig(epochs=5)
HAVE_RAY = importlib.util.find_spec("ray") is not None


def tiny_config(out: Path, **overrides) -> ImproveConfig:
    options = {"episode": TINY, "out": out, "episodes": 4, "episodes_per_update": 2, "group": 2,
               "bootstrap_episodes": 4, "lr": 3e-3, "select_episodes": 2} | overrides
    return ImproveConfig(**options)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("improve") / "mlp.safetensors"
    result = improve(tiny_config(out), build_registry())
    return out, result


# ------------------------------------------------------------------------------------- the math
def test_a_group_of_draws_on_one_seed_is_credited_relative_to_its_mean(serial_run):
    out, _ = serial_run
    from esper_cli.data.store import EpisodeReader

    with EpisodeReader(out.with_name("mlp.bootstrap.h5")) as reader:
        a, b, c = reader.episode(0), reader.episode(1), reader.episode(2)
    b.index = a.index  # as if a second draw on a's seed
    batch = make_batch([(0, c), (1, b), (0, a)], np.zeros(27, np.float32), np.ones(27, np.float32))
    total = {id(e): sum(d.outcome.reward for d in e.decisions) for e in (a, b, c)}
    n = len(a.decisions)
    # (index, draw) order: a, b (one group), then c alone; every decision gets its episode's credit
    assert np.allclose(batch.advantages[:n].numpy(), (total[id(a)] - total[id(b)]) / 2, atol=1e-4)
    assert np.allclose(batch.advantages[n : 2 * n].numpy(), (total[id(b)] - total[id(a)]) / 2, atol=1e-4)
    assert np.allclose(batch.advantages[2 * n :].numpy(), 0.0)
    assert float(batch.returns[0]) == pytest.approx(total[id(a)], abs=1e-4)  # return-to-go at the start


def test_the_blueprint_choice_is_learned_with_the_actions():
    """A GERMINATE that grew conv_enhance paid off, one that grew norm did not: the update raises
    conv_enhance's probability (the blueprint's log-probability joins the action's in the ratio)."""
    from simic_plugins.networks import MLPNet

    torch.manual_seed(0)
    names = ("conv_enhance", "norm")
    policy = MLPNet((8,), names)
    obs = torch.zeros(64, 27)
    mask = torch.tensor([[True, True, False, False]]).repeat(64, 1)
    actions = torch.ones(64, dtype=torch.int64)  # every decision a GERMINATE
    grown = torch.tensor([0, 1] * 32)
    with torch.no_grad():
        logp_old = masked_log_probs(policy(obs), mask)[:, 1]  # the action's part only
    returns = torch.where(grown == 0, 2.0, 0.0)
    batch = Batch(obs, mask, actions, logp_old, returns, blueprints=grown)
    value = ValueNet(1.0, 1.0)
    cfg = tiny_config(Path("unused"), lr=1e-2, minibatch=32)
    opt, vopt = torch.optim.Adam(policy.parameters(), lr=1e-2), torch.optim.Adam(value.parameters(), lr=1e-2)
    ppo_update(policy, value, opt, vopt, batch, cfg, torch.Generator().manual_seed(0))
    p = torch.softmax(policy.blueprint_logits.detach(), 0)
    assert p[0] > p[1] + 0.05  # moved within one update's clip range


def test_an_improved_mlp_grows_the_blueprint_it_learned(serial_run):
    out, _ = serial_run
    ckpt = load_checkpoint(out, expect_policy="mlp")
    assert ckpt.hparams["blueprints"] == list(TINY.rotation) and "blueprint_logits" in ckpt.tensors
    policy = MLPTamiyo(checkpoint=out)
    logits = ckpt.tensors["blueprint_logits"].numpy()
    from simic_plugins.mlp import pick_blueprint

    want = pick_blueprint(policy.blueprints, logits, None)[0]
    assert want is None or want == TINY.rotation[int(logits.argmax())]
    assert pick_blueprint(("a", "b"), np.zeros(2), None) == (None, 1.0)  # untrained: the rotation
    assert pick_blueprint(("a", "b"), np.array([0.0, 3.0]), None) == ("b", 1.0)


def test_to_go_credit_compares_each_decision_with_its_groups_draws_from_the_same_epoch(serial_run):
    out, _ = serial_run
    from esper_cli.data.store import EpisodeReader

    with EpisodeReader(out.with_name("mlp.bootstrap.h5")) as reader:
        a, b = reader.episode(0), reader.episode(1)
    b.index = a.index
    batch = make_batch([(0, a), (1, b)], np.zeros(27, np.float32), np.ones(27, np.float32), credit="to-go")
    n = len(a.decisions)
    to_go = [np.cumsum([d.outcome.reward for d in e.decisions][::-1])[::-1] for e in (a, b)]
    assert np.allclose(batch.advantages[:n].numpy(), (to_go[0] - to_go[1]) / 2, atol=1e-4)
    assert np.allclose(batch.advantages[n:].numpy(), (to_go[1] - to_go[0]) / 2, atol=1e-4)
    with pytest.raises(DataError, match="credit"):
        tiny_config(Path("unused"), credit="nope")


def test_a_ppo_update_raises_the_probability_of_an_action_with_positive_advantage():
    torch.manual_seed(0)
    policy = torch.nn.Linear(27, 4)
    obs = torch.zeros(64, 27)
    obs[:, 5] = torch.linspace(-1, 1, 64)  # states differ a little; the baseline is a constant
    mask = torch.tensor([[True, True, False, False]]).repeat(64, 1)  # WAIT or GERMINATE only
    actions = torch.tensor([0, 1] * 32)
    with torch.no_grad():
        logp_old = masked_log_probs(policy(obs), mask).gather(1, actions[:, None]).squeeze(1)
    returns = torch.where(actions == 1, 2.0, 0.0)  # GERMINATE paid off, WAIT did not
    batch = Batch(obs, mask, actions, logp_old, returns)
    value = ValueNet(1.0, 1.0)
    cfg = tiny_config(Path("unused"), lr=1e-2, minibatch=32)
    before = masked_log_probs(policy(obs), mask).exp()[:, 1].mean()
    opt, vopt = torch.optim.Adam(policy.parameters(), lr=1e-2), torch.optim.Adam(value.parameters(), lr=1e-2)
    stats = ppo_update(policy, value, opt, vopt, batch, cfg, torch.Generator().manual_seed(0))
    after = masked_log_probs(policy(obs), mask).exp()
    assert after[:, 1].mean() > before + 0.02  # within the clip range of one update
    assert torch.all(after[:, 2:] < 1e-6)  # invalid actions keep probability 0
    assert stats["clip_fraction"] >= 0 and np.isfinite(stats["value_loss"])


# --------------------------------------------------------------------------------- the loop
def test_improve_writes_an_mlp_checkpoint_with_its_episodes_and_curve(serial_run):
    out, result = serial_run
    # 4 bootstrap + 2 updates of 2 + 2 validation episodes for each of the 2 candidates
    assert result.episodes_used == 12 == tiny_config(out).episodes_total
    assert result.bootstrap_episodes == 4 and len(result.history) == 2
    ckpt = load_checkpoint(out, expect_policy="mlp")
    assert ckpt.meta["objective"] == "ppo" and ckpt.meta["mask_invalid"] is True
    # Every episode of the run is listed, so `simic compare` keeps off their seeds: the bootstrap's
    # (0-3), the updates' (the two draws of an update share one seed: update u ran on 4 + u) and
    # the validation seeds the kept policy was chosen on.
    assert sorted(e[2] for e in ckpt.meta["split"]["episodes"]) == [*range(6), VALIDATION_INDEX, VALIDATION_INDEX + 1]
    assert ckpt.meta["improve"]["episodes_used"] == 12
    policy = MLPTamiyo(checkpoint=out)
    obs = np.zeros(27, dtype=np.float32)  # no seed, no free slot: only WAIT is valid
    assert int(policy.decide(TrainingSnapshot.from_vector(obs)).action) == 0
    assert valid_action_mask(obs).tolist() == [True, False, False, False]


def test_the_kept_policy_is_the_best_candidate_on_the_runs_validation_seeds(serial_run):
    out, result = serial_run
    scored = [r for r in result.history if "select_score" in r]
    assert [r["update"] for r in scored] == [0, 1]  # after the first update and the last
    best = max(scored, key=lambda r: r["select_score"])  # ties: the earlier
    assert result.best_update == best["update"]
    # The kept checkpoint, greedy, scores what its candidate row says on those seeds.
    reg = build_registry()
    from esper_cli.simulation.episode import EpisodeSpec, run_episodes

    specs = [EpisodeSpec(MLPTamiyo(checkpoint=out), TINY, 0, VALIDATION_INDEX + i, "mlp") for i in range(2)]
    episodes = run_episodes(specs, task=reg.tasks["digits"], blueprints=reg.blueprints)
    assert np.mean([e.final_score for e in episodes]) == pytest.approx(best["select_score"])


def test_the_defaults_spend_at_most_500_environment_episodes():
    cfg = ImproveConfig(episode=EpisodeConfig(), out=Path("unused"))
    assert cfg.expert == "eager" and cfg.selections == [0, 3, 7, 11]
    assert cfg.episodes_total == 50 + 384 + 4 * 16 == 498


def test_select_options_are_checked():
    with pytest.raises(DataError, match="select_every"):
        tiny_config(Path("unused"), select_every=0)
    assert tiny_config(Path("unused"), select_episodes=0).selections == []
    assert tiny_config(Path("unused"), episodes=24, select_every=4).selections == [0, 3, 7, 11]


@pytest.mark.slow
def test_two_workers_give_the_serial_checkpoint(serial_run, tmp_path):
    out = tmp_path / "mlp.safetensors"
    improve(tiny_config(out, workers=2), build_registry())
    assert same_tensors(out, serial_run[0])
    assert same_tensors(out.with_name("mlp.bc.safetensors"), serial_run[0].with_name("mlp.bc.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason='the ray extra is not installed (pip install -e ".[ray]")')
def test_ray_gives_the_serial_checkpoint(serial_run, tmp_path):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "mlp.safetensors"
    improve(tiny_config(out, backend="ray", workers=2), build_registry())
    assert same_tensors(out, serial_run[0])


def test_cli_from_a_checkpoint_json_and_plot(serial_run, tmp_path):
    start = serial_run[0].with_name("mlp.bc.safetensors")
    out, png = tmp_path / "better.safetensors", tmp_path / "curve.png"
    result = invoke("improve", "--from", start, "--out", out, "--episodes", 2, "--episodes-per-update", 1,
                    "--group", 1, "--epochs", 5, "--explore", 0.2, "--select-episodes", 0, "--json", "--plot", png)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["episodes_used"] == 2 and summary["bootstrap_episodes"] == 0 and summary["updates"] == 2
    assert [r["episodes_used"] for r in summary["history"]] == [1, 2]
    assert png.stat().st_size > 0 and load_checkpoint(out).meta["improve"]["start"] == str(start)


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert "--from" in one_line_error(invoke("improve", "--from", text, "--out", tmp_path / "o.safetensors"))
    assert "mlp and gru" in one_line_error(invoke("improve", "--policy", "heuristic"))
    assert "--out" in one_line_error(invoke("improve", "--out", text))  # never overwrite a file we did not write
    assert text.read_text() == "not a checkpoint"
    # Whole groups only: 2 episodes per update in groups of 4 would run 4.
    out = tmp_path / "groups.safetensors"
    assert "--episodes-per-update" in one_line_error(invoke("improve", "--out", out, "--group", 4,
                                                            "--episodes-per-update", 2))
    assert "--episodes:" in one_line_error(invoke("improve", "--out", out, "--group", 4, "--episodes", 6))
    assert not list(tmp_path.glob("groups*"))  # refused before any file was made


@pytest.mark.slow
def test_a_rerun_after_sigkill_leaves_no_lock_file(tmp_path):
    out = tmp_path / "mlp.safetensors"
    args = [sys.executable, "-m", "esper_cli", "improve", "--out", str(out), "--bootstrap-episodes", "4",
            "--episodes", "1", "--episodes-per-update", "1", "--group", "1", "--epochs", "3"]
    env = {**os.environ, "SIMIC_HOME": str(tmp_path)}
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lock = tmp_path / "mlp.bootstrap.h5.lock"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), "the bootstrap store was never opened"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(out, expect_policy="mlp").meta["objective"] == "ppo"
    assert not list(tmp_path.glob("*.lock")), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_keeps_the_best_checkpoint_so_far(serial_run, tmp_path):
    out = tmp_path / "mlp.safetensors"
    env = {**os.environ, "SIMIC_HOME": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-m", "esper_cli", "improve", "--from", str(serial_run[0].with_name("mlp.bc.safetensors")),
         "--out", str(out), "--episodes", "400", "--episodes-per-update", "1", "--group", "1", "--epochs", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
        assert out.exists(), child.stderr.read() if child.poll() is not None else "no checkpoint after 120 s"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert "the best policy so far is in" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(out, expect_policy="mlp")
    assert ckpt.meta["objective"] == "ppo" and 0 <= ckpt.meta["improve"]["best_update"] < 400
