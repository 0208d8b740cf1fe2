"""`simic plugins`: every plugin that loaded (or failed to), and what it registered."""

from __future__ import annotations

import json

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ...plugins import build_registry
from ..common import err, out


def plugins(as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")) -> None:
    """List plugins: distribution, version, the policies / blueprints / tasks each registers, errors.

    A policy marked "(trainable)" can be fitted with `simic train --policy NAME`.

    A plugin that failed to import or to register is listed with its error and skipped; everything
    else keeps working. SIMIC_LOAD_PLUGINS=a,b (plugin or distribution names; empty for none)
    limits which installed plugins load; the core plugin always does.
    """
    reg = build_registry()
    rows = [p.to_dict() for p in reg.plugins.values()]
    broken = [r["name"] for r in rows if r["error"]]
    if broken:
        err.print(f"[yellow]Warning:[/] {len(broken)} plugin(s) reported problems: {escape(', '.join(broken))}",
                  highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="Simic plugins", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("plugin", "distribution", "policies", "blueprints", "tasks"):
        table.add_column(col, no_wrap=True)  # names stay whole (one per line): users type them
    for r in rows:
        name = f"[red]{escape(r['name'])} (error)[/]" if r["error"] else escape(r["name"])
        dist = " ".join(x for x in (r["distribution"], r["version"]) if x) or "-"
        policies = [p + (" (trainable)" if p in r["trainables"] else "") for p in r["policies"]]
        policies += [f"{t} (trainable only)" for t in r["trainables"] if t not in r["policies"]]
        table.add_row(name, escape(dist), escape("\n".join(policies)),
                      escape("\n".join(r["blueprints"])), escape("\n".join(r["tasks"])))
    out.print(table)
    for r in rows:  # errors under the table, where a long message has the full width
        for problem in r["errors"]:
            out.print(f"[red]{escape(r['name'])}[/]: {escape(problem)}", highlight=False, soft_wrap=True)
