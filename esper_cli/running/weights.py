"""Policy weights that travel with the job, so that any worker on any node can build the policy.

A checkpoint named on the driver (`NAME=PATH`, the acting policy of `simic improve`) is read
there, once, into `Weights`: the checkpoint file's bytes. A job carries them as its policy's
`checkpoint=` option; the worker checks them exactly as `load_checkpoint` checks a file
(container, format, integrity digest, feature schema) and hands the policy factory the loaded
`Checkpoint`. No worker ever opens a path from the driver's disk, which a Ray node on another
machine (or in another mount namespace) cannot see. Local worker processes receive the bytes
over their pipe; on Ray the runner puts each version in the object store once and the jobs carry
its reference (`Weights.data` is then an `ObjectRef`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, CheckpointError, checkpoint_bytes, checkpoint_from_bytes


@dataclass(frozen=True)
class Weights:
    """A checkpoint's bytes (or, on Ray, a reference to them), named by its digest."""

    sha256: str  # the checkpoint's integrity digest: which version these are
    source: str  # where the driver read them (in messages only; never opened by a worker)
    data: Any  # the safetensors file's bytes; on Ray an ObjectRef to them

    @classmethod
    def read(cls, path: str | Path, expect_policy: str | None = None) -> Weights:
        """The checkpoint at `path` on this machine, checked here; `CheckpointError` when unusable."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
        return cls(checkpoint_from_bytes(data, path, expect_policy).sha256, str(path), data)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> Weights:
        """Weights of a network in memory (no file): what `save_checkpoint` would have written."""
        data = checkpoint_bytes(tensors, meta)
        return cls(checkpoint_from_bytes(data, source).sha256, source, data)

    def load(self, fetch: Callable[[Any], bytes] | None = None) -> Checkpoint:
        """The checked `Checkpoint`; `fetch` turns a reference into the bytes (Ray's `get`)."""
        data = self.data if isinstance(self.data, (bytes, bytearray, memoryview)) else _fetch(fetch, self.data)
        return checkpoint_from_bytes(data, self.source)

    def __repr__(self) -> str:  # never the bytes: jobs are named in messages
        return f"Weights({self.source!r}, sha256={self.sha256[:8]})"


def _fetch(fetch: Callable[[Any], bytes] | None, ref: Any) -> bytes:
    if fetch is None:
        from .ray_backend import import_ray

        fetch = import_ray().get
    return fetch(ref)


def checkpoint_options(path: str | Path | None, expect_policy: str | None = None) -> dict[str, Any]:
    """A policy factory's options for the checkpoint at `path` (None: no option), read here."""
    return {} if path is None else {"checkpoint": Weights.read(path, expect_policy)}


def loaded(options: Mapping[str, Any], fetch: Callable[[Any], bytes] | None = None) -> dict[str, Any]:
    """A job's factory options as the factory takes them: every `Weights` as its `Checkpoint`."""
    return {k: v.load(fetch) if isinstance(v, Weights) else v for k, v in options.items()}


def shipped(options: Mapping[str, Any], put: Callable[[Weights], Weights]) -> dict[str, Any]:
    """`options` with every `Weights` replaced by `put(weights)` (on Ray: a reference to its bytes)."""
    return {k: put(v) if isinstance(v, Weights) else v for k, v in options.items()}


def by_reference(weights: Weights, ref: Any) -> Weights:
    """The same version, its bytes replaced by a reference to them."""
    return replace(weights, data=ref)
