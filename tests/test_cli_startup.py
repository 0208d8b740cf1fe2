"""Start-up of the command line: light commands import no heavy library, help shows no value
placeholder on flags, and Ctrl-C while a command loads exits 130 without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from episode_helpers import make_episode
from typer.testing import CliRunner

from esper_cli.cli.main import COMMANDS, app, load_command
from esper_cli.data.store import EpisodeWriter
from esper_cli.simulation.builtins import BUILTIN_BLUEPRINT_NAMES

HEAVY = ("torch", "sklearn", "ray")

# Runs one command in a fresh interpreter, then reports which heavy modules it imported.
_PROBE = """
import json, sys
from esper_cli.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["info"]])
def test_light_commands_import_no_heavy_library(tmp_path, args):
    store = tmp_path / "s.h5"
    with EpisodeWriter(store) as writer:
        writer.append(make_episode(0))
    if args == ["info"]:
        args = ["info", "--store", str(store)]
    result = _probe(*args)
    assert result["code"] == 0
    assert result["heavy"] == [], f"simic {' '.join(args)} imported {result['heavy']}"


def test_listed_help_matches_each_commands_docstring():
    for name, (_module, _function, line) in COMMANDS.items():
        command = load_command(name)
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert first == line, f"COMMANDS[{name!r}] lists {line!r}, its docstring says {first!r}"


def test_builtin_blueprint_names_match_the_blueprints_module():
    from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS

    assert tuple(BUILTIN_BLUEPRINTS) == BUILTIN_BLUEPRINT_NAMES


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_flags_show_no_value_placeholder(name):
    args = ["--help"] if name is None else [name, "--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help" in result.output


def test_unknown_command_is_one_line():
    result = CliRunner().invoke(app, ["nosuch"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "No such command" in result.output


def _simic() -> list[str]:
    script = Path(sys.executable).with_name("simic")
    return [str(script)] if script.exists() else [sys.executable, "-m", "esper_cli"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5])
def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path, delay):
    env = {**os.environ, "SIMIC_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([*_simic(), "collect", "--episodes", "1", "--epochs", "1", "--store", str(tmp_path / "s.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip(f"the run finished within {delay} s, before the signal")
    # -SIGINT: the signal came before Python installed its handler, or while the finished run shut down.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err, err
    if proc.returncode == 130:  # from start-up ("Interrupted.") or, on a slow machine, from the episode loop
        assert "Interrupted" in err, err
