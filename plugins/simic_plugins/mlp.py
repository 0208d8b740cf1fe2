"""MLP Tamiyo: a feed-forward policy behaviour-cloned from a store (`simic train --policy mlp`).

Registered through the `simic` entry-point group like any third-party policy. The factory loads a
safetensors checkpoint (default: `$SIMIC_HOME/checkpoints/mlp.safetensors`); the network is
trained in torch (`simic_plugins.networks.MLPNet`, registered as a trainable policy) but decides in
plain numpy: at 27 -> 64 -> 32 -> 4 a torch call costs more in dispatch overhead than the
arithmetic, and `decide` runs every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from esper_cli import hookimpl
from esper_cli.checkpoint import Checkpoint, CheckpointError, load_policy_checkpoint, to_numpy
from esper_cli.contracts import N_FEATURES, Action, Decision, RngStream, TrainingSnapshot, check_finite
from esper_cli.policy import EpisodeContext, valid_action_mask
from esper_cli.trainable import TrainablePolicy

VERSION = "1.0"


def best_action(logits: np.ndarray) -> tuple[int, float]:
    """(argmax, its softmax probability) of one logit vector, in plain Python: for 4 numbers this is
    several times cheaper than numpy's per-call overhead, and `decide` runs every epoch."""
    values = logits.tolist()
    a = max(range(len(values)), key=values.__getitem__)
    top = values[a]
    return a, 1.0 / sum(math.exp(v - top) for v in values)


def sampling_rng(context: EpisodeContext, draw: int) -> np.random.Generator:
    """The generator a sampling policy draws its actions from: the episode's own stream, `draw`
    picking another sequence of draws on the same episode."""
    return np.random.default_rng(np.random.SeedSequence([context.rng_seed, RngStream.POLICY_SAMPLING, draw]))


def decision_from_logits(name: str, logits: np.ndarray, sample: bool, rng: np.random.Generator | None) -> Decision:
    """The most probable action, or (`sample`) a draw from the softmax with the distribution
    reported (`Decision.probabilities`, what PPO's ratio needs); confidence = its probability."""
    if not sample:
        a, p = best_action(logits)
        return Decision(Action(a), f"{name} p={p:.2f}", p)
    if rng is None:
        raise RuntimeError(f"a sampling {name} draws from the episode's seed: call reset(context) first")
    z = np.exp(logits.astype(np.float64) - logits.max())
    probs = z / z.sum()
    a = int(rng.choice(len(probs), p=probs))
    return Decision(Action(a), f"{name} sampled p={probs[a]:.2f}", float(probs[a]), probabilities=tuple(probs.tolist()))


