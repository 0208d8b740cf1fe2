"""The core's own plugin: built-in blueprints and tasks, registered through the same hooks a
third-party plugin uses. It is always loaded (SIMIC_LOAD_PLUGINS does not filter it out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .blueprints import BUILTIN_BLUEPRINTS
from .hookspecs import hookimpl
from .tasks import BUILTIN_TASKS


@hookimpl
def register_blueprints(register: Callable[[str, Any], None]) -> None:
    for name, factory in BUILTIN_BLUEPRINTS.items():
        register(name, factory)


@hookimpl
def register_tasks(register: Callable[[str, Any], None]) -> None:
    for name, task in BUILTIN_TASKS.items():
        register(name, task)
