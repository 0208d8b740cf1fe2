"""`simic compare`: run Tamiyo policies live on real training, shadow and closed loop, and report
whether a learned policy can replace the heuristic (see `esper_cli.evaluation.comparison`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Group
from rich.live import Live
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

from ...checkpoint import CheckpointOrigin
from ...contracts import ACTION_NAMES, MAX_SEED, Episode
from ...evaluation.comparison import (
    MODES,
    CompareError,
    ComparisonConfig,
    PolicyRuns,
    PolicySpec,
    build_report,
    pick_seed,
    plot_curves,
    resolve_specs,
    run_comparison,
    trained_rng_seeds,
)
from ...running.runner import DEFAULT_ENVS_PER_WORKER, BackendUnavailable, JobFailed, make_runner
from ..common import check_plot, episode_config, err, fail, out, registry, workers_and_backend
from ..interrupt import keep_work_on_interrupt
from ..options import Backend, DataDir, Device, EnvsPerWorker, Epochs, RayAddress, Task, Threads, Workers
from ..tables import confusion_table


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def live_table(specs: list[PolicySpec], runs: dict[str, PolicyRuns], episodes: int, closed: bool) -> Table:
    table = Table(title="simic compare (live)", title_justify="left")
    for col in ("policy", "episodes", "final acc", f"Δ vs {specs[0].label}", "seeds c/f/x", "expert agree"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    ref = runs[specs[0].label].episodes
    for s in specs if closed else specs[:1]:
        eps = runs[s.label].episodes
        if not eps:
            table.add_row(s.label, f"0/{episodes}", "-", "-", "-", "-")
            continue
        finals = [e.final_accuracy for e in eps.values()]
        diffs = [eps[i].final_accuracy - ref[i].final_accuracy for i in eps if i in ref]
        pairs = [(d.action, d.expert_action) for e in eps.values() for d in e.decisions if d.expert_action >= 0]
        agree = sum(a == y for a, y in pairs) / len(pairs) if pairs else None
        seeds = (sum(e.seeds_created for e in eps.values()), sum(e.seeds_fossilized for e in eps.values()),
                 sum(e.seeds_culled for e in eps.values()))
        table.add_row(s.label, f"{len(eps)}/{episodes}", f"{sum(finals) / len(finals):.2f}",
                      f"{sum(diffs) / len(diffs):+.2f}" if diffs else "-", "/".join(map(str, seeds)), _pct(agree))
    return table


def closed_loop_tables(report: dict[str, Any]) -> list[Table]:
    """Accuracy (paired against the first policy) and behaviour, one row per policy each."""
    cl = report["closed_loop"]
    ref = report["policies"][0]
    acc = Table(title=f"Closed loop: {report['episodes']} paired episodes (seed {report['seed']}), "
                      "accuracy % (mean, 95% t-interval); val is what the controller sees, test the honest score",
                title_justify="left")
    for col in ("policy", "final val", "95% CI", "best val", f"Δ val vs {ref}", "Δ val 95% CI",
                "test", "test 95% CI", f"Δ test vs {ref}", "Δ test 95% CI"):
        acc.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    beh = Table(title="Closed loop: behaviour (totals; seeds created/fossilized/culled; agreement with the "
                      "expert on the states each policy visited)", title_justify="left")
    for col in ("policy", "seeds c/f/x", "actions W/G/A/C", "invalid", "expert agreement"):
        beh.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    for label, r in cl.items():
        ci = _fmt_ci(r["final_accuracy_ci95"]).strip() or "-"
        tci = _fmt_ci(r["test_accuracy_ci95"]).strip() or "-"
        if label == ref:
            diff, dci, tdiff, tdci = "-", "-", "-", "-"
        else:
            diff = f"{r['final_accuracy_diff_mean']:+.2f}"
            dci = _fmt_ci(r["final_accuracy_diff_ci95"]).strip() or "-"
            tdiff = f"{r['test_accuracy_diff_mean']:+.2f}"
            tdci = _fmt_ci(r["test_accuracy_diff_ci95"]).strip() or "-"
        acc.add_row(label, _fmt(r["final_accuracy_mean"]), ci, _fmt(r["best_accuracy_mean"]), diff, dci,
                    _fmt(r["test_accuracy_mean"]), tci, tdiff, tdci)
        agree = "(the expert)" if r["expert_agreement"] is None and report["expert"] == r["policy"] \
            else (f"{_pct(r['expert_agreement'])} of {r['expert_labelled_decisions']}"
                  if r["expert_agreement"] is not None else "-")
        beh.add_row(label, f"{r['seeds_created']}/{r['seeds_fossilized']}/{r['seeds_culled']}",
                    "/".join(str(r["action_counts"][a]) for a in ACTION_NAMES), str(r["invalid_actions"]), agree)
    return [acc, beh]


def shadow_table(report: dict[str, Any]) -> Table:
    sh = report["shadow"]
    table = Table(title=f"Shadow: {sh['driver']} drives {sh['n_episodes']} episodes; the others are asked on "
                        "the same observations", title_justify="left")
    table.add_column("policy", no_wrap=True)
    table.add_column("agreement", justify="right")
    table.add_column("disagreements", justify="right")
    table.add_column("where (seed stage: disagreements/decisions)")
    for label in report["policies"][1:]:
        r = sh[label]
        where = ", ".join(f"{st.lower()} {c['disagreements']}/{c['decisions']}" for st, c in r["by_stage"].items()
                          if c["disagreements"]) or "-"
        table.add_row(label, _pct(r["agreement"]), f"{r['disagreements']}/{r['n_decisions']}", where)
    return table


def compare(
    policies: list[str] = typer.Argument(..., metavar="POLICY...",
                                         help="Policies by plugin name (a learned one uses the checkpoint `simic train "
                                              "--policy NAME` wrote), or NAME=PATH for a specific checkpoint. The "
                                              "first drives in shadow mode and is the reference for paired differences."),
    episodes: int = typer.Option(5, "--episodes", "-n", min=1, max=MAX_SEED, help="Paired episodes per policy (indices 0..N-1)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED,
                                       help="Run seed; episode i of every policy uses the seed derived from (seed, i), "
                                            "as `simic collect --seed` does. Default: the smallest seed none of whose "
                                            "episodes a compared checkpoint was trained or validated on."),
    mode: str = typer.Option("both", "--mode", help="both | shadow | closed-loop."),
    epochs: Epochs = 25,
    task: Task = "digits",
    data_dir: DataDir = None,
    device: Device = "cpu",
    expert: str = typer.Option("heuristic", "--expert",
                               help="Expert asked at every state a non-expert policy visits (on-policy agreement); 'none' to skip."),
    threads: Threads = 1,
    workers: Workers = None,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    envs_per_worker: EnvsPerWorker = DEFAULT_ENVS_PER_WORKER,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy curves per policy (seed stages shaded, actions marked) to this PNG."),
) -> None:
    """Compare Tamiyo policies live on real morphogenetic training runs.

    Shadow: the first policy drives; the others are asked on the same observations (agreement,
    confusion, where they disagree). Closed loop: each policy drives its own episodes from the
    same seeds (paired: same initial weights, same data order); final and best accuracy with 95%
    intervals, paired differences against the first policy, seed counts, action mix, invalid
    actions, and agreement with the expert on the states each policy visited.
    """
    if mode not in MODES:
        fail(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    check_plot(plot)
    if plot is not None and mode == "shadow":
        fail("--plot draws closed-loop curves: use it with --mode both or closed-loop")
    reg = registry()
    n_workers = workers_and_backend(workers, backend, ray_address)
    if mode == "shadow" and len(policies) < 2:
        fail("--mode shadow needs at least two policies: the first drives, the others are asked")
    expert_name = None if expert.lower() == "none" else expert
    try:
        origins: dict[str, CheckpointOrigin] = {}
        specs, versions = resolve_specs(policies, reg, expert_name, origins=origins)
    except CompareError as exc:
        fail(escape(str(exc)))
    auto_seed = seed is None
    config = episode_config(reg, task=task, epochs=epochs, device=device, data_dir=data_dir, threads=threads)
    # Evaluating on the episodes a checkpoint learned from flatters it (it has seen their host
    # init and data order): by default run seeds none of them came from.
    splits = {label: o.split for label, o in origins.items() if o.split is not None}
    unknown = sorted(label for label, o in origins.items() if not o.known)
    trained = set().union(*(trained_rng_seeds(split, config.task) for split in splits.values()))
    what = f"a compared checkpoint ({', '.join(splits)}) trained or validated on" if splits \
        else "a compared policy was trained on"
    seed, overlap, notice = pick_seed(seed, trained, episodes, what=what)
    if notice is not None:
        err.print(notice, markup=False, highlight=False, soft_wrap=True)
    if unknown:
        err.print(f"Warning: which episodes {', '.join(map(repr, unknown))} learned from is unknown (a checkpoint "
                  "not named as NAME=PATH, or one recording no training episodes), so this comparison may not "
                  "be held out for it; name its checkpoint as NAME=PATH", markup=False, highlight=False, soft_wrap=True)
    seed_choice = {"auto": auto_seed, "held_out": not overlap and not unknown, "overlapping_indices": overlap,
                   "checkpoints_trained_on": sorted(splits), "training_unknown": unknown}

    closed = mode in ("both", "closed-loop")
    per_episode = len(specs) if closed else 1
    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=err)
    bar = progress.add_task(f"compare {' '.join(s.label for s in specs)}", total=episodes * per_episode)
    runs_live = {s.label: PolicyRuns(s, is_expert=False) for s in specs}

    def render() -> Group:
        return Group(progress, live_table(specs, runs_live, episodes, closed))

    keep_work_on_interrupt()  # the runner's workers must be stopped, not abandoned
    try:
        with Live(render(), console=err, refresh_per_second=4, transient=True) as live:
            def on_episode(label: str, episode: Episode) -> None:
                runs_live[label].episodes[episode.index] = episode
                progress.advance(bar)
                live.update(render())

            plan = ComparisonConfig(specs=tuple(specs), versions=versions, episode=config, episodes=episodes,
                                    seed=seed, mode=mode, expert=expert_name, threads=threads)
            with make_runner(backend, n_workers, ray_address=ray_address, registry=reg, envs_per_worker=envs_per_worker,
                             on_event=lambda m: err.print(f"[yellow]Warning:[/] {escape(m)}", highlight=False,
                                                          soft_wrap=True)) as runner:
                runs, shadow_eps = run_comparison(plan, runner, on_episode=on_episode)
    except BackendUnavailable as exc:
        fail(escape(str(exc)))
    except JobFailed as exc:
        fail(escape(str(exc)), code=1)
    except KeyboardInterrupt:
        err.print("Interrupted: no comparison report (episodes are not stored).")
        raise typer.Exit(130) from None

    report = build_report(specs, runs, shadow_eps, mode=mode, expert=expert_name, config=config,
                          episodes=episodes, seed=seed, seed_choice=seed_choice)
    if plot is not None:
        path = plot_curves(plot, runs)
        err.print(f"Accuracy curves written to {path}", highlight=False)
        report["plot"] = str(path)
    if as_json:
        out.print_json(json.dumps(report))
        return
    if report["closed_loop"] is not None:
        for table in closed_loop_tables(report):
            out.print(table)
    if report["shadow"] is not None and len(specs) > 1:
        out.print(shadow_table(report))
        for label in report["policies"][1:]:
            cm = report["shadow"][label]["confusion"]
            table = confusion_table({"labels": list(ACTION_NAMES), "confusion_matrix": cm})
            table.title = f"Shadow confusion: rows {report['shadow']['driver']} (driver), columns {label}; % of row"
            out.print(table)
