"""`simic dagger`: DAgger (Ross et al., 2011) for a learned Tamiyo: collect, train, compare, repeat.

Behaviour cloning learns from the expert's own trajectories, so once the learner acts it drifts
into states the expert never visited. DAgger lets the learner act (mixed with the expert by
`beta`) and stores the expert's action at every visited state as the label; training on the
aggregated store teaches the learner what to do where it actually goes.

Round 0 trains on the store as it is (collecting expert episodes first if it is empty); each
round r >= 1 collects `--episodes-per-round` episodes driven by the round's learner mixed with
the expert (beta_r = beta * decay^(r-1)), retrains on the whole store, and compares learner and
expert closed loop on held-out paired seeds (`--eval-seed`): on-policy agreement and the paired
accuracy difference per round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..checkpoint import CheckpointError, check_writable_checkpoint
from ..comparison import PolicyRuns, PolicySpec, closed_loop_summary
from ..contracts import MAX_SEED, EpisodeConfig, episode_rng_seed
from ..interrupt import keep_work_on_interrupt
from ..learning import ARCHITECTURES, DataError, train_policy
from ..paths import default_checkpoint_path, default_store_path
from ..plugins import Registry
from ..runner import EpisodeJob, JobFailed, make_runner
from ..store import EpisodeReader, EpisodeWriter, StoreError
from .common import choose, episode_config, err, fail, out, registry, workers_and_backend
from .compare import CompareError, pick_seed, resolve_specs, run_comparison


def store_episodes(path: Path) -> tuple[int, int]:
    """(episodes, decisions) committed in a store; (0, 0) when it does not exist yet."""
    if not path.exists():
        return 0, 0
    with EpisodeReader(path) as reader:
        return reader.n_episodes, reader.n_decisions


def store_rng_seeds(path: Path, task: str) -> set[int]:
    """RNG seeds of the `task` episodes committed in a store (empty when it does not exist yet)."""
    if not path.exists():
        return set()
    with EpisodeReader(path) as reader:
        metas = (reader.episode_meta(i) for i in range(reader.n_episodes))
        return {int(m["rng_seed"]) for m in metas if m["config"]["task"] == task}


def collect_into(store: Path, reg: Registry, config: EpisodeConfig, *, policy: str, options: dict[str, Any],
                 version: str, expert: str | None, seed: int, episodes: int, workers: int | None,
                 threads: int, progress: Progress, description: str) -> tuple[int, int]:
    """Run episodes 0..N-1 of `seed` (those not in the store yet) and commit them; (added, present)."""
    with EpisodeWriter(store) as writer:
        todo = writer.missing(config.key(policy), seed, episodes)
        jobs = (EpisodeJob(policy=policy, config=config, seed=seed, index=i, policy_options=options,
                           policy_version=version, threads=threads, expert=expert) for i in todo)
        bar = progress.add_task(description, total=len(todo), info="")
        if todo:
            with make_runner("local", workers, registry=reg) as runner:
                for episode in runner.run(jobs):
                    writer.append(episode)
                    progress.advance(bar)
                if runner.lost:
                    raise JobFailed(runner.lost[0].job, f"{len(runner.lost)} episode(s) lost: worker died",
                                    policy_error=False)
    return len(todo), episodes - len(todo)


def round_checkpoint(final: Path, r: int) -> Path:
    """Where round `r` keeps its checkpoint: next to the final one."""
    return final.with_name(f"{final.stem}.dagger-r{r}{final.suffix}")


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
    out_path: Optional[Path] = typer.Option(None, "--out", help="Final checkpoint (default: $SIMIC_HOME/checkpoints/<policy>.safetensors); "
                                                               "each round's is kept next to it."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed of the bootstrap episodes; round r collects with seed + r."),
    eval_seed: Optional[int] = typer.Option(None, "--eval-seed", min=0, max=MAX_SEED,
                                            help="Run seed of the comparison episodes. Default: the smallest from 1000 "
                                                 "none of whose episodes the store holds or a round will collect."),
    compare_episodes: int = typer.Option(5, "--compare-episodes", min=1, help="Paired closed-loop episodes per comparison."),
    epochs: int = typer.Option(25, "--epochs", min=1, help="Training epochs (= decisions) per episode."),
    task: str = typer.Option("digits", "--task", help="Training task."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding cifar-10-batches-py (for --task cifar10)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the episodes."),
    train_epochs: int = typer.Option(1000, "--train-epochs", min=1, help="Maximum training epochs per round (early stopping keeps the best)."),
    train_seed: int = typer.Option(0, "--train-seed", min=0, help="Seed of the split, initial weights and batch order."),
    allow_missing_classes: bool = typer.Option(False, "--allow-missing-classes", help="Train even if some action never occurs."),
    workers: Optional[str] = typer.Option(None, "--workers", "-w", help="Episodes run in parallel: a number or 'auto'."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch CPU threads per episode."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (one entry per round)."),
) -> None:
    """Run DAgger rounds: the learner acts, the expert labels, retrain, compare closed loop.

    Each round the learner (mixed with the expert by beta) drives new episodes while the expert's
    action at every state is stored as the label; the learner is retrained on the aggregated
    store and compared closed loop on held-out seeds.
    """
    if policy not in ARCHITECTURES:
        fail(f"--policy {policy!r}: not a learned policy type (trainable: {', '.join(ARCHITECTURES)})")
    if seed + rounds > MAX_SEED:  # round r collects with seed + r: the last must still fit the store
        fail(f"--seed {seed}: round {rounds} would collect with seed {seed + rounds}, over the largest run seed {MAX_SEED}")
    reg = registry()
    choose("policy", policy, reg.policies, "--policy")
    choose("policy", expert, reg.policies, "--expert")
    n_workers = workers_and_backend(workers)
    config = episode_config(reg, task=task, epochs=epochs, device=device, data_dir=data_dir, threads=threads)
    store_path = store or default_store_path()
    final_ckpt = out_path or default_checkpoint_path(policy)
    try:  # the final checkpoint and every round's, before collecting or training anything
        for path in [final_ckpt, *(round_checkpoint(final_ckpt, r) for r in range(rounds + 1))]:
            check_writable_checkpoint(path)
    except CheckpointError as exc:
        fail(escape(f"--out: {exc}"))
    try:
        _, expert_versions = resolve_specs([expert], reg, None)
        n_eps, _ = store_episodes(store_path)
        # Every round trains on the whole store, so the comparison must stay off every episode in
        # it, and off those the rounds are about to collect, or it measures training data.
        trained = store_rng_seeds(store_path, config.task)
    except CompareError as exc:
        fail(escape(str(exc)))
    except StoreError as exc:
        fail(str(exc))
    planned = [(seed, bootstrap_episodes)] if n_eps == 0 else []
    planned += [(seed + r, episodes_per_round) for r in range(1, rounds + 1)]
    trained |= {episode_rng_seed(s, i) for s, n in planned for i in range(n)}
    eval_seed, _, notice = pick_seed(eval_seed, trained, compare_episodes, start=1000, option="--eval-seed",
                                     what="the DAgger store holds or a round will collect")
    if notice is not None:
        err.print(notice, markup=False, highlight=False, soft_wrap=True)

    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err)
    results: list[dict[str, Any]] = []
    expert_spec = PolicySpec(expert, label=expert)
    expert_runs: PolicyRuns | None = None
    ckpt = final_ckpt  # each round trains its own checkpoint; round r >= 1 collects with round r-1's
    keep_work_on_interrupt()
    try:
        with progress:
            if n_eps == 0:
                collect_into(store_path, reg, config, policy=expert, options={}, version=expert_versions[expert],
                             expert=None, seed=seed, episodes=bootstrap_episodes, workers=n_workers,
                             threads=threads, progress=progress, description=f"round 0: collect {expert}")
            for r in range(rounds + 1):
                b = None if r == 0 else beta * beta_decay ** (r - 1)
                if r > 0:
                    learner = PolicySpec(policy, str(ckpt), label=policy)
                    _, versions = resolve_specs([f"{policy}={ckpt}"], reg, None)
                    dcfg = EpisodeConfig(**{**config.__dict__, "expert": expert, "beta": float(b)})
                    collect_into(store_path, reg, dcfg, policy=policy, options=learner.options,
                                 version=versions[policy], expert=expert, seed=seed + r,
                                 episodes=episodes_per_round, workers=n_workers, threads=threads,
                                 progress=progress, description=f"round {r}: collect {policy}+{expert} beta {b:.3g}")
                ckpt = round_checkpoint(final_ckpt, r)
                bar = progress.add_task(f"round {r}: train {policy}", total=train_epochs, info="")
                ckpt, metrics = train_policy(
                    store_path, policy, out=ckpt, epochs=train_epochs, seed=train_seed,
                    allow_missing_classes=allow_missing_classes,
                    on_epoch=lambda s, bar=bar: progress.update(bar, completed=s.epoch),
                    log=lambda m: progress.console.print(f"[yellow]Warning:[/] {escape(m)}", highlight=False))
                progress.update(bar, total=metrics["epochs_run"], completed=metrics["epochs_run"])
                learner = PolicySpec(policy, str(ckpt), label=policy)
                specs = [learner] if expert_runs is not None else [expert_spec, learner]
                _, versions = resolve_specs([f"{policy}={ckpt}"], reg, None)
                versions = {**expert_versions, **versions}
                cbar = progress.add_task(f"round {r}: compare {expert} vs {policy}",
                                         total=compare_episodes * len(specs), info="")
                runs, _ = run_comparison(specs, versions, reg, config, episodes=compare_episodes, seed=eval_seed,
                                         mode="closed-loop", expert=expert, threads=threads, workers=n_workers,
                                         on_episode=lambda label, e, cbar=cbar: progress.advance(cbar))
                if expert_runs is None:
                    expert_runs = runs[expert]
                summary = closed_loop_summary({expert: expert_runs, policy: runs[policy]}, expert)[policy]
                n_eps, n_dec = store_episodes(store_path)
                results.append({
                    "round": r, "beta": b, "store_episodes": n_eps, "store_decisions": n_dec,
                    "checkpoint": str(ckpt), "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
                    "val_classes_without_support": metrics["val"]["classes_without_support"],
                    "on_policy_agreement": summary["expert_agreement"],
                    "expert_labelled_decisions": summary["expert_labelled_decisions"],
                    "final_accuracy_diff_mean": summary["final_accuracy_diff_mean"],
                    "final_accuracy_diff_ci95": summary["final_accuracy_diff_ci95"],
                    "learner_final_accuracy_mean": summary["final_accuracy_mean"],
                    "expert_final_accuracy_mean": closed_loop_summary({expert: expert_runs}, expert)[expert][
                        "final_accuracy_mean"],
                    "invalid_actions": summary["invalid_actions"],
                })
                progress.update(cbar, info=f"agreement {100 * (summary['expert_agreement'] or 0):.2f}%  "
                                           f"Δ {summary['final_accuracy_diff_mean']:+.2f}")
    except (DataError, CheckpointError, StoreError, CompareError) as exc:
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
