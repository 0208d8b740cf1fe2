"""`simic train`: behaviour-clone a learned Tamiyo (mlp, gru, or a plugin's) from an episode store,
or, with `--objective outcome`, learn from the stored rewards (advantage-weighted regression).
`--tensorboard DIR` logs one step per epoch."""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ...checkpoint import CheckpointError, check_writable_checkpoint
from ...contracts import ACTION_NAMES
from ...data.decisions import DataError
from ...learning.event_log import EventLog, TensorBoardUnavailable, check_tensorboard
from ...learning.metrics import balanced_accuracy_label
from ...learning.offline import DEFAULT_MAX_WEIGHT, DEFAULT_TEMPERATURE
from ...learning.training import (
    OUTCOME_CLASS_WEIGHTS,
    EpochStats,
    TrainConfig,
    features_read,
    fit,
    prepare_training,
    trainable_policy,
)
from ...paths import default_checkpoint_path, default_store_path
from ...running.threads import use_threads
from ..common import err, fail, option_error, out, registry
from ..interrupt import keep_work_on_interrupt
from ..options import TensorBoardDir


def _hidden(spec: Optional[str], defaults: Mapping[str, Any]) -> Any:
    """`--hidden` as the policy's `hidden` hyper-parameter takes it: a list of sizes, or one size."""
    if spec is None:
        return None
    if "hidden" not in defaults:
        fail("--hidden: this policy's network has no hidden size to set")
    one = not isinstance(defaults["hidden"], (list, tuple))
    try:
        sizes = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes) or (one and len(sizes) != 1):
        fail(escape(f"--hidden {spec!r}: expected {'one size, e.g. 64' if one else 'sizes like 64,32'}"))
    return sizes


def outcome_rows(table: Table, metrics: dict[str, Any]) -> None:
    """What outcome learning made of the rewards: the value fit, the advantages, the weights, and
    the kept epoch's weighted validation loss (its selection score)."""
    awr, val = metrics["outcome"], metrics["val"]
    value, adv, w = awr["value"], awr["advantage"], awr["weights"]
    table.add_row("AWR temperature / max weight", f"{awr['temperature']:g} points / {awr['max_weight']:g}")
    table.add_row("value fit MSE train / val (points²)", f"{value['train_mse']:.3f} / {value['val_mse']:.3f} "
                  f"(predicting the mean: {value['val_mse_of_mean']:.3f})")
    table.add_row("advantage std train / val", f"{adv['train_std']:.3f} / {adv['val_std']:.3f} points")
    table.add_row("weights: effective sample size", f"{w['effective_sample_size']:.0f} of {w['n_train']} "
                  f"({w['capped_fraction']:.1%} capped)")
    table.add_row("val weighted loss (kept epoch)", f"[bold]{metrics['val_weighted_loss']:.4f}[/]")
    table.add_row("val agreement with taken actions", f"{val['accuracy']:.4f}")


def epoch_scalars(s: EpochStats) -> dict[str, Any]:
    """An epoch's TensorBoard curves (step = epoch): losses, validation accuracy and per-class recall."""
    curves: dict[str, Any] = {"train/loss": s.train_loss, "val/loss": s.val_loss, "val/accuracy": s.val_accuracy,
                              "val/balanced_accuracy": s.val_balanced_accuracy}
    curves.update({f"val/recall/{a}": r for a, r in zip(ACTION_NAMES, s.val_recall)})
    return curves


