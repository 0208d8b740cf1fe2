"""The options shared by every command that runs episodes: the same flags, the same help, and each
reaching the runner (`esper_cli.cli.options`)."""

from __future__ import annotations

import sys

import pytest
from cli_helpers import invoke, one_line_error

from esper_cli.cli.main import load_command
from esper_cli.cli.options import EPISODE_OPTIONS, RUNNER_OPTIONS
from esper_cli.data.store import StoreError

EPISODE_COMMANDS = ("collect", "compare", "dagger", "improve")
TINY = ["--epochs", "4"]


def _helps(command: str) -> dict[str, str]:
    """Each flag of `simic COMMAND` -> its help text."""
    return {opt: param.help or "" for param in load_command(command).params for opt in param.opts
            if opt.startswith("--")}


@pytest.mark.parametrize("command", EPISODE_COMMANDS)
def test_every_episode_command_takes_the_runner_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for flag in RUNNER_OPTIONS:
        assert flag in result.output, f"simic {command} has no {flag}"
    assert set(EPISODE_OPTIONS + RUNNER_OPTIONS) <= set(_helps(command)), command


def test_shared_options_have_one_help_text():
    helps = {command: _helps(command) for command in EPISODE_COMMANDS}
    for flag in EPISODE_OPTIONS + RUNNER_OPTIONS:
        texts = {command: h[flag] for command, h in helps.items()}
        assert len(set(texts.values())) == 1 and all(texts.values()), (flag, texts)
    for command in EPISODE_COMMANDS:  # -w is the same option everywhere
        workers = next(p for p in load_command(command).params if "--workers" in p.opts)
        assert "-w" in workers.opts, command


@pytest.mark.parametrize("command", EPISODE_COMMANDS)
def test_runner_options_are_checked_alike(command):
    compare = ["heuristic"] if command == "compare" else []
    one_line_error(invoke(command, *compare, "--backend", "slurm", *TINY), "--backend 'slurm'", "ray")
    one_line_error(invoke(command, *compare, "--ray-address", "auto", *TINY), "needs --backend ray")
    one_line_error(invoke(command, *compare, "--workers", "0", *TINY), "--workers")


def test_dagger_backend_ray_needs_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    one_line_error(invoke("dagger", "--backend", "ray", *TINY), 'pip install "simic[ray]"')


def test_dagger_runs_its_episodes_on_the_backend_it_is_given(monkeypatch, tmp_path):
    """--backend, --ray-address and --workers reach the one runner dagger opens for its run."""
    import esper_cli.learning.dagger_loop as dagger_loop

    asked = {}

    def make_runner(backend, workers, **kwargs):
        asked.update(kwargs, backend=backend, workers=workers)
        raise StoreError("stop here: the runner was reached")

    monkeypatch.setattr(dagger_loop, "make_runner", make_runner)
    result = invoke("dagger", "--backend", "ray", "--ray-address", "ray://head:10001", "--workers", "2",
                    "--eval-seed", "1000", "--store", tmp_path / "s.h5", "--out", tmp_path / "mlp.safetensors",
                    *TINY)
    one_line_error(result, "stop here")
    assert (asked["backend"], asked["ray_address"], asked["workers"]) == ("ray", "ray://head:10001", 2)
