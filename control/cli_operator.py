"""Operator commands added to `drover` (gateway, top, trace, metrics): registered by control/cli.py."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main CLI app."""
    return None
