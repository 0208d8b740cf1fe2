"""The batched engine: episodes per core-second against `--envs-per-worker` N, and what the
framework around the fused loop costs, side by side in one run.

Part 1, the curve. Whole `simic collect` processes, one worker each, the same episodes (run seed
`--seed`, indices 0..E-1) at every width N, driven by Heuristic Tamiyo on the default task (seeds
are grown, so the fused seed families do real work) and by `wait` (the bare host, no seed ever).
Per N: wall seconds, episodes per core-second (the child's user+sys time, from
`getrusage(RUSAGE_CHILDREN)` deltas: the whole process, start-up and store commits included), the
ratio to N=1, and the child's peak RSS (each child reports its own `ru_maxrss` at exit), also
divided by N (memory per episode) and as the marginal cost of one more episode over N=1.
N=1 is the same engine: a lone member computes beside a copy of itself (two lanes), which is
part of what the ratio measures.

Part 2, the framework's share of an epoch, in this process (1 torch thread), one batch of N, in
CPU seconds as the curve (so other load on the machine is not counted; store commits are
flushed, not fsynced, so no I/O wait is missed):
  fused   one epoch of the fused loop alone (`MorphogeneticEnv._train_epoch` + `_validate` on N
          bare hosts): no policy, no decisions, no store
  run     `run_episodes` of N episodes plus committing each to a real HDF5 store, per epoch, with
          the time spent inside `_train_epoch`/`_validate` clocked as it runs
and reports, per N: wait's run against the fused loop alone (identical compute, so the difference
is the framework: decisions, outcomes, reset/finish, store commits), the same against a whole
wait `simic collect` process per epoch (part 1's CPU time, start-up included), and for both
policies the share of a real run spent outside the fused calls (the heuristic's seeds included).

Rounds are interleaved (`--repeats`; every width and policy once per round, the order reversed
every other round) so the machine's noise hits all widths alike; medians are reported.

    python bench/bench_engine.py [--widths 1,4,8,16,32,64,128] [--episodes 128] [--epochs 25]
        [--repeats 3] [--seed 0] [--policies heuristic,wait] [--skip-framework] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esper_cli.contracts import EpisodeConfig, episode_rng_seed
from esper_cli.data.store import EpisodeWriter
from esper_cli.policy import Policy
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.simulation.episode import EpisodeSpec, run_episodes
from esper_cli.tasks import BUILTIN_TASKS

ROOT = Path(__file__).resolve().parents[1]

#: Runs `simic collect` in this process and writes the process's peak RSS (bytes) to argv[1] at
#: exit: `ru_maxrss` of RUSAGE_CHILDREN is the largest child's, never this one child's, so each
#: child reports its own. A local run with one worker trains in-process; a worker process, if the
#: runner started one, is counted through RUSAGE_CHILDREN.
WRAPPER = r"""
import resource, runpy, sys
out = sys.argv[1]
sys.argv = ["simic", *sys.argv[2:]]
try:
    runpy.run_module("esper_cli", run_name="__main__", alter_sys=True)
finally:
    unit = 1 if sys.platform == "darwin" else 1024
    peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    with open(out, "w") as f:
        f.write(str(peak * unit))
"""


@dataclass
class CollectRun:
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    digest: str  # of every stored decision, in episode order: equal at every width, or a bug


def store_digest(path: Path) -> str:
    """A digest of a store's episodes sorted by id: observations, actions, outcomes, accuracies."""
    import hashlib

    import numpy as np

    from esper_cli.data.store import EpisodeReader

    with EpisodeReader(path) as reader:
        cols = reader.columns()
    order = np.lexsort((np.asarray(cols["step"]), np.asarray(cols["episode_id"])))
    h = hashlib.sha256()
    for name in ("episode_id", "observation", "action", "reward", "val_accuracy_after", "stage_after", "blueprint"):
        column = np.asarray(cols[name])[order]
        h.update("\0".join(map(str, column)).encode() if column.dtype.kind in "OUS" else
                 np.ascontiguousarray(column).tobytes())
    return h.hexdigest()[:16]


