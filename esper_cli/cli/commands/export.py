"""`simic export`: write an episode store in another library's format (Minari or d3rlpy, for offline RL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ...data.interop import DEFAULT_DATASET_ID, ExportError, ExportResult, export_d3rlpy, export_minari
from ...data.store import StoreError
from ...paths import default_store_path, simic_home
from ..common import err, fail, out
from ..interrupt import keep_work_on_interrupt

T = TypeVar("T")

FORMATS = ("minari", "d3rlpy")


def export(
    fmt: str = typer.Option("minari", "--format", help="Output format: minari (a Minari dataset) or d3rlpy (d3rlpy's own dataset file, aligned; d3rlpy's get_minari misaligns ours)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store to export (default: $SIMIC_HOME/episodes.h5)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="minari: the datasets root to write into (default: $SIMIC_HOME/minari; load with MINARI_DATASETS_PATH=DIR); d3rlpy: the file to write (default: $SIMIC_HOME/d3rlpy.h5). Never overwritten."),
    dataset_id: Optional[str] = typer.Option(None, "--dataset-id", help=f"Minari dataset id, namespace/name-vN (default: {DEFAULT_DATASET_ID}); an existing dataset is never overwritten."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export an episode store as a Minari dataset or a d3rlpy dataset file for offline RL.

    minari: each episode becomes one Minari episode: its N observations plus its final
    observation (N+1), actions, rewards, terminations at the last epoch, per-step action masks in
    the infos, the action and observation spaces; the observation schema and every episode's
    Simic id go into the metadata. Episodes from stores written before final observations were
    kept are skipped and counted. Needs the rl extra: pip install "simic[rl]".

    d3rlpy: one d3rlpy episode per store episode (N observations, actions, rewards, terminal at
    the last decision), read back with esper_cli.data.interop.load_d3rlpy (d3rlpy's ReplayBuffer.load
    with the action size it does not store);
    action masks, episode ids and schema in the file's simic group. Needs the d3rlpy extra:
    pip install "simic[d3rlpy]".

    The store stays Simic's working format (it loads many times faster); export is for interop.
    """
    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: unknown format (available: {', '.join(FORMATS)})")
    store_path = store or default_store_path()
    if fmt == "d3rlpy":
        if dataset_id is not None:
            fail("--dataset-id names a Minari dataset; --format d3rlpy writes the file --out names")
        _export_d3rlpy(store_path, out_dir or simic_home() / "d3rlpy.h5", as_json)
        return
    dataset_id = dataset_id or DEFAULT_DATASET_ID
    root = out_dir or simic_home() / "minari"
    keep_work_on_interrupt()
    progress = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=err)
    bar = progress.add_task("export", total=None)

    def advance(done: int, total: int) -> None:
        progress.start()  # at the first episodes written: a refused export prints one line only
        progress.update(bar, completed=done, total=total)

    def run() -> ExportResult:
        try:
            return export_minari(store_path, root, dataset_id, on_progress=advance)
        finally:
            progress.stop()

    result = _guarded(run, "dataset", root)

    if result.skipped:
        err.print(f"[yellow]Skipped[/] {len(result.skipped)} episode(s) without a final observation "
                  "(collected before Simic stored it); re-collect them to export them.", highlight=False)
    load = f"MINARI_DATASETS_PATH={result.root} python -c \"import minari; minari.load_dataset('{result.dataset_id}')\""
    if as_json:
        out.print_json(json.dumps({"dataset_id": result.dataset_id, "root": str(result.root),
                                   "path": str(result.path), "episodes": result.episodes, "steps": result.steps,
                                   "skipped": result.skipped}))
        return
    table = Table(title="simic export", show_header=False)
    table.add_row("store", escape(str(store_path)))
    table.add_row("minari dataset", escape(result.dataset_id))
    table.add_row("written to", escape(str(result.path)))
    table.add_row("episodes / steps", f"{result.episodes} / {result.steps}")
    if result.skipped:
        table.add_row("skipped (no final observation)", str(len(result.skipped)))
    table.add_row("load with", escape(load))
    out.print(table)


def _guarded(export: Callable[[], T], partial: str, target: Path) -> T:
    """Run an export: its refusals are one-line errors, Ctrl-C exits 130 (the export removes what
    it had written), a failed write exits 1."""
    try:
        return export()
    except (ExportError, StoreError) as exc:
        fail(escape(str(exc)), code=getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print(f"Interrupted: the partial {partial} was removed; the store is unchanged.")
        raise typer.Exit(130) from None
    except OSError as exc:
        fail(escape(f"writing {target} failed: {exc.strerror or exc}"), code=1)


def _export_d3rlpy(store_path: Path, path: Path, as_json: bool) -> None:
    keep_work_on_interrupt()
    result = _guarded(lambda: export_d3rlpy(store_path, path), "file", path)
    if result.skipped:
        err.print(f"[yellow]Skipped[/] {len(result.skipped)} episode(s) without a decision.", highlight=False)
    load = f"python -c \"from esper_cli.data.interop import load_d3rlpy; load_d3rlpy('{result.path}')\""
    if as_json:
        out.print_json(json.dumps({"format": "d3rlpy", "path": str(result.path), "episodes": result.episodes,
                                   "steps": result.steps, "skipped": result.skipped}))
        return
    table = Table(title="simic export", show_header=False)
    table.add_row("store", escape(str(store_path)))
    table.add_row("d3rlpy dataset", escape(str(result.path)))
    table.add_row("episodes / steps", f"{result.episodes} / {result.steps}")
    if result.skipped:
        table.add_row("skipped (no decision)", str(len(result.skipped)))
    table.add_row("load with", escape(load))
    out.print(table)
