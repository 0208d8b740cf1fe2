"""Seed lifecycle and the isolation and blending guarantees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esper_cli.contracts import SeedStage
from esper_cli.kasmina import TRANSITIONS, HostCNN, IllegalTransitionError, SeedSlot
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS


def test_legal_transitions_walk_the_lifecycle():
    slot = SeedSlot(0, 4)
    slot.germinate("conv_enhance", BUILTIN_BLUEPRINTS["conv_enhance"](4))
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.FOSSILIZED):
        slot.transition(stage)
        assert slot.stage == stage
    assert slot.alpha == 1.0


@pytest.mark.parametrize("start", list(SeedStage))
def test_every_illegal_transition_is_refused(start):
    for target in SeedStage:
        if target in TRANSITIONS[start]:
            continue
        slot = SeedSlot(0, 4)
        slot.stage = start
        with pytest.raises(IllegalTransitionError, match=f"{start.name} -> {target.name}"):
            slot.transition(target)
        assert slot.stage == start


def test_cull_then_release_returns_slot_to_dormant():
    slot = SeedSlot(0, 4)
    slot.germinate("norm", BUILTIN_BLUEPRINTS["norm"](4))
    slot.transition(SeedStage.TRAINING)
    slot.cull()
    assert slot.stage == SeedStage.CULLED and slot.seed is None
    with pytest.raises(IllegalTransitionError):
        slot.germinate("norm", BUILTIN_BLUEPRINTS["norm"](4))
    slot.release()
    assert slot.stage == SeedStage.DORMANT


def _host_with_seed(blueprint="conv_enhance", slot=0):
    torch.manual_seed(0)
    model = HostCNN(1, (4, 8), 10)
    model.slots[slot].germinate(blueprint, BUILTIN_BLUEPRINTS[blueprint](model.slots[slot].channels))
    return model


@pytest.mark.parametrize("blueprint", list(BUILTIN_BLUEPRINTS))
def test_training_seed_learns_while_host_gets_no_gradient_from_it(blueprint):
    model = _host_with_seed(blueprint)
    slot = model.slots[0]
    slot.transition(SeedStage.TRAINING)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with torch.no_grad():
        host_only = model(x)
        slot.stage = SeedStage.DORMANT  # the same host without any seed
        reference = model(x)
        slot.stage = SeedStage.TRAINING
    assert torch.equal(host_only, reference), "alpha 0 must leave the host's output unchanged"

    logits, probes = model.forward_train(x)
    assert len(probes) == 1
    torch.testing.assert_close(logits, reference)
    F.cross_entropy(probes[0], y).backward()
    host_params = [p for n, p in model.named_parameters() if not n.startswith("slots.")]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in host_params), "host got gradient from the seed path"
    seed_grads = [p.grad for p in slot.seed.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in seed_grads), "TRAINING seed received no gradient"

    before = {n: p.detach().clone() for n, p in slot.seed.named_parameters()}
    torch.optim.SGD(slot.seed.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[n], p) for n, p in slot.seed.named_parameters())


def test_blending_trains_host_and_seed_jointly():
    model = _host_with_seed("conv_enhance")
    slot = model.slots[0]
    slot.transition(SeedStage.TRAINING)
    slot.transition(SeedStage.BLENDING)
    # make the seed's output non-zero so the blend is visible
    torch.nn.init.normal_(slot.seed.conv2.weight, std=0.5)
    slot.alpha = 0.5
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits, probes = model.forward_train(x)
    assert probes == []
    F.cross_entropy(logits, y).backward()
    assert model.stages[0][0].weight.grad.abs().sum() > 0  # host path is not detached
    assert slot.seed.conv1.weight.grad.abs().sum() > 0


def test_fossilized_seed_is_part_of_the_model():
    model = _host_with_seed("norm", slot=1)
    slot = model.slots[1]
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.FOSSILIZED):
        slot.transition(stage)
    keys = model.state_dict().keys()
    assert any(k.startswith("slots.1.seed.norm.running_mean") for k in keys)
    seed_params = {id(p) for p in slot.seed.parameters()}
    assert seed_params <= {id(p) for p in model.parameters()}
    model.eval()
    assert not slot.seed.norm.training
    model.train()
    assert slot.seed.norm.training
    # the checkpoint round-trips into a fresh host carrying the same seed
    clone = _host_with_seed("norm", slot=1)
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.FOSSILIZED):
        clone.slots[1].transition(stage)
    clone.load_state_dict(model.state_dict())
