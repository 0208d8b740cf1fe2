"""`simic dagger`: DAgger (Ross et al., 2011) for a learned Tamiyo: collect, train, compare, repeat.

The learner acts (mixed with the expert by beta), the expert labels every visited state, the
learner is retrained on the aggregated store and compared closed loop with the expert on held-out
paired seeds, round after round (see `esper_cli.learning.dagger_loop`). This command checks the options, draws
the progress and prints one row (or JSON entry) per round.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ...checkpoint import CheckpointError, check_writable_checkpoint
from ...contracts import MAX_SEED
from ...data.decisions import DataError
from ...data.store import StoreError
from ...evaluation.comparison import CompareError, pick_seed, resolve_specs
from ...learning.dagger_loop import (
    EVAL_SEED_START,
    DaggerConfig,
    DaggerProgress,
    avoided_rng_seeds,
    round_checkpoint,
    run_dagger,
)
from ...paths import default_checkpoint_path, default_store_path
from ...running.runner import BackendUnavailable, JobFailed
from ..common import choose, episode_config, err, fail, out, registry, workers_and_backend
from ..interrupt import keep_work_on_interrupt
from ..options import Backend, DataDir, Device, Epochs, RayAddress, Task, Threads, Workers


def progress_bars(progress: Progress, results: list[dict[str, Any]]) -> DaggerProgress:
    """A bar per stage of every round; `results` collects each finished round."""
    bar = TaskID(-1)  # the stage under way

    def stage(description: str, total: int) -> None:
        nonlocal bar
        bar = progress.add_task(description, total=total, info="")

    def round_done(result: dict[str, Any]) -> None:
        results.append(result)
        progress.update(bar, info=f"agreement {100 * (result['on_policy_agreement'] or 0):.2f}%  "
                                  f"Δ {result['final_accuracy_diff_mean']:+.2f}")

    return DaggerProgress(
        on_stage=stage,
        on_episode=lambda: progress.advance(bar),
        on_train_epoch=lambda stats: progress.update(bar, completed=stats.epoch),
        on_trained=lambda epochs_run: progress.update(bar, total=epochs_run, completed=epochs_run),
        on_round=round_done,
        log=lambda m: progress.console.print(f"[yellow]Warning:[/] {escape(m)}", highlight=False))


def round_table(rounds: list[dict[str, Any]], policy: str, expert: str) -> Table:
    table = Table(title=f"simic dagger: {policy} learning from {expert} (episodes in the store; on-policy agreement "
                        f"with {expert}; final accuracy difference {policy} - {expert}, paired)", title_justify="left")
    for col in ("round", "beta", "episodes", "val bal-acc", "agreement", "Δ final", "Δ 95% CI", f"{policy} final"):
        table.add_column(col, justify="right")
    for r in rounds:
        ci = r["final_accuracy_diff_ci95"]
        table.add_row(str(r["round"]), "-" if r["beta"] is None else f"{r['beta']:.3g}", str(r["store_episodes"]),
                      f"{r['val_balanced_accuracy']:.4f}" + "".join(f" (no {c})" for c in r["val_classes_without_support"]),
                      "-" if r["on_policy_agreement"] is None else f"{100 * r['on_policy_agreement']:.2f}%",
                      f"{r['final_accuracy_diff_mean']:+.2f}", "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                      f"{r['learner_final_accuracy_mean']:.2f}")
    return table


def dagger(
    rounds: int = typer.Option(3, "--rounds", "-k", min=0, help="DAgger rounds after round 0 (each: collect, train, compare)."),
    policy: str = typer.Option("mlp", "--policy", help="Learned policy type to train: mlp | gru."),
    expert: str = typer.Option("heuristic", "--expert", help="The expert whose actions are the labels."),
    beta: float = typer.Option(0.5, "--beta", min=0.0, max=1.0, help="Round 1's probability that the expert's action is applied."),
    beta_decay: float = typer.Option(0.5, "--beta-decay", min=0.0, max=1.0, help="beta of round r = beta * decay^(r-1)."),
    episodes_per_round: int = typer.Option(10, "--episodes-per-round", min=1, help="Episodes collected per round."),
    bootstrap_episodes: int = typer.Option(50, "--bootstrap-episodes", min=2, help="Expert episodes collected first if the store is empty."),
    store: Optional[Path] = typer.Option(None, "--store", help="The aggregated episode store (default: $SIMIC_HOME/episodes.h5)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Final checkpoint (default: $SIMIC_HOME/checkpoints/POLICY.safetensors); "
                                                               "each round's is kept next to it."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed of the bootstrap episodes; round r collects with seed + r."),
    eval_seed: Optional[int] = typer.Option(None, "--eval-seed", min=0, max=MAX_SEED,
                                            help="Run seed of the comparison episodes. Default: the smallest from 1000 "
                                                 "none of whose episodes the store holds or a round will collect."),
    compare_episodes: int = typer.Option(5, "--compare-episodes", min=1, help="Paired closed-loop episodes per comparison."),
    epochs: Epochs = 25,
    task: Task = "digits",
    data_dir: DataDir = None,
    device: Device = "cpu",
    train_epochs: int = typer.Option(1000, "--train-epochs", min=1, help="Training epochs per round (the epoch with the lowest validation loss is kept)."),
    train_seed: int = typer.Option(0, "--train-seed", min=0, help="Seed of the split, initial weights and batch order."),
    allow_missing_classes: bool = typer.Option(False, "--allow-missing-classes", help="Train even if some action never occurs."),
    workers: Workers = None,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    threads: Threads = 1,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (one entry per round)."),
) -> None:
    """Run DAgger rounds: the learner acts, the expert labels, retrain, compare closed loop.

    Each round the learner (mixed with the expert by beta) drives new episodes while the expert's
    action at every state is stored as the label; the learner is retrained on the aggregated
    store and compared closed loop on held-out seeds.
    """
    reg = registry()
    trainable = [name for name in sorted(reg.trainables) if name in reg.policies]
    if policy not in trainable:
        fail(f"--policy {policy!r}: not a learned policy type (trainable: {', '.join(trainable) or 'none'})")
    if seed + rounds > MAX_SEED:  # round r collects with seed + r: the last must still fit the store
        fail(f"--seed {seed}: round {rounds} would collect with seed {seed + rounds}, over the largest run seed {MAX_SEED}")
    choose("policy", expert, reg.policies, "--expert", reg)
    n_workers = workers_and_backend(workers, backend, ray_address)
    config = episode_config(reg, task=task, epochs=epochs, device=device, data_dir=data_dir, threads=threads)
    store_path = store or default_store_path()
    final_ckpt = out_path or default_checkpoint_path(policy)
    try:  # the final checkpoint and every round's, before collecting or training anything
        for path in [final_ckpt, *(round_checkpoint(final_ckpt, r) for r in range(rounds + 1))]:
            check_writable_checkpoint(path)
    except CheckpointError as exc:
        fail(escape(f"--out: {exc}"))
    plan = DaggerConfig(
        policy=policy, expert=expert, episode=config, store=store_path, checkpoint=final_ckpt, rounds=rounds,
        beta=beta, beta_decay=beta_decay, episodes_per_round=episodes_per_round,
        bootstrap_episodes=bootstrap_episodes, seed=seed, compare_episodes=compare_episodes,
        train_epochs=train_epochs, train_seed=train_seed, allow_missing_classes=allow_missing_classes,
        workers=n_workers, backend=backend, ray_address=ray_address, threads=threads)
    try:
        resolve_specs([expert], reg, None)  # the expert must build before anything runs
        avoided = avoided_rng_seeds(plan)
    except CompareError as exc:
        fail(escape(str(exc)))
    except StoreError as exc:
        fail(str(exc))
    eval_seed, _, notice = pick_seed(eval_seed, avoided, compare_episodes, start=EVAL_SEED_START,
                                     option="--eval-seed", what="the DAgger store holds or a round will collect")
    if notice is not None:
        err.print(notice, markup=False, highlight=False, soft_wrap=True)

    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err)
    results: list[dict[str, Any]] = []
    keep_work_on_interrupt()
    try:
        with progress:
            run_dagger(replace(plan, eval_seed=eval_seed), reg, progress_bars(progress, results))
    except (DataError, CheckpointError, StoreError, CompareError) as exc:
        fail(escape(str(exc)))
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        fail(escape(str(exc)), code=1)
    except KeyboardInterrupt:
        err.print(f"Interrupted after {len(results)} completed round(s); collected episodes are kept in {store_path}.")
        raise typer.Exit(130) from None

    try:  # checked again: the file may have changed during the rounds
        real = check_writable_checkpoint(final_ckpt)
        real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results[-1]["checkpoint"], real)
    except (CheckpointError, OSError) as exc:
        fail(escape(f"--out: {exc}"))
    report = {"policy": policy, "expert": expert, "store": str(store_path), "checkpoint": str(final_ckpt),
              "eval_seed": eval_seed, "compare_episodes": compare_episodes, "rounds": results}
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(round_table(results, policy, expert))
        out.print(f"Final checkpoint: {final_ckpt}", highlight=False)
