"""Shared fixtures: isolated SIMIC_HOME, one thread for torch, tiny configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def simic_home(tmp_path, monkeypatch):
    """Every test gets its own Simic home so default paths never leak between tests."""
    home = tmp_path / "simic-home"
    monkeypatch.setenv("SIMIC_HOME", str(home))
    return home
