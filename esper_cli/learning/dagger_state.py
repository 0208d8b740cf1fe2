"""The run state of `simic dagger`, so that the same command after Ctrl-C or SIGKILL continues
from its next round and ends bit-identical to an uninterrupted run.

A round needs nothing from the rounds before it but the store (its collect stages resume per
episode on their own), round r-1's checkpoint (a file already) and the comparison seed: training
and collection are seeded per round and per episode, so there is no generator state to carry.
The state therefore holds JSON only (in the header of a tensorless safetensors file, written by
`learning.run_state`): the configuration, whether round 0 bootstraps the store, the eval seed
picked at the start, every completed round's result, and the sha256 of the last round's
checkpoint, so a checkpoint replaced behind the run's back is detected instead of learnt from.
It is written once before any work (so a kill during the bootstrap collection resumes it with the
same plan) and again after every round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .run_state import RunStateError, config_difference, load_run_state, refuse_engine_change, save_run_state

#: Settings that say where episodes run, not what they are: a resumed run may change them. The thread
#: count is not one of them: it changes the order of float sums, and so the numbers.
RUNTIME_SETTINGS = ("workers", "backend", "ray_address", "envs_per_worker")


@dataclass(frozen=True)
class DaggerResume:
    """Where a DAgger run stands: what its next round needs and what its completed rounds reported."""

    eval_seed: int  # the comparisons' run seed, picked once at the start
    bootstrap: bool  # round 0 collects the expert's episodes first (the store was empty at the start)
    results: list[dict[str, Any]]  # one per completed round, as `run_dagger` returned them

    @property
    def next_round(self) -> int:
        return len(self.results)


def run_state_path(final: Path) -> Path:
    """Where a DAgger run keeps its state: next to the final checkpoint (`--out`)."""
    return final.with_name(f"{final.stem}.dagger-run.safetensors")


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def state_config(cfg: Any) -> dict[str, Any]:
    """The settings of a `DaggerConfig` a resumed run must share with the saved one, JSON-able."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in RUNTIME_SETTINGS:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = value.to_dict() if f.name == "episode" else str(value) if isinstance(value, Path) else value
    return out


def save_dagger_state(path: Path, cfg: Any, resume: DaggerResume) -> int:
    """Write the run state (atomically); returns its size in bytes."""
    last = Path(resume.results[-1]["checkpoint"]) if resume.results else None
    state = {"command": "dagger", "config": state_config(cfg), "eval_seed": resume.eval_seed,
             "bootstrap": resume.bootstrap, "rounds": resume.results,
             "checkpoint_sha256": None if last is None else file_sha256(last)}
    return save_run_state(path, {}, state)


def load_dagger_state(path: Path, cfg: Any) -> tuple[Any, DaggerResume] | None:
    """(cfg with the saved eval seed, where the run stands) from the state at `path`; None when
    there is none. `cfg.eval_seed` None takes the saved one. Raises `RunStateError` (one line) for
    a damaged state, another configuration, or a last-round checkpoint that is not the one saved."""
    loaded = load_run_state(path)
    if loaded is None:
        return None
    _, state = loaded
    if state.get("command") != "dagger":
        raise RunStateError(f"run state {path} belongs to `simic {state.get('command')}`, not dagger; pass --restart")
    if cfg.eval_seed is None:
        cfg = replace(cfg, eval_seed=state["eval_seed"])
    refuse_engine_change(path, state["config"], state_config(cfg))
    difference = config_difference(state["config"], state_config(cfg))
    if difference is not None:
        raise RunStateError(f"run state {path} was saved by another configuration ({difference}); "
                            f"run the same command to resume, or pass --restart to start over")
    resume = DaggerResume(eval_seed=int(state["eval_seed"]), bootstrap=bool(state["bootstrap"]),
                          results=list(state["rounds"]))
    if resume.results:
        from .dagger_loop import store_episodes  # the loop imports this module

        held, saved = store_episodes(cfg.store)[0], resume.results[-1]["store_episodes"]
        if held < saved:
            raise RunStateError(f"store {cfg.store} holds {held} episodes, fewer than the {saved} of round "
                                f"{resume.next_round - 1} in the run state {path}; pass --restart to start over")
        last = Path(resume.results[-1]["checkpoint"])
        if file_sha256(last) != state["checkpoint_sha256"]:
            raise RunStateError(f"checkpoint {last} is not the one round {resume.next_round - 1} wrote (changed or "
                                f"missing since the run state {path} was saved); pass --restart to start over")
    return cfg, resume
