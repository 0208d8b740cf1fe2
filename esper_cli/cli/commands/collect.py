"""`simic collect`: run episodes driven by a Tamiyo policy and commit each to the episode store."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ...checkpoint import CheckpointError, checkpoint_origin
from ...contracts import MAX_SEED, Episode, EpisodeConfig
from ...data.store import EpisodeWriter, StoreError
from ...paths import default_store_path
from ...plugins import Registry
from ...policy import policy_version
from ...running.collection import CollectConfig, CollectResult, collect_episodes
from ...running.runner import DEFAULT_ENVS_PER_WORKER, DEFAULT_RETRIES, BackendUnavailable, JobFailed, make_runner
from ...running.weights import checkpoint_options
from ..common import choose, episode_config, err, fail, out, registry, workers_and_backend
from ..interrupt import keep_work_on_interrupt
from ..options import Backend, DataDir, Device, EnvsPerWorker, Epochs, RayAddress, Task, Threads, Workers
from ..tables import RateColumn


def progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
        console=err,
    )


def build_or_fail(reg: Registry, name: str, role: str) -> Any:
    """A fresh instance of a registered policy; a one-line error (exit 2) when its factory fails."""
    try:
        return reg.policies[name]()
    except Exception as exc:
        fail(f"{role} {name!r} could not be created: {exc}")


class CollectProgress:
    """The bar of one collection and the count of episodes it committed (for the messages after).

    The bar appears once there are episodes to run, and `shown` closes it before any message
    that follows the run."""

    def __init__(self, policy: str, episodes: int, store_path: Path) -> None:
        self.policy, self.episodes, self.store_path = policy, episodes, store_path
        self.added = 0
        self.bar = progress_bar()
        self.shown = ExitStack()

    def started(self, todo: int, parallel: str | None) -> None:
        if todo < self.episodes:
            err.print(f"{self.episodes - todo} of {self.episodes} episodes already in {self.store_path}; "
                      "running the rest.")
        if parallel is not None:
            err.print(f"Running {todo} episodes on {parallel}.", highlight=False)
        if todo:
            self.shown.enter_context(self.bar)
            self.bar.add_task(f"collect {self.policy}", total=todo, last="")

    def committed(self, episode: Episode) -> None:
        self.added += 1
        self.bar.update(self.bar.task_ids[0], advance=1, last=f"last acc {episode.final_accuracy:.1f}%")


def open_writer(store_path: Path, engine: int | None = None) -> EpisodeWriter:
    """The store's writer; exit 1 when recovery or creation ran out of disk, 2 for a bad path or
    (with `engine`) a store holding the episodes of another engine."""
    try:
        return EpisodeWriter(store_path, engine=engine)
    except StoreError as exc:
        fail(escape(str(exc)), code=exc.exit_code)


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def run_collection(writer: EpisodeWriter, reg: Registry, config: EpisodeConfig, progress: CollectProgress, *,
                   policy: str, expert: str | None, seed: int, episodes: int, threads: int, n_workers: int | None,
                   backend: str, ray_address: str | None, retries: int,
                   envs_per_worker: int = DEFAULT_ENVS_PER_WORKER) -> tuple[CollectResult, str]:
    """Build the policies, then run and commit the missing episodes; (the result, the policy's version)."""
    if writer.recovered:
        err.print(f"[yellow]Recovered[/] {writer.path} after an interrupted write; committed episodes kept.")
    agent = build_or_fail(reg, policy, "policy")
    if expert is not None:
        build_or_fail(reg, expert, "expert")
    version = policy_version(reg, policy, agent)
    try:  # a trainable policy's default checkpoint is read here and travels with the jobs
        origin = checkpoint_origin(policy, {}, agent, trainable=policy in reg.trainables)
        options = checkpoint_options(origin.path, policy)
    except CheckpointError as exc:
        fail(escape(f"--policy {policy}: {exc}"))
    plan = CollectConfig(episode=config, policy=policy, seed=seed, episodes=episodes, version=version,
                         options=options, expert=expert, threads=threads)
    runner = make_runner(backend, n_workers, ray_address=ray_address, registry=reg, retries=retries, on_event=warn,
                         envs_per_worker=envs_per_worker)
    with runner, progress.shown:
        result = collect_episodes(writer, runner, plan, agent=agent, on_start=progress.started,
                                  on_episode=progress.committed)
    return result, version


def summary_table(store_path: Path, config: EpisodeConfig, result: CollectResult, *, policy: str, version: str,
                  seed: int) -> Table:
    table = Table(title="simic collect", show_header=False)
    table.add_row("store", str(store_path))
    table.add_row("policy", f"{policy} {version}")
    if config.expert is not None:
        table.add_row("expert (labels) / beta", f"{config.expert} / {config.beta:g}")
    if config.explore > 0:
        table.add_row("exploration (eps)", f"{config.explore:g}")
    table.add_row("task / epochs / seed", f"{config.task} / {config.epochs} / {seed}")
    table.add_row("episodes added", str(result.added))
    table.add_row("episodes already present", str(result.present))
    if result.lost:
        table.add_row("episodes failed", str(len(result.lost)))
    return table


def collect(
    episodes: int = typer.Option(50, "--episodes", "-n", min=1, max=MAX_SEED, help="Episodes the run should hold (indices 0..N-1)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store (default: $SIMIC_HOME/episodes.h5, SIMIC_HOME=./simic-data)."),
    policy: str = typer.Option("heuristic", "--policy", help="Tamiyo policy that drives the episodes (see `simic plugins`)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed; episode i uses a seed derived from (seed, i)."),
    epochs: Epochs = 25,
    task: Task = "digits",
    data_dir: DataDir = None,
    device: Device = "cpu",
    threads: Threads = 1,
    workers: Workers = None,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    envs_per_worker: EnvsPerWorker = DEFAULT_ENVS_PER_WORKER,
    retries: int = typer.Option(DEFAULT_RETRIES, "--retries", min=0, help="Re-runs of an episode whose worker died (killed, out of memory) before it is reported as failed."),
    expert: Optional[str] = typer.Option(None, "--expert", help="DAgger: a policy asked at every state; its action is stored as the label (the acting policy's action is kept too)."),
    beta: Optional[float] = typer.Option(None, "--beta", min=0.0, max=1.0, help="DAgger: probability that the expert's action is applied instead of the policy's (default 0.5 with --expert)."),
    explore: float = typer.Option(0.0, "--explore", min=0.0, max=1.0, help="Exploration: probability EPS that a uniform valid action replaces the policy's (drawn from the episode's seed); each decision's behaviour probability is stored."),
) -> None:
    """Run morphogenetic training episodes driven by a policy and record every decision.

    Episodes are identified by (config, seed, index): re-running the same command after an
    interruption completes the missing episodes instead of duplicating them. Ctrl-C keeps every
    completed episode and exits 130.

    With --workers N episodes run in parallel worker processes, with --backend ray as Ray tasks
    on a cluster; this process alone writes the store, and every episode is identical to the one
    a single worker would produce.

    DAgger (Ross et al., 2011): with --expert NAME the policy acts (mixed with the expert: each
    decision applies the expert's action with probability --beta, drawn from the episode's seed)
    while the expert's action at every state is stored as the label; `simic train` then learns
    from the expert labels of the aggregated store.

    Exploration data (for off-policy and offline RL): with --explore EPS each decision applies a
    uniform valid action instead of the policy's with probability EPS. Every decision stores the
    probability the behaviour policy gave the action taken (1 without exploration for a
    deterministic policy); EPS is part of the episodes' identity when set.
    """
    reg = registry()
    choose("policy", policy, reg.policies, "--policy", reg)
    if expert is not None:
        choose("policy", expert, reg.policies, "--expert", reg)
    elif beta is not None:
        fail("--beta mixes in an expert's actions: it needs --expert NAME")
    n_workers = workers_and_backend(workers, backend, ray_address)
    config = episode_config(reg, task=task, epochs=epochs, device=device, data_dir=data_dir, threads=threads,
                            expert=expert, beta=(0.5 if beta is None else beta) if expert is not None else 0.0,
                            explore=explore)
    store_path = store or default_store_path()

    keep_work_on_interrupt()
    writer = open_writer(store_path, config.engine)
    progress = CollectProgress(policy, episodes, store_path)
    # Every failure is reported after the writer has closed (quietly, with an error in flight; a
    # failed close on success is a StoreError below), so no message or exit code replaces another.
    try:
        with writer:
            result, version = run_collection(
                writer, reg, config, progress, policy=policy, expert=expert, seed=seed, episodes=episodes,
                threads=threads, n_workers=n_workers, backend=backend, ray_address=ray_address, retries=retries,
                envs_per_worker=envs_per_worker)
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        if exc.traceback and not exc.policy_error:
            err.print(exc.traceback.rstrip(), style="dim", highlight=False, markup=False)
        fail(f"{escape(str(exc))} ({progress.added} episodes committed before it; the store is intact)", code=1)
    except KeyboardInterrupt:
        err.print(f"Interrupted: {progress.added} new episodes committed to {store_path}; "
                  "re-run the same command to complete the rest.")
        raise typer.Exit(130) from None
    except StoreError as exc:  # writing or finishing the file failed (disk full): every committed episode stands
        fail(f"{escape(str(exc))} ({progress.added} added by this run)", code=exc.exit_code)

    out.print(summary_table(store_path, config, result, policy=policy, version=version, seed=seed))
    if result.lost:
        names = escape(", ".join(f"{x.job.label}: {x.reason}" for x in result.lost))
        fail(f"{len(result.lost)} episode(s) failed because their worker died on every attempt ({names}); "
             f"{result.added} episodes committed, the store is intact; re-run the same command to retry them",
             code=1)
