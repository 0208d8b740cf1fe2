"""Real pip installs for tests: a plugin package installed into this environment for a module's
tests (no network: `--no-index`, no build isolation) and uninstalled after, and real `simic`
processes that see it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=240)


def offline_build_possible() -> bool:
    """setuptools builds wheels by itself from 70.1 on; older ones need the `wheel` package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def is_installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


@contextmanager
def pip_installed(src: Path, dist: str) -> Iterator[str]:
    """`pip install src` (distribution `dist`) for the block, then `pip uninstall` it."""
    offline = ["--no-build-isolation", "--no-index"] if offline_build_possible() else []
    result = pip("install", "--no-deps", "--quiet", *offline, str(src))
    assert result.returncode == 0, f"pip install {src} failed:\n{result.stdout}\n{result.stderr}"
    try:
        assert is_installed(dist)
        yield dist
    finally:
        result = pip("uninstall", "--yes", "--quiet", dist)
        assert result.returncode == 0, result.stderr
        assert not is_installed(dist)


def simic_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A real `simic` process (`python -m esper_cli`), seeing what pip installed."""
    full_env = {k: v for k, v in os.environ.items() if k != "SIMIC_LOAD_PLUGINS"} | (env or {})
    return subprocess.run([sys.executable, "-m", "esper_cli", *args], capture_output=True, text=True,
                          timeout=240, env=full_env)
