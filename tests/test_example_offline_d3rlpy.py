"""examples/offline_d3rlpy.py runs end to end on a tiny budget: an explored store, the d3rlpy
export, DiscreteCQL trained, scored with the action mask beside the heuristic and `wait`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("d3rlpy")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "offline_d3rlpy.py"


@pytest.mark.slow
def test_offline_d3rlpy_example_trains_and_scores_for_a_tiny_budget(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--episodes", "3", "--epochs", "3", "--steps", "20",
                             "--eval-episodes", "2", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "data: 3 episodes, 9 transitions" in out
    assert "trained DiscreteCQL: 20 gradient steps" in out
    assert "(2 episodes of 3 epochs)" in out
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()
            if line.startswith(("cql (masked greedy)", "heuristic", "wait"))}
    assert set(rows) == {"cql (masked greedy)", "heuristic", "wait"}
    for test_acc, val_acc, _ in rows.values():
        assert 0 < float(test_acc) <= 100 and 0 < float(val_acc) <= 100 and math.isfinite(float(test_acc))
    assert rows["cql (masked greedy)"][2] == "0"  # the mask keeps its greedy choice valid
    assert (tmp_path / "episodes-d3rlpy.h5").exists()


@pytest.mark.slow
def test_a_seed_among_the_held_out_ones_is_refused():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--seed", "10001", "--eval-seed", "10000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "held-out" in result.stderr
