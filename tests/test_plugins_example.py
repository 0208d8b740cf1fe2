"""The installable example plugin (examples/simic-example-policy), for real.

The package is pip-installed into this test environment (no network: `--no-index`, no build
isolation), then real `simic` processes find it through its `simic` entry point, collect episodes
with its `patience` policy and list it in `simic plugins`. It is uninstalled when the module's
tests end. The policy's own logic is unit-tested on synthetic observations.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pip_helpers import is_installed, pip_installed, simic_process
from typer.testing import CliRunner

from esper_cli.cli import app
from esper_cli.contracts import Action, SeedStage, TrainingSnapshot
from esper_cli.policy import EpisodeContext

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "simic-example-policy"
DIST = "simic-example-policy"
runner = CliRunner()


# ----------------------------------------------------------------------------- installation
@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """pip-install the example for real (from a copy: pip builds in the source tree), uninstall after.

    An example someone already installed by hand is used as it is and left alone.
    """
    if is_installed(DIST):
        yield DIST
        return
    src = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    with pip_installed(src, DIST) as dist:
        yield dist


def info_json(store: Path) -> dict:
    result = runner.invoke(app, ["info", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_installed_example_is_listed_by_simic_plugins(installed_example):
    result = simic_process("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    row = rows["simic-example-policy"]
    assert (row["distribution"], row["version"], row["policies"], row["blueprints"], row["error"]) == (
        DIST, "0.1.0", ["patience", "linear"], ["bottleneck"], None)
    assert row["trainables"] == ["linear"]
    assert row["module"] == "simic_example_policy"
    assert rows["heuristic"]["error"] is None  # the built-ins are untouched
    assert "Warning" not in result.stderr


@pytest.mark.slow
def test_simic_collect_runs_the_installed_policy_end_to_end(installed_example, tmp_path):
    store = tmp_path / "patience.h5"
    # 20 epochs: the narrow host keeps setting new bests for ~12-16 epochs, then patience runs out.
    result = simic_process("collect", "--policy", "patience", "--episodes", "2", "--epochs", "20",
                           "--store", str(store))
    assert result.returncode == 0, result.stderr
    assert "patience 0.1.0" in result.stdout  # the distribution's version is recorded
    report = info_json(store)
    assert report["n_episodes"] == 2 and report["n_decisions"] == 40
    assert [e["policy"] for e in report["episodes"]] == ["patience", "patience"]
    assert report["action_counts"]["GERMINATE"] >= 1 and report["seeds_created"] >= 1


@pytest.mark.slow
def test_simic_load_plugins_can_leave_the_installed_example_out(installed_example, tmp_path):
    result = simic_process("collect", "--policy", "patience", "--store", str(tmp_path / "s.h5"),
                           "--epochs", "5", env={"SIMIC_LOAD_PLUGINS": "heuristic"})
    assert result.returncode == 2
    assert "--policy 'patience': unknown policy (available: heuristic)" in result.stderr


@pytest.mark.slow
def test_simic_compare_heuristic_against_the_installed_example(installed_example):
    result = simic_process("compare", "heuristic", "patience", "--episodes", "2", "--epochs", "12")
    assert result.returncode == 0, result.stderr
    assert "heuristic" in result.stdout and "patience" in result.stdout


@pytest.mark.slow
def test_simic_train_fits_the_installed_trainable_policy_and_compare_runs_it(installed_example, tmp_path):
    store, ckpt = tmp_path / "heuristic.h5", tmp_path / "linear.safetensors"
    result = simic_process("collect", "--episodes", "3", "--epochs", "12", "--store", str(store))
    assert result.returncode == 0, result.stderr
    result = simic_process("train", "--policy", "linear", "--store", str(store), "--out", str(ckpt),
                           "--epochs", "5", "--allow-missing-classes", "--json")
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)
    assert trained["policy"] == "linear" and trained["epochs_run"] == 5 and ckpt.exists()
    result = simic_process("eval", "--policy", "linear", "--checkpoint", str(ckpt), "--store", str(store),
                           "--split", "all", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_decisions"] == 36
    result = simic_process("compare", "heuristic", f"linear={ckpt}", "--episodes", "2", "--epochs", "12",
                           "--mode", "closed-loop", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["closed_loop"]["linear"]["n_episodes"] == 2
    assert report["closed_loop"]["linear"]["policy_version"].startswith("0.1.0+")


# ------------------------------------------------------------------- the example policy's logic
@pytest.fixture
def patience(monkeypatch):
    """The example's policy class, imported from the source tree (no install needed)."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import simic_example_policy

    return simic_example_policy.PatienceTamiyo


