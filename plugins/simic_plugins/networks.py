"""The torch networks of the built-in learned policies, used by `simic train` only.

The state-dict key names (`layers.{i}.weight`, `gru.weight_ih_l{i}`, `head.{0,2}.weight`, ...) are
the contract with the numpy forward passes in `mlp.py` and `gru.py`, which decide without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esper_cli.contracts import N_ACTIONS, N_FEATURES


class MLPNet(nn.Module):
    """27 -> hidden... -> 4 with ReLU (the seed design: 27 -> 64 -> 32 -> 4). Inputs are normalised.

    With `blueprints` (names), it also holds `blueprint_logits`: which blueprint a GERMINATE grows,
    one logit per name, the same in every state. They start equal, which means "the
    environment's rotation" (`MLPTamiyo`), and `simic improve` learns them with the actions.
    """

    def __init__(self, hidden: Sequence[int] = (64, 32), blueprints: Sequence[str] = ()) -> None:
        super().__init__()
        sizes = [N_FEATURES, *hidden, N_ACTIONS]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        if blueprints:
            self.blueprint_logits = nn.Parameter(torch.zeros(len(blueprints)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class GRUNet(nn.Module):
    """A GRU over an episode's normalised observations, one logit vector per epoch.

    (B, T, 27) -> logits (B, T, 4). Causal: the decision at epoch t sees epochs 0..t only, so running
    the whole episode at once equals deciding live, step by step, with the hidden state carried.
    The head reads the hidden state *and* the current observation ([h_t, x_t] -> head -> 4):
    Tamiyo's rules are mostly sharp thresholds on the current features, which a head with a
    skip connection learns as easily as the MLP, while h_t carries what the history adds.
    `dropout` applies to the GRU outputs h_t fed to the head, in training only (inactive at
    inference, so the live numpy policy needs no change; checkpoints without it load with 0).
    """

    def __init__(self, hidden: int = 64, layers: int = 1, head: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.gru = nn.GRU(N_FEATURES, hidden, num_layers=layers, batch_first=True)
        self.dropout = float(dropout)
        self.head = nn.Sequential(nn.Linear(hidden + N_FEATURES, head), nn.ReLU(), nn.Linear(head, N_ACTIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(x)
        if self.training and self.dropout > 0:
            y = F.dropout(y, self.dropout)
        return self.head(torch.cat([y, x], dim=-1))
