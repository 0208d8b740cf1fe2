"""`simic improve`: fine-tune a learned Tamiyo on its own live episodes with PPO (see
`esper_cli.learning.ppo`); the best policy so far is an ordinary `mlp` (or `gru`) checkpoint."""

from __future__ import annotations

import json
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
    TimeRemainingColumn,
)
from rich.table import Table

from ...checkpoint import CheckpointError, check_writable_checkpoint, load_checkpoint
from ...contracts import MAX_SEED
from ...data.decisions import DataError
from ...data.store import StoreError, check_store_engine
from ...learning.event_log import EventLog, TensorBoardUnavailable, check_tensorboard
from ...learning.ppo import ImproveConfig, ImproveProgress, ImproveResult, improve
from ...learning.ppo_state import check_state, remove_state, state_path
from ...learning.run_state import RunStateError
from ...paths import default_checkpoint_path
from ...running.runner import DEFAULT_ENVS_PER_WORKER, BackendUnavailable, JobFailed
from ..common import check_plot, choose, episode_config, err, fail, option_error, out, registry, workers_and_backend
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
from ..tables import RateColumn

#: The curves `--tensorboard` writes, one step per update: TensorBoard tag -> the curve row's key.
TENSORBOARD_CURVES = {
    "return/mean": "mean_return", "return/running_mean": "running_mean_return",
    "ppo/entropy": "entropy", "ppo/approx_kl": "approx_kl", "ppo/clip_fraction": "clip_fraction",
    "ppo/value_loss": "value_loss", "seeds/fossilized_per_episode": "seeds_fossilized",
    "seeds/culled_per_episode": "seeds_culled", "accuracy/final": "final_accuracy", "accuracy/test": "test_accuracy",
    "speed/episodes_per_second": "episodes_per_second", "select/score": "select_score",
}


class UpdateLog:
    """`--tensorboard`: each update's row as TensorBoard scalars (step = the update). The event log
    opens at the first update this process runs, so a resumed run replaces whatever a killed one
    logged from there on: every step once."""

    def __init__(self, log_dir: Path | None) -> None:
        self.log_dir = log_dir
        self._log: EventLog | None = None

    def __call__(self, row: dict[str, Any]) -> None:
        if self.log_dir is None:
            return
        if self._log is None:
            self._log = EventLog(self.log_dir, resume_from=int(row["update"]))
        self._log.scalars(int(row["update"]), {tag: row.get(key) for tag, key in TENSORBOARD_CURVES.items()})

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def progress_reporter(progress: Progress, also: Any = None) -> ImproveProgress:
    """One bar per stage (episodes/s, the running mean return), over one bar for the whole run;
    `also` is called with each update's row too."""
    bar = TaskID(-1)
    last = ""

    def stage(description: str, total: int) -> None:
        nonlocal bar
        if bar >= 0:
            progress.remove_task(bar)
        bar = progress.add_task(description, total=total, info=last)

    def update(row: dict[str, Any]) -> None:
        nonlocal last
        last = (f"return {row['mean_return']:+.2f} (running {row['running_mean_return']:+.2f})  "
                f"final acc {row['final_accuracy']:.2f}"
                + (f"  select {row['select_score']:.2f}" if "select_score" in row else ""))
        progress.update(bar, info=last)
        if also is not None:
            also(row)

    return ImproveProgress(on_stage=stage, on_episode=lambda _: progress.advance(bar), on_update=update,
                           log=lambda m: progress.console.print(f"[yellow]Warning:[/] {escape(m)}", highlight=False))


def curve_table(result: ImproveResult) -> Table:
    table = Table(title=f"simic improve: {result.episodes_used} environment episodes "
                        f"({result.bootstrap_episodes} for behaviour cloning); best update {result.best_update}",
                  title_justify="left")
    for col in ("update", "episodes", "mean return", "running mean", "select score", "final acc", "fossilized/ep",
                "entropy", "approx KL"):
        table.add_column(col, justify="right")
    for r in result.history:
        mark = " *" if r["update"] == result.best_update else ""
        select = f"{r['select_score']:.2f}" if "select_score" in r else ""
        table.add_row(f"{r['update']}{mark}", str(r["episodes_used"]), f"{r['mean_return']:+.2f}",
                      f"{r['running_mean_return']:+.2f}", select, f"{r['final_accuracy']:.2f}",
                      f"{r['seeds_fossilized']:.2f}", f"{r['entropy']:.3f}", f"{r['approx_kl']:.4f}")
    return table


