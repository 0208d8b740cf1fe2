"""The store's reader: a consistent snapshot of the episodes committed when it was opened.

Readers open in SWMR-read mode, so any number of them work while a writer appends and after a
writer crashed; they read nothing beyond the commit record. Every read is checked against the
layout, so a damaged file is a one-line StoreError naming what is wrong, not a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ...contracts import ACTION_NAMES, N_ACTIONS, Episode, SeedStage, engine_of
from ...policy import valid_action_mask
from .encoding import decode
from .errors import StoreError, hdf5_reason
from .files import attr_str, open_swmr, real_path
from .layout import DECISION_COLUMNS, DECISION_NAMES, EPISODE_COLUMNS, EPISODE_NAMES, LAYOUT, Counts


class EpisodeReader:
    """Reads the episodes committed to a store when it was opened (a consistent snapshot).

    Safe while a writer appends (SWMR) and after a writer crashed. Raises StoreError (missing,
    truncated, unreadable, other schema) or NotAStoreError (not HDF5 / not a Simic store).

    Attributes: `path`, `n_episodes`, `n_decisions`, `feature_names`, `schema_name`,
    `schema_version`, `blueprint_names` (what the 'blueprint' decision codes index).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.real_path = real_path(self.path)  # the same file a writer through this path locks
        self._file: h5py.File | None = open_swmr(self.real_path, self.path)
        try:
            self._load()
        except StoreError:
            self.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            self.close()
            raise self._damaged(hdf5_reason(exc)) from None

    def _damaged(self, what: str) -> StoreError:
        return StoreError(f"episode store {self.path} is damaged: {what}")

    def _load(self) -> None:
        f = self._file
        commit = f["commit"]
        commit.refresh()  # SWMR: the writer's latest commit, not a cached one
        values = commit[()]
        if values.shape != (len(Counts._fields),) or (values < 0).any():
            raise self._damaged(f"impossible commit record {values.tolist()}")
        self._counts = Counts(*(int(x) for x in values))
        self._check_datasets()
        self.schema_name = attr_str(f.attrs["schema_name"])
        self.schema_version = int(f.attrs["schema_version"])
        self.feature_names = tuple(attr_str(x) for x in f.attrs["feature_names"])
        self.n_episodes = self._counts.n_episodes
        self.n_decisions = self._counts.n_decisions
        self._index = {name: self._read(f"episodes/{name}") for name in EPISODE_NAMES}
        self.blueprint_names = tuple(attr_str(b) for b in self._read("blueprint_names"))
        self._check_index()
        self._meta_blob: bytes | None = None

    def _check_datasets(self) -> None:
        """Open every dataset's header now. A damaged one is refused here, at open, rather than
        met by a writer mid-append or by a command after its work (a writer validates the store
        through a reader, which otherwise touches only the datasets it reads)."""
        absent = set()
        for name, spec in LAYOUT.items():
            if spec.absent is not None and name not in self._file:
                absent.add(name)
                continue
            try:
                ds = self._file[name]
                found = (ds.dtype, ds.shape[1:])
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise self._damaged(f"{name}: {hdf5_reason(exc)}") from None
            if found != (np.dtype(spec.dtype), spec.shape):
                raise self._damaged(f"{name} holds {found[0]} {found[1]} rows, "
                                    f"expected {np.dtype(spec.dtype)} {spec.shape}")
        #: Optional datasets this store lacks (written before they existed): they read as absent.
        self.absent = frozenset(absent)

    def _read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed rows [start, stop) of a dataset (stop defaults to the committed count)."""
        if self._file is None:
            raise StoreError(f"episode store {self.path} reader is closed")
        spec = LAYOUT[name]
        committed = getattr(self._counts, spec.counted_by)
        stop = committed if stop is None else stop
        dtype, tail = spec.dtype, spec.shape
        if name in self.absent:
            return np.full((max(stop - start, 0), *tail), spec.absent, dtype=dtype)
        try:
            ds = self._file[name]
            if ds.shape[0] < committed:
                ds.refresh()  # SWMR: the cached extent may predate the commit we read
            if ds.shape[0] < committed and spec.absent is not None:
                # A writer that predates this column committed rows without it: absent there.
                have = ds[start:min(stop, ds.shape[0])]
                pad = np.full((max(stop - start, 0) - len(have), *tail), spec.absent, dtype=dtype)
                rows = np.concatenate([have.astype(dtype), pad])
            elif ds.shape[0] < committed:
                raise self._damaged(f"{name} has {ds.shape[0]} rows, the commit record "
                                    f"says {committed}")
            else:
                rows = ds[start:stop]
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # HDF5 saw damage
            raise self._damaged(f"{name}: {hdf5_reason(exc)}") from None
        if rows.shape[1:] != tail or rows.dtype != np.dtype(dtype):
            raise self._damaged(f"{name} holds {rows.dtype} {rows.shape[1:]} rows, "
                                f"expected {np.dtype(dtype)} {tail}")
        return rows

    def _check_index(self) -> None:
        """Episodes must tile the decision and metadata arrays exactly (catches corruption)."""
        for first, length, total in (("offset", "length", self.n_decisions),
                                     ("meta_offset", "meta_length", self._counts.n_meta_bytes)):
            lengths = self._index[length].astype(np.int64)
            expected = np.cumsum(lengths) - lengths
            if ((lengths < 0).any() or not np.array_equal(self._index[first], expected)
                    or lengths.sum() != total):
                raise self._damaged("inconsistent episode index")

    def index(self) -> dict[str, np.ndarray]:
        """The episode index: one entry per committed episode in every column; 'key' as str.

        'final_observation' (float32, n x N_FEATURES) is the observation after the episode's last
        epoch where 'has_final_observation' (bool) says the store knows it, zeros elsewhere.
        """
        out = {name: col.copy() for name, col in self._index.items()}
        for col in EPISODE_COLUMNS:
            if col.flag:
                out[col.name] = out[col.name].astype(bool)
        try:
            out["key"] = out["key"].astype(str)
        except UnicodeDecodeError:
            raise self._damaged("an episode key is not text") from None
        return out

    def decisions(self, episodes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every decision column for the given episode positions (None: all), in store order.

        Adds 'episode' (each row's episode position). 'valid' and 'seed_alive' are bool,
        'blueprint' codes index `blueprint_names`. Reasons are not included (see `episode`).
        One read per column, however many episodes are selected.
        """
        lengths = self._index["length"].astype(np.int64)
        if episodes is None:
            out = {name: self._read(f"decisions/{name}") for name in DECISION_NAMES}
            out["episode"] = np.repeat(np.arange(self.n_episodes, dtype=np.int64), lengths)
        else:
            positions = self._positions(episodes)
            starts, counts = self._index["offset"][positions], lengths[positions]
            lo = int(starts.min()) if len(positions) else 0
            hi = int((starts + counts).max()) if len(positions) else 0
            # Row numbers (relative to lo) of every selected decision, without a per-episode loop.
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            rows = np.repeat(starts - lo, counts) + within
            out = {name: self._read(f"decisions/{name}", lo, hi)[rows] for name in DECISION_NAMES}
            out["episode"] = np.repeat(positions, counts)
        self._check_decisions(out)
        for col in DECISION_COLUMNS:
            if col.flag:
                out[col.name] = out[col.name].astype(bool)
        return out

    def _check_decisions(self, cols: dict[str, np.ndarray]) -> None:
        """Coded columns must hold codes this Simic knows: a damaged byte must not become an
        IndexError (or a wrong class) far from the store that holds it."""
        bounds = {"actions": (0, N_ACTIONS - 1), "expert_actions": (-1, N_ACTIONS - 1),
                  "blueprint": (-1, len(self.blueprint_names) - 1),
                  "stage_after": (min(SeedStage), max(SeedStage))}
        for name, (low, high) in bounds.items():
            col = cols[name]
            bad = (col < low) | (col > high)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                where = f"episode {int(cols['episode'][row])}, " if "episode" in cols else ""
                raise self._damaged(f"decisions/{name} holds {int(col[row])} ({where}"
                                    f"expected {low}..{high})")
        probs = cols["behaviour_prob"]
        bad = ~((probs == -1.0) | ((probs >= 0.0) & (probs <= 1.0)))
        if bad.any():
            raise self._damaged(f"decisions/behaviour_prob holds {float(probs[bad][0])} (expected 0..1, "
                                "or -1 for unknown)")
        offsets = cols["reason_offset"].astype(np.int64)
        ends = offsets + cols["reason_length"]
        if ((offsets < 0) | (cols["reason_length"] < 0) | (ends > self._counts.n_reason_bytes)).any():
            raise self._damaged("decisions/reason_offset points outside the reason text")

    def columns(self, episodes: np.ndarray | Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """One row per decision, every column a numpy array of the same length (store order).

        For analysis and offline RL; `pandas.DataFrame` takes every column but the 2-D
        'observation' (one column per name in `feature_names`) and 'action_mask'. `episodes`
        selects episode positions (None: all). Columns:

        - 'episode_id' (str), 'episode' (int64 position in the store), 'step' (0, 1, ... within
          the episode), 'last' (bool: the episode's final decision);
        - 'observation' (float32, N x len(feature_names));
        - 'action_mask' (bool, N x 4, `contracts.Action` order): the actions valid in the state
          the observation describes (`policy.valid_action_mask`, the rule the environment
          applies), derived, not stored: what an offline learner masks its choices with;
        - 'action' (int8, index into contracts.ACTION_NAMES), 'valid' (bool: the action was
          applicable), 'confidence' (float64), 'expert_action' (int8, -1: no expert label);
        - 'reward' and the outcome measured after the decision's epoch: 'accuracy_change',
          'loss_change', 'val_accuracy_after' (float64), 'seed_alive' (bool), 'stage_after'
          (int8, contracts.SeedStage), 'blueprint' (str; '' when the action germinated none);
        - 'behaviour_prob' (float64): the probability the behaviour policy gave the action taken
          (1 for a deterministic policy without exploration); NaN where the store does not know
          (episodes collected before it was recorded).

        Reasons (free text) are left out: `episode(i)` has them; `next_observations` gives the
        observation after each decision (complete transitions).
        """
        selected = np.arange(self.n_episodes) if episodes is None else self._positions(episodes)
        cols = self.decisions(None if episodes is None else selected)
        counts = self._index["length"].astype(np.int64)[selected]
        step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = np.array([self.episode_meta(i)["id"] for i in range(self.n_episodes)], dtype=str)
        names = np.array([*self.blueprint_names, ""])  # code -1 picks the trailing ''
        probs = cols["behaviour_prob"].copy()
        probs[probs < 0] = np.nan
        # Public forms where a column's stored codes are not what an analysis wants.
        forms = {"blueprint": names[cols["blueprint"]], "behaviour_prob": probs}
        out = {
            "episode_id": ids[cols["episode"]],
            "episode": cols["episode"],
            "step": step,
            "last": step == np.repeat(counts, counts) - 1,
        }
        for col in DECISION_COLUMNS:
            if col.public is not None:
                out[col.public] = forms.get(col.name, cols[col.name])
            if col.name == "observations":
                out["action_mask"] = valid_action_mask(cols["observations"])
        return out

    def next_observations(self, episodes: np.ndarray | Iterable[int] | None = None) -> np.ndarray:
        """The observation after each decision, rows aligned with `columns(episodes)` (float32).

        Within an episode it is the next decision's observation; after its last decision, the
        episode's final observation, or a row of NaN where the store does not know it (episodes
        collected before final observations were stored).
        """
        selected = np.arange(self.n_episodes) if episodes is None else self._positions(episodes)
        obs = self.decisions(None if episodes is None else selected)["observations"]
        counts = self._index["length"].astype(np.int64)[selected]
        following = np.empty_like(obs)
        following[:-1] = obs[1:]  # within an episode the next row is the next observation
        ends = np.cumsum(counts)[counts > 0] - 1
        owners = selected[counts > 0]
        known = self._index["has_final_observation"][owners].astype(bool)
        following[ends[known]] = self._index["final_observation"][owners[known]]
        following[ends[~known]] = np.nan
        return following

    def _positions(self, episodes: np.ndarray | Iterable[int]) -> np.ndarray:
        positions = np.asarray(episodes)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_episodes):
            raise IndexError(f"episode positions must be in 0..{self.n_episodes - 1}")
        return positions

    def _position(self, i: int) -> int:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range: the store holds {self.n_episodes}")
        return i % self.n_episodes

    def episode_meta(self, i: int) -> dict[str, Any]:
        """The parsed JSON metadata of episode i (id, policy, config, seeds, rng_seed, ...)."""
        i = self._position(i)
        if self._meta_blob is None:  # one read serves a loop over every episode
            self._meta_blob = self._read("meta_bytes").tobytes()
        start = int(self._index["meta_offset"][i])
        return self._parse_meta(i, self._meta_blob[start: start + int(self._index["meta_length"][i])])

    def _parse_meta(self, i: int, raw: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise self._damaged(f"the metadata of episode {i} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
            raise self._damaged(f"the metadata of episode {i} is not an episode record")
        return meta

    def engine_versions(self) -> dict[int, int]:
        """Committed episodes per engine version (`EpisodeConfig.engine`, 1 for episodes stored
        before it had one), in ascending version order; empty for an empty store.

        The engine is in each episode's config, which its key digests, so episodes of one key share
        it: one small metadata read per distinct key answers for the whole store.
        """
        _, first, counts = np.unique(self._index["key"], return_index=True, return_counts=True)
        found: dict[int, int] = {}
        for i, n in zip(first.tolist(), counts.tolist()):
            if self._meta_blob is None:
                start = int(self._index["meta_offset"][i])
                raw = self._read("meta_bytes", start, start + int(self._index["meta_length"][i])).tobytes()
                meta = self._parse_meta(i, raw)
            else:
                meta = self.episode_meta(i)
            try:
                engine = engine_of(meta["config"])
            except (KeyError, TypeError, ValueError, AttributeError):
                raise self._damaged(f"the metadata of episode {i} names no engine") from None
            found[engine] = found.get(engine, 0) + n
        return dict(sorted(found.items()))

    def episode(self, i: int) -> Episode:
        """Episode i, reconstructed: equal to what was appended (reasons, seeds, config too)."""
        i = self._position(i)
        try:
            return self._episode(i)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # UnicodeDecodeError too
            raise self._damaged(f"episode {i} cannot be rebuilt ({type(exc).__name__}: "
                                f"{hdf5_reason(exc)})") from None

    def _episode(self, i: int) -> Episode:
        meta = self.episode_meta(i)
        start = int(self._index["offset"][i])
        stop = start + int(self._index["length"][i])
        cols = {name: self._read(f"decisions/{name}", start, stop) for name in DECISION_NAMES}
        self._check_decisions(cols)
        blob = b""
        if stop > start:
            first = int(cols["reason_offset"][0])
            last = int(cols["reason_offset"][-1] + cols["reason_length"][-1])
            blob = self._read("reason_bytes", first, last).tobytes()
        entry = {name: column[i] for name, column in self._index.items()}
        return decode(meta, entry, cols, blob, self.blueprint_names)

    def summary(self) -> dict[str, Any]:
        """Store-wide totals: episodes, decisions, action mix, seed fates, accuracy, schema, engine
        versions, and how many episodes keep a final observation and decisions a behaviour probability."""
        actions = self._read("decisions/actions").astype(np.int64)
        if len(actions) and (actions.min() < 0 or actions.max() >= N_ACTIONS):
            bad = int(actions[(actions < 0) | (actions >= N_ACTIONS)][0])
            raise self._damaged(f"decisions/actions holds {bad} (expected 0..{N_ACTIONS - 1})")
        counts = np.bincount(actions, minlength=N_ACTIONS)
        final = self._index["final_accuracy"]
        engines = self.engine_versions()
        return {
            "path": str(self.path),
            "n_episodes": self.n_episodes,
            "n_decisions": self.n_decisions,
            "action_counts": {name: int(counts[a]) for a, name in enumerate(ACTION_NAMES)},
            "seeds_created": int(self._index["seeds_created"].sum()),
            "seeds_fossilized": int(self._index["seeds_fossilized"].sum()),
            "seeds_culled": int(self._index["seeds_culled"].sum()),
            "mean_final_accuracy": float(final.mean()) if len(final) else None,
            "schema_name": self.schema_name,
            "schema_version": self.schema_version,
            # Episodes of two engines are never trained on together (`contracts.ENGINE_VERSION`).
            "engine_versions": list(engines),
            "episodes_per_engine": {str(v): n for v, n in engines.items()},
            # Complete transitions and off-policy data need these; older episodes lack them.
            "episodes_with_final_observation": int(self._index["has_final_observation"].sum()),
            "decisions_with_behaviour_prob": int((self._read("decisions/behaviour_prob") >= 0).sum()),
        }

    def committed_arrays(self) -> dict[str, np.ndarray]:
        """Every dataset's committed rows, by its path in the file (`layout.LAYOUT`); optional
        datasets this store lacks come filled with their absent value.

        What a writer rewrites into a fresh file to recover a crashed store or upgrade an old one;
        it holds the whole store in memory.
        """
        return {name: self._read(name) for name in LAYOUT}

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EpisodeReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
