"""Offline RL with d3rlpy on Simic's data: DiscreteCQL learned from an explored store, then scored
greedily (over the valid actions only) in `simic/Morphogenetic-v0` on held-out run seeds, beside
the heuristic and `wait`.

    pip install -e ".[rl,d3rlpy]"
    python examples/offline_d3rlpy.py --episodes 50 --steps 5000

The pipeline is the command line's: collect heuristic episodes with exploration (`simic collect
--explore 0.2`), export them as d3rlpy's own dataset file (`simic export --format d3rlpy`; d3rlpy's
`get_minari` would misalign our Minari export), load it (`ReplayBuffer.load`, with Discrete(4)), train. The
masks come from the export's `simic` group for the data and from the env's
`info["action_mask"]` when acting. The defaults run in a few minutes on one CPU core; the
learned controller needs far more data than that to beat the heuristic.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import torch

import esper_cli.gym_env  # noqa: F401  (registers simic/Morphogenetic-v0)
from esper_cli.contracts import N_ACTIONS, EpisodeConfig, TrainingSnapshot
from esper_cli.data.interop import D3RLPY_SIMIC_GROUP, export_d3rlpy, import_d3rlpy, load_d3rlpy
from esper_cli.data.store import EpisodeWriter
from esper_cli.plugins import Registry, build_registry
from esper_cli.policy import EpisodeContext, policy_version
from esper_cli.running.collection import CollectConfig, collect_episodes
from esper_cli.running.runner import make_runner

ENV_ID = "simic/Morphogenetic-v0"


def collect(store: Path, registry: Registry, *, episodes: int, epochs: int, explore: float, seed: int) -> None:
    """`simic collect --policy heuristic --explore EPS --episodes N --epochs E --seed S`, via the library."""
    config = EpisodeConfig(epochs=epochs, explore=explore)
    plan = CollectConfig(episode=config, policy="heuristic", seed=seed, episodes=episodes,
                         version=policy_version(registry, "heuristic"))
    with EpisodeWriter(store) as writer, make_runner(registry=registry) as runner:
        collect_episodes(writer, runner, plan, strict=True)


def masked_greedy(algo: Any, obs: np.ndarray, mask: np.ndarray) -> int:
    """The action of highest Q among those `mask` allows (CQL alone would also rank no-ops)."""
    q = np.array([algo.predict_value(obs[None], np.array([a]))[0] for a in range(N_ACTIONS)])
    return int(np.argmax(np.where(mask.astype(bool), q, -np.inf)))


def play(env: gym.Env, act: Any, seeds: list[int]) -> dict[str, float]:
    """One episode per run seed with `act(obs, info) -> action`: mean test and final val accuracy."""
    tests, finals, invalid = [], [], 0
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(act(obs, info))
            invalid += not info["valid"]
            done = terminated or truncated
        tests.append(info["test_accuracy"])
        finals.append(info["final_accuracy"])
    return {"test": float(np.mean(tests)), "val": float(np.mean(finals)), "invalid": invalid}


class PolicyActor:
    """`act(obs, info)` driving a registered Tamiyo policy, reset at each episode's first epoch."""

    def __init__(self, registry: Registry, name: str, epochs: int) -> None:
        self.agent = registry.policies[name]()
        self.blueprints = tuple(registry.blueprints)
        self.epochs = epochs
        self.context: EpisodeContext | None = None

    def __call__(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        if info["epoch"] == 0:  # a reset: every slot is free, so available_slots counts them
            self.context = EpisodeContext(task="digits", max_epochs=self.epochs, blueprints=self.blueprints,
                                          n_slots=int(obs[-1]), rng_seed=info["rng_seed"])
            self.agent.reset(self.context)
        return int(self.agent.decide(TrainingSnapshot.from_vector(obs), self.context).action)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=50, help="explored heuristic episodes to learn from")
    parser.add_argument("--epochs", type=int, default=25, help="epochs per episode")
    parser.add_argument("--explore", type=float, default=0.2, help="exploration epsilon of the collection")
    parser.add_argument("--steps", type=int, default=5000, help="DiscreteCQL gradient steps")
    parser.add_argument("--seed", type=int, default=0, help="run seed of the training episodes (and of CQL)")
    parser.add_argument("--eval-seed", type=int, default=10_000, help="first held-out run seed")
    parser.add_argument("--eval-episodes", type=int, default=5, help="held-out run seeds to score on")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the store and export here (default: a temp dir)")
    args = parser.parse_args(argv)
    held_out = list(range(args.eval_seed, args.eval_seed + args.eval_episodes))
    if args.seed in held_out:
        parser.error(f"--seed {args.seed} is among the held-out seeds {held_out[0]}..{held_out[-1]}")
    torch.set_num_threads(1)  # the small default host trains fastest on one thread
    torch.manual_seed(args.seed)
    # d3rlpy logs every fit through structlog to stdout; keep the table readable.
    d3rlpy = import_d3rlpy()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    d3rlpy.seed(args.seed)

    registry = build_registry()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store, exported = work / "episodes.h5", work / "episodes-d3rlpy.h5"
        collect(store, registry, episodes=args.episodes, epochs=args.epochs, explore=args.explore, seed=args.seed)
        export_d3rlpy(store, exported)
        dataset = load_d3rlpy(exported)  # ReplayBuffer.load, with the action size d3rlpy's file omits
        with h5py.File(exported, "r") as h5:
            masks = h5[D3RLPY_SIMIC_GROUP]["action_mask"][()]
    taken = np.concatenate([e.actions.ravel() for e in dataset.episodes])
    print(f"data: {len(dataset.episodes)} episodes, {dataset.transition_count} transitions, "
          f"{int((~masks[np.arange(len(taken)), taken]).sum())} invalid actions taken")

    algo = d3rlpy.algos.DiscreteCQLConfig(
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        batch_size=min(256, dataset.transition_count), learning_rate=3e-4,
        target_update_interval=max(1, min(500, args.steps // 10)), alpha=1.0,
    ).create(device="cpu:0")
    algo.fit(dataset, n_steps=args.steps, n_steps_per_epoch=args.steps, show_progress=False,
             logger_adapter=d3rlpy.logging.NoopAdapterFactory(), save_interval=args.steps + 1)
    print(f"trained DiscreteCQL: {algo.grad_step} gradient steps")

    env = gym.make(ENV_ID, epochs=args.epochs)
    rows = {
        "cql (masked greedy)": play(env, lambda obs, info: masked_greedy(algo, obs, info["action_mask"]), held_out),
        "heuristic": play(env, PolicyActor(registry, "heuristic", args.epochs), held_out),
        "wait": play(env, PolicyActor(registry, "wait", args.epochs), held_out),
    }
    print(f"held-out run seeds {held_out[0]}..{held_out[-1]} ({len(held_out)} episodes of {args.epochs} epochs):")
    print(f"{'policy':<22}{'test acc %':>11}{'final val %':>13}{'invalid':>9}")
    for name, r in rows.items():
        print(f"{name:<22}{r['test']:>11.2f}{r['val']:>13.2f}{r['invalid']:>9d}")
    gap = rows["cql (masked greedy)"]["test"] - rows["heuristic"]["test"]
    print(f"cql minus heuristic: {gap:+.2f} test accuracy points")


if __name__ == "__main__":
    main()
