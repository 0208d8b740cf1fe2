"""The policy table: heuristic, wait, random, eager (and any named checkpoint) over paired held-out seeds.

Every policy drives its own episodes from the same seeds (episode i of each starts from the same
weights and sees the same data order), so the difference to `wait` on episode i is the effect of
the policy's decisions alone. Validation accuracy is what the controller sees; test accuracy,
read once at the end of each episode, is the honest score. Intervals are Student-t 95%.

    python bench/bench_policies.py [--episodes 20] [--seed 1000] [--task digits] [--workers 2]
        [--reference wait] [POLICY ...]

POLICY is a registered name or NAME=PATH (a checkpoint), as for `simic compare`; the default is
heuristic, random, eager. The reference (`wait` unless `--reference` names another) is always run, first;
every difference is paired against it (e.g. `--reference heuristic mlp=improved.safetensors wait
random`: does a learned Tamiyo beat the rules?). On a task that prices growth (`growth_cost`, e.g.
`digits-rent`) the scores and differences are net of each episode's growth charge.
"""

from __future__ import annotations

import argparse
import json
import time

from esper_cli.cli.common import registry
from esper_cli.evaluation.comparison import ComparisonConfig, build_report, resolve_specs, run_comparison
from esper_cli.running.runner import DEFAULT_ENVS_PER_WORKER, make_runner
from esper_cli.tasks import task_config


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+6.2f}, {ci[1]:+6.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policies", nargs="*", default=["heuristic", "random", "eager"])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000, help="run seed (use one you did not tune on)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--envs-per-worker", type=int, default=DEFAULT_ENVS_PER_WORKER,
                        help="episodes a worker trains together")
    parser.add_argument("--reference", default="wait", help="the policy every difference is paired against")
    parser.add_argument("--json", action="store_true", help="print the compare report as JSON")
    args = parser.parse_args()
    reg = registry()
    names = [args.reference] + [p for p in args.policies if p != args.reference]
    specs, versions = resolve_specs(names, reg, None)
    config = task_config(args.task, reg.tasks[args.task], epochs=args.epochs)
    net = config.growth_cost > 0  # score = accuracy minus the growth charge
    t0 = time.perf_counter()
    plan = ComparisonConfig(specs=tuple(specs), versions=versions, episode=config, episodes=args.episodes,
                            seed=args.seed, mode="closed-loop")
    with make_runner(workers=args.workers, registry=reg, envs_per_worker=args.envs_per_worker) as runner:
        runs, _ = run_comparison(plan, runner)
    report = build_report(specs, runs, [], mode="closed-loop", expert=None, config=config,
                          episodes=args.episodes, seed=args.seed)
    if args.json:
        print(json.dumps(report))
        return
    what = f"net of a growth cost of {config.growth_cost:g} points per 1,000 seed parameters" if net else "accuracy %"
    print(f"{args.episodes} paired episodes, task {args.task}, run seed {args.seed}, {args.epochs} epochs "
          f"({time.perf_counter() - t0:.0f} s); {what}, mean and 95% interval; Δ paired against {args.reference}")
    print(f"{'policy':<14} {'final val':>8} {'95% CI':>18} {'Δ val':>7} {'Δ 95% CI':>18} "
          f"{'test':>7} {'95% CI':>18} {'Δ test':>7} {'Δ 95% CI':>18}  seeds c/f/x  charge")
    score, final = ("test_score", "final_score") if net else ("test_accuracy", "final_accuracy")
    for label, r in report["closed_loop"].items():
        ref = label == args.reference
        dv = "" if ref else f"{r[f'{final}_diff_mean']:+7.2f}"
        dt = "" if ref else f"{r[f'{score}_diff_mean']:+7.2f}"
        val = r["final_accuracy_mean"] - (r["growth_charge_mean"] if net else 0.0)
        print(f"{label:<14} {val:8.2f} {'' if net else _ci(r['final_accuracy_ci95']):>18} {dv:>7} "
              f"{'' if ref else _ci(r[f'{final}_diff_ci95']):>18} {r[f'{score}_mean']:7.2f} "
              f"{_ci(r[f'{score}_ci95']):>18} {dt:>7} {'' if ref else _ci(r[f'{score}_diff_ci95']):>18}  "
              f"{r['seeds_created']}/{r['seeds_fossilized']}/{r['seeds_culled']}  {r['growth_charge_mean']:6.2f}")


if __name__ == "__main__":
    main()
