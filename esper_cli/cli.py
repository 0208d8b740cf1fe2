"""The `simic` command line: collect | info | plugins | train | eval | compare | dagger (Typer + Rich).

Data goes to stdout (tables, or JSON with --json); progress and diagnostics go to stderr.
Exit codes: 0 ok; 1 the job ran and failed; 2 bad usage or bad input; 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors its own click; older releases use the click package
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

from .commands import collect, compare, dagger, info, plugins, train
from .commands import eval as eval_cmd


class SimicGroup(TyperGroup):
    """Turns every usage error into one line on stderr (exit 2) instead of a framed panel."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=SimicGroup,
    help="Simic: learn Tamiyo controllers for morphogenetic training.\n\n"
    "Collect episodes driven by a policy into an HDF5 store, train MLP/GRU policies to imitate "
    "them, score them, and compare policies live. Policies, blueprints and tasks are plugins.",
    no_args_is_help=True,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("collect")(collect.collect)
app.command("info")(info.info)
app.command("plugins")(plugins.plugins)
app.command("train")(train.train)
app.command("eval")(eval_cmd.evaluate)
app.command("compare")(compare.compare)
app.command("dagger")(dagger.dagger)


def main() -> None:
    """Console-script entry point."""
    app()