def summary_table(policy: str, metrics: dict[str, Any], store: Path) -> Table:
    """The end-of-training summary: data, weights, the kept epoch and its validation scores."""
    val, trn = metrics["val"], metrics["train"]
    table = Table(title=f"simic train {policy}", show_header=False)
    table.add_row("store", str(store))
    table.add_row("checkpoint", metrics["checkpoint"])
    table.add_row("objective", metrics.get("objective", "bc"))
    table.add_row("episodes train / val", f"{metrics['n_train_episodes']} / {metrics['n_val_episodes']}")
    table.add_row("decisions train / val", f"{trn['n_decisions']} / {val['n_decisions']}")
    table.add_row("class weights", "  ".join(f"{a} {w:.3g}" for a, w in zip(ACTION_NAMES, metrics["class_weights"])))
    if metrics.get("input_feature_norms"):
        read = features_read(metrics["input_feature_norms"])
        table.add_row(f"features read (penalty {metrics['feature_penalty']:g})",
                      f"{len(read)} of {len(metrics['input_feature_norms'])}: {', '.join(read)}")
    stopped = " (interrupted)" if metrics.get("interrupted") else ""
    table.add_row("best epoch / run", f"{metrics['best_epoch']} / {metrics['epochs_run']}{stopped}")
    if "outcome" in metrics:
        outcome_rows(table, metrics)
        table.add_row("time", f"{metrics['seconds']:.1f} s ({metrics['decisions_per_second']:,.0f} decisions/s)")
        return table
    table.add_row(f"train {balanced_accuracy_label(trn, 'training')}", f"{trn['balanced_accuracy']:.4f}")
    table.add_row("val accuracy", f"{val['accuracy']:.4f}")
    table.add_row(f"val {balanced_accuracy_label(val, 'validation')}", f"[bold]{val['balanced_accuracy']:.4f}[/]")
    recalls = "  ".join(f"{a} {c['recall']:.3f}" if c["support"] else f"{a} -"
                        for a, c in val["per_class"].items())
    table.add_row("val recall per class", recalls)
    table.add_row("time", f"{metrics['seconds']:.1f} s ({metrics['decisions_per_second']:,.0f} decisions/s)")
    return table


