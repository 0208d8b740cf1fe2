"""Simic: learn Tamiyo controllers for morphogenetic training (Esper-Lite)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # `from esper_cli import hookimpl` works as ever; importing the package alone stays instant, so
    # the console script arms its Ctrl-C handler (esper_cli.__main__) before anything slow runs.
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'esper_cli' has no attribute {name!r}")
