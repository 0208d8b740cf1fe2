"""Kasmina: seed slots, their lifecycle state machine, and the host network that carries them.

A slot sits after a host stage. Its seed is grown in isolation and grafted in:

- GERMINATED: the seed exists; the host's output is unchanged.
- TRAINING: alpha is 0, so the host's output is unchanged, yet the seed really learns: a probe pass
  feeds it *detached* host features and runs the rest of the network with *detached* host
  parameters, so the seed gets the task gradient and the host gets none from the seed path.
- BLENDING: the slot outputs h + alpha * seed(h), alpha ramping 0 -> 1; host and seed train
  jointly (nothing detached).
- FOSSILIZED: alpha is 1 for good; the seed is an ordinary submodule of the model.

Training runs in the fused engine (`simulation.engine`), which keeps a `SlotState` per member and
slot; `HostCNN` is the host's structure (the engine's template) and, with its seeds installed as
`SeedSlot` submodules, a member's model as a plain module (`MorphogeneticEnv.model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .contracts import ACTIVE_STAGES, SeedStage

#: The legal lifecycle transitions. Anything else is refused with IllegalTransitionError.
TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.CULLED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.CULLED}),
    SeedStage.BLENDING: frozenset({SeedStage.FOSSILIZED, SeedStage.CULLED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.CULLED: frozenset({SeedStage.DORMANT}),
}


class IllegalTransitionError(RuntimeError):
    """A lifecycle transition the state machine does not allow."""


class SlotState:
    """A slot's lifecycle: stage, blueprint and alpha, with every transition checked.

    The fused engine keeps one per member and slot (the seed's weights are a row of its family
    there); `SeedSlot` is the same lifecycle holding its seed as a submodule.
    """

    def __init__(self, index: int, channels: int) -> None:
        self.index = index
        self.channels = channels
        self.stage = SeedStage.DORMANT
        self.blueprint: str | None = None
        self.alpha = 0.0

    @property
    def is_active(self) -> bool:
        return self.stage in ACTIVE_STAGES

    @property
    def has_seed(self) -> bool:
        """A seed occupies the slot (active or fossilized)."""
        return self.blueprint is not None

    def transition(self, to: SeedStage) -> None:
        """Move to `to` or raise: refusals are visible, never silently ignored."""
        if to not in TRANSITIONS[self.stage]:
            raise IllegalTransitionError(
                f"slot {self.index}: {self.stage.name} -> {SeedStage(to).name} is not a legal transition"
            )
        self.stage = SeedStage(to)
        if to == SeedStage.FOSSILIZED:
            self.alpha = 1.0
        elif to in (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING):
            self.alpha = 0.0

    def germinate(self, blueprint: str) -> None:
        self.transition(SeedStage.GERMINATED)
        self.blueprint = blueprint

    def cull(self) -> None:
        self.transition(SeedStage.CULLED)
        self.blueprint = None
        self.alpha = 0.0

    def release(self) -> None:
        """End of the embargo: the culled slot is empty and available again."""
        self.transition(SeedStage.DORMANT)


class SeedSlot(nn.Module, SlotState):
    """An injection point after a host stage, holding at most one seed as a submodule."""

    def __init__(self, index: int, channels: int) -> None:
        nn.Module.__init__(self)
        SlotState.__init__(self, index, channels)
        self.register_module("seed", None)

    def germinate(self, blueprint: str, module: nn.Module) -> None:  # type: ignore[override]
        SlotState.germinate(self, blueprint)
        self.seed = module

    def cull(self) -> None:
        SlotState.cull(self)
        self.seed = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.seed is None or self.stage not in (SeedStage.BLENDING, SeedStage.FOSSILIZED):
            return h
        return h + self.alpha * self.seed(h)


class HostCNN(nn.Module):
    """A small CNN: stage -> slot -> stage -> slot -> ... -> global pool -> linear head."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int, pool: int = 2) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.MaxPool2d(2)]
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU()]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.slots = nn.ModuleList(SeedSlot(i, w) for i, w in enumerate(widths))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(prev * pool * pool, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, slot in zip(self.stages, self.slots):
            x = stage(x)
            if slot.seed is not None:  # an empty slot is the identity: skip the module call
                x = slot(x)
        return self.head(x)
