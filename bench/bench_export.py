"""Minari export: the HDF5 episode store versus the Minari dataset it exports, in the same run.

  store read   every decision of every episode, plus the final observations (`columns()`)
  export       `simic export --format minari` (the library call behind it)
  minari load  `minari.load_dataset` and every episode's observations, actions and rewards

    python bench/bench_export.py [--episodes 2000] [--decisions 25]

Needs the rl extra. Synthetic episodes (bench_store's) with a final observation each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_store import synthetic_episodes

from esper_cli.data.interop import export_minari
from esper_cli.data.store import EpisodeReader, EpisodeWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--decisions", type=int, default=25)
    args = parser.parse_args()
    import minari

    rng = np.random.default_rng(1)
    episodes = [replace(ep, final_observation=rng.normal(size=27).astype(np.float32))
                for ep in synthetic_episodes(args.episodes, args.decisions)]
    with tempfile.TemporaryDirectory() as tmp:
        store, root = Path(tmp) / "episodes.h5", Path(tmp) / "minari"
        with EpisodeWriter(store) as writer:
            writer.append_many(episodes)

        start = time.perf_counter()
        with EpisodeReader(store) as reader:
            cols = reader.columns()
        read_s = time.perf_counter() - start
        assert len(cols["observation"]) == args.episodes * args.decisions

        start = time.perf_counter()
        export_minari(store, root, "simic/bench-v0")
        export_s = time.perf_counter() - start

        os.environ["MINARI_DATASETS_PATH"] = str(root)
        start = time.perf_counter()
        dataset = minari.load_dataset("simic/bench-v0")
        steps = sum(len(ep.actions) for ep in dataset.iterate_episodes())  # each read whole
        load_s = time.perf_counter() - start
        assert steps == args.episodes * args.decisions

    print(f"{args.episodes} episodes x {args.decisions} decisions")
    print(f"  store read (columns)  {read_s:8.3f} s")
    print(f"  export to Minari      {export_s:8.3f} s   x{export_s / read_s:7.1f} the store read")
    print(f"  Minari load           {load_s:8.3f} s   x{load_s / read_s:7.1f} the store read")


if __name__ == "__main__":
    main()
