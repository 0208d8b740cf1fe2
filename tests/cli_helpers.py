"""What many test files ask of the command line: run it in-process, and check the bad-input contract."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from esper_cli.cli import app

runner = CliRunner()


def invoke(*args: object):
    """`simic ARGS...` in this process (CliRunner); every argument passed as a string."""
    return runner.invoke(app, [str(a) for a in args])


def succeed(*args: object) -> str:
    """`simic ARGS...` that must exit 0: its stdout."""
    result = invoke(*args)
    assert result.exit_code == 0, f"simic {' '.join(map(str, args))}: exit {result.exit_code}\n{result.output}"
    return result.stdout


def info_json(store: Path) -> dict:
    """`simic info --json` of `store`."""
    return json.loads(succeed("info", "--store", store, "--json"))


def one_line_error(result, *fragments: str, code: int = 2) -> str:
    """The CLI's error contract: exit `code`, one `Error:` line on stderr naming `fragments`, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
