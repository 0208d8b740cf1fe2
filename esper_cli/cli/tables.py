"""Rich renderers that more than one command prints."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    """Episodes per second over the run so far."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} ep/s" if speed else "-- ep/s", style="progress.data.speed")


def _shade(fraction: float, diagonal: bool) -> str:
    """Background for a confusion cell: green on the diagonal, red off it, deeper = larger share."""
    if fraction <= 0:
        return ""
    t = 0.25 + 0.75 * min(fraction, 1.0)
    base = (0, 135, 0) if diagonal else (175, 0, 0)
    r, g, b = (int(c * t + 25 * (1 - t)) for c in base)
    return f"white on rgb({r},{g},{b})"


def confusion_table(report: dict[str, Any]) -> Table:
    """Rows actual, columns predicted; each cell its count and its share of the row, shaded."""
    labels, cm = report["labels"], np.asarray(report["confusion_matrix"])
    table = Table(title="Confusion matrix (rows actual, columns predicted; % of row)")
    table.add_column("actual \\ predicted", style="bold")
    for name in labels:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right", style="dim")
    for i, name in enumerate(labels):
        total = int(cm[i].sum())
        cells = []
        for j in range(len(labels)):
            share = cm[i, j] / total if total else 0.0
            cells.append(Text(f"{cm[i, j]} ({100 * share:.1f}%)" if total else "0", style=_shade(share, i == j)))
        table.add_row(name, *cells, str(total))
    return table
