"""Export an episode store to a Minari dataset, the offline-RL format d3rlpy and TorchRL read.

The store stays Simic's working format (measured: Minari loads 10,000 episodes 150-220x slower);
this is for interop. One Simic episode becomes one Minari episode:

- observations: the N decision observations plus the episode's final observation (N+1 rows, raw
  float32, `Box(27)` as `esper_cli.gym_env` declares it); actions (`Discrete(4)`), rewards;
  terminations True on the last step only (the run ends at its last epoch), truncations False;
- seed and options: the run seed and `{"index": i}`, so `reset(seed=seed, options=options)` of
  `simic/Morphogenetic-v0` replays the episode's environment (the env spec is recorded when every
  episode shares one config, so `dataset.recover_environment()` works);
- infos, one entry per observation (index 0 = the reset, index t + 1 = after action t, as a
  Gymnasium env reports them): `valid`, `expert_action` (-1 = none) and `behaviour_prob` (NaN at
  the reset and where the store does not know it);
- metadata: the observation schema (name, version, feature names), the source store and every
  exported episode's Simic id in order; each episode's own metadata holds its id, policy, run
  seed and index.

Episodes from stores written before final observations were kept cannot give N+1 observations:
they are skipped and counted (`ExportResult.skipped`), never completed with a made-up one.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contracts import FEATURE_NAMES, N_ACTIONS, SCHEMA_NAME, EpisodeConfig
from .store import EpisodeReader

MINARI_INSTALL_HINT = 'pip install "simic[rl]"'
DEFAULT_DATASET_ID = "simic/episodes-v0"
#: Episodes handed to Minari per write: progress moves, memory stays bounded.
_CHUNK = 256


class ExportError(Exception):
    """Bad input or an impossible export; one-line message, nothing left behind."""


@dataclass
class ExportResult:
    """What an export wrote."""

    dataset_id: str
    root: Path  # the Minari datasets root (MINARI_DATASETS_PATH to load it)
    path: Path  # the dataset's own folder
    episodes: int
    steps: int
    skipped: list[str] = field(default_factory=list)  # Simic ids without a final observation


def import_minari() -> Any:
    """Import Minari (with the HDF5 backend's dependencies), or say how to install it."""
    try:
        import h5py  # noqa: F401  (the HDF5 backend)
        import minari
        import PIL  # noqa: F401  (Minari's HDF5 backend imports it without declaring it)
    except ImportError as exc:
        raise ExportError(f"Minari export needs minari with its HDF5 backend ({exc}); "
                          f"install the extra: {MINARI_INSTALL_HINT}") from None
    return minari


@contextmanager
def _datasets_root(root: Path) -> Iterator[None]:
    """Point Minari at `root` (it reads MINARI_DATASETS_PATH at each call), then restore."""
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root.resolve())
    try:
        with warnings.catch_warnings():
            # Minari advises on metadata an export cannot know (author, e-mail, code link) and on
            # env specs it lacks when episodes differ; the result names what it holds.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"minari\.")
            yield
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def _env_spec(configs: list[EpisodeConfig]) -> Any:
    """The Gymnasium spec of the episodes' environment when they share one config, else None."""
    if not configs or any(c != configs[0] for c in configs):
        return None
    from gymnasium.envs.registration import EnvSpec

    from .gym_plugin import ENTRY_POINT, ENV_ID

    kwargs = configs[0].to_dict()
    for collection_only in ("expert", "beta", "explore"):
        kwargs.pop(collection_only, None)
    return EnvSpec(id=ENV_ID, entry_point=ENTRY_POINT, kwargs=kwargs)


