"""Simic: learn Tamiyo controllers for morphogenetic training (Esper-Lite)."""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
