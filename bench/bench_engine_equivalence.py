"""Do the heuristic's episodes end the same under the batched engine as under the engine before it?

The engine before is the code at `--old` (default c9ce30c, the commit before the batched engine),
exported with `git archive` into a temporary folder; the engine now is this checkout. Each runs
the same `--pairs` heuristic episodes (run seed `--seed`, indices 0..P-1, the default config
but for `--epochs`) in its own subprocess with only its own code importable: the old one episode
at a time (`run_episode`), the new one in batches of `--envs-per-worker` (`run_episodes`). Episode
i of the two starts from the same rng seed, so the differences are paired.

Reported: the paired mean difference new - old of final (validation) and test accuracy with a
Student-t 95% interval, and whether it passes (the interval contains 0 and the mean is within
`--tolerance` points: the batched-engine issue's criterion); seeds created / fossilized / culled
and the action mix of each; how many episodes take the same actions throughout, how many end on
the same final and test accuracy, and how many are
bit-identical (every observation, outcome, seed record and accuracy equal; none is expected: the
fused engine sums floats in another order, so the episodes part within a few epochs and land
near each other, not on each other).

    python bench/bench_engine_equivalence.py [--pairs 40] [--seed 7500] [--epochs 25]
        [--old c9ce30c] [--envs-per-worker 16] [--tolerance 0.3] [--json PATH|-]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ("WAIT", "GERMINATE", "ADVANCE", "CULL")

#: Runs in the engine's own code (only its folder and its plugins on the path) and prints one JSON
#: line per episode. Written against what both engines share: `run_episode` in the old,
#: `run_episodes` in the new, and the Episode, DecisionRecord and SeedLifecycle fields of both.
CHILD = r"""
import hashlib, json, sys, time
import torch
torch.set_num_threads(1)
import esper_cli
from esper_cli.contracts import EpisodeConfig
from esper_cli.simulation import episode as episode_module
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.tasks import BUILTIN_TASKS
from simic_plugins.heuristic import HeuristicTamiyo

seed, pairs, epochs, width = (int(a) for a in sys.argv[1:5])
cfg = EpisodeConfig(epochs=epochs)
task = BUILTIN_TASKS[cfg.task]
print(json.dumps({"esper_cli": esper_cli.__file__}), flush=True)
if hasattr(episode_module, "run_episodes"):
    batches = [range(b, min(b + width, pairs)) for b in range(0, pairs, width)]
    run = lambda batch: episode_module.run_episodes(
        [episode_module.EpisodeSpec(HeuristicTamiyo(), cfg, seed, i, "heuristic") for i in batch],
        task=task, blueprints=BUILTIN_BLUEPRINTS)
else:
    batches = [range(i, i + 1) for i in range(pairs)]
    run = lambda batch: [episode_module.run_episode(HeuristicTamiyo(), cfg, seed, i, task=task,
                         blueprints=BUILTIN_BLUEPRINTS, policy_name="heuristic") for i in batch]


def everything(ep):
    # Every number the episode records, exactly (repr of a float round-trips).
    return [[d.observation.tolist(), int(d.action), bool(d.valid), d.blueprint,
             [repr(float(x)) for x in (d.outcome.accuracy_change, d.outcome.loss_change,
                                       d.outcome.val_accuracy, d.outcome.reward)],
             int(d.outcome.stage_after), bool(d.outcome.seed_alive)] for d in ep.decisions] + [
        [repr(float(x)) for x in (ep.final_accuracy, ep.best_accuracy, ep.test_accuracy)],
        [[s.blueprint, s.slot, [list(t) for t in s.stages], s.fate, repr(s.contribution)] for s in ep.seeds],
        None if ep.final_observation is None else ep.final_observation.tolist()]


