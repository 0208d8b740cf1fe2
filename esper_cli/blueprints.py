"""Kasmina blueprints: the seed modules that can be grown in a slot.

A blueprint is a factory `(channels) -> nn.Module` whose module maps a feature map of shape
(B, C, H, W) to a residual of the same shape. The slot adds `alpha * seed(h)` to the host's
features, so every blueprint zero-initialises its last layer: a new seed starts as an identity
change and blending it in causes no jump.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BlueprintFactory = Callable[[int], nn.Module]


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ConvEnhance(nn.Module):
    """Two 3x3 convolutions: more local capacity at the slot."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = _zero_init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(h)))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation style gating: reweights channels by global context."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = _zero_init(nn.Linear(hidden, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.fc2(torch.relu(self.fc1(h.mean(dim=(2, 3))))))
        return h * gate[:, :, None, None]


class NormSeed(nn.Module):
    """BatchNorm followed by a 1x1 mix: re-centres features (and must follow train/eval)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.mix = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(h))


class DepthwiseSeed(nn.Module):
    """Depthwise 3x3 then pointwise 1x1: cheap spatial filtering per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.relu(self.depthwise(h)))


#: Built-in blueprints in the environment's default rotation order.
BUILTIN_BLUEPRINTS: dict[str, BlueprintFactory] = {
    "conv_enhance": ConvEnhance,
    "attention": ChannelAttention,
    "norm": NormSeed,
    "depthwise": DepthwiseSeed,
}
