"""Simic: learn Tamiyo controllers for morphogenetic training (Esper-Lite).

The public API for plugins, and only it, is listed in `__all__`: the hook marker, the policy
contract (observation and its feature names and meanings, action, which actions are valid,
decision, episode context, protocol) and the trainable-policy contract (with the checkpoint
loader its factory calls and what it returns). Everything else is internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, CheckpointError, load_policy_checkpoint
    from .contracts import (
        FEATURE_MEANINGS,
        FEATURE_NAMES,
        N_ACTIONS,
        N_FEATURES,
        Action,
        Decision,
        SeedStage,
        TrainingSnapshot,
    )
    from .hookspecs import hookimpl
    from .policy import EpisodeContext, Policy, valid_action_mask
    from .trainable import TrainablePolicy

__version__ = "0.1.0"

# Resolved on first use: importing the package alone stays instant, so the console script arms
# its Ctrl-C handler (esper_cli.__main__) before anything slow (h5py, torch) is imported.
_PUBLIC = {
    "hookimpl": "hookspecs",
    "Action": "contracts", "Decision": "contracts", "SeedStage": "contracts", "TrainingSnapshot": "contracts",
    "N_ACTIONS": "contracts", "N_FEATURES": "contracts", "FEATURE_NAMES": "contracts", "FEATURE_MEANINGS": "contracts",
    "EpisodeContext": "policy", "Policy": "policy", "valid_action_mask": "policy",
    "TrainablePolicy": "trainable", "load_policy_checkpoint": "checkpoint", "Checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
}
__all__ = [
    "__version__", "hookimpl", "Action", "Decision", "SeedStage", "TrainingSnapshot", "N_ACTIONS", "N_FEATURES",
    "FEATURE_NAMES", "FEATURE_MEANINGS", "EpisodeContext", "Policy", "valid_action_mask", "TrainablePolicy",
    "load_policy_checkpoint", "Checkpoint", "CheckpointError",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'esper_cli' has no attribute {name!r}")
