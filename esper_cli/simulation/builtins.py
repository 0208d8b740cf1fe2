"""The core's own plugin: built-in blueprints and tasks, registered through the same hooks a
third-party plugin uses. It is always loaded (SIMIC_LOAD_PLUGINS does not filter it out).

Registering must not import torch (seconds): `simic plugins` and `simic info` build the registry
and never train. Blueprints are registered by name and built from `esper_cli.simulation.blueprints` on first
use; tasks import torch only when they load data or build a host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl
from ..tasks import BUILTIN_TASKS

if TYPE_CHECKING:
    from torch import nn

#: The built-in blueprints, in `esper_cli.simulation.blueprints.BUILTIN_BLUEPRINTS` order (a test checks).
BUILTIN_BLUEPRINT_NAMES = ("conv_enhance", "attention", "norm", "depthwise", "pool_mixer")


class LazyBlueprint:
    """A built-in blueprint factory that imports `esper_cli.simulation.blueprints` (and torch) when first called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, channels: int) -> nn.Module:
        from .blueprints import BUILTIN_BLUEPRINTS

        return BUILTIN_BLUEPRINTS[self.name](channels)

    def __repr__(self) -> str:
        return f"LazyBlueprint({self.name!r})"


@hookimpl
def register_blueprints(register: Callable[[str, Any], None]) -> None:
    for name in BUILTIN_BLUEPRINT_NAMES:
        register(name, LazyBlueprint(name))


@hookimpl
def register_tasks(register: Callable[[str, Any], None]) -> None:
    for name, task in BUILTIN_TASKS.items():
        register(name, task)
