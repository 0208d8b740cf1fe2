"""Train an outside RL learner on Simic's Gymnasium env: Stable-Baselines3's DQN on
`simic/Morphogenetic-v0`, then score it against never growing (WAIT) on held-out run seeds.

    pip install -e ".[rl]" stable-baselines3
    python examples/rl_gymnasium_dqn.py --timesteps 2000 --epochs 10

Each step trains the host for one epoch, so a timestep costs what an epoch costs (tens of ms on
the digits default). The defaults run in about a minute on one CPU core; learning something
useful takes far more steps (and `simic collect --explore` plus `simic export` for offline RL).
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN

import esper_cli.gym_env  # noqa: F401  (registers simic/Morphogenetic-v0)


def score(env: gym.Env, act, seeds: range) -> float:
    """Mean final validation accuracy of `act(obs) -> action` over one episode per run seed."""
    finals = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(act(obs))
            done = terminated or truncated
        finals.append(info["final_accuracy"])
    return float(np.mean(finals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=1000, help="DQN training steps (= epochs trained)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per episode")
    parser.add_argument("--eval-episodes", type=int, default=3, help="held-out run seeds to score on")
    parser.add_argument("--seed", type=int, default=0, help="seeds DQN and the training episodes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the small default host trains fastest on one thread

    # Raw observations span losses, step counts and percentages: normalise them for the network.
    env = gym.wrappers.NormalizeObservation(gym.make("simic/Morphogenetic-v0", epochs=args.epochs))
    env.reset(seed=args.seed)  # run seed; later resets walk episodes 1, 2, ... of that run
    model = DQN("MlpPolicy", env, learning_starts=min(100, args.timesteps), buffer_size=10_000,
                exploration_fraction=0.5, train_freq=1, target_update_interval=100, seed=args.seed, verbose=0)
    model.learn(total_timesteps=args.timesteps, progress_bar=False)

    env.update_running_mean = False  # score with the statistics learned in training
    held_out = range(10_000, 10_000 + args.eval_episodes)
    learned = score(env, lambda obs: int(model.predict(obs, deterministic=True)[0]), held_out)
    wait = score(env, lambda obs: 0, held_out)
    print(f"final val accuracy over {args.eval_episodes} held-out seeds: DQN {learned:.1f}%, WAIT {wait:.1f}% "
          f"(difference {learned - wait:+.1f} points)")


if __name__ == "__main__":
    main()
