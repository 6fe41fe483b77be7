"""Shared plotting for the benchmark scripts' ``--plot DIR``: PNG files drawn with matplotlib's headless Agg
backend (no display needed), one figure per call, each written next to the script's printed table.

Every helper takes plain sequences (seconds, counts) and a file stem, writes ``DIR/<stem>.png`` (creating
DIR) and returns the path, so scripts stay free of matplotlib details. matplotlib is in the ``dev`` extras.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = tuple[Sequence[float], Sequence[float]]  # (x values, y values)
MAX_CDF_POINTS = 4000


def save(fig: Figure, directory: Path, stem: str) -> Path:
    """Write ``fig`` as ``directory/stem.png`` and close it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return path


def _finite(values: Iterable[float]) -> list[float]:
    return sorted(float(v) for v in values if v is not None and math.isfinite(v))


def draw_cdf(ax: Axes, values: Iterable[float], label: str, scale: float = 1.0) -> None:
    """An empirical CDF of ``values`` (times ``scale``) on ``ax``; NaN and inf are left out."""
    ordered = _finite(values)
    n = len(ordered)
    if not n:
        return
    # Past a few thousand points a step line looks the same drawn through evenly spaced ranks (and the
    # last one), which keeps PNGs of per-token samples (millions) quick to draw.
    ranks = range(n) if n <= MAX_CDF_POINTS else sorted({*range(0, n, n // MAX_CDF_POINTS), n - 1})
    ax.step([ordered[i] * scale for i in ranks], [(i + 1) / n for i in ranks], where="post", label=f"{label} (n={n})")


def cdf_plot(
    directory: Path,
    stem: str,
    series: Mapping[str, Iterable[float]],
    *,
    xlabel: str,
    title: str,
    scale: float = 1.0,
    log_x: bool = False,
) -> Path:
    """One CDF per entry of ``series`` (label -> values) on shared axes."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        draw_cdf(ax, values, label, scale)
    _decorate(ax, xlabel, "cumulative fraction", title, log_x=log_x)
    ax.set_ylim(0, 1.02)
    return save(fig, directory, stem)


def cdf_grid(
    directory: Path,
    stem: str,
    panels: Mapping[str, Mapping[str, Iterable[float]]],
    *,
    xlabel: str,
    title: str,
    scale: float = 1.0,
    log_x: bool = False,
    columns: int = 3,
) -> Path:
    """Several CDF panels (panel title -> label -> values) in one figure, e.g. one panel per load level."""
    count = max(1, len(panels))
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items(), strict=False):
        for label, values in series.items():
            draw_cdf(ax, values, label, scale)
        _decorate(ax, xlabel, "cumulative fraction", panel, log_x=log_x)
        ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save(fig, directory, stem)


def line_plot(
    directory: Path,
    stem: str,
    series: Mapping[str, Series],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    log_y: bool = False,
    marker: str = "o",
    xticks: Sequence[float] | None = None,
) -> Path:
    """One line per entry of ``series`` (label -> (xs, ys)); ``xticks``: label exactly these x values."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker=marker, label=label)
    _decorate(ax, xlabel, ylabel, title, log_x=log_x, log_y=log_y)
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{x:g}" for x in xticks])
    return save(fig, directory, stem)


def bar_plot(
    directory: Path,
    stem: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
    log_y: bool = False,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series (label -> one value per group)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, list(values), width=width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    _decorate(ax, "", ylabel, title, log_y=log_y)
    return save(fig, directory, stem)


def timeline_plot(
    directory: Path,
    stem: str,
    panels: Sequence[tuple[str, Mapping[str, Series]]],
    *,
    xlabel: str,
    title: str,
    step: bool | Sequence[bool] = False,
) -> Path:
    """Stacked panels sharing the x axis (time): each panel is (y label, label -> (times, values)).
    ``step``: draw values as held until the next change (counts), for all panels or per panel."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), sharex=True, squeeze=False)
    steps = [step] * len(panels) if isinstance(step, bool) else list(step)
    for ax, (ylabel, series), stepped in zip(axes[:, 0], panels, steps, strict=True):
        for label, (xs, ys) in series.items():
            if stepped:
                ax.step(list(xs), list(ys), where="post", label=label)
            else:
                ax.plot(list(xs), list(ys), label=label)
        _decorate(ax, "", ylabel, "")
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
    return save(fig, directory, stem)


def _decorate(
    ax: Axes, xlabel: str, ylabel: str, title: str, *, log_x: bool = False, log_y: bool = False, **_: Any
) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
