"""`simic improve --policy gru`: sequence PPO on the same runner, checkpoints and resume as mlp.
The hidden state is carried across an episode's epochs when it acts and when it learns (whole
episodes in the forward and backward passes), and the sampling GRU's recorded probabilities are
the ones the update's ratio starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_line_error
from simic_plugins.gru import GRUTamiyo

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import EpisodeConfig
from esper_cli.data.store import EpisodeReader
from esper_cli.learning.ppo import ImproveConfig, improve, make_batch, masked_log_probs, policy_logits
from esper_cli.learning.training import build_network
from esper_cli.plugins import build_registry
from esper_cli.policy import EpisodeContext

TINY = EpisodeConfig(epochs=5)


def gru_config(out, **overrides) -> ImproveConfig:
    options = {"episode": TINY, "out": out, "episodes": 4, "episodes_per_update": 2, "group": 2,
               "bootstrap_episodes": 4, "lr": 3e-3, "policy": "gru", "select_episodes": 2} | overrides
    return ImproveConfig(**options)


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("improve-gru") / "gru.safetensors"
    return out, improve(gru_config(out), build_registry())


def test_improve_gru_writes_a_gru_checkpoint_that_decides(gru_run):
    out, result = gru_run
    assert result.episodes_used == 12 and len(result.history) == 2  # 4 + 2 x 2 + 2 candidates x 2
    ckpt = load_checkpoint(out, expect_policy="gru")
    assert ckpt.meta["objective"] == "ppo" and ckpt.meta["mask_invalid"] is True
    assert ckpt.meta["improve"]["config"]["policy"] == "gru"
    assert load_checkpoint(out.with_name("gru.bc.safetensors"), expect_policy="gru").meta["objective"] == "bc"
    assert all(np.isfinite(r["policy_loss"]) for r in result.history)
    policy = GRUTamiyo(checkpoint=out)
    with EpisodeReader(out.with_name("gru.bootstrap.h5")) as reader:
        obs = np.stack([d.observation for d in reader.episode(0).decisions])
    assert len(policy.decide_episode(obs)) == len(obs)


def test_the_sampling_gru_records_the_probabilities_the_update_recomputes(gru_run):
    """The acting policy's recorded behaviour probability of each action equals what the torch
    network gives the same episode run whole (hidden state carried), so PPO's first ratio is 1."""
    out, _ = gru_run
    ckpt = load_checkpoint(out, expect_policy="gru")
    network = build_network("gru", ckpt.meta["hparams"])
    network.load_state_dict(ckpt.tensors)
    reg = build_registry()
    from esper_cli.simulation.episode import EpisodeSpec, run_episodes

    specs = [EpisodeSpec(GRUTamiyo(checkpoint=out, sample=True, draw=d), TINY, 3, 0, "gru") for d in (0, 1)]
    episodes = run_episodes(specs, task=reg.tasks["digits"], blueprints=reg.blueprints)
    mean, std = (a.astype(np.float32) for a in ckpt.normalisation)
    batch = make_batch(list(enumerate(episodes)), mean, std, ckpt.input_range)
    rows = batch.episode_rows(torch.arange(2))
    with torch.no_grad():
        logits, flat = policy_logits(network, batch.obs, rows)
        logp = masked_log_probs(logits, batch.mask[flat]).gather(1, batch.actions[flat, None]).squeeze(1)
    np.testing.assert_allclose(logp.numpy(), batch.logp_old[flat].numpy(), atol=1e-4)
    # Without the hidden state (each decision alone, from zeros) the logits differ: the recurrence
    # is really used.
    with torch.no_grad():
        alone = network(batch.obs[flat][:, None, :])[:, 0]
    assert not torch.allclose(alone, logits, atol=1e-3)


def test_a_sampling_gru_is_reproducible_per_draw_and_greedy_by_default(gru_run):
    out, _ = gru_run
    context = EpisodeContext(task="digits", max_epochs=5, blueprints=(), n_slots=2, rng_seed=11)
    draws = []
    for _ in range(2):
        p = GRUTamiyo(checkpoint=out, sample=True, draw=0)
        p.reset(context)
        from esper_cli.contracts import TrainingSnapshot

        obs = TrainingSnapshot.from_vector(np.zeros(27, dtype=np.float32))
        draws.append([p.decide(obs).probabilities for _ in range(3)])
    assert draws[0] == draws[1] and all(d is not None for d in draws[0])
    assert GRUTamiyo(checkpoint=out).decide(obs).probabilities is None
    with pytest.raises(ValueError, match="unknown gru option"):
        GRUTamiyo(checkpoint=out, temperature=2)


def test_cli_improve_gru_from_a_checkpoint_and_refusals(gru_run, tmp_path):
    start = gru_run[0].with_name("gru.bc.safetensors")
    out = tmp_path / "better.safetensors"
    result = invoke("improve", "--policy", "gru", "--from", start, "--out", out, "--episodes", 2,
                    "--episodes-per-update", 2, "--group", 2, "--epochs", 5, "--select-episodes", 1, "--json")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out, expect_policy="gru").meta["improve"]["start"] == str(start)
    # A checkpoint of another policy is not a gru start (the gru run's own bootstrap store is not
    # a checkpoint at all); refused before any work.
    refused = tmp_path / "refused.safetensors"
    assert "--from" in one_line_error(invoke("improve", "--policy", "gru", "--from", gru_run[0].with_name("gru.bootstrap.h5"),
                                             "--out", refused))
    assert not refused.exists()


def test_an_interrupted_gru_run_resumes_to_the_uninterrupted_checkpoint(gru_run, tmp_path):
    from esper_cli.learning.ppo import ImproveProgress

    def stop_at_second_update(description: str, _steps: int) -> None:
        if description.startswith("update 2/"):
            raise KeyboardInterrupt

    out = tmp_path / "gru.safetensors"
    first = improve(gru_config(out), build_registry(), ImproveProgress(on_stage=stop_at_second_update))
    assert first.interrupted and len(first.history) == 1
    resumed = improve(gru_config(out), build_registry())
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    want, got = load_checkpoint(gru_run[0]).tensors, load_checkpoint(out).tensors
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
