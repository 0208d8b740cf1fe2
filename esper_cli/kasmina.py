"""Kasmina: seed slots, their lifecycle state machine, and the host network that carries them.

A slot sits after a host stage. Its seed is grown in isolation and grafted in:

- GERMINATED: the seed exists; the host's output is unchanged.
- TRAINING: alpha is 0, so the host's output is unchanged, yet the seed really learns: a probe pass
  feeds it *detached* host features and runs the rest of the network with *detached* host
  parameters, so the seed gets the task gradient and the host gets none from the seed path.
- BLENDING: the slot outputs h + alpha * seed(h), alpha ramping 0 -> 1; host and seed train
  jointly (nothing detached).
- FOSSILIZED: alpha is 1 for good; the seed is an ordinary submodule of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

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


class SeedSlot(nn.Module):
    """An injection point after a host stage, holding at most one seed."""

    def __init__(self, index: int, channels: int) -> None:
        super().__init__()
        self.index = index
        self.channels = channels
        self.register_module("seed", None)
        self.stage = SeedStage.DORMANT
        self.blueprint: str | None = None
        self.alpha = 0.0

    @property
    def is_active(self) -> bool:
        return self.stage in ACTIVE_STAGES

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

    def germinate(self, blueprint: str, module: nn.Module) -> None:
        self.transition(SeedStage.GERMINATED)
        self.seed = module
        self.blueprint = blueprint

    def cull(self) -> None:
        self.transition(SeedStage.CULLED)
        self.seed = None
        self.blueprint = None
        self.alpha = 0.0

    def release(self) -> None:
        """End of the embargo: the culled slot is empty and available again."""
        self.transition(SeedStage.DORMANT)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.seed is None or self.stage not in (SeedStage.BLENDING, SeedStage.FOSSILIZED):
            return h
        return h + self.alpha * self.seed(h)

    def isolated(self, h: torch.Tensor) -> torch.Tensor:
        """The TRAINING probe: the seed at full strength on detached host features."""
        assert self.seed is not None
        h = h.detach()
        return h + self.seed(h)


def _frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `module` with its parameters detached (and buffers copied), so nothing flows back
    into it and no running statistic is updated: the host stays untouched by the seed's probe."""
    state = {n: p.detach() for n, p in module.named_parameters()}
    state.update({n: b.clone() for n, b in module.named_buffers()})
    return functional_call(module, state, (x,))


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

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Host logits, plus one probe-logits tensor per TRAINING seed (see module docstring)."""
        probes: list[torch.Tensor] = []
        n = len(self.stages)
        for i, (stage, slot) in enumerate(zip(self.stages, self.slots)):
            h = stage(x)
            if slot.stage == SeedStage.TRAINING:
                p = slot.isolated(h)
                for j in range(i + 1, n):
                    p = _frozen_call(self.stages[j], p)
                    if self.slots[j].seed is not None:
                        p = _frozen_call(self.slots[j], p)
                probes.append(_frozen_call(self.head, p))
            x = slot(h) if slot.seed is not None else h
        return self.head(x), probes

    def forward_worth(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host logits and, for slot `index`, the counterfactual logits that measure its seed.

        TRAINING: the counterfactual is the isolated probe (the seed at full strength on the host's
        features; the host's own path is unchanged, alpha being 0). BLENDING: the counterfactual is
        the slot at alpha 0 (the seed removed). The layers before the slot run once; only the rest
        of the network runs twice. Call it under `torch.no_grad()` in eval mode: it changes nothing.
        """
        slot_k = self.slots[index]
        assert slot_k.seed is not None and slot_k.stage in (SeedStage.TRAINING, SeedStage.BLENDING)
        branch: torch.Tensor | None = None
        for i, (stage, slot) in enumerate(zip(self.stages, self.slots)):
            x = stage(x)
            if branch is not None:  # downstream of the measured slot: the counterfactual path too
                branch = stage(branch)
                if slot.seed is not None:
                    branch = slot(branch)
            elif i == index:
                branch = slot.isolated(x) if slot.stage == SeedStage.TRAINING else x
            if slot.seed is not None:
                x = slot(x)
        assert branch is not None
        return self.head(x), self.head(branch)
