"""Where Simic keeps its files when no path is given.

Everything lives under the Simic home: `$SIMIC_HOME`, or `./simic-data` in the current directory
(experiments stay next to the project that ran them, like `runs/` for TensorBoard).
"""

from __future__ import annotations

import os
from pathlib import Path


def simic_home() -> Path:
    return Path(os.environ.get("SIMIC_HOME") or "simic-data")


def default_store_path() -> Path:
    """The episode store every command uses by default: `<home>/episodes.h5`."""
    return simic_home() / "episodes.h5"


def default_checkpoint_path(policy: str) -> Path:
    """Where `simic train --policy NAME` writes, and `eval`/`compare` look, by default."""
    return simic_home() / "checkpoints" / f"{policy}.safetensors"
