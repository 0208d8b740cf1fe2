"""Collection overhead: `simic collect`'s episode loop versus a bare training loop.

Runs, interleaved in one process so machine noise hits both alike:
  bare       the same host, data, optimiser and epochs in a plain PyTorch loop (train + validate)
  framework  run_episode with a WAIT-only policy (identical compute: no seed is ever grown) plus
             committing the episode to a real HDF5 store -- the pure cost of the framework
  heuristic  run_episode with Heuristic Tamiyo plus the store commit (seeds add real compute)

and then what measuring a seed's worth (schema v2's `seed_improvement`) adds to an epoch with a
TRAINING or BLENDING seed: the validation pass with the counterfactual path against the plain one.

    python bench/bench_collect.py [--episodes 10] [--epochs 25]
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
from esper_cli.simulation.episode import run_episode
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


def measurement_cost(cfg: EpisodeConfig, repeats: int = 15) -> None:
    """Epoch cost of the worth measurement, per stage (medians of interleaved timings)."""
    task = BUILTIN_TASKS[cfg.task]
    for stage, advances in ((SeedStage.TRAINING, 1), (SeedStage.BLENDING, 2)):
        env = MorphogeneticEnv(EpisodeConfig(epochs=10 * repeats, blending_epochs=10 * repeats), task,
                               BUILTIN_BLUEPRINTS)
        env.reset(1)
        env.step(Decision(Action.GERMINATE, blueprint="conv_enhance"))
        for _ in range(advances):
            env.step(Decision(Action.ADVANCE))
        assert env.active_slot().stage == stage
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
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = EpisodeConfig(epochs=args.epochs)
    task = BUILTIN_TASKS["digits"]
    times: dict[str, list[float]] = {"bare": [], "framework": [], "heuristic": []}
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(cfg, 0)  # warm caches (dataset, kernels) before timing anything
        with EpisodeWriter(Path(tmp) / "bench.h5") as writer:
            for i in range(args.episodes):
                t0 = time.perf_counter()
                bare_loop(cfg, episode_rng_seed(0, i))
                times["bare"].append(time.perf_counter() - t0)
                for name, policy in (("framework", WaitOnly()), ("heuristic", HeuristicTamiyo())):
                    t0 = time.perf_counter()
                    ep = run_episode(policy, cfg, 0, i, task=task, blueprints=BUILTIN_BLUEPRINTS, policy_name=name)
                    writer.append(ep)
                    times[name].append(time.perf_counter() - t0)
    bare = statistics.median(times["bare"])
    print(f"episodes={args.episodes} epochs={args.epochs} (median seconds per episode, 1 torch thread)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<10} {med:7.3f} s/episode   ratio to bare {med / bare:5.3f}   (+{100 * (med / bare - 1):5.1f}%)")
    measurement_cost(cfg)


if __name__ == "__main__":
    main()
