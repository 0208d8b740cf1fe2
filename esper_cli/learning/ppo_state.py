"""The run state of `simic improve`, so that the same command after Ctrl-C or SIGKILL continues
from its last completed update and ends with the checkpoint an uninterrupted run writes.

One file beside `--out` (`<out stem>.run.safetensors`, see `learning.run_state`), saved after
every completed update: the policy and the baseline, both Adam optimisers' moments, the
minibatch generator, the curve, the best acting policy so far with its score and update, the
softening temperature, every episode learned from and the count of episodes used. The episodes
themselves need no state: episode k of update u is a pure function of (config, seed, u, k).

It is kept when the run completes, so the same command again finds the run complete, writes the
same checkpoint and runs nothing; `--restart` removes it.

What a resumed run may change: `workers`, `backend`, `ray_address` and `envs_per_worker` (1 worker, N
workers, Ray and any batch width give the same checkpoint) and `out` (a moved folder). Everything else, `threads` included (another thread count changes
the order of float sums), must match the saved state, or the run is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from .run_state import (
    RunStateError,
    config_difference,
    generator_state,
    load_run_state,
    optimizer_state,
    refuse_engine_change,
    restore_generator,
    restore_optimizer,
    save_run_state,
)

if TYPE_CHECKING:  # ppo imports this module
    from .ppo import ImproveConfig, ImproveResult, _Learner

#: Settings a resumed run may change: they do not change a single number of the result (`out`
#: only names where the state is, so a moved folder still resumes).
MAY_CHANGE = ("workers", "backend", "ray_address", "envs_per_worker", "out")


def state_path(cfg: ImproveConfig) -> Path:
    """Where the run state of `cfg` lives: beside `--out`."""
    return cfg.out.with_name(f"{cfg.out.stem}.run.safetensors")


def comparable(cfg: ImproveConfig) -> dict[str, Any]:
    """The configuration a resumed run must share with the saved state."""
    return {k: v for k, v in cfg.to_dict().items() if k not in MAY_CHANGE}


@dataclass
class Saved:
    """Where a run stands after its last completed update (`next_update` is the one to run)."""

    next_update: int = 0
    best_score: float = -math.inf
    best: dict[str, torch.Tensor] | None = None


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_state(cfg: ImproveConfig, learner: _Learner, result: ImproveResult, saved: Saved) -> int:
    """Write the run state after a completed update (atomically); returns its size in bytes."""
    assert learner.value is not None and learner.value_opt is not None
    tensors = {f"policy.{k}": v for k, v in learner.policy.state_dict().items()}
    tensors |= {f"value.{k}": v for k, v in learner.value.state_dict().items()}
    if saved.best is not None:
        tensors |= {f"best.{k}": v for k, v in saved.best.items()}
    opt_tensors, opt_json = optimizer_state(learner.opt, "opt")
    value_tensors, value_json = optimizer_state(learner.value_opt, "value_opt")
    tensors |= opt_tensors | value_tensors
    tensors["gen"] = generator_state(learner.gen)
    state = {"run": "simic improve", "config": comparable(cfg), "next_update": saved.next_update,
             "best_score": saved.best_score if math.isfinite(saved.best_score) else None,
             "best_update": result.best_update, "episodes_used": result.episodes_used,
             "bootstrap_episodes": result.bootstrap_episodes, "temperature": result.temperature,
             "history": result.history, "seen": learner.seen,
             "value_scale": [learner.value.shift, learner.value.scale], "opt": opt_json, "value_opt": value_json}
    return save_run_state(state_path(cfg), tensors, state)


def check_state(cfg: ImproveConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved run state of `cfg` (None when there is none). `RunStateError`, one line, for a
    damaged file or one saved with another configuration (naming the first difference)."""
    loaded = load_run_state(state_path(cfg))
    if loaded is None:
        return None
    state = loaded[1]
    if state.get("run") != "simic improve":
        raise RunStateError(f"run state {state_path(cfg)} is not a simic improve run's; pass --restart to start over")
    refuse_engine_change(state_path(cfg), state["config"], comparable(cfg))
    difference = config_difference(state["config"], comparable(cfg))
    if difference is not None:
        raise RunStateError(f"run state {state_path(cfg)} was saved with another configuration ({difference}); "
                            "run the same command to resume, or pass --restart to start over")
    return loaded


def restore_state(loaded: tuple[dict[str, torch.Tensor], dict[str, Any]], learner: _Learner,
                  result: ImproveResult, cfg: ImproveConfig) -> Saved:
    """Put the saved run back into `learner` and `result`; where the run stands."""
    from .ppo import ValueNet

    tensors, state = loaded
    learner.policy.load_state_dict(_split(tensors, "policy"))
    restore_optimizer(learner.opt, tensors, state["opt"], "opt")
    shift, scale = state["value_scale"]
    with torch.random.fork_rng():  # its initial weights are replaced: leave torch's global generator alone
        learner.value = ValueNet(shift, scale)
    learner.value.load_state_dict(_split(tensors, "value"))
    learner.value_opt = torch.optim.Adam(learner.value.parameters(), lr=cfg.value_lr)
    restore_optimizer(learner.value_opt, tensors, state["value_opt"], "value_opt")
    restore_generator(learner.gen, tensors["gen"])
    learner.seen = [list(s) for s in state["seen"]]
    result.history = list(state["history"])
    result.best_update = int(state["best_update"])
    result.episodes_used = int(state["episodes_used"])
    result.bootstrap_episodes = int(state["bootstrap_episodes"])
    result.temperature = float(state["temperature"])
    result.resumed_from = int(state["next_update"])
    best = _split(tensors, "best") or None
    score = state["best_score"]
    return Saved(next_update=int(state["next_update"]), best_score=-math.inf if score is None else float(score),
                 best=best)


def remove_state(cfg: ImproveConfig) -> bool:
    """`--restart`: remove the run state of `cfg`; whether there was one. Only a file a run wrote
    (a safetensors file with a run state header, even a damaged one) is removed: anything else at
    that path is refused with `RunStateError`."""
    path = state_path(cfg)
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            ours = "simic_run_state" in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        ours = False
    if not ours:
        raise RunStateError(f"{path} is not a Simic run state; --restart removes only its own files (move it away)")
    path.unlink()
    return True
