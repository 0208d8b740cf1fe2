"""Headroom: the best test accuracy a broad family of scripted controllers reaches, per held-out seed.

For each episode i of a run seed, every strategy of a grid of scripted controllers (`ScriptedTamiyo`:
when to germinate, which blueprint, how long to train a seed in isolation, how long to blend it,
whether to cull a seed whose worth is below a threshold) drives its own episode i (paired: same
seed and index, so the same initial weights and data order). The strategy with the best final
VALIDATION accuracy on that episode is picked (ties: the first in grid order) and its TEST accuracy
is the episode's headroom. The named policies (heuristic always, plus `--policies`) run on the same
episodes, and every difference is paired per episode.

Picking per episode on validation is an oracle over the family: no single controller does it, since
it would need to know in advance which strategy suits which seed. The headroom is therefore an upper
bound that a policy can approach only if it could tell, from what it observes, which strategy fits
the seed in front of it. Because the pick uses validation accuracy, test accuracy (read once at the
end of each episode, never used to choose) is the honest score; the picked strategy's validation
accuracy is optimistically biased by the selection and is not reported as a score. On a task that
prices growth (`digits-rent`) every score is net of the episode's growth charge.

    python bench/bench_headroom.py [--seed 7000] [--episodes 40] [--epochs 25] [--task digits]
        [--workers 2] [--strategies N] [--policies heuristic eager mlp=PATH ...] [--json]

`--strategies N` subsamples the grid evenly (a quick run); the default runs all of it.
Intervals are Student-t 95%.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from esper_cli.contracts import Action, Decision, EpisodeConfig, SeedStage, TrainingSnapshot
from esper_cli.evaluation.comparison import PolicySpec, build_policy, mean_ci95, resolve_specs
from esper_cli.policy import EpisodeContext, valid_actions

#: The built-in blueprints a fixed-blueprint strategy may name (the default rotation's).
BLUEPRINTS: tuple[str, ...] = EpisodeConfig().rotation


@dataclass(frozen=True)
class Strategy:
    """One scripted controller's parameters.

    - `trigger`: "epoch" (germinate as soon as `epoch >= when`) or "plateau" (germinate once
      `epoch >= 2` and `plateau_epochs >= when`).
    - `blueprint`: a blueprint name, or None for the environment's rotation.
    - `advance_after`: epochs in TRAINING before ADVANCE to BLENDING.
    - `blend_epochs`: epochs in BLENDING before the verdict (fossilize, or cull under the rule).
    - `cull_below`: None = never cull (always fossilize); else CULL at the end of TRAINING or of
      BLENDING when `seed_improvement < cull_below` (points).
    """

    trigger: str
    when: int
    blueprint: str | None
    advance_after: int
    blend_epochs: int
    cull_below: float | None

    @property
    def name(self) -> str:
        germ = f"e{self.when}" if self.trigger == "epoch" else f"p{self.when}"
        cull = "never" if self.cull_below is None else f"cull<{self.cull_below:g}"
        return f"{germ}/{self.blueprint or 'rot'}/t{self.advance_after}/b{self.blend_epochs}/{cull}"

    @property
    def family(self) -> str:
        """The strategy without its blueprint: when to grow and how to judge."""
        return self.name.replace(f"/{self.blueprint or 'rot'}/", "/")


class ScriptedTamiyo:
    """A parametrised scripted controller (see `Strategy`); valid actions only."""

    name = "scripted"
    version = "1.0"

    def __init__(self, **params: Any) -> None:
        self.s = Strategy(**params)

    def reset(self, context: EpisodeContext) -> None:
        """Stateless: each decision depends on the observation alone."""

    def decide(self, obs: TrainingSnapshot, context: EpisodeContext | None = None) -> Decision:
        s, valid = self.s, valid_actions(obs)
        stage = SeedStage(int(obs.seed_stage)) if obs.has_active_seed else SeedStage.DORMANT
        n, worth = obs.seed_epochs_in_stage, obs.seed_improvement
        action = Action.WAIT
        if stage == SeedStage.DORMANT:
            due = obs.epoch >= s.when if s.trigger == "epoch" else (obs.epoch >= 2 and obs.plateau_epochs >= s.when)
            if due:
                action = Action.GERMINATE
        elif stage == SeedStage.GERMINATED:
            action = Action.ADVANCE
        elif stage == SeedStage.TRAINING and n >= s.advance_after:
            action = Action.CULL if s.cull_below is not None and worth < s.cull_below else Action.ADVANCE
        elif stage == SeedStage.BLENDING and n >= s.blend_epochs:
            action = Action.CULL if s.cull_below is not None and worth < s.cull_below else Action.ADVANCE
        if action not in valid:
            action = Action.WAIT
        blueprint = s.blueprint if action == Action.GERMINATE else None
        return Decision(action, f"scripted {s.name}", 1.0, blueprint)


def strategies(blueprints: tuple[str, ...] = BLUEPRINTS) -> list[Strategy]:
    """The grid: 5 germination triggers x (rotation + each blueprint) x 2 TRAINING lengths x
    2 blending lengths x 2 cull rules (never, worth < 0) = 240 with the 5 built-in blueprints."""
    triggers = [("epoch", 1), ("epoch", 3), ("epoch", 6), ("plateau", 1), ("plateau", 2)]
    grid = []
    for trigger, when in triggers:
        for bp in (None, *blueprints):
            for advance_after in (1, 3):
                for blend in (1, 3):
                    for cull in (None, 0.0):
                        grid.append(Strategy(trigger, when, bp, advance_after, blend, cull))
    return grid


def subsample(grid: list[Strategy], n: int | None) -> list[Strategy]:
    """`n` strategies spread evenly over the grid (all of it for None or n >= len)."""
    if n is None or n >= len(grid):
        return grid
    return [grid[round(k * (len(grid) - 1) / max(1, n - 1))] for k in range(n)] if n > 1 else grid[:1]


_REGISTRY: Any = None


Job = tuple[str, str, dict[str, Any], EpisodeConfig, int, int]  # (kind, label, params, config, seed, index)


def _batch(jobs: list[Job]) -> list[tuple[str, str, int, float, float]]:
    """Run episodes together in this process (the batched engine): per job (kind, label, index,
    final val score, test score): the accuracies, net of the growth charge on a task that prices
    growth."""
    global _REGISTRY
    import torch

    from esper_cli.plugins import build_registry
    from esper_cli.simulation.episode import EpisodeSpec, run_episodes

    torch.set_num_threads(1)
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    reg = _REGISTRY
    specs = []
    for kind, label, params, config, seed, index in jobs:
        if kind == "strategy":
            policy: Any = ScriptedTamiyo(**params)
        else:
            policy = build_policy(reg.policies[params["name"]], PolicySpec(**params))
        specs.append(EpisodeSpec(policy, config, seed, index, label))
    episodes = run_episodes(specs, task=reg.tasks[jobs[0][3].task], blueprints=reg.blueprints)
    out = []
    for (kind, label, _, _, _, index), ep in zip(jobs, episodes):
        if isinstance(ep, Exception):
            raise ep
        out.append((kind, label, index, float(ep.final_score), float(ep.test_score)))
    return out


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+6.2f}, {ci[1]:+6.2f}]"


def _summary(values: list[float]) -> dict[str, Any]:
    mean, ci = mean_ci95(values)
    return {"mean": mean, "ci95": ci}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7000, help="run seed (use one you did not tune on)")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--envs-per-worker", type=int, default=32, help="episodes a worker trains together")
    parser.add_argument("--strategies", type=int, default=None, help="subsample the grid evenly to N strategies")
    parser.add_argument("--policies", nargs="*", default=["heuristic", "eager"],
                        help="registered policies or NAME=PATH checkpoints (heuristic is always run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from esper_cli.cli.common import registry
    from esper_cli.tasks import task_config

    reg = registry()
    if args.task not in reg.tasks:
        parser.error(f"task {args.task!r} is not registered")
    names = ["heuristic"] + [p for p in args.policies if p != "heuristic"]
    specs, _ = resolve_specs(names, reg, None)
    bps = tuple(b for b in BLUEPRINTS if b in reg.blueprints)
    full = strategies(bps)
    grid = subsample(full, args.strategies)
    by_name = {s.name: s for s in grid}
    config = task_config(args.task, reg.tasks[args.task], epochs=args.epochs)
    jobs = [("strategy", s.name, asdict(s), config, args.seed, i) for i in range(args.episodes) for s in grid]
    jobs += [("policy", sp.label, {"name": sp.name, "checkpoint": sp.checkpoint, "label": sp.label},
              config, args.seed, i) for i in range(args.episodes) for sp in specs]
    t0 = time.perf_counter()
    width = max(1, min(args.envs_per_worker, -(-len(jobs) // max(args.workers, 1))))
    batches = [jobs[i:i + width] for i in range(0, len(jobs), width)]
    if args.workers > 1:
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            results = [r for chunk in pool.map(_batch, batches) for r in chunk]
    else:
        results = [r for chunk in map(_batch, batches) for r in chunk]
    elapsed = time.perf_counter() - t0

    strat: dict[int, dict[str, tuple[float, float]]] = {i: {} for i in range(args.episodes)}
    pol: dict[str, dict[int, float]] = {sp.label: {} for sp in specs}
    for kind, label, i, val, test in results:
        if kind == "strategy":
            strat[i][label] = (val, test)
        else:
            pol[label][i] = test
    order = [s.name for s in grid]
    winners: list[str] = []
    head: list[float] = []
    for i in range(args.episodes):
        best = max(order, key=lambda n, i=i: (strat[i][n][0], -order.index(n)))
        winners.append(best)
        head.append(strat[i][best][1])
    heur = [pol["heuristic"][i] for i in range(args.episodes)]
    rows = {}
    for label, by_i in pol.items():
        t = [by_i[i] for i in range(args.episodes)]
        rows[label] = {"test": _summary(t),
                       "minus_headroom": _summary([a - b for a, b in zip(t, head)]),
                       "minus_heuristic": _summary([a - b for a, b in zip(t, heur)])}
    counts = Counter(winners)
    families = Counter(by_name[w].family for w in winners)
    best_fixed = max(order, key=lambda n: sum(strat[i][n][1] for i in range(args.episodes)))
    report = {
        "task": args.task, "seed": args.seed, "episodes": args.episodes, "epochs": args.epochs,
        "strategies": len(grid), "grid_size": len(full), "seconds": elapsed,
        "headroom": {"test": _summary(head), "minus_heuristic": _summary([h - b for h, b in zip(head, heur)])},
        "policies": rows, "winners": counts.most_common(10), "winning_families": families.most_common(10),
        "per_episode": [{"index": i, "winner": winners[i], "headroom_test": head[i],
                         **{lab: pol[lab][i] for lab in pol}} for i in range(args.episodes)],
        "best_single_strategy_on_test": {"name": best_fixed, "test": _summary(
            [strat[i][best_fixed][1] for i in range(args.episodes)])},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.episodes} paired episodes, run seed {args.seed}, task {args.task}, {args.epochs} epochs, "
          f"{len(grid)} of {len(full)} scripted strategies ({elapsed:.0f} s); test accuracy %, mean and 95% interval")
    print("headroom = per episode, the strategy with the best final val accuracy, scored on test (an oracle over the family)")
    print(f"{'controller':<16} {'test':>7} {'95% CI':>18} {'- headroom':>10} {'95% CI':>18} "
          f"{'- heuristic':>11} {'95% CI':>18}")
    h = report["headroom"]
    print(f"{'headroom':<16} {h['test']['mean']:7.2f} {_ci(h['test']['ci95']):>18} {'':>10} {'':>18} "
          f"{h['minus_heuristic']['mean']:+11.2f} {_ci(h['minus_heuristic']['ci95']):>18}")
    for label, r in rows.items():
        dh = "" if label == "heuristic" else f"{r['minus_heuristic']['mean']:+11.2f}"
        dci = "" if label == "heuristic" else _ci(r["minus_heuristic"]["ci95"])
        print(f"{label:<16} {r['test']['mean']:7.2f} {_ci(r['test']['ci95']):>18} "
              f"{r['minus_headroom']['mean']:+10.2f} {_ci(r['minus_headroom']['ci95']):>18} {dh:>11} {dci:>18}")
    b = report["best_single_strategy_on_test"]
    print(f"(best single strategy over all episodes, chosen on test so optimistic: {b['name']} "
          f"{b['test']['mean']:.2f})")
    print(f"headroom minus heuristic: {h['minus_heuristic']['mean']:+.2f} points {_ci(h['minus_heuristic']['ci95'])}")
    print("top winners (strategy: episodes won):")
    for name, c in counts.most_common(10):
        print(f"  {name:<36} {c}")
    print("top winning families (blueprint ignored):")
    for name, c in families.most_common(10):
        print(f"  {name:<30} {c}")


if __name__ == "__main__":
    main()
