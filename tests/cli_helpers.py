"""What many test files ask of the command line: run it in-process, and check the bad-input contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from esper_cli.cli import app
from esper_cli.data.store import EpisodeReader

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


def simic_process(*args: str, **kw) -> subprocess.Popen:
    """`python -m esper_cli ARGS...` as a real child process (text pipes), for signals and crashes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "esper_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def committed_episodes(store: Path) -> int:
    """Episodes a reader sees committed in `store` (0 while it does not exist or cannot be read yet)."""
    try:
        with EpisodeReader(store) as r:
            return r.n_episodes
    except Exception:
        return 0


def wait_for_episodes(store: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until `store` holds `n` committed episodes, while `proc` (the writer) is alive."""
    deadline = time.monotonic() + timeout
    while committed_episodes(store) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "collect made no progress"
        time.sleep(0.02)
