"""Workloads for the cluster simulator: arrival processes, length distributions, CSV trace replay.

Everything is drawn from one seeded ``numpy.random.Generator``, so a workload is a pure function of its
parameters and seed (the same requests for every policy compared).

* Arrivals: Poisson (exponential gaps) or Gamma gaps with a coefficient of variation ``cv`` (cv = 1 is
  Poisson; Llumnix uses CV 2-8 for bursty load).
* Lengths: fixed, uniform, or Llumnix's generated power-law (Zipf) lengths: a discrete power law on
  [1, cap] whose exponent is solved so the mean hits the requested value (Llumnix: means 128/256/512,
  capped at 6,144).
* Traces: CSV ``timestamp,input_tokens,output_tokens[,hash_ids]`` (e.g. the Azure 2023 conversation trace),
  with a time-compression factor (2.0 replays it twice as fast) and optional length caps (none by default:
  a prompt longer than the context is rejected by the engine, never truncated). ``hash_ids`` (space-separated
  prefix-block hashes of ``hash_block_tokens`` tokens each, Mooncake's format) are carried to the requests.
* Rate changes: :func:`warp_arrivals` replays a workload with a piecewise speed-up (bursts on a real trace),
  :func:`piecewise_arrivals` draws Gamma arrivals whose rate steps through a schedule.
* Request classes (Chiron): every request is ``interactive`` (TTFT/ITL SLOs) or ``batch`` (a deadline);
  :func:`batch_backlog` makes a batch job, :func:`merge` interleaves workloads.
"""

from __future__ import annotations

import csv
import dataclasses
import math
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
    request_class: str = "interactive"  # interactive | batch
    deadline: float = math.inf  # batch: finish by this time (seconds from the start)
    prefix_hashes: tuple[int, ...] = ()
    """Prefix-block hashes of the prompt (a trace's ``hash_ids``): equal ids at the same position mean the
    same prefix; each covers ``prefix_block_tokens`` tokens."""
    prefix_block_tokens: int = 0
    client: str = ""
    """Who sent it: its share in the fair queue (``ClusterConfig.fair_quantum_tokens``)."""


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
    hash_block_tokens: int = 512,
) -> list[RequestSpec]:
    """Replay a ``timestamp,input_tokens,output_tokens[,hash_ids]`` CSV, ``time_compression`` times faster.

    ``start``/``duration`` cut a window (trace seconds, before compression); lengths are capped as given.
    ValueError (naming the line) on a malformed row.
    """
    if time_compression <= 0:
        raise ValueError("time_compression must be > 0")
    specs: list[RequestSpec] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"timestamp", "input_tokens", "output_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(sorted(missing))} (need timestamp,input_tokens,"
                "output_tokens[,hash_ids])"
            )
        has_hashes = "hash_ids" in (reader.fieldnames or ())
        for row in reader:
            try:
                t = float(row["timestamp"])
                p = max(1, int(row["input_tokens"]))
                o = max(1, int(row["output_tokens"]))
                hashes = tuple(int(h) for h in (row.get("hash_ids") or "").split()) if has_hashes else ()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
            if t < start:
                continue
            if duration is not None and t >= start + duration:
                break
            if max_prompt_len is not None:
                p = min(p, max_prompt_len)
            if max_output_len is not None:
                o = min(o, max_output_len)
            if max_total_len is not None:
                p = min(p, max_total_len - 1)
                o = max(1, min(o, max_total_len - p))
            specs.append(
                RequestSpec(
                    f"trace-{len(specs)}",
                    (t - start) / time_compression,
                    p,
                    o,
                    prefix_hashes=hashes,
                    prefix_block_tokens=hash_block_tokens if hashes else 0,
                )
            )
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


def piecewise_arrivals(
    schedule: Sequence[tuple[float, float]], rng: np.random.Generator, *, cv: float = 1.0
) -> np.ndarray:
    """Arrival times over consecutive ``(duration_s, rate)`` segments, Gamma gaps of CV ``cv`` in each (a
    rate of 0 leaves the segment empty)."""
    times: list[np.ndarray] = []
    start = 0.0
    for duration, rate in schedule:
        if rate > 0:
            expected = int(duration * rate * 1.5) + 16
            t = start + arrival_times(expected, rate, rng, cv=cv)
            while t[-1] < start + duration:  # rare: draw more
                t = np.concatenate([t, t[-1] + arrival_times(expected, rate, rng, cv=cv)])
            times.append(t[t < start + duration])
        start += duration
    return np.concatenate(times) if times else np.zeros(0)


