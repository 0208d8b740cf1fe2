"""The README's RL example runs: Stable-Baselines3's DQN trains on `simic/Morphogenetic-v0`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("stable_baselines3")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rl_gymnasium_dqn.py"


@pytest.mark.slow
def test_dqn_example_trains_and_scores_for_a_tiny_budget():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--timesteps", "12", "--epochs", "2",
                             "--eval-episodes", "1"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "held-out seeds: DQN" in result.stdout and "WAIT" in result.stdout
