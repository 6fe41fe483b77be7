"""The request traces shipped in the repository's ``traces/`` folder (see traces/README.md for sources and
licences), found relative to the repository root, never by an absolute path."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACES_DIR = REPO_ROOT / "traces"
AZURE_CONV = TRACES_DIR / "azure2023_conv.csv"
"""Azure LLM inference trace 2023, conversation: 19,366 requests over one hour (CC-BY 4.0)."""
MOONCAKE_SYNTHETIC = TRACES_DIR / "mooncake_synthetic.csv"
"""Mooncake FAST'25 synthetic trace: 3,993 long-context requests with prefix-block hashes (Apache-2.0)."""


def resolve_trace(path: Path | str) -> Path:
    """``path`` if it exists; else the file of that name (with or without ``.csv``) in ``traces/``."""
    given = Path(path)
    if given.is_file():
        return given
    for candidate in (TRACES_DIR / given.name, TRACES_DIR / f"{given.name}.csv"):
        if candidate.is_file():
            return candidate
    return given