def export_minari(store: Path, out: Path, dataset_id: str = DEFAULT_DATASET_ID, *,
                  on_progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the store's episodes as the Minari dataset `dataset_id` under the datasets root `out`.

    Refuses (ExportError) a malformed id, an `out` that is not a folder, and a dataset that
    already exists there: nothing is overwritten. A failure or Ctrl-C midway removes the partial
    dataset. `on_progress(done, total)` is called as episodes are written.
    """
    minari = import_minari()
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id

    from .gym_env import observation_bounds

    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        raise ExportError(f"--dataset-id {dataset_id!r} is not a Minari id "
                          "(namespace/name-vN, e.g. simic/episodes-v0)") from None
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is not a folder (it is the Minari datasets root)")
    target = out / dataset_id
    if target.exists():
        raise ExportError(f"Minari dataset {dataset_id} already exists in {out} ({target}); "
                          "choose another --dataset-id or --out, it is never overwritten")

    with EpisodeReader(store) as reader:
        index = reader.index()
        cols = reader.decisions()
        metas = [reader.episode_meta(i) for i in range(reader.n_episodes)]
    has_final = index["has_final_observation"]
    chosen = np.flatnonzero(has_final)
    skipped = [metas[i]["id"] for i in np.flatnonzero(~has_final)]
    if len(chosen) == 0:
        why = (f"its {len(skipped)} episodes were collected before final observations were stored"
               if skipped else "it holds no episodes")
        raise ExportError(f"nothing to export from {store}: {why}")
    configs = [EpisodeConfig.from_dict(metas[i]["config"]) for i in chosen]
    from gymnasium import spaces

    low, high = observation_bounds(max(c.epochs for c in configs))
    observation_space = spaces.Box(low, high, dtype=np.float32)
    action_space = spaces.Discrete(N_ACTIONS)

    def buffer(i: int) -> Any:
        start, n = int(index["offset"][i]), int(index["length"][i])
        rows = slice(start, start + n)
        probs = cols["behaviour_prob"][rows].astype(np.float64)
        probs[probs < 0] = np.nan
        return EpisodeBuffer(
            seed=int(index["seed"][i]),
            options={"index": int(index["index"][i])},
            observations=np.concatenate([cols["observations"][rows], index["final_observation"][i][None]]),
            actions=cols["actions"][rows].astype(np.int64),
            rewards=cols["reward"][rows].astype(np.float64),
            terminations=np.arange(n) == n - 1,
            truncations=np.zeros(n, dtype=bool),
            infos={
                "valid": np.concatenate([[True], cols["valid"][rows].astype(bool)]),
                "expert_action": np.concatenate([[-1], cols["expert_actions"][rows]]).astype(np.int8),
                "behaviour_prob": np.concatenate([[np.nan], probs]),
            },
        )

    out.mkdir(parents=True, exist_ok=True)
    policies = sorted({metas[i]["policy"] for i in chosen})
    done = 0
    try:
        with _datasets_root(out):
            first = [buffer(int(i)) for i in chosen[:_CHUNK]]
            spec = _env_spec(configs)
            dataset = minari.create_dataset_from_buffers(
                dataset_id, first, env=spec, eval_env=spec,
                observation_space=observation_space, action_space=action_space,
                algorithm_name="simic collect: " + ", ".join(policies),
                description=f"Simic episodes exported from {store}: morphogenetic training runs, one "
                            f"decision per epoch; observations are raw {SCHEMA_NAME} vectors.",
            )
            done = len(first)
            if on_progress:
                on_progress(done, len(chosen))
            for at in range(_CHUNK, len(chosen), _CHUNK):
                part = [buffer(int(i)) for i in chosen[at: at + _CHUNK]]
                dataset.storage.update_episodes(part)
                done += len(part)
                if on_progress:
                    on_progress(done, len(chosen))
            dataset.storage.update_metadata({
                "simic_schema": {"name": reader.schema_name, "version": reader.schema_version,
                                 "feature_names": list(FEATURE_NAMES)},
                "simic_store": str(store),
                "simic_episode_ids": [metas[i]["id"] for i in chosen],
            })
            dataset.storage.update_episode_metadata([
                {"simic_episode_id": metas[i]["id"], "simic_policy": metas[i]["policy"],
                 "simic_run_seed": int(index["seed"][i]), "simic_index": int(index["index"][i])}
                for i in chosen
            ])
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # ours: it did not exist before
        raise
    return ExportResult(dataset_id=dataset_id, root=out, path=target, episodes=len(chosen),
                        steps=int(index["length"][chosen].sum()), skipped=skipped)
