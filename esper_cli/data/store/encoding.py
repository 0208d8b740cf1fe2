"""Episodes to rows and back: what each column holds, for one episode.

`encode` validates episodes and lays them out as the rows of every dataset (`layout.LAYOUT`),
raising before anything is written; `decode` rebuilds an episode from its rows, equal to the one
encoded. A new column gets its value here, in both directions, and its declaration in `layout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...contracts import (
    N_ACTIONS,
    N_FEATURES,
    Action,
    DecisionRecord,
    Episode,
    EpisodeConfig,
    Outcome,
    SeedLifecycle,
    SeedStage,
    check_finite,
)
from .layout import BLUEPRINT_NAME_BYTES, DECISION_COLUMNS, EPISODE_COLUMNS, EPISODE_NAMES, Counts


@dataclass
class Batch:
    """Rows to append for some episodes, and the commit that makes them visible."""

    rows: dict[str, np.ndarray]  # dataset path -> new rows
    counts: Counts
    blueprints: list[str]
    keys: set[tuple[str, int, int]]


def _finite(values: list[float], what: str) -> np.ndarray:
    # A column vector: check_finite names features only for rows of N_FEATURES values.
    array = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    check_finite(array, what)
    return array.reshape(-1)


def _observations(episode: Episode, what: str) -> np.ndarray:
    obs = np.zeros((len(episode.decisions), N_FEATURES), dtype=np.float32)
    for t, d in enumerate(episode.decisions):
        vec = np.asarray(d.observation, dtype=np.float32)
        if vec.shape != (N_FEATURES,):
            raise ValueError(f"{what} observation {t} has shape {vec.shape}, expected ({N_FEATURES},)")
        obs[t] = vec
    check_finite(obs, f"{what} observation")
    return obs


def _blueprint_code(name: str | None, vocab: dict[str, int], names: list[str]) -> int:
    """The code of a blueprint name, adding it to the (batch-local) vocabulary if new."""
    if name is None:
        return -1
    if name not in vocab:
        if len(name.encode()) > BLUEPRINT_NAME_BYTES or not name:
            raise ValueError(f"blueprint name {name!r} must be 1 to {BLUEPRINT_NAME_BYTES} bytes")
        vocab[name] = len(names)
        names.append(name)
    return vocab[name]


def _decision_rows(episode: Episode, what: str, reason_start: int, vocab: dict[str, int],
                   names: list[str]) -> tuple[dict[str, np.ndarray], bytes]:
    """One episode's decision columns (validated) and its packed reasons."""
    recs = episode.decisions
    floats = {
        "confidence": [d.confidence for d in recs],
        "accuracy_change": [d.outcome.accuracy_change for d in recs],
        "loss_change": [d.outcome.loss_change for d in recs],
        "val_accuracy_after": [d.outcome.val_accuracy for d in recs],
        "reward": [d.outcome.reward for d in recs],
    }
    expert = [int(d.expert_action) for d in recs]
    if any(not -1 <= e < N_ACTIONS for e in expert):
        raise ValueError(f"{what} expert_action must be -1 or 0..{N_ACTIONS - 1}")
    probs = [-1.0 if d.behaviour_prob is None else float(d.behaviour_prob) for d in recs]
    if any(not (p == -1.0 or 0.0 <= p <= 1.0) for p in probs):
        raise ValueError(f"{what} behaviour_prob must be between 0 and 1 (or None)")
    reasons = [d.reason.encode() for d in recs]
    lengths = np.array([len(r) for r in reasons], dtype=np.int64)
    rows = {
        "observations": _observations(episode, what),
        **{k: _finite(v, f"{what} {k}") for k, v in floats.items()},
        "actions": np.array([int(Action(d.action)) for d in recs], dtype=np.int8),
        "expert_actions": np.array(expert, dtype=np.int8),
        "valid": np.array([bool(d.valid) for d in recs], dtype=np.uint8),
        "blueprint": np.array([_blueprint_code(d.blueprint, vocab, names) for d in recs],
                              dtype=np.int16),
        "seed_alive": np.array([bool(d.outcome.seed_alive) for d in recs], dtype=np.uint8),
        "stage_after": np.array([int(SeedStage(d.outcome.stage_after)) for d in recs],
                                dtype=np.int8),
        "reason_offset": reason_start + np.cumsum(lengths) - lengths,
        "reason_length": lengths,
        "behaviour_prob": np.array(probs, dtype=np.float64),
    }
    return rows, b"".join(reasons)


def _final_observation(episode: Episode, what: str) -> np.ndarray | None:
    if episode.final_observation is None:
        return None
    vec = np.asarray(episode.final_observation, dtype=np.float32)
    if vec.shape != (N_FEATURES,):
        raise ValueError(f"{what} final observation has shape {vec.shape}, expected ({N_FEATURES},)")
    check_finite(vec, f"{what} final observation")
    return vec


def _episode_meta(episode: Episode, episode_id: str, key: str) -> bytes:
    """The episode's JSON: everything that is not a number column, and the exact accuracies."""
    what = f"episode {episode_id}:"
    _finite([episode.final_accuracy, episode.best_accuracy, episode.test_accuracy], f"{what} accuracy")
    meta = {
        "id": episode_id,
        "key": key,
        "seed": int(episode.seed),
        "index": int(episode.index),
        "rng_seed": int(episode.rng_seed),
        "policy": episode.policy,
        "policy_version": episode.policy_version,
        "expert": episode.expert,
        "config": episode.config.to_dict(),
        "final_accuracy": float(episode.final_accuracy),
        "best_accuracy": float(episode.best_accuracy),
        "test_accuracy": float(episode.test_accuracy),
        "seeds": [s.to_dict() for s in episode.seeds],
    }
    try:
        return json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise ValueError(f"{what} metadata is not finite JSON ({exc})") from None


