"""GRU Tamiyo: a recurrent policy behaviour-cloned from whole episodes (`simic train --policy gru`).

It reads an episode's observations in order and carries its hidden state from epoch to epoch:
`reset` clears it at the start of each episode, every `decide` advances it one step. Trained in
torch (`simic_plugins.networks.GRUNet`, whole episodes at once); decides in numpy with the same
equations as `torch.nn.GRU` (gate order r, z, n), one cheap step per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from esper_cli import hookimpl
from esper_cli.checkpoint import CheckpointError, load_policy_checkpoint, to_numpy
from esper_cli.contracts import N_FEATURES, Action, Decision, TrainingSnapshot, check_finite
from esper_cli.policy import EpisodeContext, valid_action_mask
from esper_cli.trainable import TrainablePolicy

from .mlp import decision_from_logits, folded_input_layer, sampling_rng

VERSION = "1.0"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free logistic


class GRUTamiyo:
    """Tamiyo as a GRU over the episode so far. Stateful: call `reset` before each episode.

    Greedy by default; with `sample=True` it draws its action from the softmax, from the episode's
    seed (`draw` picks another sequence of draws), and reports the distribution: the stochastic
    policy `simic improve --policy gru` fine-tunes. A checkpoint whose metadata says
    `mask_invalid` never picks an action that is a no-op in the state.
    """

    name = "gru"

    def __init__(self, checkpoint: str | Path | None = None, sample: bool = False, draw: int = 0,
                 **options: Any) -> None:
        if options:
            raise ValueError(f"unknown gru option(s): {', '.join(sorted(options))} (known: checkpoint, sample, draw)")
        self.sample, self.draw = bool(sample), int(draw)
        self._rng: np.random.Generator | None = None
        self.checkpoint = load_policy_checkpoint("gru", checkpoint)
        self.mask_invalid = bool(self.checkpoint.meta.get("mask_invalid", False))
        self.version = f"{VERSION}+{self.checkpoint.sha256[:8]}"
        self.input_range = self.checkpoint.input_range  # clip to the training range (None: older checkpoints)
        a = to_numpy(self.checkpoint.tensors)
        hp = self.checkpoint.hparams
        try:
            self.hidden, n_layers = int(hp["hidden"]), int(hp.get("layers", 1))
            self._layers = []  # (W_ih^T, b_ih, W_hh^T, b_hh) per layer
            for i in range(n_layers):
                w_ih, b_ih = a[f"gru.weight_ih_l{i}"], a[f"gru.bias_ih_l{i}"]
                if i == 0:  # normalisation folded into the input projection, as for the MLP
                    w_ih, b_ih = folded_input_layer(w_ih, b_ih, self.checkpoint)
                w_hh, b_hh = a[f"gru.weight_hh_l{i}"], a[f"gru.bias_hh_l{i}"]
                if w_hh.shape != (3 * self.hidden, self.hidden) or w_ih.shape[0] != 3 * self.hidden:
                    raise ValueError("GRU sizes")
                self._layers.append((np.ascontiguousarray(w_ih.T), b_ih, np.ascontiguousarray(w_hh.T), b_hh))
            # Head: [h, x] -> hidden -> 4. Its x part gets the normalisation folded in, like layer 0.
            w1, b1 = a["head.0.weight"], a["head.0.bias"]
            w1x, b1 = folded_input_layer(w1[:, self.hidden :], b1, self.checkpoint)
            self._head_h, self._head_x = np.ascontiguousarray(w1[:, : self.hidden].T), np.ascontiguousarray(w1x.T)
            self._head_b1 = b1
            self._head_w2, self._head_b2 = np.ascontiguousarray(a["head.2.weight"].T), a["head.2.bias"]
            if self._layers[0][0].shape[0] != N_FEATURES or self._head_w2.shape[1] != len(Action):
                raise ValueError("input/output sizes")
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} does not match a GRU of its hparams ({exc})") from None
        self._h = self._zeros()

    def _zeros(self) -> list[np.ndarray]:
        return [np.zeros(self.hidden, dtype=np.float32) for _ in self._layers]

    def reset(self, context: EpisodeContext | None = None) -> None:
        """Start of an episode: forget the previous one (a sampling GRU restarts its draws from
        the episode's seed)."""
        self._h = self._zeros()
        if self.sample and context is not None:
            self._rng = sampling_rng(context, self.draw)

    def _step(self, x: np.ndarray, h: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One epoch through every layer: raw observation (27,) -> (logits (4,), new hidden state)."""
        raw = x
        if self.input_range is not None:
            x = np.clip(x, *self.input_range)
        new_h, k, obs = [], 2 * self.hidden, x
        for (w_ih, b_ih, w_hh, b_hh), h_l in zip(self._layers, h):
            gi, gh = x @ w_ih + b_ih, h_l @ w_hh + b_hh
            rz = _sigmoid(gi[:k] + gh[:k])  # reset and update gates together
            r, z = rz[: self.hidden], rz[self.hidden :]
            n = np.tanh(gi[k:] + r * gh[k:])
            x = n + z * (h_l - n)  # = (1 - z) * n + z * h
            new_h.append(x)
        z = np.maximum(x @ self._head_h + obs @ self._head_x + self._head_b1, 0.0)
        logits = z @ self._head_w2 + self._head_b2
        if self.mask_invalid:
            logits = np.where(valid_action_mask(raw), logits, -np.inf)
        return logits, new_h

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        """Advance the hidden state by this epoch's observation and pick the most probable action
        (or draw one, when sampling)."""
        logits, self._h = self._step(obs.to_vector(), self._h)
        return decision_from_logits(self.name, logits, self.sample, self._rng)

    def decide_episode(self, observations: np.ndarray) -> np.ndarray:
        """Actions (T,) for one whole episode's raw observations (T, 27), in order, from a fresh state.

        Equal to `reset` then `decide` per epoch (used to replay stored episodes quickly).
        """
        x = np.asarray(observations, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"observations must have shape (T, {N_FEATURES}), got {x.shape}")
        check_finite(x, "observations")
        h, actions = self._zeros(), np.empty(len(x), dtype=np.int64)
        for t in range(len(x)):
            logits, h = self._step(x[t], h)
            actions[t] = int(logits.argmax())
        return actions


def gru_network(hidden: int = 16, layers: int = 1, head: int = 32, dropout: float = 0.0) -> Any:
    """The torch network `simic train --policy gru` fits (imported here: deciding needs no torch).

    Checkpoints written before dropout was a hyper-parameter build with its default, 0.
    """
    from .networks import GRUNet

    return GRUNet(int(hidden), int(layers), int(head), float(dropout))


@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("gru", GRUTamiyo)


@hookimpl
def register_trainable_policies(register: Callable[[str, TrainablePolicy], None]) -> None:
    # A small hidden state with dropout on it and one episode per batch: a GRU of 64 memorises the
    # training trajectories and generalises worse to held-out seeds.
    register("gru", TrainablePolicy(gru_network, {"hidden": 16, "layers": 1, "head": 64, "dropout": 0.5,
                                                  "batch_size": 1}, sequence=True, lr=3e-3))