t0 = time.perf_counter()
for batch in batches:
    for ep in run(batch):
        if isinstance(ep, Exception):
            raise ep
        print(json.dumps({
            "index": ep.index, "final": ep.final_accuracy, "best": ep.best_accuracy, "test": ep.test_accuracy,
            "created": len(ep.seeds), "fossilized": sum(s.fate == "fossilized" for s in ep.seeds),
            "culled": sum(s.fate == "culled" for s in ep.seeds),
            "actions": [int(d.action) for d in ep.decisions],
            "invalid": sum(not d.valid for d in ep.decisions),
            "digest": hashlib.sha256(json.dumps(everything(ep)).encode()).hexdigest(),
        }), flush=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def start(code_root: Path, args: argparse.Namespace, cwd: Path) -> subprocess.Popen:
    """The engine at `code_root` running the episodes, in a process that imports nothing else."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code_root), str(code_root / "plugins")]))
    # cwd is an empty folder: `python -c` puts the cwd first on sys.path, and the repository's
    # root there would win over the old code.
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args.seed), str(args.pairs), str(args.epochs), str(args.envs_per_worker)],
        env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code_root: Path, label: str) -> tuple[dict[int, dict], float]:
    """Each episode's summary by index, and the seconds its engine took to run them all."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the {label} engine's episodes failed (exit {proc.returncode}):\n{err[-3000:]}")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    imported = Path(lines[0]["esper_cli"]).resolve()
    if code_root.resolve() not in imported.parents:
        raise SystemExit(f"the {label} engine's process imported {imported}, not the code under {code_root}")
    return {row["index"]: row for row in lines if "index" in row}, lines[-1]["seconds"]


def paired(new: list[float], old: list[float], tolerance: float) -> dict:
    """Mean of new - old with its Student-t 95% interval; passes if it holds 0 and |mean| <= tolerance."""
    d = np.asarray(new) - np.asarray(old)
    mean = float(d.mean())
    if len(d) < 2:
        return dict(mean=mean, sd=math.nan, ci95=[math.nan, math.nan], contains_zero=False,
                    within_tolerance=abs(mean) <= tolerance, passes=False)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    return dict(mean=mean, sd=sd, ci95=[lo, hi], contains_zero=lo <= 0.0 <= hi,
                within_tolerance=abs(mean) <= tolerance, passes=lo <= 0.0 <= hi and abs(mean) <= tolerance)


def totals(rows: list[dict]) -> dict:
    actions = Counter(a for r in rows for a in r["actions"])
    n_actions = sum(actions.values()) or 1
    return dict(
        final_mean=float(np.mean([r["final"] for r in rows])), test_mean=float(np.mean([r["test"] for r in rows])),
        created=sum(r["created"] for r in rows), fossilized=sum(r["fossilized"] for r in rows),
        culled=sum(r["culled"] for r in rows), invalid=sum(r["invalid"] for r in rows),
        actions={name: actions[a] for a, name in enumerate(ACTIONS)},
        action_share={name: actions[a] / n_actions for a, name in enumerate(ACTIONS)},
    )


def print_report(r: dict) -> None:
    s = r["settings"]
    print(f"{s['pairs']} paired heuristic episodes, run seed {s['seed']}, {s['epochs']} epochs; old = {s['old']} "
          f"(one at a time, {r['seconds']['old']:.0f} s), new = this checkout "
          f"(batches of {s['envs_per_worker']}, {r['seconds']['new']:.0f} s)")
    print(f"\n  {'new - old (points)':<20} {'mean':>7} {'sd':>6} {'95% CI':>18} {'holds 0':>8} "
          f"{'|mean|<=' + format(s['tolerance'], 'g'):>9} {'passes':>7}")
    for name in ("final", "test"):
        p = r["paired"][name]
        print(f"  {name + ' accuracy':<20} {p['mean']:+7.2f} {p['sd']:6.2f} "
              f"{'[' + format(p['ci95'][0], '+.2f') + ', ' + format(p['ci95'][1], '+.2f') + ']':>18} "
              f"{'yes' if p['contains_zero'] else 'NO':>8} {'yes' if p['within_tolerance'] else 'NO':>9} "
              f"{'yes' if p['passes'] else 'NO':>7}")
    print(f"\n  {'engine':<6} {'final':>7} {'test':>7} {'created':>8} {'fossil.':>8} {'culled':>7} {'invalid':>8}  "
          + " ".join(f"{a:>14}" for a in ACTIONS))
    for label in ("old", "new"):
        t = r[label]
        mix = " ".join(f"{t['actions'][a]:>6} ({100 * t['action_share'][a]:4.1f}%)" for a in ACTIONS)
        print(f"  {label:<6} {t['final_mean']:7.2f} {t['test_mean']:7.2f} {t['created']:>8} {t['fossilized']:>8} "
              f"{t['culled']:>7} {t['invalid']:>8}  {mix}")
    e = r["episodes"]
    where = (f" (where not, the first differing action comes at epoch {e['first_divergence_median']:g}, median)"
             if e["first_divergence_median"] is not None else "")
    print(f"\n  episodes taking the same actions throughout: {e['same_actions']}/{s['pairs']}{where}; the same final "
          f"and test accuracy: {e['same_accuracies']}/{s['pairs']}; bit-identical: {e['bit_identical']}/{s['pairs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40, help="paired episodes (indices 0..P-1)")
    parser.add_argument("--seed", type=int, default=7500, help="run seed")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--old", default="c9ce30c", help="the commit of the engine before")
    parser.add_argument("--envs-per-worker", type=int, default=16, help="batch width of the new engine's runs")
    parser.add_argument("--tolerance", type=float, default=0.3, help="points the mean difference may be off 0")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-': stdout, no table)")
    args = parser.parse_args()
    old_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.old}^{{commit}}"],
                             capture_output=True, text=True)
    if old_rev.returncode != 0:
        parser.error(f"--old {args.old}: not a commit of {ROOT}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old_root, cwd = tmp / "old", tmp / "cwd"
        old_root.mkdir()
        cwd.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", old_rev.stdout.strip()], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive.stdout, check=True)
        # The two engines run side by side (their times are for information, not a speed test).
        procs = {"old": start(old_root, args, cwd), "new": start(ROOT, args, cwd)}
        results, seconds = {}, {}
        for label, proc in procs.items():
            results[label], seconds[label] = finish(proc, old_root if label == "old" else ROOT, label)
    idx = sorted(results["old"])
    old, new = [results["old"][i] for i in idx], [results["new"][i] for i in idx]
    if idx != sorted(results["new"]) or len(idx) != args.pairs:
        raise SystemExit(f"episode indices differ: old {sorted(results['old'])}, new {sorted(results['new'])}")
    divergence = [next((t for t, (a, b) in enumerate(zip(o["actions"], n["actions"])) if a != b), None)
                  for o, n in zip(old, new)]
    firsts = [t for t in divergence if t is not None]
    report = dict(
        settings=dict(pairs=args.pairs, seed=args.seed, epochs=args.epochs, old=old_rev.stdout.strip(),
                      envs_per_worker=args.envs_per_worker, tolerance=args.tolerance),
        seconds=seconds,
        paired={name: paired([n[name] for n in new], [o[name] for o in old], args.tolerance)
                for name in ("final", "test")},
        old=totals(old), new=totals(new),
        episodes=dict(
            same_actions=sum(t is None for t in divergence),
            same_accuracies=sum(o["final"] == n["final"] and o["test"] == n["test"] for o, n in zip(old, new)),
            bit_identical=sum(o["digest"] == n["digest"] for o, n in zip(old, new)),
            first_divergence_median=float(np.median(firsts)) if firsts else None,
            per_episode=[dict(index=i, old_final=o["final"], new_final=n["final"], old_test=o["test"],
                              new_test=n["test"], first_divergence=t)
                         for i, o, n, t in zip(idx, old, new, divergence)],
        ),
    )
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
