"""The saved state of a long learning run (`simic improve`, `simic dagger`), so that the same
command after Ctrl-C or SIGKILL continues from its last completed unit (update, round).

One file beside the run's output: safetensors for every tensor (network weights, optimiser
moments, torch generator states) with the rest as JSON in its header (the configuration, counters,
numpy generator states, the curve), never a pickle. It is replaced atomically (a temp file in the
same folder, then a rename), so a kill while it is written leaves the previous state whole, and a
digest over the JSON and the tensors detects a damaged file. What a run keeps in it is the run's
business; this module only stores, checks and restores.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import digest
from ..contracts import engine_of

FORMAT = "simic-run-state"
FORMAT_VERSION = 1


class RunStateError(Exception):
    """A run state that cannot be resumed: damaged, another format, or another configuration."""


def save_run_state(path: Path, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> int:
    """Write the run state atomically; returns the bytes written. `state` must be JSON-able."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, sort_keys=True)
    header = {"simic_run_state": meta_json, "sha256": digest(meta_json, tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:  # on disk before the rename makes it the state
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def load_run_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the run state at `path`; None when there is none. `RunStateError` for a
    file that is not an intact Simic run state."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunStateError(f"run state {path} is unreadable ({first}); remove it or pass --restart") from None
    meta_json = header.get("simic_run_state")
    if meta_json is None or digest(meta_json, tensors) != header.get("sha256"):
        raise RunStateError(f"run state {path} is damaged or not a Simic run state; remove it or pass --restart")
    state = json.loads(meta_json)
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise RunStateError(f"run state {path} has format {state.get('format')!r} v{state.get('format_version')}; "
                            f"this Simic resumes {FORMAT!r} v{FORMAT_VERSION} (pass --restart)")
    return tensors, state


def config_difference(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first setting in which two JSON-able configurations differ, as "name: saved -> current"
    (nested keys joined with dots), or None when they are the same."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_difference(a, b, f"{prefix}{key}.")
            if found is not None:
                return found
        elif a != b:
            return f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}"
    return None


def refuse_engine_change(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise `RunStateError` when the saved run's episodes (its configuration's `episode`) are of
    another engine than the current configuration's: checked before `config_difference`, whose
    "null -> 2" would hide that a state saved before the engine had a version is engine 1's."""
    was, now = (engine_of(config.get("episode") or {}) for config in (saved, current))
    if was != now:
        raise RunStateError(f"run state {path} was saved by a run of engine {was} episodes, which this Simic "
                            f"cannot continue (engine {was} -> {now}); pass --restart to start over, with a new "
                            "store for the new episodes")


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state as tensors named `prefix.<param>.<key>` plus its JSON part (param groups,
    scalar entries)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{param}.{key}"] = value
            else:
                scalars.setdefault(str(param), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], saved: Mapping[str, Any],
                      prefix: str) -> None:
    """Load what `optimizer_state` saved back into `opt` (built over the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        head, _, key = name.rpartition(".")
        owner, _, param = head.rpartition(".")
        if owner == prefix:
            state.setdefault(int(param), {})[key] = value
    for param, entries in saved.get("scalars", {}).items():
        state.setdefault(int(param), {}).update(entries)
    opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """A torch generator's state, as a tensor the run state can hold."""
    return gen.get_state()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8))
