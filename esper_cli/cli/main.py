"""The `simic` command line: collect | info | plugins | train | eval | compare | dagger | improve | export (Typer + Rich).

Data goes to stdout (tables, or JSON with --json); progress and diagnostics go to stderr.
Exit codes: 0 ok; 1 the job ran and failed; 2 bad usage or bad input; 130 interrupted.

Commands load lazily: `simic --help` lists them from the table below without importing them,
and running one imports only its own module. torch, scikit-learn and Ray take seconds to import,
which `simic --help`, `simic plugins` and `simic info` should never pay.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x vendors its own click; older releases use the click package
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

#: command -> (module under esper_cli.cli.commands, function, the one line `simic --help` shows).
#: A test checks each line against the command's own docstring.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "collect": ("collect", "collect", "Run morphogenetic training episodes driven by a policy and record every decision."),
    "info": ("info", "info", "Summarise an episode store: episodes, decisions, action mix, seed fates, accuracy, schema, engine."),
    "plugins": ("plugin_list", "plugins", "List plugins: distribution, version, the policies / blueprints / tasks each registers, errors."),
    "train": ("train", "train", "Train a learned Tamiyo to imitate the decisions in an episode store (behaviour cloning)."),
    "eval": ("eval", "evaluate", "Score a Tamiyo policy against the decisions stored in an episode store."),
    "compare": ("compare", "compare", "Compare Tamiyo policies live on real morphogenetic training runs."),
    "dagger": ("dagger", "dagger", "Run DAgger rounds: the learner acts, the expert labels, retrain, compare closed loop."),
    "export": ("export", "export", "Export an episode store as a Minari dataset or a d3rlpy dataset file for offline RL."),
    "improve": ("improve", "improve_command", "Fine-tune a learned Tamiyo on its own live episodes (PPO) toward higher final accuracy."),
}


def _blank_flag_metavars(params: list[Any]) -> list[Any]:
    """Flags take no value; Typer's help would still show a `<bool>` placeholder beside them."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class SimicCommand(TyperCommand):
    """A command whose help shows no value placeholder for flags."""

    def get_params(self, ctx: click.Context) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))


class _Listed(TyperCommand):
    """A command as `simic --help` lists it (name and one line); resolved to the real one to run."""


def load_command(name: str) -> click.Command:
    """The click command `name`, built by Typer from its function (importing its module now)."""
    module, function, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(f"esper_cli.cli.commands.{module}"), function)
    single = typer.Typer(rich_markup_mode="markdown", add_completion=False, pretty_exceptions_enable=False)
    single.command(name, cls=SimicCommand)(fn)
    command = typer.main.get_command(single)
    command.name = name
    return command


def _interrupted() -> NoReturn:
    click.echo("Interrupted.", err=True)
    raise typer.Exit(130) from None


class SimicGroup(TyperGroup):
    """Lazy commands, and every usage error as one line on stderr (exit 2) instead of a framed panel."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return _Listed(cmd_name, short_help=COMMANDS[cmd_name][2], help=COMMANDS[cmd_name][2])

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _Listed) and name is not None:
            command = load_command(name)
        return name, command, rest

    def get_params(self, ctx: click.Context) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))

    # Typer turns a Ctrl-C into a silent exit 130; say why (commands that ran say more themselves).
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
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


@app.callback()
def _root() -> None:
    """The group itself takes no options; its commands come from `COMMANDS`."""


def main() -> None:
    """Console-script entry point."""
    app()
