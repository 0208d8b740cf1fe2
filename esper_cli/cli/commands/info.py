"""`simic info`: what an episode store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from ...contracts import ACTION_NAMES, ENGINE_VERSION, N_ACTIONS, engine_of
from ...data.store import EpisodeReader, StoreError
from ...paths import default_store_path
from ..common import fail, out


def store_report(reader: EpisodeReader) -> dict[str, Any]:
    """Summary plus one entry per episode, from a few columnar reads."""
    summary = reader.summary()
    index = reader.index()
    actions = reader.decisions()
    counts = np.zeros((reader.n_episodes, N_ACTIONS), dtype=np.int64)
    np.add.at(counts, (actions["episode"], actions["actions"].astype(np.int64)), 1)
    episodes = []
    worth: dict[str, dict[str, list[float]]] = {}  # blueprint -> fate -> measured contributions
    fates: dict[str, dict[str, int]] = {}
    for i in range(reader.n_episodes):
        meta = reader.episode_meta(i)
        for seed in meta.get("seeds", []):
            bp, fate = str(seed.get("blueprint")), str(seed.get("fate"))
            fates.setdefault(bp, {}).setdefault(fate, 0)
            fates[bp][fate] += 1
            if seed.get("contribution") is not None:
                worth.setdefault(bp, {}).setdefault(fate, []).append(float(seed["contribution"]))
        episodes.append({
            "id": meta["id"],
            "seed": int(index["seed"][i]),
            "index": int(index["index"][i]),
            "policy": meta.get("policy"),
            "engine": engine_of(meta.get("config") or {}),
            "n_decisions": int(index["length"][i]),
            "final_accuracy": float(index["final_accuracy"][i]),
            "best_accuracy": float(index["best_accuracy"][i]),
            "test_accuracy": float(index["test_accuracy"][i]),
            "seeds_created": int(index["seeds_created"][i]),
            "seeds_fossilized": int(index["seeds_fossilized"][i]),
            "seeds_culled": int(index["seeds_culled"][i]),
            "action_counts": dict(zip(ACTION_NAMES, map(int, counts[i]))),
        })
    return {**summary, "path": str(summary.get("path", "")), "blueprints": blueprint_report(fates, worth),
            "episodes": episodes}


def blueprint_report(fates: dict[str, dict[str, int]], worth: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per blueprint and fate: seeds, and the mean measured contribution (points; see
    `SeedLifecycle.contribution`) of those that have one. 'all' pools every blueprint."""
    def entry(counts: dict[str, int], values: dict[str, list[float]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fate in ("fossilized", "culled", "active"):
            v = values.get(fate, [])
            out[fate] = {"seeds": counts.get(fate, 0), "measured": len(v),
                         "contribution_mean": float(np.mean(v)) if v else None}
        return out

    report = {bp: entry(fates[bp], worth.get(bp, {})) for bp in sorted(fates)}
    pooled_counts: dict[str, int] = {}
    pooled: dict[str, list[float]] = {}
    for bp in fates:
        for fate, n in fates[bp].items():
            pooled_counts[fate] = pooled_counts.get(fate, 0) + n
        for fate, v in worth.get(bp, {}).items():
            pooled.setdefault(fate, []).extend(v)
    if fates:
        report["all"] = entry(pooled_counts, pooled)
    return report


def info(
    store: Optional[Path] = typer.Option(None, "--store", help="Episode store (default: $SIMIC_HOME/episodes.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Summarise an episode store: episodes, decisions, action mix, seed fates, accuracy, schema, engine."""
    path = store or default_store_path()
    try:
        with EpisodeReader(path) as reader:
            report = store_report(reader)
    except StoreError as exc:  # a path may hold [brackets], which Rich would read as markup
        fail(escape(str(exc)), code=exc.exit_code)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"Episode store {path}", show_header=False)
    table.add_row("episodes", str(report["n_episodes"]))
    table.add_row("decisions", str(report["n_decisions"]))
    total = max(report["n_decisions"], 1)
    for name, n in report["action_counts"].items():
        table.add_row(f"  {name}", f"{n} ({100 * n / total:.1f}%)")
    table.add_row("seeds created / fossilized / culled",
                  f"{report['seeds_created']} / {report['seeds_fossilized']} / {report['seeds_culled']}")
    mean = report.get("mean_final_accuracy")
    table.add_row("mean final val accuracy", "-" if mean is None else f"{mean:.2f}%")
    table.add_row("schema", f"{report['schema_name']} v{report['schema_version']}")
    table.add_row("engine", engine_cell(report["episodes_per_engine"]))
    out.print(table)
    if report["blueprints"]:
        out.print(blueprint_table(report["blueprints"]))


def engine_cell(per_engine: dict[str, int]) -> str:
    """The store's engine version(s) (`EpisodeConfig.engine`) for the summary table: one engine, or
    each with its episodes and a warning, since a store of two cannot be trained on."""
    if not per_engine:
        return "-"
    if len(per_engine) == 1:
        version = next(iter(per_engine))
        note = "" if int(version) == ENGINE_VERSION else f" (this Simic runs engine {ENGINE_VERSION})"
        return f"{version}{note}"
    counts = ", ".join(f"{v}: {n} episodes" for v, n in per_engine.items())
    return f"{counts} (mixed: not trainable as one set)"


def blueprint_table(blueprints: dict[str, Any]) -> Table:
    table = Table(title="Seeds per blueprint: count, and mean measured contribution in points "
                        "(fossilized: at the end; culled: when culled)", title_justify="left")
    table.add_column("blueprint")
    for fate in ("fossilized", "culled", "active"):
        table.add_column(fate, justify="right")
    for bp, r in blueprints.items():
        cells = []
        for fate in ("fossilized", "culled", "active"):
            c = r[fate]
            mean = "" if c["contribution_mean"] is None else f" ({c['contribution_mean']:+.2f})"
            cells.append(f"{c['seeds']}{mean}")
        table.add_row(bp, *cells, style="bold" if bp == "all" else None)
    return table