def generate_scheduled_workload(
    schedule: Sequence[tuple[float, float]],
    *,
    prompt: LengthSpec = LengthSpec.zipf(256),
    output: LengthSpec = LengthSpec.zipf(256),
    cv: float = 1.0,
    seed: int = 0,
    max_total_len: int | None = None,
    prefix: str = "req",
) -> list[RequestSpec]:
    """Like :func:`generate_workload` with a rate that steps through ``schedule`` ((duration_s, rate) pairs)."""
    rng = np.random.default_rng(seed)
    times = piecewise_arrivals(schedule, rng, cv=cv)
    n = len(times)
    prompts, outputs = prompt.sample(n, rng), output.sample(n, rng)
    specs = []
    for i in range(n):
        p, o = _cap(int(prompts[i]), int(outputs[i]), max_total_len)
        specs.append(RequestSpec(f"{prefix}-{i}", float(times[i]), p, o))
    return specs


def _cap(prompt: int, output: int, max_total_len: int | None) -> tuple[int, int]:
    if max_total_len is None:
        return prompt, output
    prompt = min(prompt, max_total_len - 1)
    return prompt, max(1, min(output, max_total_len - prompt))


def warp_arrivals(specs: Sequence[RequestSpec], speedups: Sequence[tuple[float, float]]) -> list[RequestSpec]:
    """Replay ``specs`` with a piecewise-constant speed-up: ``speedups`` are ``(from_s, factor)`` pairs in the
    workload's own time (the first must start at 0); between one ``from_s`` and the next, time runs ``factor``
    times faster. Lengths and order are kept, only arrival times move (rate changes on a real trace)."""
    if not speedups or speedups[0][0] != 0.0:
        raise ValueError("speedups must start at time 0")
    if any(f <= 0 for _, f in speedups):
        raise ValueError("speed-up factors must be > 0")
    bounds = [t for t, _ in speedups] + [math.inf]
    warped_start = [0.0]
    for k in range(1, len(speedups)):
        warped_start.append(warped_start[-1] + (bounds[k] - bounds[k - 1]) / speedups[k - 1][1])
    out = []
    k = 0
    for spec in specs:
        while spec.arrival >= bounds[k + 1]:
            k += 1
        t = warped_start[k] + (spec.arrival - bounds[k]) / speedups[k][1]
        out.append(dataclasses.replace(spec, arrival=t))
    return out


def batch_backlog(
    n: int,
    *,
    at: float,
    deadline_s: float,
    seed: int,
    lengths: Sequence[tuple[int, int]] | None = None,
    prompt: LengthSpec = LengthSpec.zipf(256),
    output: LengthSpec = LengthSpec.zipf(256),
    max_total_len: int | None = None,
    prefix: str = "batch",
) -> list[RequestSpec]:
    """A batch job: ``n`` batch requests submitted at ``at``, all due ``deadline_s`` later. Lengths are drawn
    (seeded) from ``lengths`` ((prompt, output) pairs, e.g. a trace's rows) when given, else from the specs."""
    rng = np.random.default_rng(seed)
    if lengths:
        picks = rng.integers(0, len(lengths), size=n)
        pairs = [lengths[int(k)] for k in picks]
    else:
        prompts, outputs = prompt.sample(n, rng), output.sample(n, rng)
        pairs = [(int(prompts[i]), int(outputs[i])) for i in range(n)]
    specs = []
    for i, (p, o) in enumerate(pairs):
        p, o = _cap(p, o, max_total_len)
        specs.append(RequestSpec(f"{prefix}-{i}", at, p, o, request_class="batch", deadline=at + deadline_s))
    return specs


def merge(*parts: Sequence[RequestSpec]) -> list[RequestSpec]:
    """One workload from several (ids must already be distinct), in arrival order."""
    merged = [spec for part in parts for spec in part]
    ids = {s.request_id for s in merged}
    if len(ids) != len(merged):
        raise ValueError("request ids collide; give each part its own prefix")
    return sorted(merged, key=lambda s: (s.arrival, s.request_id))
