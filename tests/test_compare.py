"""`simic compare`: shadow and closed-loop comparisons on real (tiny) training runs.

One small heuristic store and a quickly trained MLP checkpoint are shared by the module; the
episodes are 12 epochs long (the heuristic germinates a seed in most of them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, one_line_error
from simic_plugins.heuristic import HeuristicTamiyo
from simic_plugins.mlp import MLPTamiyo

from esper_cli import hookimpl
from esper_cli.checkpoint import digest
from esper_cli.contracts import EpisodeConfig, TrainingSnapshot
from esper_cli.evaluation.comparison import mean_ci95, parse_specs, resolve_specs
from esper_cli.learning.training import TrainConfig, train_policy
from esper_cli.paths import default_checkpoint_path
from esper_cli.plugins import build_registry, registered_plugin
from esper_cli.simulation.episode import run_episode

EPOCHS = 12
SEED = ["--seed", 5]  # episode 1 of run seed 5 grows a seed within 12 epochs (episode 0 does not)



def compare_json(*args: object) -> dict:
    result = invoke("compare", *args, "--epochs", EPOCHS, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)



@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    store = root / "heuristic.h5"
    result = invoke("collect", "--episodes", 4, "--epochs", EPOCHS, *SEED, "--store", store)
    assert result.exit_code == 0, result.output
    path, _ = train_policy(store, TrainConfig("mlp", epochs=30, allow_missing_classes=True), out=root / "mlp.safetensors")
    return path


class CopyPlugin:
    """A third-party plugin registering the heuristic again under another name."""

    @hookimpl
    def register_policies(self, register):
        register("heuristic-copy", HeuristicTamiyo)


# ------------------------------------------------------------------------------------ units
def test_specs_parse_names_and_checkpoints():
    specs = parse_specs(["heuristic", "mlp=a.safetensors"])
    assert [(s.name, s.checkpoint, s.label) for s in specs] == [("heuristic", None, "heuristic"),
                                                               ("mlp", "a.safetensors", "mlp")]
    twice = parse_specs(["mlp=a.safetensors", "mlp=b.safetensors"])
    assert [s.label for s in twice] == ["mlp=a.safetensors", "mlp=b.safetensors"]
    for bad in (["mlp", "mlp"], ["=x"], ["mlp="]):
        with pytest.raises(ValueError):
            parse_specs(bad)


def test_mean_ci95_is_a_t_interval():
    mean, ci = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx([2.0 - 4.302653 / np.sqrt(3), 2.0 + 4.302653 / np.sqrt(3)], rel=1e-5)
    assert mean_ci95([5.0]) == (5.0, None) and mean_ci95([0.0, 0.0]) == (0.0, [0.0, 0.0])


# ------------------------------------------------------------------------------- end to end
def test_a_policy_against_itself_agrees_everywhere_and_differs_by_exactly_zero(tmp_path):
    plot = tmp_path / "curves.png"
    with registered_plugin(CopyPlugin(), name="copy"):  # any registered policy works, third-party too
        report = compare_json("heuristic", "heuristic-copy", "--episodes", 2, *SEED, "--plot", plot)
    assert report["shadow"]["driver"] == "heuristic"
    shadow = report["shadow"]["heuristic-copy"]
    assert shadow["agreement"] == 1.0 and shadow["disagreements"] == 0 and shadow["n_decisions"] == 2 * EPOCHS
    assert np.trace(np.asarray(shadow["confusion"])) == 2 * EPOCHS
    cl = report["closed_loop"]
    assert cl["heuristic"]["final_accuracies"] == cl["heuristic-copy"]["final_accuracies"]  # same seeds: identical runs
    assert cl["heuristic-copy"]["final_accuracy_diffs"] == [0.0, 0.0]
    assert cl["heuristic-copy"]["final_accuracy_diff_mean"] == 0.0
    assert cl["heuristic-copy"]["final_accuracy_diff_ci95"] == [0.0, 0.0]
    assert cl["heuristic"]["expert_agreement"] is None  # the expert itself
    assert cl["heuristic-copy"]["expert_agreement"] == 1.0
    assert cl["heuristic-copy"]["expert_labelled_decisions"] == 2 * EPOCHS
    assert sum(cl["heuristic"]["action_counts"].values()) == 2 * EPOCHS
    assert cl["heuristic"]["seeds_created"] >= 1 and cl["heuristic"]["invalid_actions"] == 0
    lo, hi = cl["heuristic"]["final_accuracy_ci95"]
    assert lo <= cl["heuristic"]["final_accuracy_mean"] <= hi
    assert plot.stat().st_size > 10_000 and report["plot"] == str(plot)


def test_mlp_on_policy_agreement_is_measured_against_real_expert_labels(mlp_checkpoint):
    report = compare_json("heuristic", f"mlp={mlp_checkpoint}", "--episodes", 2, *SEED, "--mode", "closed-loop")
    assert report["shadow"] is None
    mlp = report["closed_loop"]["mlp"]
    assert mlp["checkpoint"] == str(mlp_checkpoint) and mlp["paired_against"] == "heuristic"
    # Re-run the MLP's episodes independently and ask a fresh heuristic at every state it visited.
    reg = build_registry()
    config = EpisodeConfig(epochs=EPOCHS)
    expert, agree, finals = HeuristicTamiyo(), [], []
    for i in range(2):
        ep = run_episode(MLPTamiyo(checkpoint=mlp_checkpoint), config, 5, i, task=reg.tasks["digits"],
                         blueprints=reg.blueprints, policy_name="mlp")
        finals.append(ep.final_accuracy)
        agree += [int(d.action) == int(expert.decide(TrainingSnapshot.from_vector(d.observation)).action)
                  for d in ep.decisions]
    assert mlp["final_accuracies"] == finals
    assert mlp["expert_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert mlp["expert_labelled_decisions"] == 2 * EPOCHS
    assert sum(map(sum, mlp["expert_confusion"])) == 2 * EPOCHS
    heur = report["closed_loop"]["heuristic"]
    assert mlp["final_accuracy_diffs"] == pytest.approx([m - h for m, h in zip(finals, heur["final_accuracies"])])
    # Test accuracy, the honest score, is reported the same way (paired against the first policy).
    assert mlp["test_accuracy_diffs"] == pytest.approx(
        [m - h for m, h in zip(mlp["test_accuracies"], heur["test_accuracies"])])
    assert mlp["test_accuracy_diff_mean"] == pytest.approx(np.mean(mlp["test_accuracy_diffs"]))
    assert len(mlp["test_accuracy_diff_ci95"]) == 2 and len(heur["test_accuracy_ci95"]) == 2
    assert heur["test_accuracy_mean"] == pytest.approx(np.mean(heur["test_accuracies"]))


def test_baselines_compare_like_any_policy():
    report = compare_json("wait", "random", "heuristic", "--episodes", 2, *SEED, "--mode", "closed-loop",
                          "--expert", "none")
    cl = report["closed_loop"]
    assert cl["wait"]["seeds_created"] == 0 and cl["wait"]["action_counts"]["WAIT"] == 2 * EPOCHS
    assert cl["random"]["invalid_actions"] == 0 and cl["random"]["paired_against"] == "wait"
    assert all(k in cl["heuristic"] for k in ("test_accuracies", "test_accuracy_ci95", "test_accuracy_diff_mean",
                                              "test_accuracy_diff_ci95", "test_accuracy_diffs"))


def test_a_learned_policy_by_name_uses_the_default_checkpoint_and_prints_tables(mlp_checkpoint):
    missing = invoke("compare", "heuristic", "mlp", "--episodes", 1, "--epochs", 6)
    one_line_error(missing, "no checkpoint at", "simic train --policy mlp")
    target = default_checkpoint_path("mlp")
    target.parent.mkdir(parents=True)
    shutil.copyfile(mlp_checkpoint, target)
    result = invoke("compare", "heuristic", "mlp", "--episodes", 2, "--epochs", 6)
    assert result.exit_code == 0, result.output
    for fragment in ("Closed loop", "Shadow", "heuristic", "mlp", "expert agreement", "(the expert)"):
        assert fragment in result.stdout, fragment
    # The default checkpoint is the one handed over: its weights travel with the jobs, so a worker
    # that cannot see this machine's SIMIC_HOME still builds the policy.
    specs, _ = resolve_specs(["heuristic", "mlp"], build_registry(), None)
    assert [s.checkpoint for s in specs] == [None, str(target)]


def test_bad_input_is_one_line_and_exit_2(mlp_checkpoint, tmp_path):
    one_line_error(invoke("compare", "heuristic", "nope"), "'nope'", "unknown policy", "available:")
    one_line_error(invoke("compare", "heuristic", "--episodes", 0), "--episodes")
    one_line_error(invoke("compare", "heuristic", "--mode", "sideways"), "--mode")
    one_line_error(invoke("compare", "heuristic", "--mode", "shadow"), "at least two policies")
    one_line_error(invoke("compare", "heuristic", f"gru={mlp_checkpoint}"), "'mlp' checkpoint, not 'gru'")
    one_line_error(invoke("compare", "heuristic", f"mlp={tmp_path / 'none.safetensors'}"),
                   "no checkpoint at", "simic train --policy mlp")
    other = tmp_path / "other-schema.safetensors"
    shutil.copyfile(mlp_checkpoint, other)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(other), framework="pt") as f:
        meta = json.loads(f.metadata()["simic"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["feature_schema"]["version"] = 99
    blob = json.dumps(meta, sort_keys=True)
    save_file(tensors, str(other), metadata={"simic": blob, "sha256": digest(blob, tensors)})
    one_line_error(invoke("compare", "heuristic", f"mlp={other}"), "feature schema")
    one_line_error(invoke("compare", "heuristic", "heuristic"), "named twice")


@pytest.mark.slow
def test_workers_give_the_same_report_as_one_process(mlp_checkpoint):
    args = ("heuristic", f"mlp={mlp_checkpoint}", "--episodes", 2, "--mode", "closed-loop")
    serial = compare_json(*args)
    parallel = compare_json(*args, "--workers", 2)
    assert parallel["closed_loop"] == serial["closed_loop"]
