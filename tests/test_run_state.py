"""The saved state of long learning runs and their TensorBoard curves (real files, real TensorBoard)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from esper_cli.learning.run_state import (
    RunStateError,
    config_difference,
    generator_state,
    load_run_state,
    optimizer_state,
    restore_generator,
    restore_optimizer,
    save_run_state,
)

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _trained_adam() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.ones(4, 3)).square().sum().backward()
        opt.step()
    return net, opt


def test_a_run_state_round_trips_weights_optimiser_moments_and_generators(tmp_path):
    net, opt = _trained_adam()
    gen = torch.Generator().manual_seed(7)
    torch.randn(5, generator=gen)
    tensors, opt_json = optimizer_state(opt, "opt")
    path = tmp_path / "run.safetensors"
    size = save_run_state(path, {**net.state_dict(), **tensors, "gen": generator_state(gen)},
                          {"opt": opt_json, "update": 3, "curve": [1.5, 2.0]})
    assert size == path.stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]

    saved, state = load_run_state(path)
    assert state["update"] == 3 and state["curve"] == [1.5, 2.0]
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict({k: saved[k] for k in ("weight", "bias")})
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    restore_optimizer(twin_opt, saved, state["opt"], "opt")
    twin_gen = torch.Generator()
    restore_generator(twin_gen, saved["gen"])
    for model, optimiser in ((net, opt), (twin, twin_opt)):  # one more identical step on each
        optimiser.zero_grad()
        model(torch.ones(4, 3)).square().sum().backward()
        optimiser.step()
    assert torch.equal(net.weight, twin.weight) and torch.equal(net.bias, twin.bias)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=twin_gen))


def test_a_missing_state_is_none_and_a_damaged_one_a_one_line_error(tmp_path):
    path = tmp_path / "run.safetensors"
    assert load_run_state(path) is None
    save_run_state(path, {"w": torch.ones(3)}, {"update": 1})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(RunStateError, match="damaged") as err:
        load_run_state(path)
    assert "\n" not in str(err.value) and "--restart" in str(err.value)
    path.write_text("not a run state")
    with pytest.raises(RunStateError, match="unreadable"):
        load_run_state(path)


def test_config_difference_names_the_first_changed_setting():
    saved = {"lr": 0.001, "episode": {"epochs": 25, "task": "digits"}, "group": 4}
    assert config_difference(saved, dict(saved)) is None
    assert config_difference(saved, {**saved, "episode": {"epochs": 10, "task": "digits"}}) == "episode.epochs: 25 -> 10"
    assert config_difference(saved, {**saved, "seed": 1}) == "seed: null -> 1"


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason='the tensorboard extra is not installed (pip install -e ".[tensorboard]")')
def test_a_resumed_event_log_holds_each_step_once(tmp_path):
    from esper_cli.learning.event_log import EventLog, read_scalars

    with EventLog(tmp_path) as log:  # a run that logged steps 0-4, then was killed with its state at step 2
        for step in range(5):
            log.scalars(step, {"loss": float(step), "label": "ignored", "flag": True})
    with EventLog(tmp_path, resume_from=3) as log:  # the re-run writes steps 3-5 again
        for step in range(3, 6):
            log.scalars(step, {"loss": 10.0 + step})
    curves = read_scalars(tmp_path)
    assert list(curves) == ["loss"]
    assert curves["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_without_tensorboard_the_event_log_is_a_one_line_error(tmp_path, monkeypatch):
    from esper_cli.learning import event_log

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(event_log.TensorBoardUnavailable, match=r'pip install "simic\[tensorboard\]"'):
        event_log.EventLog(tmp_path)
    assert not any(tmp_path.iterdir())
