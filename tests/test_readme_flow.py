"""The README's first run, from a fresh Simic home: `simic collect && simic train --class-weights
auto && simic compare heuristic mlp`, for many training seeds (the same commands, fewer episodes).

Each training seed writes a different checkpoint (weights, and so the safetensors header length):
the first run once failed on a valid checkpoint whose header length began with byte 0x80, and
compare once ran on the very episodes the checkpoint was trained on.
"""

from __future__ import annotations

import json

from cli_helpers import succeed as simic

from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import episode_rng_seed
from esper_cli.evaluation.comparison import trained_rng_seeds
from esper_cli.paths import default_checkpoint_path, default_store_path

COMPARE_EPOCHS = 8
TRAINING_SEEDS = range(8)


def test_readme_first_run_from_a_fresh_home(simic_home):
    assert not simic_home.exists()
    simic("collect", "--episodes", 8)  # default epochs: the heuristic grows, advances and culls
    assert default_store_path().is_file()
    for seed in TRAINING_SEEDS:
        trained = json.loads(simic("train", "--class-weights", "auto", "--seed", seed, "--epochs", 5, "--json"))
        assert trained["checkpoint"] == str(default_checkpoint_path("mlp"))
        split = load_checkpoint(default_checkpoint_path("mlp"), expect_policy="mlp").meta["split"]
        on_training = trained_rng_seeds(split, "digits")
        assert on_training == {episode_rng_seed(0, i) for i in range(8)}

        report = json.loads(simic("compare", "heuristic", "mlp", "--episodes", 2, "--epochs", COMPARE_EPOCHS, "--json"))
        compared = {episode_rng_seed(report["seed"], i) for i in range(2)}
        assert not compared & on_training, f"training seed {seed}: compare ran on training episodes"
        assert report["seed_choice"]["auto"] and report["seed_choice"]["held_out"]
        assert set(report["policies"]) == {"heuristic", "mlp"}