CONTEXT = EpisodeContext(task="digits", max_epochs=25, n_slots=2, rng_seed=1,
                         blueprints=("conv_enhance", "attention", "norm", "depthwise", "bottleneck"))


def snap(**fields) -> TrainingSnapshot:
    base = TrainingSnapshot.from_vector(np.zeros(27, dtype=np.float32))
    return dataclasses.replace(base, available_slots=2, **fields)


def test_patience_germinates_after_no_new_best_and_picks_the_blueprint_from_the_gap(patience):
    policy = patience()
    policy.reset(CONTEXT)
    accs = [50.0, 60.0, 70.0, 70.1, 70.2]  # a new best, then two epochs within min_delta
    decisions = [policy.decide(snap(epoch=e, val_accuracy=a, train_accuracy=a + 1.0), CONTEXT)
                 for e, a in enumerate(accs)]
    assert [d.action for d in decisions] == [Action.WAIT] * 4 + [Action.GERMINATE]
    assert decisions[-1].blueprint == "bottleneck"  # small train/val gap: capacity
    # The environment's plateau counter is ignored: this policy keeps its own bookkeeping.
    policy.reset(CONTEXT)
    overfit = [policy.decide(snap(epoch=e, val_accuracy=a, train_accuracy=a + 10.0, plateau_epochs=9), CONTEXT)
               for e, a in enumerate(accs)]
    assert [d.action for d in overfit][:4] == [Action.WAIT] * 4
    assert overfit[-1].action == Action.GERMINATE and overfit[-1].blueprint == "norm"  # overfitting


def test_patience_culls_a_seed_that_gives_back_its_gain_and_does_not_retry_that_blueprint(patience):
    policy = patience()
    policy.reset(CONTEXT)
    for e, a in enumerate([50.0, 60.0, 70.0, 70.0, 70.0]):
        decision = policy.decide(snap(epoch=e, val_accuracy=a, train_accuracy=a), CONTEXT)
    assert decision.blueprint == "bottleneck"
    training = dict(has_active_seed=True, seed_stage=SeedStage.TRAINING, val_accuracy=70.0, train_accuracy=70.0)
    wait = policy.decide(snap(epoch=5, seed_epochs_in_stage=1, seed_improvement=0.3, **training), CONTEXT)
    assert wait.action == Action.WAIT
    cull = policy.decide(snap(epoch=6, seed_epochs_in_stage=2, seed_improvement=-0.9, **training), CONTEXT)
    assert cull.action == Action.CULL and "fell back" in cull.reason
    again = policy.decide(snap(epoch=9, val_accuracy=70.0, train_accuracy=70.0), CONTEXT)
    assert again.action == Action.GERMINATE and again.blueprint == "conv_enhance"  # not bottleneck again
    policy.reset(CONTEXT)  # a new episode forgets the culls
    assert policy.culled == [] and policy.best is None


def test_patience_fossilizes_only_once_fully_blended_and_helpful(patience):
    policy = patience()
    policy.reset(CONTEXT)
    blending = dict(has_active_seed=True, seed_stage=SeedStage.BLENDING, seed_epochs_in_stage=3)
    assert policy.decide(snap(seed_alpha=0.6, seed_improvement=0.5, **blending), CONTEXT).action == Action.WAIT
    assert policy.decide(snap(seed_alpha=0.6, seed_improvement=-2.0, **blending), CONTEXT).action == Action.CULL
    assert policy.decide(snap(seed_alpha=1.0, seed_improvement=0.2, **blending), CONTEXT).action == Action.ADVANCE
    assert policy.decide(snap(seed_alpha=1.0, seed_improvement=-0.2, **blending), CONTEXT).action == Action.CULL


def test_patience_rejects_unknown_options_and_accepts_known_ones(patience):
    assert patience(patience="4").config.patience == 4
    with pytest.raises(ValueError, match="unknown patience option"):
        patience(patiense=4)
