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

from ...contracts import MAX_SEED, Episode
from ...data.store import EpisodeWriter, StoreError
from ...paths import default_store_path
from ...plugins import Registry
from ...policy import policy_version
from ...running.collection import CollectConfig, collect_episodes
from ...running.runner import DEFAULT_RETRIES, BackendUnavailable, JobFailed, make_runner
from ..common import choose, episode_config, err, fail, out, registry, workers_and_backend
from ..interrupt import keep_work_on_interrupt
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


def collect(
    episodes: int = typer.Option(50, "--episodes", "-n", min=1, max=MAX_SEED, help="Episodes the run should hold (indices 0..N-1)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store (default: $SIMIC_HOME/episodes.h5, SIMIC_HOME=./simic-data)."),
    policy: str = typer.Option("heuristic", "--policy", help="Tamiyo policy that drives the episodes (see `simic plugins`)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed; episode i uses a seed derived from (seed, i)."),
    epochs: int = typer.Option(25, "--epochs", min=1, help="Training epochs (= decisions) per episode."),
    task: str = typer.Option("digits", "--task", help="Training task: digits (bundled) or cifar10 (needs --data-dir)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding cifar-10-batches-py (for --task cifar10)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for training: cpu, cuda, cuda:1, ..."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch CPU threads per episode (1 is fastest for the small default host)."),
    workers: Optional[str] = typer.Option(None, "--workers", "-w", help="Episodes run in parallel: a number or 'auto' (= CPU cores). Default: 1 locally; every CPU of the cluster with --backend ray."),
    backend: str = typer.Option("local", "--backend", help="Where episodes run: local (this machine) or ray (a Ray cluster; needs the ray extra)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one. Needs --backend ray."),
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
    try:
        writer = EpisodeWriter(store_path)
        writer.__enter__()
    except StoreError as exc:  # exit 1 when recovery or creation ran out of disk, 2 for a bad path
        fail(escape(str(exc)), code=exc.exit_code)
    added = 0
    bar = progress_bar()
    shown = ExitStack()  # the bar appears once there are episodes to run, and is gone before any message below

    def started(todo: int, parallel: str | None) -> None:
        if todo < episodes:
            err.print(f"{episodes - todo} of {episodes} episodes already in {store_path}; running the rest.")
        if parallel is not None:
            err.print(f"Running {todo} episodes on {parallel}.", highlight=False)
        if todo:
            shown.enter_context(bar)
            bar.add_task(f"collect {policy}", total=todo, last="")

    def committed(episode: Episode) -> None:
        nonlocal added
        added += 1
        bar.update(bar.task_ids[0], advance=1, last=f"last acc {episode.final_accuracy:.1f}%")

    try:
        if writer.recovered:
            err.print(f"[yellow]Recovered[/] {store_path} after an interrupted write; committed episodes kept.")
        agent = build_or_fail(reg, policy, "policy")
        if expert is not None:
            build_or_fail(reg, expert, "expert")
        version = policy_version(reg, policy, agent)
        plan = CollectConfig(episode=config, policy=policy, seed=seed, episodes=episodes, version=version,
                             expert=expert, threads=threads)
        runner = make_runner(backend, n_workers, ray_address=ray_address, registry=reg, retries=retries,
                             on_event=lambda m: err.print(f"[yellow]Warning:[/] {escape(m)}", highlight=False,
                                                          soft_wrap=True))
        with runner, shown:
            result = collect_episodes(writer, runner, plan, agent=agent, on_start=started, on_episode=committed)
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        if exc.traceback and not exc.policy_error:
            err.print(exc.traceback.rstrip(), style="dim", highlight=False, markup=False)
        fail(f"{escape(str(exc))} ({added} episodes committed before it; the store is intact)", code=1)
    except KeyboardInterrupt:
        writer.close(quiet=True)  # a failure to finish the file must not replace exit 130
        err.print(f"Interrupted: {added} new episodes committed to {store_path}; "
                  "re-run the same command to complete the rest.")
        raise typer.Exit(130) from None
    except StoreError as exc:  # writing failed (disk full): every committed episode stands
        fail(f"{escape(str(exc))} ({added} added by this run)", code=exc.exit_code)
    finally:
        try:
            writer.close()
        except StoreError as exc:  # finishing the file failed; the commits are on disk
            fail(f"{escape(str(exc))} ({added} added by this run)", code=exc.exit_code)

    table = Table(title="simic collect", show_header=False)
    table.add_row("store", str(store_path))
    table.add_row("policy", f"{policy} {version}")
    if expert is not None:
        table.add_row("expert (labels) / beta", f"{expert} / {config.beta:g}")
    if explore > 0:
        table.add_row("exploration (eps)", f"{explore:g}")
    table.add_row("task / epochs / seed", f"{task} / {epochs} / {seed}")
    table.add_row("episodes added", str(result.added))
    table.add_row("episodes already present", str(result.present))
    if result.lost:
        table.add_row("episodes failed", str(len(result.lost)))
    out.print(table)
    if result.lost:
        names = escape(", ".join(f"{x.job.label}: {x.reason}" for x in result.lost))
        fail(f"{len(result.lost)} episode(s) failed because their worker died on every attempt ({names}); "
             f"{result.added} episodes committed, the store is intact; re-run the same command to retry them",
             code=1)
