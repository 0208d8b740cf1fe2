"""Episode store: the HDF5 store versus the prototype's one-JSON-file-per-episode directory.

Both formats get the same synthetic episodes, in the same run, so machine noise hits both alike:
  write        every episode (HDF5: one `append_many` commit; JSON: one file each)
  load         every decision into torch tensors: observations float32 (N, 27), actions int64
  commit/ep    HDF5 with one commit per episode, as `simic collect` does it

    python bench/bench_store.py [--episodes 10000] [--decisions 25]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from esper_cli.contracts import (
    N_FEATURES,
    Action,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    Outcome,
    SeedLifecycle,
    SeedStage,
    episode_rng_seed,
)
from esper_cli.data.store import EpisodeReader, EpisodeWriter


def synthetic_episodes(n_episodes: int, n_decisions: int, seed: int = 0) -> list[Episode]:
    """Realistic-looking episodes: random observations, mostly WAIT, a seed or two each."""
    rng = np.random.default_rng(seed)
    config = EpisodeConfig(epochs=n_decisions)
    episodes = []
    for i in range(n_episodes):
        obs = rng.normal(size=(n_decisions, N_FEATURES)).astype(np.float32)
        actions = rng.choice(4, size=n_decisions, p=[0.85, 0.05, 0.07, 0.03])
        decisions = [
            DecisionRecord(
                observation=obs[t], action=Action(int(a)), valid=True, confidence=float(rng.random()),
                reason="plateau: germinate" if a == 1 else "waiting for improvement",
                blueprint="conv_enhance" if a == 1 else None,
                outcome=Outcome(float(rng.normal()), float(rng.normal()), 90 + float(rng.random()),
                                bool(a), SeedStage(int(a)), float(rng.normal())),
            )
            for t, a in enumerate(actions)
        ]
        seeds = [SeedLifecycle(0, "conv_enhance", 0, [("GERMINATED", 3), ("FOSSILIZED", 12)], "fossilized", 0.4)]
        episodes.append(Episode(0, i, episode_rng_seed(0, i), config, "heuristic", "1.0", decisions,
                                91.0, 92.0, 90.5, seeds))
    return episodes


def episode_json(ep: Episode) -> dict:
    """The prototype's per-episode JSON document."""
    return {
        "id": ep.id, "seed": ep.seed, "index": ep.index, "rng_seed": ep.rng_seed,
        "config": ep.config.to_dict(), "policy": ep.policy, "policy_version": ep.policy_version,
        "final_accuracy": ep.final_accuracy, "best_accuracy": ep.best_accuracy,
        "test_accuracy": ep.test_accuracy, "seeds": [s.to_dict() for s in ep.seeds],
        "decisions": [
            {"observation": d.observation.tolist(), "action": int(d.action), "valid": d.valid,
             "confidence": d.confidence, "reason": d.reason, "blueprint": d.blueprint,
             "expert_action": d.expert_action,
             "outcome": {"accuracy_change": d.outcome.accuracy_change, "loss_change": d.outcome.loss_change,
                         "val_accuracy": d.outcome.val_accuracy, "seed_alive": d.outcome.seed_alive,
                         "stage_after": int(d.outcome.stage_after), "reward": d.outcome.reward}}
            for d in ep.decisions
        ],
    }


def write_json(directory: Path, episodes: list[Episode]) -> None:
    directory.mkdir()
    for ep in episodes:
        (directory / f"episode_{ep.index:06d}.json").write_text(json.dumps(episode_json(ep)))


def load_json(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What the prototype did: read every file, then build the tensors (through numpy, its fast path)."""
    obs: list[list[float]] = []
    actions: list[int] = []
    for file in sorted(directory.glob("*.json")):
        for d in json.loads(file.read_text())["decisions"]:
            obs.append(d["observation"])
            actions.append(d["action"])
    return (torch.from_numpy(np.asarray(obs, dtype=np.float32)),
            torch.from_numpy(np.asarray(actions, dtype=np.int64)))


def write_hdf5(path: Path, episodes: list[Episode]) -> None:
    with EpisodeWriter(path) as writer:
        writer.append_many(episodes)


def load_hdf5(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with EpisodeReader(path) as reader:
        cols = reader.decisions()
    return torch.from_numpy(cols["observations"]), torch.from_numpy(cols["actions"].astype(np.int64))


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Fastest of `repeats` runs (the least disturbed by the machine) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--decisions", type=int, default=25, help="decisions per episode")
    parser.add_argument("--commit-episodes", type=int, default=500,
                        help="episodes appended one commit each, to time `simic collect`'s pattern")
    parser.add_argument("--repeats", type=int, default=3, help="loads per format; the best is reported")
    args = parser.parse_args()

    print(f"generating {args.episodes} episodes x {args.decisions} decisions ...", flush=True)
    episodes = synthetic_episodes(args.episodes, args.decisions)
    n = args.episodes * args.decisions
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        h5, js = Path(tmp) / "episodes.h5", Path(tmp) / "json"
        # Writes are timed once: a second run would append to / collide with the first.
        t_h5_write, _ = best_of(1, lambda: write_hdf5(h5, episodes))
        t_js_write, _ = best_of(1, lambda: write_json(js, episodes))
        t_h5_load, (h5_obs, h5_act) = best_of(args.repeats, lambda: load_hdf5(h5))
        t_js_load, (js_obs, js_act) = best_of(args.repeats, lambda: load_json(js))
        # Same tensors from both formats (JSON files sort in episode order).
        assert h5_obs.shape == (n, N_FEATURES) and h5_act.dtype == torch.int64
        assert torch.equal(h5_obs, js_obs) and torch.equal(h5_act, js_act)

        k = min(args.commit_episodes, args.episodes)
        per = Path(tmp) / "per_episode.h5"

        def commit_each() -> None:
            with EpisodeWriter(per) as writer:
                for ep in episodes[:k]:
                    writer.append(ep)

        t_commit, _ = best_of(1, commit_each)
        sizes = size_of(h5), size_of(js)

    print(f"\n{args.episodes} episodes, {n} decisions ({args.repeats} loads each, best shown)")
    print(f"{'':24}{'HDF5 store':>14}{'JSON files':>14}{'ratio':>10}")
    print(f"{'write all':24}{t_h5_write:>13.3f}s{t_js_write:>13.3f}s{t_js_write / t_h5_write:>9.1f}x")
    print(f"{'load into tensors':24}{t_h5_load:>13.3f}s{t_js_load:>13.3f}s{t_js_load / t_h5_load:>9.1f}x")
    print(f"{'size on disk':24}{sizes[0] / 2**20:>12.1f}MB{sizes[1] / 2**20:>12.1f}MB")
    print(f"{'one commit per episode':24}{1000 * t_commit / k:>11.2f}ms/episode ({k} appends)")
    verdict = "meets" if t_js_load / t_h5_load >= 50 else "MISSES"
    print(f"\nload speed-up {t_js_load / t_h5_load:.0f}x ({verdict} the >= 50x target); "
          f"write speed-up {t_js_write / t_h5_write:.1f}x")


if __name__ == "__main__":
    main()
