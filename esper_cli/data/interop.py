"""Export an episode store for offline RL: a Minari dataset, or d3rlpy's own dataset file.

The store stays Simic's working format (measured: Minari loads 10,000 episodes 150-220x slower);
this is for interop. What a consumer reads back is checked with the real consumer
(tests/test_export.py): Minari's `load_dataset` and `recover_environment`, d3rlpy's
`ReplayBuffer.load`. d3rlpy's own Minari reader (`d3rlpy.datasets.get_minari`, 2.8) stacks each
episode's N+1 observations against its N actions, shifting episode k's observations by k rows:
d3rlpy users take `export_d3rlpy` instead.

Minari (`export_minari`): one Simic episode becomes one Minari episode:

- observations: the N decision observations plus the episode's final observation (N+1 rows, raw
  float32, `Box(27)` as `esper_cli.gym_env` declares it); actions (`Discrete(4)`), rewards;
  terminations True on the last step only (the run ends at its last epoch), truncations False;
- seed and options: the run seed and `{"index": i}`, so `reset(seed=seed, options=options)` of
  `simic/Morphogenetic-v0` replays the episode's environment (the env spec is recorded when every
  episode shares one config, with `max_episode_steps` = its epochs, so
  `dataset.recover_environment()` works);
- infos, one entry per observation (index 0 = the reset, index t + 1 = after action t, as a
  Gymnasium env reports them): `action_mask` (int8 (N+1, 4), 1 = valid in that state, the env's
  `info["action_mask"]`), `valid`, `expert_action` (-1 = none) and `behaviour_prob` (NaN at the
  reset and where the store does not know it);
- metadata: `simic_schema` (JSON text: name, version, feature names, as Minari keeps its own
  spaces and env spec), `simic_reset` (JSON text: each episode's `{"seed", "options"}`, plain
  integers; Minari's HDF5 backend hands the per-episode options back as numpy integers), the
  source store and every exported episode's Simic id in order; each episode's own metadata holds
  its id, policy, run seed and index.

Episodes from stores written before final observations were kept cannot give N+1 observations:
they are skipped and counted (`ExportResult.skipped`), never completed with a made-up one.

d3rlpy (`export_d3rlpy`): what `MDPDataset(...).dump(file)` writes, read back with
`d3rlpy.dataset.ReplayBuffer.load(file, d3rlpy.dataset.InfiniteBuffer())`: one d3rlpy episode
per store episode, its N observations, actions and rewards as stored, terminal at its last
decision (the run ends there), discrete action space of size 4. d3rlpy needs no final
observation (a terminal transition does not bootstrap), so every episode with a decision is
exported, old stores' included. What d3rlpy's format has no slot for sits in an `simic` HDF5
group beside d3rlpy's datasets (its loader reads only the datasets it names): `action_mask`
(bool, one row per decision, store order), `episode_length`, `episode_id`, and the attributes
`schema` (JSON) and `store`. d3rlpy's format keeps no action size: `ReplayBuffer.load` infers it
from the largest action in the file (3 where no episode ever culled); `load_d3rlpy` rebuilds the
buffer with Discrete(4).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import FEATURE_NAMES, N_ACTIONS, SCHEMA_NAME, EpisodeConfig
from ..policy import valid_action_mask
from .store import EpisodeReader

MINARI_INSTALL_HINT = 'pip install "simic[rl]"'
D3RLPY_INSTALL_HINT = 'pip install "simic[d3rlpy]"'
#: The HDF5 group of a d3rlpy export that holds what d3rlpy's own format has no slot for.
D3RLPY_SIMIC_GROUP = "simic"
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

    from ..simulation.gym_plugin import ENTRY_POINT, ENV_ID

    kwargs = configs[0].to_dict()
    for collection_only in ("expert", "beta", "explore"):
        kwargs.pop(collection_only, None)
    # The env terminates itself after `epochs` steps; consumers (d3rlpy's get_minari) need the bound.
    return EnvSpec(id=ENV_ID, entry_point=ENTRY_POINT, kwargs=kwargs, max_episode_steps=int(configs[0].epochs))


def _schema(reader: EpisodeReader) -> dict[str, Any]:
    return {"name": reader.schema_name, "version": int(reader.schema_version),
            "feature_names": list(reader.feature_names or FEATURE_NAMES)}


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

    from ..gym_env import observation_bounds

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
        schema = _schema(reader)
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
        observations = np.concatenate([cols["observations"][rows], index["final_observation"][i][None]])
        return EpisodeBuffer(
            seed=int(index["seed"][i]),
            options={"index": int(index["index"][i])},
            observations=observations,
            actions=cols["actions"][rows].astype(np.int64),
            rewards=cols["reward"][rows].astype(np.float64),
            terminations=np.arange(n) == n - 1,
            truncations=np.zeros(n, dtype=bool),
            infos={
                "action_mask": valid_action_mask(observations).astype(np.int8),
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
                "simic_schema": json.dumps(schema),
                "simic_reset": json.dumps([{"seed": int(index["seed"][i]), "options": {"index": int(index["index"][i])}}
                                           for i in chosen]),
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


@dataclass
class D3rlpyExportResult:
    """What a d3rlpy export wrote."""

    path: Path
    episodes: int
    steps: int
    skipped: list[str] = field(default_factory=list)  # Simic ids of episodes without a decision


def import_d3rlpy() -> Any:
    """Import d3rlpy, or say how to install it.

    d3rlpy imports the unmaintained `gym`, whose import prints a notice to stderr about gym
    itself; Simic never uses gym, so the notice is swallowed (it would break one-line errors).
    """
    try:
        with redirect_stderr(io.StringIO()):
            import d3rlpy
    except ImportError as exc:
        raise ExportError(f"d3rlpy export needs d3rlpy ({exc}); install the extra: {D3RLPY_INSTALL_HINT}") from None
    return d3rlpy


def export_d3rlpy(store: Path, out: Path) -> D3rlpyExportResult:
    """Write the store's episodes as d3rlpy's own dataset file `out` (`ReplayBuffer.dump`).

    One d3rlpy episode per store episode with at least one decision (episodes without one are
    skipped and counted): its observations, actions and rewards as stored, terminal at the last
    decision. The per-decision action masks, the Simic episode ids and the observation schema go
    into the file's `simic` group (see the module docstring). Refuses (ExportError) an existing
    `out`, checked before any work: nothing is overwritten. A failure or Ctrl-C midway removes
    the partial file.
    """
    import h5py

    if out.exists():
        raise ExportError(f"--out {out} already exists; choose another file, it is never overwritten")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: its folder {out.parent} does not exist")
    d3rlpy = import_d3rlpy()
    with EpisodeReader(store) as reader:
        index = reader.index()
        cols = reader.decisions()
        ids = [reader.episode_meta(i)["id"] for i in range(reader.n_episodes)]
        schema = _schema(reader)
    lengths = index["length"].astype(np.int64)
    skipped = [ids[i] for i in np.flatnonzero(lengths == 0)]
    if not lengths.any():
        why = f"its {len(skipped)} episodes hold no decision" if skipped else "it holds no episodes"
        raise ExportError(f"nothing to export from {store}: {why}")
    observations = np.asarray(cols["observations"], dtype=np.float32)
    # Rows are in store order, episode after episode: the last row of each non-empty one ends it.
    ends = np.cumsum(lengths)[lengths > 0] - 1
    terminals = np.zeros(len(observations), dtype=np.float32)
    terminals[ends] = 1.0
    ds = d3rlpy.dataset
    episodes = ds.EpisodeGenerator(observations=observations, actions=cols["actions"].astype(np.int64),
                                   rewards=cols["reward"].astype(np.float64), terminals=terminals)()
    # What MDPDataset builds, with the signatures given: d3rlpy logs the ones it infers to stdout.
    dataset = ds.ReplayBuffer(
        ds.InfiniteBuffer(), episodes=episodes,
        observation_signature=ds.Signature(dtype=[np.dtype(np.float32)], shape=[(observations.shape[1],)]),
        action_signature=ds.Signature(dtype=[np.dtype(np.int64)], shape=[(1,)]),
        reward_signature=ds.Signature(dtype=[np.dtype(np.float64)], shape=[(1,)]),
        action_space=d3rlpy.constants.ActionSpace.DISCRETE, action_size=N_ACTIONS,
    )
    try:
        f = open(out, "x+b")  # exclusive: a file that appeared since the check is not ours
    except FileExistsError:
        raise ExportError(f"--out {out} already exists; choose another file, it is never overwritten") from None
    try:
        with f:
            dataset.dump(f)
        with h5py.File(out, "a") as h5:
            group = h5.create_group(D3RLPY_SIMIC_GROUP)
            group.create_dataset("action_mask", data=valid_action_mask(observations))
            group.create_dataset("episode_length", data=lengths[lengths > 0])
            group.create_dataset("episode_id", data=[ids[i] for i in np.flatnonzero(lengths)],
                                 dtype=h5py.string_dtype())
            group.attrs["schema"] = json.dumps(schema)
            group.attrs["store"] = str(store)
    except BaseException:
        out.unlink(missing_ok=True)  # ours: it did not exist before
        raise
    return D3rlpyExportResult(path=out, episodes=len(ends), steps=int(lengths.sum()), skipped=skipped)


def load_d3rlpy(path: Path) -> Any:
    """Read a `export_d3rlpy` file as a d3rlpy `ReplayBuffer` over Simic's four actions.

    `ReplayBuffer.load` alone gives the same episodes, with an action size inferred from the
    largest action present, which is too small for data where CULL never occurs.
    """
    d3rlpy = import_d3rlpy()
    ds = d3rlpy.dataset
    with open(path, "rb") as f:  # the episodes ReplayBuffer.load reads, without its inference logs
        episodes = ds.io.load(ds.Episode, f)
    if not episodes:
        raise ExportError(f"{path} holds no d3rlpy episode")
    first = episodes[0]
    return ds.ReplayBuffer(ds.InfiniteBuffer(), episodes=episodes,
                           observation_signature=first.observation_signature,
                           action_signature=first.action_signature, reward_signature=first.reward_signature,
                           action_space=d3rlpy.constants.ActionSpace.DISCRETE, action_size=N_ACTIONS)
