"""Seed lifecycle: the checked transitions, and a seed as part of the host module.

The isolation and blending guarantees are the training engine's, tested per member on a mixed
batch in test_engine.py."""

from __future__ import annotations

import pytest
import torch

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