def train(
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store to learn from (default: $SIMIC_HOME/episodes.h5)."),
    policy: str = typer.Option("mlp", "--policy", help="Trainable policy: mlp, gru, or a plugin's (`simic plugins` marks them)."),
    class_weights: Optional[str] = typer.Option(
        None, "--class-weights", show_default=False,
        help=f"auto (sklearn 'balanced', finite when a class is absent), none, or W,G,A,C "
             f"[default: auto; {OUTCOME_CLASS_WEIGHTS} with --objective outcome]."),
    epochs: int = typer.Option(1000, "--epochs", min=1, help="Training epochs; the epoch with the lowest validation loss is kept."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the episode split, initial weights and batch order."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Fraction of episodes held out for validation."),
    out_path: Optional[Path] = typer.Option(None, "--out",
                                            help="Checkpoint file (default: $SIMIC_HOME/checkpoints/POLICY.safetensors); "
                                                 "an existing file is only replaced if it is a Simic checkpoint."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="Hidden sizes: 64,32 (mlp, default) or one size for gru (default 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3 for mlp, 3e-3 for gru)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Mini-batch: decisions for mlp (default 32), episodes for gru (default 1)."),
    patience: Optional[int] = typer.Option(
        None, "--patience", min=1, show_default=False,
        help="Stop early after this many epochs without a lower validation loss [default: run every epoch]."),
    feature_penalty: Optional[float] = typer.Option(
        None, "--feature-penalty", show_default=False,
        help="Group lasso on the input layer's per-feature weights: pushes the policy to read only the "
             "observation features its labels depend on, so it stays right on states unlike its training "
             "episodes (0 = off) [default: 0.01 for mlp; 0 for a policy that names no input weight]."),
    allow_missing_classes: bool = typer.Option(False, "--allow-missing-classes",
                                               help="Train even if the store has no example of some action."),
    objective: str = typer.Option(
        "bc", "--objective",
        help="bc: imitate the stored actions (expert labels where recorded). outcome: learn from the stored "
             "rewards by advantage-weighted regression (needs a store collected with --explore; mlp or a "
             "plugin's non-sequence policy)."),
    temperature: float = typer.Option(
        DEFAULT_TEMPERATURE, "--temperature",
        help="outcome: AWR temperature in accuracy points; a decision's weight is exp(advantage / T), so "
             "lower = greedier, higher = closer to imitation."),
    max_weight: float = typer.Option(
        DEFAULT_MAX_WEIGHT, "--max-weight",
        help="outcome: cap on a decision's weight exp(advantage / T), so a few lucky episodes cannot dominate."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch CPU threads (1 is fastest for these small networks)."),
    tensorboard: TensorBoardDir = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary table."),
) -> None:
    """Train a learned Tamiyo to imitate the decisions in an episode store (behaviour cloning).

    Episodes are split into training and validation by a seeded shuffle (never one episode on both
    sides); features are normalised with statistics of the training episodes; the loss is
    class-weighted cross-entropy (WAIT dominates), plus a group-lasso penalty on the input layer
    (--feature-penalty). The epoch with the lowest class-weighted validation loss is kept and
    saved with its metadata as a safetensors checkpoint.

    With --objective outcome (advantage-weighted regression, Peng et al. 2019) the policy learns
    the actions actually taken, each weighted by exp(advantage / T): advantage = the accuracy the
    episode went on to gain from that decision minus what a value network fitted on the training
    episodes expects from that state. The epoch with the lowest weighted validation loss is kept;
    the checkpoint never picks an action that is invalid in the state.
    """
    if tensorboard is not None:
        try:
            check_tensorboard()
        except TensorBoardUnavailable as exc:
            fail(escape(str(exc)))
    reg = registry()
    try:
        trainable = trainable_policy(policy, reg)
    except DataError as exc:
        fail(escape(f"--policy: {exc}"))
    use_threads(threads)
    store_path = store or default_store_path()
    target = out_path or default_checkpoint_path(policy)
    try:  # before loading anything: a store, a text file or a device is never overwritten
        check_writable_checkpoint(target)
    except CheckpointError as exc:
        fail(escape(f"--out: {exc}"))

    progress = Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=err,
    )

    events: EventLog | None = None

    def on_epoch(s: EpochStats) -> None:
        if events is not None:
            events.scalars(s.epoch, epoch_scalars(s))
        progress.update(job, completed=s.epoch, stats=(
            f"loss {s.train_loss:.4f}  val loss {s.val_loss:.4f}  val bal-acc {s.val_balanced_accuracy:.4f}  "
            f"best {s.best_val_loss:.4f}@{s.best_epoch} (bal-acc {s.best_balanced_accuracy:.4f})" if objective == "bc" else
            f"loss {s.train_loss:.4f}  val weighted loss {s.val_loss:.4f}  best {s.best_val_loss:.4f}@{s.best_epoch}"))

    keep_work_on_interrupt()
    try:  # every input check happens here, before the progress bar appears
        config = TrainConfig(
            policy, epochs=epochs, seed=seed, val_fraction=val_fraction, class_weights=class_weights,
            hidden=_hidden(hidden, trainable.defaults), lr=lr, batch_size=batch_size, patience=patience,
            allow_missing_classes=allow_missing_classes, objective=objective, temperature=temperature,
            max_weight=max_weight, feature_penalty=feature_penalty)
        prep = prepare_training(
            store_path, config, out=target, registry=reg,
            log=lambda msg: err.print(f"[yellow]Warning:[/] {msg}", highlight=False, soft_wrap=True))
        err.print(f"{prep.train.n_episodes} training / {prep.val.n_episodes} validation episodes "
                  f"({len(prep.train.labels)} / {len(prep.val.labels)} decisions) from {store_path}", highlight=False)
        with progress, ExitStack() as stack:
            if tensorboard is not None:  # a new run: its curves replace any earlier run's in DIR
                events = stack.enter_context(EventLog(tensorboard, resume_from=0))
            job = progress.add_task(f"train {policy}", total=epochs, stats="")
            path, metrics = fit(prep, on_epoch)
            progress.update(job, total=metrics["epochs_run"], completed=metrics["epochs_run"])
    except (DataError, CheckpointError) as exc:
        fail(option_error(exc))
    except KeyboardInterrupt:
        err.print("Interrupted before the first epoch finished; no checkpoint written.")
        raise typer.Exit(130) from None

    if metrics["epochs_run"] < epochs and not metrics["interrupted"]:
        err.print(f"Early stop: no lower validation loss for {patience} epochs; kept epoch {metrics['best_epoch']}.")
    if as_json:
        out.print_json(json.dumps({"policy": policy, "store": str(store_path), **metrics}))
    else:
        out.print(summary_table(policy, metrics, store_path))
    if metrics["interrupted"]:
        err.print(f"Interrupted: the best epoch so far was saved to {path}.")
        raise typer.Exit(130) from None
