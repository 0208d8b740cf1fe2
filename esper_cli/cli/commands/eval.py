"""`simic eval`: score a policy on stored decisions (held-out episodes by default).

Stored observations are replayed through the policy (a stateful one gets each episode in order
after `reset`) and its actions compared with the stored labels: accuracy, balanced accuracy,
per-class precision/recall/F1 and a confusion matrix (rows actual, columns predicted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from ...checkpoint import CheckpointError, checkpoint_origin, load_checkpoint
from ...data.decisions import DataError, load_decisions, require_schema
from ...data.replay import replay, select_split
from ...learning.metrics import agreement_by_stage, balanced_accuracy_label, classification_metrics, seed_stages
from ...policy import policy_version
from ..common import check_plot, choose, err, fail, option_error, out, registry
from ..tables import confusion_table


def per_class_table(report: dict[str, Any]) -> Table:
    table = Table(title="Per class")
    for col in ("action", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "action" else "right")
    for name, c in report["per_class"].items():
        if c["support"] == 0 and c["precision"] == 0:
            table.add_row(name, "-", "-", "-", "0")
        else:
            table.add_row(name, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"]))
    return table


def stage_table(by_stage: dict[str, dict[str, int]]) -> Table:
    """Agreement with the stored labels per seed stage: where a policy follows the rules, where not."""
    table = Table(title="Agreement by seed stage")
    for col in ("stage", "decisions", "agreement"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, c in by_stage.items():
        table.add_row(stage, str(c["decisions"]), f"{100 * (1 - c['disagreements'] / c['decisions']):.2f}%")
    return table


def write_plot(path: Path, report: dict[str, Any], history: list[dict[str, float]] | None, title: str) -> None:
    """PNG of the confusion matrix (row-normalised colours, counts written) and training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report["confusion_matrix"], dtype=float)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ncols = 2 if history else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(report["labels"])), report["labels"])
    ax.set_yticks(range(len(report["labels"])), report["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title}\n{balanced_accuracy_label(report, 'these episodes')} {report['balanced_accuracy']:.4f}")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * rows[i, j]:.1f}%", ha="center", va="center",
                    color="white" if rows[i, j] > 0.5 else "black", fontsize=9)
    if history:
        ax = axes[0, 1]
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
        ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("weighted cross-entropy")
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["val_balanced_accuracy"] for h in history], color="tab:green", label="val balanced acc")
        ax2.set_ylabel("val balanced accuracy")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
        ax.set_title("training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint written by `simic train`."),
    policy: Optional[str] = typer.Option(None, "--policy",
                                         help="A registered policy by name (learned ones load their default checkpoint). "
                                              "Default: mlp."),
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store to score on (default: $SIMIC_HOME/episodes.h5)."),
    split: str = typer.Option("val", "--split",
                              help="val (episodes not used in training; all of them for a policy without a checkpoint), "
                                   "train, or all."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the confusion matrix and training curves."),
) -> None:
    """Score a Tamiyo policy against the decisions stored in an episode store.

    `simic eval --policy heuristic` on a store of the heuristic's own decisions scores 100%: a
    built-in sanity check of the store and the replay.
    """
    from ...paths import default_store_path

    if split not in ("val", "train", "all"):
        fail(f"--split {split!r}: expected val, train or all")
    check_plot(plot)
    reg = registry()
    options: dict[str, Any] = {}
    if checkpoint is not None:
        try:  # which policy type the checkpoint is for (validated again by the factory)
            kind = load_checkpoint(checkpoint).policy
        except CheckpointError as exc:
            fail(str(exc))
        if policy is not None and policy != kind:
            fail(f"--checkpoint {checkpoint} is a {kind!r} checkpoint but --policy is {policy!r}")
        policy, options = kind, {"checkpoint": checkpoint}
    policy = policy or "mlp"
    choose("policy", policy, reg.policies, "--policy", reg)
    try:
        agent = reg.policies[policy](**options)
    except CheckpointError as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"policy {policy!r} could not be created: {type(exc).__name__}: {exc}")
    # Which episodes the policy learned from comes from the checkpoint this command handed it,
    # never from the policy object.
    try:
        origin = checkpoint_origin(policy, options, agent, trainable=policy in reg.trainables)
    except CheckpointError as exc:
        fail(str(exc))
    if not origin.known and split != "all":
        what = f"checkpoint {origin.path} records no training episodes" if origin.path is not None else \
            "it holds a checkpoint that no --checkpoint named, so its training episodes are unknown"
        fail(escape(f"--split {split}: policy {policy!r} cannot be scored on held-out episodes: {what}; "
                    "name its checkpoint with --checkpoint, or score --split all"))
    store_path = store or default_store_path()

    try:
        data = load_decisions(store_path)
        if origin.meta is not None:  # a learned policy reads the schema it was trained on, nothing else
            require_schema(data, int(origin.meta["feature_schema"]["version"]), f"checkpoint {origin.path}")
        positions, note = select_split(data, split, origin.split, policy)
        part = data.select(positions)
    except DataError as exc:
        fail(option_error(exc))
    try:
        pred = replay(agent, part, tuple(reg.blueprints))
    except Exception as exc:
        fail(f"policy '{policy}' failed while replaying {store_path}: {type(exc).__name__}: {exc}", code=1)
    report = classification_metrics(part.labels, pred)
    version = policy_version(reg, policy, agent)
    result = {
        "policy": policy, "policy_version": version,
        "checkpoint": str(origin.path) if origin.path is not None else None,
        "store": str(store_path), "split": split, "split_note": note,
        "n_episodes": part.n_episodes, **report,
        # Where the policy departs from the labels, by the seed's stage at the decision.
        "by_stage": agreement_by_stage(pred == part.labels, seed_stages(part.observations)),
    }
    if plot is not None:
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            write_plot(plot, report, (origin.meta or {}).get("history"),
                       f"{policy} on {store_path.name} ({split})")
        except OSError as exc:
            fail(f"--plot {plot}: cannot write: {exc.strerror or exc}")
        err.print(f"Wrote {plot}")
    if as_json:
        out.print_json(json.dumps(result))
        return
    err.print(f"Scored on {note}.", highlight=False)
    head = Table(title=f"simic eval {policy} {version}", show_header=False)
    head.add_row("store", str(store_path))
    head.add_row("split", f"{split}: {note}")
    head.add_row("episodes / decisions", f"{part.n_episodes} / {report['n_decisions']}")
    head.add_row("accuracy", f"{report['accuracy']:.4f}")
    head.add_row(balanced_accuracy_label(report, "the scored episodes"), f"[bold]{report['balanced_accuracy']:.4f}[/]")
    out.print(head)
    out.print(per_class_table(report))
    out.print(stage_table(result["by_stage"]))
    out.print(confusion_table(report))
