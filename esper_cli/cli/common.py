"""Helpers every command shares: consoles, the one-line failure, registry look-ups."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from ..contracts import EpisodeConfig
from ..plugins import Registry, build_registry

if TYPE_CHECKING:
    import torch

#: The width data is laid out in when stdout is not a terminal: wider than any table Simic prints,
#: so every cell keeps its whole text. Rich renders a table at its natural width, never padded to this.
PIPED_WIDTH = 10_000


class DataConsole(Console):
    """The stdout console. On a terminal it fits the window, as Rich does; piped to a file or a
    program it has no window to fit, and Rich's fallback (80 columns, or the width of whatever
    terminal stdin or stderr is) would ellipsize table cells: names and headers a reader needs
    whole. So off a terminal it is PIPED_WIDTH wide."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(PIPED_WIDTH, dims.height)
        return dims


out = DataConsole()  # data: tables and JSON
err = Console(stderr=True)  # progress and diagnostics


def option_error(exc: Exception) -> str:
    """A library error as the CLI words it: prefixed with the flag of the parameter at fault
    (`exc.option`, e.g. "class_weights" -> "--class-weights"), markup escaped."""
    option = getattr(exc, "option", None)
    return escape(f"--{option.replace('_', '-')}: {exc}" if option else str(exc))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error on stderr and exit (2 = bad input, 1 = the job failed)."""
    err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_plot(plot: Path | None) -> None:
    """Refuse, before any work, a --plot that is not a .png path or that matplotlib cannot draw."""
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        fail(f"--plot {plot}: the file name must end in .png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("--plot needs matplotlib, which is not installed: pip install 'simic\\[plot]'")  # '\\[' escapes Rich markup


def registry() -> Registry:
    """The registries, reporting on stderr any plugin that failed (the rest keep working)."""
    reg = build_registry()
    for info in reg.plugins.values():
        for problem in info.errors:
            err.print(f"[yellow]Warning:[/] plugin '{info.name}': {problem}", highlight=False, soft_wrap=True)
    return reg


def resolve_device(device: str) -> torch.device:
    import torch  # seconds to import: only the commands that run episodes pay for it

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        fail(f"--device {device!r} is not a torch device (try cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    return dev


def choose(kind: str, name: str, table: dict, option: str, reg: Registry | None = None) -> None:
    """Exit 2 unless `name` is in `table` (the registry's `kind`s); with `reg`, the message names
    a plugin that failed to load and may be why the name is missing."""
    if name not in table:
        if reg is not None:
            fail(escape(f"{option} {name!r}: {reg.unknown(kind, name)}"))
        known = ", ".join(sorted(table)) or "none"
        fail(f"{option} {name!r}: unknown {kind} (available: {known})")


def workers_and_backend(workers: str | None, backend: str = "local", ray_address: str | None = None) -> int | None:
    """Validate --workers/--backend/--ray-address (exit 2 on nonsense); the parsed worker count."""
    from ..running.runner import BACKENDS, BackendUnavailable, import_ray, parse_workers  # the runner imports torch

    try:
        n_workers = parse_workers(workers)
    except ValueError as exc:
        fail(escape(f"--{exc}"))  # "--workers '0': expected ..."
    if backend not in BACKENDS:
        fail(f"--backend {backend!r}: unknown backend (available: {', '.join(BACKENDS)})")
    if ray_address and backend != "ray":
        fail(f"--ray-address {ray_address!r} needs --backend ray")
    if backend == "ray":
        try:
            import_ray()
        except BackendUnavailable as exc:
            fail(escape(str(exc)))
    return n_workers


def episode_config(reg: Registry, *, task: str, epochs: int, device: str, data_dir: Path | None,
                   threads: int, **extra: Any) -> EpisodeConfig:
    """The episode config of a command's options, with the task's data checked before any work."""
    from ..running.threads import use_threads  # only the commands that run episodes pay for torch
    from ..tasks import TaskError, task_config

    choose("task", task, reg.tasks, "--task", reg)
    resolve_device(device)
    use_threads(threads)
    try:
        config = task_config(task, reg.tasks[task], epochs=epochs, device=device,
                             data_dir=str(data_dir) if data_dir is not None else None, **extra)
    except ValueError as exc:
        fail(str(exc))
    try:
        reg.tasks[task].load(config.data_dir, 0)  # bad data is a usage error, found before any work
    except TaskError as exc:
        fail(option_error(exc))
    return config
