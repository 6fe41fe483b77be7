"""Where files inside the repository are, wherever the clone lives and whatever the working directory."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(*parts: str) -> Path:
    """``REPO_ROOT / parts``: e.g. ``repo_path("traces", "azure2023_conv.csv")``."""
    return REPO_ROOT.joinpath(*parts)
