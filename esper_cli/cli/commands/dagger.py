"""`simic dagger`: DAgger (Ross et al., 2011) for a learned Tamiyo: collect, train, compare, repeat.

The learner acts (mixed with the expert by beta), the expert labels every visited state, the
learner is retrained on the aggregated store and compared closed loop with the expert on held-out
paired seeds, round after round (see `esper_cli.learning.dagger_loop`). This command checks the options, draws
the progress and prints one row (or JSON entry) per round.

The run state beside `--out` (`<out stem>.dagger-run.safetensors`) lets the same command after
Ctrl-C or SIGKILL continue from its next round; `--tensorboard DIR` logs one step per round.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
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
from ...learning.dagger_state import DaggerResume, load_dagger_state, run_state_path
from ...learning.event_log import EventLog, TensorBoardUnavailable, check_tensorboard
from ...learning.run_state import RunStateError
from ...paths import default_checkpoint_path, default_store_path
from ...plugins import Registry
from ...running.runner import DEFAULT_ENVS_PER_WORKER, BackendUnavailable, JobFailed
from ..common import choose, episode_config, err, fail, out, registry, workers_and_backend
from ..interrupt import keep_work_on_interrupt
from ..options import (
    Backend,
    DataDir,
    Device,
    EnvsPerWorker,
    Epochs,
    RayAddress,
    Task,
    TensorBoardDir,
    Threads,
    Workers,
)


def round_scalars(result: dict[str, Any]) -> dict[str, Any]:
    """A round's TensorBoard curves (step = round): on-policy agreement and closed-loop accuracy."""
    return {"dagger/on_policy_agreement": result["on_policy_agreement"],
            "dagger/learner_final_accuracy": result["learner_final_accuracy_mean"],
            "dagger/expert_final_accuracy": result["expert_final_accuracy_mean"],
            "dagger/final_accuracy_diff": result["final_accuracy_diff_mean"],
            "dagger/val_balanced_accuracy": result["val_balanced_accuracy"],
            "dagger/store_episodes": result["store_episodes"]}


def progress_bars(progress: Progress, results: list[dict[str, Any]], events: EventLog | None = None) -> DaggerProgress:
    """A bar per stage of every round; `results` collects each finished round, `events` logs it."""
    bar = TaskID(-1)  # the stage under way

    def stage(description: str, total: int) -> None:
        nonlocal bar
        bar = progress.add_task(description, total=total, info="")

    def round_done(result: dict[str, Any]) -> None:
        results.append(result)
        if events is not None:
            events.scalars(result["round"], round_scalars(result))
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
    envs_per_worker: EnvsPerWorker = DEFAULT_ENVS_PER_WORKER,
    threads: Threads = 1,
    tensorboard: TensorBoardDir = None,
    restart: bool = typer.Option(False, "--restart", help="Start over: forget the run state saved beside --out "
                                                          "(the store's episodes are kept and reused)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (one entry per round)."),
) -> None:
    """Run DAgger rounds: the learner acts, the expert labels, retrain, compare closed loop.

    Each round the learner (mixed with the expert by beta) drives new episodes while the expert's
    action at every state is stored as the label; the learner is retrained on the aggregated
    store and compared closed loop on held-out seeds. The same command after Ctrl-C or a kill
    continues from the next round (the run state is kept beside --out); --restart starts over.
    """
    if tensorboard is not None:
        try:
            check_tensorboard()
        except TensorBoardUnavailable as exc:
            fail(escape(str(exc)))
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
        bootstrap_episodes=bootstrap_episodes, seed=seed, eval_seed=eval_seed, compare_episodes=compare_episodes,
        train_epochs=train_epochs, train_seed=train_seed, allow_missing_classes=allow_missing_classes,
        workers=n_workers, backend=backend, ray_address=ray_address, threads=threads, envs_per_worker=envs_per_worker)
    state_path = run_state_path(final_ckpt)
    plan, resume = resume_or_start(plan, reg, state_path, restart=restart)

    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err)
    results: list[dict[str, Any]] = list(resume.results) if resume is not None else []
    keep_work_on_interrupt()
    try:
        with progress, ExitStack() as stack:
            events = None if tensorboard is None else stack.enter_context(
                EventLog(tensorboard, resume_from=resume.next_round if resume is not None else 0))
            results = run_dagger(plan, reg, progress_bars(progress, results, events), state=state_path, resume=resume)
    except (DataError, CheckpointError, StoreError, CompareError) as exc:
        fail(escape(str(exc)))
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        fail(escape(str(exc)), code=1)
    except KeyboardInterrupt:
        err.print(f"Interrupted after {len(results)} completed round(s); collected episodes are kept in {store_path}; "
                  f"the same command continues from round {len(results)}.")
        raise typer.Exit(130) from None

    try:  # checked again: the file may have changed during the rounds
        real = check_writable_checkpoint(final_ckpt)
        real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results[-1]["checkpoint"], real)
    except (CheckpointError, OSError) as exc:
        fail(escape(f"--out: {exc}"))
    report = {"policy": policy, "expert": expert, "store": str(store_path), "checkpoint": str(final_ckpt),
              "eval_seed": plan.eval_seed, "compare_episodes": compare_episodes, "resumed": resume is not None,
              "resumed_from_round": None if resume is None else resume.next_round, "run_state": str(state_path),
              "rounds": results}
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(round_table(results, policy, expert))
        out.print(f"Final checkpoint: {final_ckpt}", highlight=False)


def resume_or_start(plan: DaggerConfig, reg: Registry, state_path: Path, *,
                    restart: bool) -> tuple[DaggerConfig, DaggerResume | None]:
    """The plan with its eval seed, and the saved run to continue (None: a fresh start). A saved
    state of another configuration is refused in one line; `restart` forgets it first."""
    if restart:
        state_path.unlink(missing_ok=True)  # only the state: round checkpoints are overwritten, episodes reused
    try:
        resolve_specs([plan.expert], reg, None)  # the expert must build before anything runs
        loaded = load_dagger_state(state_path, plan)
        if loaded is not None:
            plan, resume = loaded
            err.print(f"Resuming from round {resume.next_round} ({resume.next_round} completed round(s) in "
                      f"{state_path}; --restart starts over)", markup=False, highlight=False, soft_wrap=True)
            return plan, resume
        avoided = avoided_rng_seeds(plan)
    except CompareError as exc:
        fail(escape(str(exc)))
    except RunStateError as exc:
        fail(escape(str(exc)))
    except StoreError as exc:
        fail(str(exc))
    seed, _, notice = pick_seed(plan.eval_seed, avoided, plan.compare_episodes, start=EVAL_SEED_START,
                                option="--eval-seed", what="the DAgger store holds or a round will collect")
    if notice is not None:
        err.print(notice, markup=False, highlight=False, soft_wrap=True)
    return replace(plan, eval_seed=seed), None