def collect_process(policy: str, width: int, args: argparse.Namespace, tmp: Path) -> CollectRun:
    """One whole `simic collect` process into a fresh store; its wall time, CPU time and peak RSS."""
    store, rss = tmp / f"{policy}-{width}-{time.monotonic_ns()}.h5", tmp / "rss"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-c", WRAPPER, str(rss), "collect", "--policy", policy, "--episodes", str(args.episodes),
           "--store", str(store), "--envs-per-worker", str(width), "--seed", str(args.seed),
           "--epochs", str(args.epochs), "--workers", "1", "--threads", "1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"simic collect --policy {policy} --envs-per-worker {width} exited {proc.returncode}:\n"
                         f"{proc.stderr[-3000:]}")
    digest = store_digest(store)
    store.unlink()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return CollectRun(wall, cpu, int(rss.read_text()), digest)


# --------------------------------------------------------------------------- in-process timing
def make_policy(name: str) -> Policy:
    """A fresh instance per episode: a policy may keep per-episode state."""
    from simic_plugins.baselines import WaitTamiyo
    from simic_plugins.heuristic import HeuristicTamiyo

    return {"heuristic": HeuristicTamiyo, "wait": WaitTamiyo}[name]()


@contextmanager
def clocked_fused_calls() -> Iterator[list[float]]:
    """Seconds spent inside `MorphogeneticEnv._train_epoch` and `_validate` while active."""
    spent = [0.0]
    originals = {name: getattr(MorphogeneticEnv, name) for name in ("_train_epoch", "_validate")}

    def clocked(fn: Callable) -> Callable:
        def call(self: MorphogeneticEnv, *a: Any, **kw: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(self, *a, **kw)
            finally:
                spent[0] += time.process_time() - t0
        return call

    for name, fn in originals.items():
        setattr(MorphogeneticEnv, name, clocked(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(MorphogeneticEnv, name, fn)


def fused_epoch(width: int, cfg: EpisodeConfig, seed: int) -> float:
    """Seconds per epoch of the fused loop alone: N bare hosts, train + validate, nothing else."""
    env = MorphogeneticEnv(cfg, BUILTIN_TASKS[cfg.task], BUILTIN_BLUEPRINTS)
    env.reset([episode_rng_seed(seed, i) for i in range(width)])
    t0 = time.process_time()
    for _ in range(cfg.epochs):
        env._plan()
        env._train_epoch()
        env._validate()
    return (time.process_time() - t0) / cfg.epochs


def run_epoch(policy: str, width: int, cfg: EpisodeConfig, seed: int, store: Path) -> tuple[float, float]:
    """(seconds per epoch of a real run of N episodes with store commits, of which inside the fused calls)."""
    specs = [EpisodeSpec(make_policy(policy), cfg, seed, i, policy) for i in range(width)]
    with EpisodeWriter(store) as writer, clocked_fused_calls() as fused:
        t0 = time.process_time()
        for episode in run_episodes(specs, task=BUILTIN_TASKS[cfg.task], blueprints=BUILTIN_BLUEPRINTS):
            writer.append(episode)  # type: ignore[arg-type]  # a PolicyError would fail here, loudly
        total = time.process_time() - t0
    store.unlink()
    return total / cfg.epochs, fused[0] / cfg.epochs


# ------------------------------------------------------------------------------------- report
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def curve_rows(runs: dict[str, dict[int, list[CollectRun]]], episodes: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for policy, by_width in runs.items():
        base_width = min(by_width)
        base_rate = episodes / _median([r.cpu_s for r in by_width[base_width]])
        base_rss = _median([r.peak_rss_bytes for r in by_width[base_width]])
        rows[policy] = []
        for width, rs in sorted(by_width.items()):
            cpu, rss = _median([r.cpu_s for r in rs]), _median([r.peak_rss_bytes for r in rs])
            rate = episodes / cpu
            rows[policy].append(dict(
                width=width, wall_s=_median([r.wall_s for r in rs]), cpu_s=cpu, episodes_per_core_s=rate,
                ratio=rate / base_rate, ratio_to_width=base_width, peak_rss_mib=rss / 2**20,
                mib_per_episode=rss / 2**20 / width,
                marginal_mib_per_episode=(rss - base_rss) / 2**20 / (width - base_width) if width > base_width else None,
                digests=sorted({r.digest for r in rs}), repeats=[asdict(r) for r in rs]))
    return rows


def framework_rows(fused: dict[int, list[float]], runs: dict[str, dict[int, list[tuple[float, float]]]],
                   curve: dict[str, list[dict]], episodes: int, epochs: int) -> list[dict]:
    wait_cpu = {row["width"]: row["cpu_s"] for row in curve.get("wait", [])}
    rows = []
    for width in sorted(fused):
        f = _median(fused[width])
        row: dict = dict(width=width, fused_epoch_ms=1e3 * f)
        for policy, by_width in runs.items():
            total = _median([t for t, _ in by_width[width]])
            inside = _median([i / t for t, i in by_width[width]])
            row[f"{policy}_run_epoch_ms"] = 1e3 * total
            row[f"{policy}_outside_fused_pct"] = 100 * (1 - inside)
        if "wait" in runs:
            row["wait_vs_fused_pct"] = 100 * (1 - f / (row["wait_run_epoch_ms"] / 1e3))
        if width in wait_cpu:
            per_epoch = wait_cpu[width] / (math.ceil(episodes / width) * epochs)
            row["wait_process_epoch_ms"] = 1e3 * per_epoch
            row["wait_process_vs_fused_pct"] = 100 * (1 - f / per_epoch)
        rows.append(row)
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"simic collect, one worker, {s['episodes']} episodes of {s['epochs']} epochs, run seed {s['seed']}, "
          f"{s['repeats']} interleaved repeats (medians); cpus={os.cpu_count()}, torch {torch.__version__}")
    for policy, rows in report["curve"].items():
        print(f"\n  {policy}{' (seeds grown)' if policy == 'heuristic' else ' (bare host)' if policy == 'wait' else ''}")
        print(f"  {'N':>5} {'wall s':>8} {'cpu s':>8} {'ep/core-s':>10} {'ratio':>6} "
              f"{'peak MiB':>9} {'MiB/ep':>8} {'marginal MiB/ep':>16}")
        for r in rows:
            print(f"  {r['width']:>5} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['episodes_per_core_s']:10.3f} "
                  f"{r['ratio']:5.2f}x {r['peak_rss_mib']:9.0f} {r['mib_per_episode']:8.1f} "
                  f"{_cell(r, 'marginal_mib_per_episode', '16.2f'):>16}")
        if rows and rows[0]["width"] != 1:
            print(f"  (ratios to N={rows[0]['width']}: N=1 was not run)")
        digests = {d for r in rows for d in r["digests"]}
        print(f"  stored episodes identical at every width: {'yes' if len(digests) == 1 else 'NO'}"
              f" ({len(digests)} distinct store digest{'s' if len(digests) != 1 else ''})")
    if report["framework"]:
        pols = [p for p in s["policies"]]
        print("\nframework share of an epoch (in this process, 1 thread; CPU ms per epoch of one batch of N)")
        head = f"  {'N':>5} {'fused ms':>9}"
        for p in pols:
            head += f" {p + ' run ms':>15} {p + ' outside %':>17}"
        head += f" {'wait vs fused %':>16} {'wait process ms':>16} {'process vs fused %':>19}"
        print(head)
        for r in report["framework"]:
            line = f"  {r['width']:>5} {r['fused_epoch_ms']:9.1f}"
            for p in pols:
                line += f" {r[p + '_run_epoch_ms']:15.1f} {r[p + '_outside_fused_pct']:17.1f}"
            line += (f" {_cell(r, 'wait_vs_fused_pct', '16.1f'):>16} {_cell(r, 'wait_process_epoch_ms', '16.1f'):>16}"
                     f" {_cell(r, 'wait_process_vs_fused_pct', '19.1f'):>19}")
            print(line)
        print("  outside %: a real run's time not inside _train_epoch/_validate (decisions, outcomes, reset, finish,\n"
              "  store); wait vs fused %: wait's run against the fused loop alone (same compute); process: against\n"
              "  a whole wait `simic collect` process per epoch (CPU time, start-up and every batch included)")


# --------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1,4,8,16,32,64,128", help="comma-separated --envs-per-worker values")
    parser.add_argument("--episodes", type=int, default=128, help="episodes per collect process")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0, help="run seed (the same episodes at every width)")
    parser.add_argument("--policies", default="heuristic,wait")
    parser.add_argument("--skip-framework", action="store_true", help="only the curve (part 1)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-': stdout, no table)")
    args = parser.parse_args()
    widths = sorted({int(w) for w in args.widths.split(",")})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in ("heuristic", "wait")]
    if unknown:
        parser.error(f"--policies: only heuristic and wait are benchmarked (not {', '.join(unknown)})")
    wide = [w for w in widths if w > args.episodes]
    if wide:
        print(f"skipping widths {wide}: wider than --episodes {args.episodes} (the batch would be narrower)",
              file=sys.stderr)
        widths = [w for w in widths if w <= args.episodes]
    if not widths:
        parser.error("no width left to run")
    torch.set_num_threads(1)
    cfg = EpisodeConfig(epochs=args.epochs)
    log = sys.stderr if args.json == "-" else sys.stdout

    curve: dict[str, dict[int, list[CollectRun]]] = {p: {w: [] for w in widths} for p in policies}
    fused: dict[int, list[float]] = {w: [] for w in widths}
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {p: {w: [] for w in widths} for p in policies}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_framework:  # one-off costs (data, kernels, packing checks) before timing
            run_epoch(policies[0], 2, EpisodeConfig(epochs=1), args.seed, tmp / "warm.h5")
        for r in range(args.repeats):
            order = widths if r % 2 == 0 else widths[::-1]
            for width in order:
                for policy in policies:
                    run = collect_process(policy, width, args, tmp)
                    curve[policy][width].append(run)
                    print(f"  round {r + 1} {policy:<9} N={width:<4} collect {run.wall_s:7.1f} s wall, "
                          f"{run.cpu_s:7.1f} s cpu, {run.peak_rss_bytes / 2**20:6.0f} MiB", file=log, flush=True)
                if args.skip_framework:
                    continue
                fused[width].append(fused_epoch(width, cfg, args.seed))
                for policy in policies:
                    runs[policy][width].append(run_epoch(policy, width, cfg, args.seed, tmp / "run.h5"))
                print(f"  round {r + 1} framework N={width:<4} fused {1e3 * fused[width][-1]:7.1f} ms/epoch, "
                      + ", ".join(f"{p} run {1e3 * runs[p][width][-1][0]:7.1f} ms/epoch" for p in policies),
                      file=log, flush=True)
    curve_report = curve_rows(curve, args.episodes)
    report = dict(
        settings=dict(widths=widths, episodes=args.episodes, epochs=args.epochs, repeats=args.repeats,
                      seed=args.seed, policies=policies, cpus=os.cpu_count(), torch=torch.__version__,
                      seconds=time.perf_counter() - t_start),
        curve=curve_report,
        framework=[] if args.skip_framework else framework_rows(fused, runs, curve_report, args.episodes,
                                                                args.epochs),
    )
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
