"""Simic's built-in Tamiyo policies, shipped as ordinary `simic` entry-point plugins."""
