"""Workloads for the memory benchmarks: a time-compressed window of a real trace and a synthetic burst.

Built on the cluster simulator's committed generators (``RequestSpec``, ``LengthSpec``, ``arrival_times``,
``load_trace``) so that both simulators replay identical arrivals for a seed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from control.simulator.workload import LengthSpec, RequestSpec, arrival_times, load_trace


def burst_workload(
    schedule: Sequence[tuple[float, float]],
    *,
    prompt: LengthSpec,
    output: LengthSpec,
    seed: int = 0,
    max_total_len: int = 4096,
    prefix: str = "burst",
) -> list[RequestSpec]:
    """Poisson arrivals through ``(duration_s, rate)`` segments (e.g. quiet, burst, quiet); same seed, same
    requests. Prompt + output is capped at ``max_total_len`` (prompt first, at least one output token)."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    start = 0.0
    arrival: np.ndarray
    for duration, rate in schedule:
        if rate > 0:
            n = int(duration * rate * 2) + 16
            arrival = start + arrival_times(n, rate, rng)
            times.extend(float(x) for x in arrival[arrival < start + duration])
        start += duration
    prompts, outputs = prompt.sample(len(times), rng), output.sample(len(times), rng)
    specs = []
    for i, when in enumerate(times):
        p = min(int(prompts[i]), max_total_len - 1)
        o = max(1, min(int(outputs[i]), max_total_len - p))
        specs.append(RequestSpec(f"{prefix}-{i}", when, p, o))
    return specs


def busiest_window(path: str | Path, window_s: float) -> float:
    """Start (trace seconds) of the ``window_s`` window with the most KV demand, sum of prompt + output tokens.

    Chosen from the trace alone, before any simulation, so the benchmark's window is not picked by result.
    Windows start on whole multiples of ``window_s / 4``.
    """
    stamps: list[float] = []
    tokens: list[int] = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            stamps.append(float(row["timestamp"]))
            tokens.append(int(row["input_tokens"]) + int(row["output_tokens"]))
    t = np.asarray(stamps)
    cum = np.concatenate([[0], np.cumsum(tokens)])
    step = window_s / 4
    best_start, best = 0.0, -1
    for start in np.arange(0.0, max(step, t[-1] - window_s + step), step):
        lo, hi = np.searchsorted(t, start), np.searchsorted(t, start + window_s)
        demand = int(cum[hi] - cum[lo])
        if demand > best:
            best_start, best = float(start), demand
    return best_start


def trace_window(
    path: str | Path, *, start: float, duration: float, compression: float, max_total_len: int = 4096
) -> list[RequestSpec]:
    """``duration`` trace seconds from ``start``, replayed ``compression`` times faster."""
    return load_trace(path, time_compression=compression, start=start, duration=duration, max_total_len=max_total_len)
