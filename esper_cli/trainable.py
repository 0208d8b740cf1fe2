"""The trainable-policy contract: what a plugin registers so that `simic train --policy NAME` can
fit its policy by behaviour cloning, exactly as it fits the built-in mlp and gru.

A trainable policy is two registrations under one name:

- `register_policies`: `register(NAME, factory)`, where `factory(checkpoint=PATH)` loads a
  checkpoint that training wrote (`esper_cli.load_policy_checkpoint(NAME, PATH)`) and decides
  from it: how the policy is rebuilt from a checkpoint, and its decide.
- `register_trainable_policies`: `register(NAME, TrainablePolicy(...))`: its network and defaults.

Training normalises the observations (mean/std fitted on the training episodes, stored in the
checkpoint's `normalisation`), builds `network(**hparams)`, minimises a class-weighted
cross-entropy with Adam, and saves the network's `state_dict()` with the hyper-parameters in the
checkpoint's `meta["hparams"]`. The policy factory reads both back: `network(**checkpoint.hparams)`
rebuilds the trained network (`Checkpoint.hparams` leaves out the training-only keys).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

#: Hyper-parameters of the training loop, not of the network: stored with the others in a
#: checkpoint's `meta["hparams"]`, never passed to `TrainablePolicy.network`.
TRAINING_HPARAMS = frozenset({"batch_size"})


def network_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters `TrainablePolicy.network` is built from: `hparams` without the
    training-only keys (`TRAINING_HPARAMS`)."""
    return {k: v for k, v in hparams.items() if k not in TRAINING_HPARAMS}


@dataclass(frozen=True)
class TrainablePolicy:
    """How to build and train one learned policy type.

    `network(**hparams)` returns a fresh `torch.nn.Module`. A non-sequence network maps normalised
    observations (B, 27) to logits (B, 4) and is trained on shuffled decisions; a `sequence`
    network maps whole episodes (B, T, 27) to logits (B, T, 4), causally (the logits at epoch t
    depend on epochs 0..t only), and is trained on whole episodes, zero-padded at the end.

    `defaults` are the hyper-parameters, stored in the checkpoint and passed to `network` without
    the training-only ones (`batch_size`: `network` receives only what it builds from); the
    keys `hidden` (an int, or a list of ints) and `layers` may be overridden by `simic train
    --hidden/--layers`, and `batch_size` (decisions, or episodes for a sequence network) is the
    training batch. `lr` is the default Adam learning rate. The network is built under
    `torch.manual_seed(seed)`, so its initial weights follow the training seed.

    `input_weight` names the parameter (shape (out, 27)) that reads the normalised observation,
    one column per feature. A policy that names one can be trained with a feature penalty
    (`simic train --feature-penalty`, default `feature_penalty`): a group lasso over its columns.
    """

    network: Callable[..., nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=lambda: {"batch_size": 32})
    sequence: bool = False
    lr: float = 1e-3
    input_weight: str | None = None
    feature_penalty: float = 0.0
