"""`simic export`: write an episode store in another library's format (Minari, for offline RL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..export import DEFAULT_DATASET_ID, ExportError, export_minari
from ..interrupt import keep_work_on_interrupt
from ..paths import default_store_path, simic_home
from ..store import StoreError
from .common import err, fail, out

FORMATS = ("minari",)


def export(
    fmt: str = typer.Option("minari", "--format", help="Output format: minari (the offline-RL dataset d3rlpy, TorchRL and Minari read)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store to export (default: $SIMIC_HOME/episodes.h5)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Minari datasets root to write into (default: $SIMIC_HOME/minari); load with MINARI_DATASETS_PATH=DIR."),
    dataset_id: str = typer.Option(DEFAULT_DATASET_ID, "--dataset-id", help="Minari dataset id, namespace/name-vN; an existing dataset is never overwritten."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export an episode store as a Minari dataset for offline-RL libraries.

    Each episode becomes one Minari episode: its N observations plus its final observation
    (N+1), actions, rewards, terminations at the last epoch, the action and observation spaces;
    the observation schema and every episode's Simic id go into the metadata. Episodes from
    stores written before final observations were kept are skipped and counted. The store stays
    Simic's working format (it loads many times faster); export is for interop. Needs the rl
    extra: pip install "simic[rl]".
    """
    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: unknown format (available: {', '.join(FORMATS)})")
    store_path = store or default_store_path()
    root = out_dir or simic_home() / "minari"
    keep_work_on_interrupt()
    progress = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=err)
    bar = progress.add_task("export", total=None)

    def advance(done: int, total: int) -> None:
        progress.start()  # at the first episodes written: a refused export prints one line only
        progress.update(bar, completed=done, total=total)

    try:
        try:
            result = export_minari(store_path, root, dataset_id, on_progress=advance)
        finally:
            progress.stop()
    except (ExportError, StoreError) as exc:
        fail(escape(str(exc)), code=getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("Interrupted: the partial dataset was removed; the store is unchanged.")
        raise typer.Exit(130) from None
    except OSError as exc:
        fail(escape(f"writing {root} failed: {exc.strerror or exc}"), code=1)

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