def folded_input_layer(weight: np.ndarray, bias: np.ndarray, ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """Fold the (x - mean) / std normalisation into the first layer: W' = W / std, b' = b - W' @ mean.

    One matmul fewer per decision; done in float64 so the folded layer matches the trained one.
    """
    mean, std = ckpt.normalisation
    if mean.shape != (N_FEATURES,) or std.shape != (N_FEATURES,) or not (np.isfinite(mean).all()
                                                                       and np.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError(f"checkpoint {ckpt.path} has an invalid normalisation")
    w = weight.astype(np.float64) / std[None, :]
    b = bias.astype(np.float64) - w @ mean
    return w.astype(np.float32), b.astype(np.float32)


class MLPTamiyo:
    """Tamiyo as an MLP over the normalised 27 features. Has a batched fast path.

    Greedy by default (the most probable action). With `sample=True` it draws its action from the
    softmax, from the episode's seed (`draw` picks another sequence of draws on the same episode),
    and reports the distribution (`Decision.probabilities`): the stochastic policy `simic improve`
    fine-tunes. A checkpoint whose metadata says `mask_invalid` (outcome-trained ones) never picks
    an action that is a no-op in the state.
    """

    name = "mlp"

    def __init__(self, checkpoint: str | Path | None = None, sample: bool = False, draw: int = 0,
                 **options: Any) -> None:
        if options:
            raise ValueError(f"unknown mlp option(s): {', '.join(sorted(options))} (known: checkpoint, sample, draw)")
        self.sample, self.draw = bool(sample), int(draw)
        self._rng: np.random.Generator | None = None
        self.checkpoint = load_policy_checkpoint("mlp", checkpoint)
        self.mask_invalid = bool(self.checkpoint.meta.get("mask_invalid", False))
        self.input_range = self.checkpoint.input_range  # clip to the training range (None: older checkpoints)
        self.version = f"{VERSION}+{self.checkpoint.sha256[:8]}"  # which weights made a decision
        arrays = to_numpy(self.checkpoint.tensors)
        n_layers = len(self.checkpoint.hparams["hidden"]) + 1
        try:
            layers = [(arrays[f"layers.{i}.weight"], arrays[f"layers.{i}.bias"]) for i in range(n_layers)]
            layers[0] = folded_input_layer(*layers[0], self.checkpoint)
            # Pre-transposed and contiguous so each layer is one `x @ W + b`.
            self._layers = [(np.ascontiguousarray(w.T), b) for w, b in layers]
            if self._layers[0][0].shape[0] != N_FEATURES or self._layers[-1][1].shape != (len(Action),):
                raise ValueError("input/output sizes")
            for (w1, _), (w2, b2) in zip(self._layers, self._layers[1:]):
                if w1.shape[1] != w2.shape[0] or b2.shape != (w2.shape[1],):
                    raise ValueError("layer sizes")
            self.blueprints = tuple(str(b) for b in self.checkpoint.hparams.get("blueprints", ()))
            self._blueprint_logits = arrays["blueprint_logits"].astype(np.float64) if self.blueprints else None
            if self._blueprint_logits is not None and self._blueprint_logits.shape != (len(self.blueprints),):
                raise ValueError("blueprint logits")
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} does not match an MLP of its hparams ({exc})") from None

    def reset(self, context: EpisodeContext) -> None:
        """A sampling MLP restarts its draws from the episode's seed; a greedy one keeps no state."""
        if self.sample:
            self._rng = sampling_rng(context, self.draw)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) observations (N, 27) or (27,) -> logits (N, 4) or (4,)."""
        if self.input_range is not None:
            x = np.clip(x, *self.input_range)
        last = len(self._layers) - 1
        for i, (w, b) in enumerate(self._layers):
            x = x @ w + b
            if i < last:
                np.maximum(x, 0.0, out=x)
        return x

    def _action_logits(self, x: np.ndarray) -> np.ndarray:
        """`logits`, with the actions invalid in each state at -inf when the checkpoint says `mask_invalid`."""
        logits = self.logits(x)
        return np.where(valid_action_mask(x), logits, -np.inf) if self.mask_invalid else logits

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        """The most probable action (or a draw, when sampling); confidence = its softmax probability."""
        logits = self._action_logits(obs.to_vector())  # to_vector also rejects NaN/inf
        decision = decision_from_logits(self.name, logits, self.sample, self._rng)
        if decision.action != Action.GERMINATE or self._blueprint_logits is None:
            return decision
        blueprint, p = pick_blueprint(self.blueprints, self._blueprint_logits, self._rng if self.sample else None)
        reason = decision.reason if blueprint is None else f"{decision.reason}, {blueprint} p={p:.2f}"
        return replace(decision, blueprint=blueprint, reason=reason)

    def decide_batch(self, observations: np.ndarray) -> np.ndarray:
        """Actions (N,) for N independent raw observations (N, 27)."""
        x = np.asarray(observations, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"observations must have shape (N, {N_FEATURES}), got {x.shape}")
        check_finite(x, "observations")
        return self._action_logits(x).argmax(axis=1).astype(np.int64)


#: Default group-lasso weight on the first layer's per-feature columns (`simic train
#: --feature-penalty`): strong enough to silence the features a rule-based expert never reads, so
#: the imitation holds on other seeds' states, weak enough to keep its thresholds sharp.
FEATURE_PENALTY = 1e-2


def mlp_network(hidden: Sequence[int] = (64, 32), blueprints: Sequence[str] = ()) -> Any:
    """The torch network `simic train --policy mlp` fits (imported here: deciding needs no torch);
    `blueprints` adds the learned blueprint choice (`simic improve`)."""
    from .networks import MLPNet

    return MLPNet(hidden, blueprints)


def pick_blueprint(names: Sequence[str], logits: np.ndarray, rng: np.random.Generator | None) -> tuple[str | None, float]:
    """The blueprint a GERMINATE grows and its probability: a draw from softmax(logits) with `rng`,
    else the most probable; equal logits (never trained) mean the environment's rotation (None)."""
    if rng is None:
        if float(logits.max() - logits.min()) < 1e-6:
            return None, 1.0
        return names[int(logits.argmax())], 1.0
    z = np.exp(logits.astype(np.float64) - logits.max())
    probs = z / z.sum()
    b = int(rng.choice(len(probs), p=probs))
    return names[b], float(probs[b])


@hookimpl
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("mlp", MLPTamiyo)


@hookimpl
def register_trainable_policies(register: Callable[[str, TrainablePolicy], None]) -> None:
    register("mlp", TrainablePolicy(mlp_network, {"hidden": [64, 32], "batch_size": 32},
                                    input_weight="layers.0.weight", feature_penalty=FEATURE_PENALTY))
