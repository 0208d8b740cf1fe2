"""Training throughput and decide() latency of the learned Tamiyo policies.

1. Synthesises a ~250,000-decision episode store: a few real heuristic episodes, replicated with
   small noise on the continuous features (losses, accuracies) and written through the store's
   writer, so loading is measured on a real HDF5 file.
2. Training throughput, decisions per second per epoch, measured interleaved in one process:
     original   the prototype's style: observations in Python lists, shuffled index list,
                mini-batches of 32 built by Python indexing + torch.tensor() every step
     mlp/32     training.train_one_epoch: tensors loaded once, randperm slices, batch 32
     mlp/256    the same with batch 256
     gru/4      whole episodes, 4 per batch (= 100 decisions for 25-epoch episodes)
3. decide() latency, one torch thread, p50/p99 over many single decisions: MLP (numpy forward),
   the same MLP through torch under inference_mode (the road not taken), GRU, heuristic.

    python bench/bench_train.py [--decisions 250000] [--repeats 2] [--store PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from simic_plugins.gru import GRUTamiyo
from simic_plugins.heuristic import HeuristicTamiyo
from simic_plugins.mlp import MLPTamiyo

from esper_cli.contracts import EpisodeConfig, TrainingSnapshot
from esper_cli.data.decisions import load_decisions
from esper_cli.data.preprocess import class_weights, fit_normaliser
from esper_cli.data.store import EpisodeWriter
from esper_cli.learning.training import (
    TrainConfig,
    build_network,
    network_options,
    to_tensors,
    train_one_epoch,
    train_policy,
    trainable_policy,
)
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.episode import run_episode
from esper_cli.tasks import BUILTIN_TASKS

CONTINUOUS = [2, 3, 4, 5, 6, 7, 9, 10, *range(11, 21), 25]  # losses, accuracies, histories, improvement
LOSSES = [2, 3, 10, *range(11, 16)]


def synthesise_store(path: Path, n_decisions: int, base_episodes: int, seed: int = 0) -> float:
    """Write ~n_decisions heuristic decisions: real episodes, replicated with feature noise."""
    rng = np.random.default_rng(seed)
    cfg = EpisodeConfig()
    base = [run_episode(HeuristicTamiyo(), cfg, 0, i, task=BUILTIN_TASKS["digits"],
                        blueprints=BUILTIN_BLUEPRINTS, policy_name="heuristic") for i in range(base_episodes)]
    per = len(base[0].decisions)
    t0 = time.perf_counter()
    synthetic = []
    for k in range(-(-n_decisions // per)):
        ep = base[k % len(base)]
        decisions = []
        for d in ep.decisions:
            obs = d.observation.copy()
            obs[CONTINUOUS] += rng.normal(0, 0.01, len(CONTINUOUS)).astype(np.float32)
            obs[LOSSES] = np.abs(obs[LOSSES])  # losses stay >= 0
            decisions.append(dataclasses.replace(d, observation=obs))
        synthetic.append(dataclasses.replace(ep, index=k, seed=1000, decisions=decisions))
    with EpisodeWriter(path) as writer:
        for i in range(0, len(synthetic), 500):  # a few large commits
            writer.append_many(synthetic[i : i + 500])
    return time.perf_counter() - t0


def original_style_epoch(model, opt, x_list, y_list, weight, batch_size=32) -> None:
    """The prototype's loop: Python lists, Python-built mini-batches, a tensor per step."""
    order = list(range(len(x_list)))
    random.shuffle(order)
    for i in range(0, len(order), batch_size):
        b = order[i : i + batch_size]
        xb = torch.tensor([x_list[j] for j in b], dtype=torch.float32)
        yb = torch.tensor([y_list[j] for j in b], dtype=torch.long)
        loss = F.cross_entropy(model(xb), yb, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()


def percentiles(fn, n: int) -> tuple[float, float]:
    ts = np.empty(n)
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        ts[i] = time.perf_counter_ns() - t
    return float(np.percentile(ts, 50) / 1e3), float(np.percentile(ts, 99) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=250_000)
    parser.add_argument("--base-episodes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-calls", type=int, default=20_000)
    parser.add_argument("--store", type=Path, help="Use this store instead of synthesising one.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            store = Path(tmp) / "bench.h5"
            secs = synthesise_store(store, args.decisions, args.base_episodes)
            print(f"synthesised store: {secs:.1f} s to write")
        t0 = time.perf_counter()
        data = load_decisions(store)
        load_s = time.perf_counter() - t0
        n = len(data.labels)
        print(f"store: {data.n_episodes} episodes, {n} decisions, loaded in {load_s:.2f} s "
              f"({n / load_s:,.0f} decisions/s)")

        mean, std = fit_normaliser(data.observations)
        weight = torch.from_numpy(class_weights(data.labels, "auto"))
        flat = to_tensors(data, mean, std, sequence=False)
        seq = to_tensors(data, mean, std, sequence=True)
        x_list = ((data.observations - mean) / std).tolist()
        y_list = data.labels.tolist()
        gen = torch.Generator().manual_seed(0)

        def fresh(kind: str):
            model = trainable_policy(kind).network(**network_options(dict(trainable_policy(kind).defaults)))
            return model, torch.optim.Adam(model.parameters(), lr=1e-3)

        runs = {
            "original (lists, batch 32)": lambda m, o: original_style_epoch(m, o, x_list, y_list, weight),
            "mlp (tensors, batch 32)": lambda m, o: train_one_epoch(m, o, flat, weight, 32, gen),
            "mlp (tensors, batch 256)": lambda m, o: train_one_epoch(m, o, flat, weight, 256, gen),
            "gru (4 episodes/batch)": lambda m, o: train_one_epoch(m, o, seq, weight, 4, gen),
        }
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            for name, run in runs.items():
                model, opt = fresh("gru" if name.startswith("gru") else "mlp")
                t0 = time.perf_counter()
                run(model, opt)
                rates[name].append(n / (time.perf_counter() - t0))
        base = max(rates["original (lists, batch 32)"])
        print(f"\ntraining throughput, one epoch over {n} decisions, 1 torch thread (best of {args.repeats}):")
        for name, r in rates.items():
            print(f"  {name:<28} {max(r):>10,.0f} decisions/s   x{max(r) / base:5.2f} vs original")

        # decide() latency needs real checkpoints; weights do not matter, so train briefly.
        ckpts = {}
        for kind in ("mlp", "gru"):
            ckpts[kind], _ = train_policy(store, TrainConfig(kind, epochs=1, allow_missing_classes=True),
                                          out=Path(tmp) / f"{kind}.safetensors")
        obs = [TrainingSnapshot.from_vector(o) for o in data.observations[:2000]]
        mlp, gru, heur = MLPTamiyo(checkpoint=ckpts["mlp"]), GRUTamiyo(checkpoint=ckpts["gru"]), HeuristicTamiyo()
        net = build_network("mlp", mlp.checkpoint.meta["hparams"])
        net.load_state_dict(mlp.checkpoint.tensors)
        net.eval()
        mean_t, std_t = (torch.tensor(v, dtype=torch.float32) for v in mlp.checkpoint.normalisation)

        def torch_decide(o: TrainingSnapshot) -> int:
            with torch.inference_mode():
                x = (torch.from_numpy(o.to_vector()) - mean_t) / std_t
                p = torch.softmax(net(x), dim=-1)
                return int(p.argmax())

        calls = args.latency_calls
        print(f"\ndecide() latency, {calls} single decisions, 1 torch thread:")
        results = {
            "mlp (numpy)": percentiles(lambda i: mlp.decide(obs[i % len(obs)]), calls),
            "mlp (torch, inference_mode)": percentiles(lambda i: torch_decide(obs[i % len(obs)]), calls),
            "gru (numpy, hidden carried)": percentiles(lambda i: gru.decide(obs[i % len(obs)]), calls),
            "heuristic": percentiles(lambda i: heur.decide(obs[i % len(obs)]), calls),
            "TrainingSnapshot.to_vector": percentiles(lambda i: obs[i % len(obs)].to_vector(), calls),
        }
        for name, (p50, p99) in results.items():
            print(f"  {name:<30} p50 {p50:7.1f} us   p99 {p99:7.1f} us")
        t0 = time.perf_counter()
        mlp.decide_batch(data.observations)
        dt = time.perf_counter() - t0
        print(f"  mlp decide_batch over {n}: {dt * 1e3:.1f} ms ({dt / n * 1e9:.0f} ns/decision)")


if __name__ == "__main__":
    main()
