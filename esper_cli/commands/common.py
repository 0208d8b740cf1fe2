"""Helpers every command shares: consoles, the one-line failure, registry look-ups."""

from __future__ import annotations

from typing import NoReturn

import torch
import typer
from rich.console import Console

from ..plugins import Registry, build_registry

out = Console()  # data: tables and JSON
err = Console(stderr=True)  # progress and diagnostics


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error on stderr and exit (2 = bad input, 1 = the job failed)."""
    err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def registry() -> Registry:
    """The registries, reporting on stderr any plugin that failed (the rest keep working)."""
    reg = build_registry()
    for info in reg.plugins.values():
        for problem in info.errors:
            err.print(f"[yellow]Warning:[/] plugin '{info.name}': {problem}", highlight=False, soft_wrap=True)
    return reg


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        fail(f"--device {device!r} is not a torch device (try cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    return dev


def choose(kind: str, name: str, table: dict, option: str) -> None:
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        fail(f"{option} {name!r}: unknown {kind} (available: {known})")