def encode(episodes: list[Episode], counts: Counts, blueprints: list[str]) -> Batch:
    """Validate and lay out episodes as rows after `counts`. Raises before anything is written."""
    names = list(blueprints)
    vocab = {name: i for i, name in enumerate(names)}
    decision_parts: list[dict[str, np.ndarray]] = []
    episode_rows: dict[str, list[Any]] = {name: [] for name in EPISODE_NAMES}
    reasons: list[bytes] = []
    metas: list[bytes] = []
    n_dec, n_reason, n_meta = counts.n_decisions, counts.n_reason_bytes, counts.n_meta_bytes
    keys = set()
    for ep in episodes:
        key, episode_id = ep.key, ep.id  # each hashes the config: compute once
        rows, reason_blob = _decision_rows(ep, f"episode {episode_id}:", n_reason, vocab, names)
        meta = _episode_meta(ep, episode_id, key)
        final = _final_observation(ep, f"episode {episode_id}:")
        n = len(ep.decisions)
        values = {
            "offset": n_dec, "length": n, "seed": ep.seed, "index": ep.index,
            "rng_seed": ep.rng_seed, "key": key.encode(),
            "final_accuracy": ep.final_accuracy, "best_accuracy": ep.best_accuracy,
            "test_accuracy": ep.test_accuracy, "seeds_created": ep.seeds_created,
            "seeds_fossilized": ep.seeds_fossilized, "seeds_culled": ep.seeds_culled,
            "meta_offset": n_meta, "meta_length": len(meta),
            "final_observation": np.zeros(N_FEATURES, dtype=np.float32) if final is None else final,
            "has_final_observation": final is not None,
        }
        for name, value in values.items():
            episode_rows[name].append(value)
        decision_parts.append(rows)
        reasons.append(reason_blob)
        metas.append(meta)
        keys.add((key, int(ep.seed), int(ep.index)))
        n_dec, n_reason, n_meta = n_dec + n, n_reason + len(reason_blob), n_meta + len(meta)

    out: dict[str, np.ndarray] = {}
    for col in DECISION_COLUMNS:
        out[f"decisions/{col.name}"] = np.concatenate([p[col.name] for p in decision_parts]).astype(col.dtype)
    for col in EPISODE_COLUMNS:
        out[f"episodes/{col.name}"] = np.array(episode_rows[col.name], dtype=col.dtype).reshape(-1, *col.shape)
    out["reason_bytes"] = np.frombuffer(b"".join(reasons), dtype=np.uint8)
    out["meta_bytes"] = np.frombuffer(b"".join(metas), dtype=np.uint8)
    out["blueprint_names"] = np.array([n.encode() for n in names[len(blueprints):]],
                                      dtype=f"S{BLUEPRINT_NAME_BYTES}")
    new_counts = Counts(counts.n_episodes + len(episodes), n_dec, n_meta, n_reason, len(names))
    return Batch(out, new_counts, names, keys)


def decode(meta: dict[str, Any], entry: dict[str, Any], cols: dict[str, np.ndarray],
           reasons: bytes, blueprint_names: tuple[str, ...]) -> Episode:
    """The episode whose parsed metadata, episode-index `entry` (one value per episode column),
    decision rows `cols` and packed reasons (from its first decision's reason on) are given."""
    first = int(cols["reason_offset"][0]) if len(cols["reason_offset"]) else 0
    decisions = []
    for t in range(len(cols["actions"])):
        a = int(cols["reason_offset"][t]) - first
        code = int(cols["blueprint"][t])
        decisions.append(DecisionRecord(
            observation=cols["observations"][t],
            action=Action(int(cols["actions"][t])),
            valid=bool(cols["valid"][t]),
            confidence=float(cols["confidence"][t]),
            reason=reasons[a: a + int(cols["reason_length"][t])].decode(),
            blueprint=blueprint_names[code] if code >= 0 else None,
            outcome=Outcome(
                accuracy_change=float(cols["accuracy_change"][t]),
                loss_change=float(cols["loss_change"][t]),
                val_accuracy=float(cols["val_accuracy_after"][t]),
                seed_alive=bool(cols["seed_alive"][t]),
                stage_after=SeedStage(int(cols["stage_after"][t])),
                reward=float(cols["reward"][t]),
            ),
            expert_action=int(cols["expert_actions"][t]),
            behaviour_prob=float(cols["behaviour_prob"][t]) if cols["behaviour_prob"][t] >= 0 else None,
        ))
    return Episode(
        seed=int(entry["seed"]),
        index=int(entry["index"]),
        rng_seed=int(entry["rng_seed"]),
        config=EpisodeConfig.from_dict(meta["config"]),
        policy=meta["policy"],
        policy_version=meta["policy_version"],
        decisions=decisions,
        final_accuracy=meta["final_accuracy"],
        best_accuracy=meta["best_accuracy"],
        test_accuracy=meta["test_accuracy"],
        seeds=[SeedLifecycle.from_dict(s) for s in meta["seeds"]],
        expert=meta["expert"],
        final_observation=entry["final_observation"].copy() if entry["has_final_observation"] else None,
    )
