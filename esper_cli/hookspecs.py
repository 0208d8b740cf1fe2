"""Simic's pluggy hook specifications: the four things a plugin can add.

A plugin is a module (or any object) with functions marked `@simic.hookimpl` (re-exported as
`esper_cli.hookimpl`) named after these specs, listed under the `simic` entry-point group of its
distribution. Each hook receives a `register(name, obj)` callback; call it once per thing. A name
another plugin already registered is reported by `simic plugins` and skipped (the first owner
keeps it), never silently overwritten. See docs/plugins.md for a worked example.

An implementation may declare fewer arguments than the spec (pluggy's rule); it is called once per
process, and should only register: do heavy work (loading weights, data) in the factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("simic")
hookimpl = pluggy.HookimplMarker("simic")


@hookspec
def register_policies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register Tamiyo policies: call `register(name, factory)` once per policy.

    `factory(**options)` returns a fresh object following `esper_cli.policy.Policy`: `reset(context)`
    before each episode and `decide(observation, context) -> Decision` once per epoch; optionally
    `decide_batch(observations) -> actions` (stateless) or `decide_episode(observations) ->
    actions` (stateful) for fast replay in `simic eval`. `simic collect`
    calls the factory with no arguments once per episode, so a policy may keep per-episode state.
    """


@hookspec
def register_trainable_policies(register: Callable[[str, Any], None]) -> None:
    """Register policies `simic train --policy NAME` can fit: `register(name, trainable)`.

    `trainable` is an `esper_cli.trainable.TrainablePolicy` (its torch network and defaults). The
    same name must also be registered as a policy (`register_policies`) whose factory accepts
    `checkpoint=PATH` and decides from the checkpoint training wrote (see esper_cli.trainable).
    """


@hookspec
def register_blueprints(register: Callable[[str, Callable[[int], Any]], None]) -> None:
    """Register Kasmina blueprints (seed modules): `register(name, factory)`.

    `factory(channels) -> torch.nn.Module` mapping a (B, C, H, W) feature map to a residual of the
    same shape; zero-initialise its last layer so that a new seed starts as an identity change.
    Built from Conv2d / Linear / BatchNorm2d layers and per-channel operations, it runs packed in
    the batched engine (`simulation.engine`); anything else runs under vmap (docs/plugins.md).
    """


@hookspec
def register_tasks(register: Callable[[str, Any], None]) -> None:
    """Register Tolaria training tasks (a dataset plus a host model): `register(name, task)`.

    `task` is an `esper_cli.tasks.Task`: `load(data_dir, split_seed) -> TaskData` with train /
    validation / test tensors, and `build_host() -> HostCNN` (built under the episode's torch seed).
    """
