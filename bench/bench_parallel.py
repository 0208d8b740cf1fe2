"""Parallel collection: episodes/s with 1 worker, 2 local workers and Ray (2 CPUs), same work.

Every mode runs the same episodes (Heuristic Tamiyo, same seed and indices) through the episode
runner and commits each to a real HDF5 store, as `simic collect` does. Rounds are interleaved so
machine noise hits every mode alike. Worker start-up is measured separately (a warm-up batch per
runner) and excluded from the steady-state rates, which is what a long collection run sees:

  phase 1  1 worker (in-process) vs 2 local worker processes      -> speed-up (target >= 1.8x)
  phase 2  2 local worker processes vs Ray, local cluster 2 CPUs  -> Ray overhead (target < 15%)

Ray runs only in phase 2, so its background daemons cannot slow down phase 1.

    python bench/bench_parallel.py [--episodes 8] [--epochs 25] [--rounds 3] [--no-ray]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from esper_cli.contracts import EpisodeConfig
from esper_cli.data.store import EpisodeWriter
from esper_cli.running.runner import BaseRunner, EpisodeJob, ProcessRunner, RayRunner, SerialRunner


def _spin(n: int = 6_000_000) -> None:
    x = 0
    for i in range(n):
        x += i


def free_cores(workers: int) -> float:
    """How much faster `workers` CPU-bound processes finish than one, right now (other load included)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_spin, [10] * workers)  # start the processes before timing
        t0 = time.perf_counter()
        pool.map(_spin, [6_000_000])
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_spin, [6_000_000] * workers, chunksize=1)
        many = time.perf_counter() - t0
    return workers * one / many


def batch(cfg: EpisodeConfig, start: int, n: int) -> list[EpisodeJob]:
    return [EpisodeJob(policy="heuristic", config=cfg, seed=0, index=i) for i in range(start, start + n)]


def timed(runner: BaseRunner, jobs: list[EpisodeJob], writer: EpisodeWriter) -> float:
    t0 = time.perf_counter()
    for _job, episode in runner.run(jobs):
        writer.append(episode)
    return time.perf_counter() - t0


def phase(title: str, makers: dict[str, Callable[[], BaseRunner]], cfg: EpisodeConfig, args: argparse.Namespace,
          tmp: Path, next_index: list[int]) -> dict[str, float]:
    """Warm every runner up, then time `rounds` interleaved batches; returns median episodes/s."""
    print(title)
    runners: dict[str, BaseRunner] = {}
    rates: dict[str, list[float]] = {name: [] for name in makers}
    writers = {name: EpisodeWriter(tmp / f"{title[:7].strip()}-{name}.h5") for name in makers}
    try:
        for name, make in makers.items():
            t0 = time.perf_counter()
            runners[name] = make()
            created = time.perf_counter() - t0
            warm = timed(runners[name], batch(cfg, next_index[0], 2 * runners[name].parallelism), writers[name])
            next_index[0] += 2 * runners[name].parallelism
            print(f"  start-up {name:<14} create {created:6.2f} s, first {2 * runners[name].parallelism} "
                  f"episodes {warm:6.2f} s (imports, data, first-episode warm-up)")
        for r in range(args.rounds):
            jobs = batch(cfg, next_index[0], args.episodes)  # the same episodes for every mode
            next_index[0] += args.episodes
            order = list(makers) if r % 2 == 0 else list(reversed(makers))
            for name in order:
                seconds = timed(runners[name], jobs, writers[name])
                rates[name].append(args.episodes / seconds)
            print("  round", r + 1, "  ".join(f"{n}: {rates[n][-1]:.2f} ep/s" for n in makers))
    finally:
        for runner in runners.values():
            runner.close()
        for writer in writers.values():
            writer.close()
    return {name: statistics.median(v) for name, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per timed batch")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip phase 2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = EpisodeConfig(epochs=args.epochs)
    n = args.workers
    print(f"episodes={args.episodes} per batch, epochs={args.epochs}, rounds={args.rounds}, "
          f"cpus={os.cpu_count()} (median episodes/s over rounds, store commits included)")
    print(f"machine check: {n} CPU-bound processes do {free_cores(n):.2f}x the work of 1 in the same time "
          f"(the best any {n}-worker speed-up can be now; < {n} means other load is sharing the CPUs)")
    next_index = [0]
    with tempfile.TemporaryDirectory() as tmp:
        p1 = phase("phase 1: local", {"1 worker": SerialRunner, f"{n} workers": lambda: ProcessRunner(n)},
                   cfg, args, Path(tmp), next_index)
        speedup = p1[f"{n} workers"] / p1["1 worker"]
        print(f"  => 1 worker {p1['1 worker']:.2f} ep/s, {n} workers {p1[f'{n} workers']:.2f} ep/s: "
              f"speed-up {speedup:.2f}x (target >= {0.9 * n:.1f}x)")
        if args.no_ray or importlib.util.find_spec("ray") is None:
            print("phase 2 skipped (--no-ray, or the ray extra is not installed)")
            return
        p2 = phase("phase 2: pool vs ray", {"local pool": lambda: ProcessRunner(n), "ray": lambda: RayRunner(n)},
                   cfg, args, Path(tmp), next_index)
        overhead = p2["local pool"] / p2["ray"] - 1
        print(f"  => local pool {p2['local pool']:.2f} ep/s, Ray {p2['ray']:.2f} ep/s: "
              f"Ray overhead {100 * overhead:+.1f}% (target < 15%)")


if __name__ == "__main__":
    main()
