"""`linear`: a trainable Tamiyo. Softmax regression over the normalised 27 features.

`simic train --policy linear` fits it like the built-in mlp (same split, normalisation, class
weights, early stopping and checkpoint format); this module supplies only what is particular to
it: the torch network training fits, and the policy that decides from the checkpoint it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from esper_cli import (
    N_ACTIONS,
    N_FEATURES,
    Action,
    Decision,
    EpisodeContext,
    TrainablePolicy,
    TrainingSnapshot,
    load_policy_checkpoint,
)

NAME = "linear"


class LinearNet(nn.Module):
    """Normalised observations (B, 27) -> logits (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(N_FEATURES, N_ACTIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LinearTamiyo:
    """Decides with the weights of a `simic train --policy linear` checkpoint, in numpy."""

    name = NAME

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self.checkpoint = load_policy_checkpoint(NAME, checkpoint)
        self.version = f"0.1.0+{self.checkpoint.sha256[:8]}"
        weight = self.checkpoint.tensors["linear.weight"].double().numpy()
        bias = self.checkpoint.tensors["linear.bias"].double().numpy()
        mean, std = self.checkpoint.normalisation
        # (x - mean) / std @ W.T + b, folded into one affine map of the raw observation.
        self._w = (weight / std).T
        self._b = bias - (weight / std) @ mean
        self._range = self.checkpoint.input_range  # training clips validation to this range; so do we

    def reset(self, context: EpisodeContext) -> None:
        """Stateless: nothing to reset."""

    def decide(self, observation: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        x = observation.to_vector()
        if self._range is not None:
            x = np.clip(x, *self._range)
        logits = x @ self._w + self._b
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        action = int(probs.argmax())
        return Decision(Action(action), f"linear p={probs[action]:.2f}", float(probs[action]))


def trainable() -> TrainablePolicy:
    """What `register_trainable_policies` registers: the network and its training defaults."""
    return TrainablePolicy(network=lambda **_: LinearNet(), defaults={"batch_size": 64}, lr=1e-2)

