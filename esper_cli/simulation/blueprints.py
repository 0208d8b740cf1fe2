"""Kasmina blueprints: the seed modules that can be grown in a slot.

A blueprint is a factory `(channels) -> nn.Module` whose module maps a feature map of shape
(B, C, H, W) to a residual of the same shape. The slot adds `alpha * seed(h)` to the host's
features; alpha ramps from 0, so blending any seed in causes no jump.

The built-ins differ for real, so that growing is a decision and culling one too: on the digits
host, `conv_enhance` (depth where the host has too little) usually helps, `attention` and `norm`
rarely change much, and `pool_mixer` (PoolFormer's token mixer, default-initialised) starts as a
blur of the features and mostly hurts where spatial detail matters. Most zero-initialise their
last layer, so their isolated probe starts equal to the host; `pool_mixer` does not, like a seed
transplanted at full strength.
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


def _expanded(channels: int) -> int:
    """Hidden width of the blueprints that add capacity: 4x the slot's channels, at least 16."""
    return max(4 * channels, 16)


class ConvEnhance(nn.Module):
    """Two 3x3 convolutions through a wider hidden layer: more local capacity at the slot."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = _expanded(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = _zero_init(nn.Conv2d(hidden, channels, 3, padding=1))

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
    """MobileNetV2's inverted residual: 1x1 expansion, depthwise 3x3, 1x1 projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = _expanded(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.pointwise = _zero_init(nn.Conv2d(hidden, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.relu(self.depthwise(torch.relu(self.expand(h)))))


class PoolMixer(nn.Module):
    """PoolFormer's token mixer (Yu et al., 2022): a 3x3 average minus the feature itself, mixed
    by a 1x1 convolution with PyTorch's default initialisation: a full-strength blur from the start."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mix(self.pool(h) - h)


#: Built-in blueprints in the environment's default rotation order.
BUILTIN_BLUEPRINTS: dict[str, BlueprintFactory] = {
    "conv_enhance": ConvEnhance,
    "attention": ChannelAttention,
    "norm": NormSeed,
    "depthwise": DepthwiseSeed,
    "pool_mixer": PoolMixer,
}