def plot_curve(path: Path, result: ImproveResult) -> None:
    """PNG: mean return per update (and its running mean) and final accuracy, against episodes used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["episodes_used"] for r in result.history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(x, [r["mean_return"] for r in result.history], "o-", alpha=0.5, label="per update")
    a.plot(x, [r["running_mean_return"] for r in result.history], "-", lw=2, label="running mean")
    a.set(xlabel="environment episodes used", ylabel="mean return (val accuracy points)", title="Return")
    a.legend()
    b.plot(x, [r["final_accuracy"] for r in result.history], "o-")
    b.set(xlabel="environment episodes used", ylabel="final val accuracy %", title="Final accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The trainable policies PPO fine-tunes (a feed-forward one and a recurrent one).
IMPROVABLE = ("mlp", "gru")


def improve_command(
    policy: str = typer.Option("mlp", "--policy", help="The policy to fine-tune: mlp, or gru (sequence PPO: whole "
                                                       "episodes, the hidden state carried)."),
    start: Optional[Path] = typer.Option(None, "--from", help="A `simic train` checkpoint of --policy to start from. "
                                                              "Default: behaviour-clone --expert first (collecting its episodes)."),
    episodes: int = typer.Option(384, "--episodes", "-n", min=1, help="Live episodes for PPO (the bootstrap's and the "
                                                                       "validation seeds' come on top: 498 in all by default)."),
    episodes_per_update: int = typer.Option(32, "--episodes-per-update", min=1, help="Episodes collected per PPO update (whole groups)."),
    group: int = typer.Option(4, "--group", min=1, help="Draws of the policy on each seed: each episode's advantage is its return "
                                                         "minus its group's mean (1: one draw per seed, a learned baseline)."),
    bootstrap_episodes: int = typer.Option(50, "--bootstrap-episodes", min=2, help="Expert episodes behaviour cloning starts from (without --from)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="The improved checkpoint (default: $SIMIC_HOME/checkpoints/POLICY-improved.safetensors); "
                                                               "the best policy so far is kept there during the run."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed of every episode, and seed of the updates."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Adam learning rate of the policy."),
    entropy: float = typer.Option(0.01, "--entropy", min=0.0, help="Entropy bonus (keeps the policy exploring)."),
    explore: float = typer.Option(0.0, "--explore", min=0.0, max=1.0, help="Probability of a uniform valid action instead of the policy's draw."),
    expert: str = typer.Option("eager", "--expert", help="The policy the bootstrap behaviour-clones (without --from)."),
    select_episodes: int = typer.Option(16, "--select-episodes", min=0,
                                        help="Greedy episodes on the run's own validation seeds per candidate policy; the "
                                             "best candidate is kept (0: keep the best running mean return instead)."),
    select_every: int = typer.Option(4, "--select-every", min=1,
                                     help="A candidate after the first update, the last, and every this many."),
    credit: str = typer.Option("episode", "--credit", help="A draw's credit relative to its group: its episode's return "
                                                           "(episode), or each decision's return from its epoch on (to-go)."),
    epochs: Epochs = 25,
    task: Task = "digits",
    data_dir: DataDir = None,
    device: Device = "cpu",
    workers: Workers = None,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    envs_per_worker: EnvsPerWorker = DEFAULT_ENVS_PER_WORKER,
    threads: Threads = 1,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary (with the learning curve) instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the learning curve to this PNG."),
    tensorboard: TensorBoardDir = None,
    restart: bool = typer.Option(False, "--restart", help="Start over: remove the run state a killed or finished run "
                                                          "left beside --out (the bootstrap episodes are still reused)."),
) -> None:
    """Fine-tune a learned Tamiyo on its own live episodes (PPO) toward higher final accuracy.

    The policy samples its actions; each decision's reward is the validation accuracy it gained,
    so PPO (with a learned baseline) moves it toward decisions that end training higher. Episodes
    run through the episode runner (--workers, --backend ray) and the result reproduces per seed.
    Without --from it starts from behaviour cloning of --expert (eager). The policy kept is the
    best greedy candidate on the run's own validation seeds (--select-episodes), written to --out
    as it is found: Ctrl-C keeps it. The run state
    is saved beside --out after every update: the same command after Ctrl-C or a kill continues
    from the last completed update and ends with the same checkpoint (--restart starts over).
    """
    if policy not in IMPROVABLE:
        fail(f"--policy {policy!r}: simic improve fine-tunes {' and '.join(IMPROVABLE)} policies only")
    check_plot(plot)
    if tensorboard is not None:
        try:
            check_tensorboard()
        except TensorBoardUnavailable as exc:
            fail(escape(str(exc)))
    reg = registry()
    choose("policy", policy, reg.policies, "--policy", reg)
    choose("policy", expert, reg.policies, "--expert", reg)
    n_workers = workers_and_backend(workers, backend, ray_address)
    config = episode_config(reg, task=task, epochs=epochs, device=device, data_dir=data_dir, threads=threads)
    target = out_path or default_checkpoint_path(f"{policy}-improved")
    if start is not None:
        try:
            base = load_checkpoint(start, expect_policy=policy)
        except CheckpointError as exc:
            fail(escape(f"--from: {exc}"))
        if base.meta.get("feature_schema", {}).get("version") is None:
            fail(escape(f"--from {start}: the checkpoint records no feature schema"))
    try:
        cfg = ImproveConfig(episode=config, out=target, start=start, episodes=episodes,
                            episodes_per_update=episodes_per_update, group=group, seed=seed,
                            bootstrap_episodes=bootstrap_episodes, lr=lr, entropy=entropy, explore=explore,
                            workers=n_workers, backend=backend, ray_address=ray_address, threads=threads,
                            envs_per_worker=envs_per_worker, policy=policy, expert=expert,
                            select_episodes=select_episodes, select_every=select_every, credit=credit)
    except DataError as exc:
        fail(option_error(exc))
    try:  # every file this run writes, before any episode runs
        for path in (target, *(() if start else (cfg.bootstrap_checkpoint(),))):
            check_writable_checkpoint(path)
    except CheckpointError as exc:
        fail(escape(f"--out: {exc}"))
    try:  # refused before any work: a damaged state, or one of another configuration
        if restart and remove_state(cfg):
            err.print(f"--restart: removed the run state {state_path(cfg)}.", highlight=False)
        saved = check_state(cfg)
    except RunStateError as exc:
        fail(escape(str(exc)))
    if saved is not None:
        done = int(saved[1]["next_update"])
        err.print(f"Run already complete ({done} updates in {state_path(cfg)}): the checkpoint is written again."
                  if done >= cfg.updates else f"Resuming from update {done} of {cfg.updates} ({state_path(cfg)}).",
                  highlight=False)
    if start is None and cfg.bootstrap_path().exists():
        try:  # its episodes are reused and more may be added: of this engine only
            check_store_engine(cfg.bootstrap_path(), cfg.episode.engine)
        except StoreError as exc:
            fail(escape(str(exc)), code=exc.exit_code)
        err.print(f"Bootstrap episodes already in {cfg.bootstrap_path()} are reused.", highlight=False)

    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err)
    keep_work_on_interrupt()
    curves = UpdateLog(tensorboard)
    try:
        with progress:
            result = improve(cfg, reg, progress_reporter(progress, curves))
    except RunStateError as exc:
        fail(escape(str(exc)))
    except (DataError, CheckpointError, StoreError) as exc:
        fail(option_error(exc))
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        fail(escape(str(exc)), code=1)
    finally:
        curves.close()

    if plot is not None and result.history:
        plot_curve(plot, result)
        err.print(f"Learning curve written to {plot}", highlight=False)
    summary = {"checkpoint": str(target), "best_update": result.best_update, "episodes_used": result.episodes_used,
               "bootstrap_episodes": result.bootstrap_episodes, "updates": len(result.history),
               "resumed_from": result.resumed_from, "interrupted": result.interrupted, "seconds": result.seconds, "config": cfg.to_dict(),
               "history": result.history, "plot": str(plot) if plot is not None and result.history else None}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(curve_table(result))
        out.print(f"Improved checkpoint: {target}" if result.best_update >= 0 or not result.interrupted
                  else "No update finished: no checkpoint written.", highlight=False)
    if result.interrupted:
        err.print(f"Interrupted after {len(result.history)} update(s); the best policy so far is in {target}."
                  if result.best_update >= 0 else "Interrupted before the first update finished.")
        raise typer.Exit(130)
