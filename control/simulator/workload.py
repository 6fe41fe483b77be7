"""Workloads for the cluster simulator: arrival processes, length distributions, CSV trace replay.

Everything is drawn from one seeded ``numpy.random.Generator``, so a workload is a pure function of its
parameters and seed (the same requests for every policy compared).

* Arrivals: Poisson (exponential gaps) or Gamma gaps with a coefficient of variation ``cv`` (cv = 1 is
  Poisson; Llumnix uses CV 2-8 for bursty load).
* Lengths: fixed, uniform, or Llumnix's generated power-law (Zipf) lengths: a discrete power law on
  [1, cap] whose exponent is solved so the mean hits the requested value (Llumnix: means 128/256/512,
  capped at 6,144).
* Traces: CSV ``timestamp,input_tokens,output_tokens`` (e.g. the Azure 2023 conversation trace), with a
  time-compression factor (2.0 replays it twice as fast) and optional length caps.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload."""

    request_id: str
    arrival: float  # seconds from the start
    prompt_len: int
    output_len: int
    priority: int = 0


@dataclass(frozen=True, slots=True)
class LengthSpec:
    """A length distribution: ``fixed`` (value), ``uniform`` (low..high), ``zipf`` (mean, cap)."""

    kind: str = "zipf"
    mean: float = 256.0
    low: int = 1
    high: int = 6144  # uniform's upper bound; zipf's cap

    @staticmethod
    def fixed(value: int) -> LengthSpec:
        return LengthSpec("fixed", float(value), value, value)

    @staticmethod
    def uniform(low: int, high: int) -> LengthSpec:
        return LengthSpec("uniform", (low + high) / 2, low, high)

    @staticmethod
    def zipf(mean: float, cap: int = 6144) -> LengthSpec:
        return LengthSpec("zipf", mean, 1, cap)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed {self.low}"
        if self.kind == "uniform":
            return f"uniform {self.low}-{self.high}"
        return f"zipf mean {self.mean:g} cap {self.high}"

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.low, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        if self.kind == "zipf":
            cdf = _zipf_cdf(float(self.mean), int(self.high))
            return np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64) + 1
        raise ValueError(f"unknown length distribution {self.kind!r} (fixed, uniform, zipf)")


@lru_cache(maxsize=32)
def _zipf_cdf(mean: float, cap: int) -> np.ndarray:
    """CDF over 1..cap of P(x) ∝ x^-s with s solved (bisection) so that E[x] = mean."""
    if not 1.0 <= mean <= (cap + 1) / 2:
        raise ValueError(f"zipf mean {mean} must lie in [1, {(cap + 1) / 2}] for cap {cap}")
    x = np.arange(1, cap + 1, dtype=np.float64)

    def mean_for(s: float) -> float:
        w = x**-s
        return float((x * w).sum() / w.sum())

    lo, hi = 0.0, 8.0  # mean_for is decreasing in s: s = 0 is uniform, large s puts all mass on 1
    for _ in range(80):
        mid = (lo + hi) / 2
        if mean_for(mid) > mean:
            lo = mid
        else:
            hi = mid
    w = x ** -((lo + hi) / 2)
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf


def arrival_times(n: int, rate: float, rng: np.random.Generator, *, cv: float = 1.0) -> np.ndarray:
    """``n`` arrival times at mean ``rate``/s: Poisson when cv == 1, Gamma gaps of that CV otherwise."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if cv <= 0:
        raise ValueError("cv must be > 0")
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, size=n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    return np.cumsum(gaps)


def generate_workload(
    n: int,
    rate: float,
    *,
    prompt: LengthSpec = LengthSpec.zipf(256),
    output: LengthSpec = LengthSpec.zipf(256),
    cv: float = 1.0,
    seed: int = 0,
    high_priority_fraction: float = 0.0,
    max_total_len: int | None = None,
) -> list[RequestSpec]:
    """A generated workload; the same arguments always give the same requests.

    ``max_total_len`` caps prompt + output (prompt first keeps at least one output token), as an
    instance's max_model_len would.
    """
    rng = np.random.default_rng(seed)
    times = arrival_times(n, rate, rng, cv=cv)
    prompts = prompt.sample(n, rng)
    outputs = output.sample(n, rng)
    priorities = (rng.random(n) < high_priority_fraction).astype(np.int64)
    specs = []
    for i in range(n):
        p, o = int(prompts[i]), int(outputs[i])
        if max_total_len is not None:
            p = min(p, max_total_len - 1)
            o = max(1, min(o, max_total_len - p))
        specs.append(RequestSpec(f"req-{i}", float(times[i]), p, o, int(priorities[i])))
    return specs


def load_trace(
    path: str | Path,
    *,
    time_compression: float = 1.0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    max_total_len: int | None = None,
    limit: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
) -> list[RequestSpec]:
    """Replay a ``timestamp,input_tokens,output_tokens`` CSV, ``time_compression`` times faster.

    ``start``/``duration`` cut a window (trace seconds, before compression); lengths are capped as given.
    """
    if time_compression <= 0:
        raise ValueError("time_compression must be > 0")
    specs: list[RequestSpec] = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            t = float(row["timestamp"])
            if t < start:
                continue
            if duration is not None and t >= start + duration:
                break
            p = max(1, int(row["input_tokens"]))
            o = max(1, int(row["output_tokens"]))
            if max_prompt_len is not None:
                p = min(p, max_prompt_len)
            if max_output_len is not None:
                o = min(o, max_output_len)
            if max_total_len is not None:
                p = min(p, max_total_len - 1)
                o = max(1, min(o, max_total_len - p))
            specs.append(RequestSpec(f"trace-{len(specs)}", (t - start) / time_compression, p, o))
            if limit is not None and len(specs) >= limit:
                break
    return specs


def describe(specs: Sequence[RequestSpec]) -> str:
    """One line: count, duration, rate and length means (for benchmark headers)."""
    if not specs:
        return "empty workload"
    span = max(specs[-1].arrival, 1e-9)
    prompts = np.array([s.prompt_len for s in specs])
    outputs = np.array([s.output_len for s in specs])
    return (
        f"{len(specs)} requests over {span:.1f} s ({len(specs) / span:.2f} req/s), "
        f"prompt mean {prompts.mean():.0f} p99 {np.percentile(prompts, 99):.0f}, "
        f"output mean {outputs.mean():.0f} p99 {np.percentile(outputs, 99):.0f}"
    )
