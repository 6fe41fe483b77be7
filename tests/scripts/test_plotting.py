"""The benchmark plot helpers write real PNG files (headless, matplotlib's Agg backend)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import matplotlib

from scripts.plotting import MAX_CDF_POINTS, bar_plot, cdf_grid, cdf_plot, line_plot, timeline_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_backend_is_headless() -> None:
    assert matplotlib.get_backend().lower() == "agg"


def test_each_helper_writes_a_non_empty_png(tmp_path: Path) -> None:
    out = tmp_path / "plots"  # created on demand
    paths = [
        cdf_plot(out, "cdf", {"a": [0.1, 0.2, 0.3, math.nan], "b": [0.15, 0.4]}, xlabel="s", title="t", log_x=True),
        cdf_grid(
            out,
            "grid",
            {"x1": {"a": [1.0, 2.0]}, "x2": {"a": [3.0]}, "x3": {}, "x4": {"b": [1.0]}},
            xlabel="s",
            title="t",
        ),
        line_plot(
            out,
            "line",
            {"live": ([64, 256], [1.0, 2.0]), "recompute": ([64, 256], [5.0, 40.0])},
            xlabel="tokens",
            ylabel="ms",
            title="t",
            log_x=True,
            log_y=True,
        ),
        bar_plot(out, "bars", ["batch 1", "batch 8"], {"a": [1.0, 2.0], "b": [3.0, 4.0]}, ylabel="tok/s", title="t"),
        timeline_plot(
            out,
            "timeline",
            [("instances", {"x": ([0, 1, 2], [1, 3, 2])}), ("SLO", {"x": ([0.5], [0.9])})],
            xlabel="s",
            title="t",
        ),
    ]
    assert [p.name for p in paths] == ["cdf.png", "grid.png", "line.png", "bars.png", "timeline.png"]
    for path in paths:
        assert path.parent == out and path.stat().st_size > 1000
        width, height = png_size(path)
        assert width > 100 and height > 100


def test_a_cdf_of_many_samples_is_drawn_through_fewer_points(tmp_path: Path) -> None:
    values = [i / 1000 for i in range(MAX_CDF_POINTS * 50)]
    path = cdf_plot(tmp_path, "many", {"tokens": values}, xlabel="s", title="t")
    assert png_size(path)[0] > 100
