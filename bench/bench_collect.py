"""Collection overhead: `simic collect`'s episode loop versus a bare training loop.

Runs, interleaved in one process so machine noise hits all alike, per episode (`--width` N
episodes stepped together by the batched engine, N=1 by default):
  bare       the same host, data, optimiser and epochs in a plain PyTorch loop (train + validate),
             one host at a time
  fused      the engine's fused loop alone for N bare hosts (`MorphogeneticEnv._train_epoch` +
             `_validate`): no policy, no decisions, no store. Against bare: what the engine's
             packed computation costs or saves (at N=1 a lone member computes beside a copy of
             itself, see `simulation.engine`)
  framework  run_episodes of N with a WAIT-only policy (identical compute to fused: no seed is
             ever grown) plus committing each episode to a real HDF5 store -- against fused, the
             pure cost of the framework
  heuristic  run_episodes of N with Heuristic Tamiyo plus the store commits (seeds add real compute)

and then what measuring a seed's worth (schema v2's `seed_improvement`) adds to an epoch with a
TRAINING or BLENDING seed: the validation pass with the counterfactual path against the plain one.

    python bench/bench_collect.py [--episodes 10] [--epochs 25] [--width 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from simic_plugins.heuristic import HeuristicTamiyo

from esper_cli.contracts import Action, Decision, EpisodeConfig, SeedStage, episode_rng_seed
from esper_cli.data.store import EpisodeWriter
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.simulation.episode import EpisodeSpec, run_episodes
from esper_cli.tasks import BUILTIN_TASKS


class WaitOnly:
    name = "wait"

    def reset(self, context) -> None:
        pass

    def decide(self, obs, context) -> Decision:
        return Decision(Action.WAIT, "bench")


def bare_loop(cfg: EpisodeConfig, rng_seed: int) -> float:
    """The training loop with nothing around it: what an episode costs at minimum."""
    data = BUILTIN_TASKS[cfg.task].load(None, 0)
    torch.manual_seed(rng_seed)
    model = BUILTIN_TASKS[cfg.task].build_host()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(rng_seed)
    acc = 0.0
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(data.val_x).argmax(1) == data.val_y).float().mean())
    return acc


def fused_loop(cfg: EpisodeConfig, rng_seeds: list[int]) -> None:
    """The engine's training loop for these hosts with nothing around it (no seed is ever grown)."""
    env = MorphogeneticEnv(cfg, BUILTIN_TASKS[cfg.task], BUILTIN_BLUEPRINTS)
    env.reset(rng_seeds)
    for _ in range(cfg.epochs):
        env._plan()
        env._train_epoch()
        env._validate()


def measurement_cost(cfg: EpisodeConfig, repeats: int = 15) -> None:
    """Epoch cost of the worth measurement, per stage (medians of interleaved timings)."""
    task = BUILTIN_TASKS[cfg.task]
    for stage, advances in ((SeedStage.TRAINING, 1), (SeedStage.BLENDING, 2)):
        env = MorphogeneticEnv(EpisodeConfig(epochs=10 * repeats, blending_epochs=10 * repeats), task,
                               BUILTIN_BLUEPRINTS)
        env.reset([1])
        env.step([Decision(Action.GERMINATE, blueprint="conv_enhance")])
        for _ in range(advances):
            env.step([Decision(Action.ADVANCE)])
        slot = env.members[0].active_slot()
        assert slot is not None and slot.stage == stage
        train, plain, worth = [], [], []
        for _ in range(repeats):
            for out, fn in ((train, env._train_epoch), (plain, partial(env._evaluate, env.data.val_x, env.data.val_y)),
                            (worth, env._validate)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        epoch = statistics.median(train) + statistics.median(plain)
        extra = statistics.median(worth) - statistics.median(plain)
        print(f"  worth measurement in {stage.name:<8}: +{1e3 * extra:5.2f} ms on a {1e3 * epoch:6.1f} ms epoch "
              f"(+{100 * extra / epoch:4.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10, help="rounds (each runs --width episodes per mode)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--width", type=int, default=1, help="episodes stepped together (--envs-per-worker)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = EpisodeConfig(epochs=args.epochs)
    task = BUILTIN_TASKS["digits"]
    policies = {"framework": WaitOnly, "heuristic": HeuristicTamiyo}
    times: dict[str, list[float]] = {"bare": [], "fused": [], "framework": [], "heuristic": []}
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(cfg, 0)  # warm caches (dataset, kernels, the engine's packing checks) before timing
        fused_loop(EpisodeConfig(epochs=1), [0, 1])
        with EpisodeWriter(Path(tmp) / "bench.h5") as writer:
            for r in range(args.episodes):
                indices = range(r * args.width, (r + 1) * args.width)
                rng_seeds = [episode_rng_seed(0, i) for i in indices]
                t0 = time.perf_counter()
                for rng_seed in rng_seeds:
                    bare_loop(cfg, rng_seed)
                times["bare"].append((time.perf_counter() - t0) / args.width)
                t0 = time.perf_counter()
                fused_loop(cfg, rng_seeds)
                times["fused"].append((time.perf_counter() - t0) / args.width)
                for name, make in policies.items():
                    t0 = time.perf_counter()
                    specs = [EpisodeSpec(make(), cfg, 0, i, name) for i in indices]
                    for ep in run_episodes(specs, task=task, blueprints=BUILTIN_BLUEPRINTS):
                        writer.append(ep)  # type: ignore[arg-type]  # a PolicyError would fail here, loudly
                    times[name].append((time.perf_counter() - t0) / args.width)
    bare, fused = statistics.median(times["bare"]), statistics.median(times["fused"])
    print(f"rounds={args.episodes} width={args.width} epochs={args.epochs} "
          f"(median seconds per episode, 1 torch thread)")
    for name, ts in times.items():
        med = statistics.median(ts)
        against = f"   ratio to fused {med / fused:5.3f}   (+{100 * (med / fused - 1):5.1f}%)" if name != "bare" else ""
        print(f"  {name:<10} {med:7.3f} s/episode   ratio to bare {med / bare:5.3f}{against}")
    measurement_cost(cfg)


if __name__ == "__main__":
    main()
