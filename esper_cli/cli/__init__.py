"""The Typer command line (`simic`): the app, its lazily loaded commands, shared options and tables.

`app` is resolved on first use: `esper_cli.__main__` imports `cli.interrupt` to arm its Ctrl-C
handler before Typer and Rich are imported.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from .main import app

        return app
    raise AttributeError(f"module 'esper_cli.cli' has no attribute {name!r}")
