"""KunServe parameter drop vs vLLM, Llumnix and KV swap under memory overload, side by side.

Every system replays the same arrivals (same seed) on the same simulated cluster (control.simulator.memory: LLaMA-7B
fp16 on A100-40GB instances, weights and KV in one budget). Two workloads, each on a fixed grid:

* **Azure conversation trace** (traces/azure2023_conv.csv in the repository): the 120 s window with the most
  token demand (chosen from the trace alone, :func:`busiest_window`), compressed in time. The compression
  is chosen before any comparison: the first factor of the ladder 1, 1.5, 2, 3, 4, 6, 8 at which the
  *vLLM baseline alone* overloads memory (some instance meets KunServe's drop trigger for ≥ 1 s of polls);
  the grid is that factor and the next two of the ladder.
* **Synthetic burst**: Poisson at 4 req/s for 30 s, a 20 s burst at 4x, 8x and 12x that rate, 60 s at 4 req/s;
  prompts uniform 256-2048 tokens, outputs Zipf mean 200 capped at 1000 (close to the Azure trace's lengths).

Prints one table per grid point (every point is reported), ratios of each baseline to KunServe (exchange),
and a one-line summary. Usage: ``python -m scripts.bench_kunserve [--instances 4] [--seed 0] [--quick] [--plot DIR]``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from control.simulator.memory import MemSimConfig, MemSimResult, simulate
from control.simulator.memory_workloads import burst_workload, busiest_window, trace_window
from control.simulator.traces import AZURE_CONV
from control.simulator.workload import LengthSpec, RequestSpec

TRACE = str(AZURE_CONV)
WINDOW_S = 120.0
LADDER = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
BASE_RATE = 4.0
BURST_FACTORS = (4.0, 8.0, 12.0)
SYSTEMS = (
    ("vllm", "vllm", "exchange"),
    ("llumnix", "llumnix", "exchange"),
    ("swap", "swap", "exchange"),
    ("kunserve", "kunserve", "exchange"),
    ("kunserve-recompute", "kunserve", "recompute"),
)
BASELINES = ("vllm", "llumnix", "swap")


@dataclass(frozen=True, slots=True)
class Point:
    workload: str
    label: str
    specs: list[RequestSpec]


def run_point(point: Point, instances: int) -> dict[str, MemSimResult]:
    """Every system on the same arrivals."""
    results = {}
    for name, mode, kv in SYSTEMS:
        config = MemSimConfig(mode=mode, num_instances=instances, kv_on_drop=kv)  # type: ignore[arg-type]
        results[name] = simulate(config, point.specs)
    return results


def choose_compression(start: float, instances: int) -> float:
    """First ladder factor at which the vLLM baseline alone overloads memory (≥ 1 s meeting the trigger)."""
    for factor in LADDER:
        specs = trace_window(TRACE, start=start, duration=WINDOW_S, compression=factor)
        if simulate(MemSimConfig(mode="vllm", num_instances=instances), specs).overloaded_s >= 1.0:
            return factor
    return LADDER[-1]


def fmt(value: float, digits: int = 2) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "nan" if b <= 0 or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def print_point(point: Point, results: dict[str, MemSimResult]) -> None:
    n = len(point.specs)
    span = point.specs[-1].arrival if point.specs else 0.0
    vllm = results["vllm"]
    print(
        f"\n## {point.workload} {point.label}: {n} requests over {span:.1f} s "
        f"(vLLM: peak KV use {vllm.peak_memory_use:.0%}, {vllm.overloaded_s:.1f} s at the drop trigger)"
    )
    header = (
        f"{'system':<19} {'done':>5} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'TBT p99 ms':>10} {'tok/s':>7} "
        f"{'preempt':>7} {'swaps':>5} {'migr':>5} {'drops':>5} {'max g':>5} {'exch GB':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<19} {r.completed:>5} {fmt(r.ttft_p(50)):>10} {fmt(r.ttft_p(99)):>10} "
            f"{fmt(r.tbt_p(99) * 1000, 1):>10} {r.throughput:>7.0f} {r.preemptions:>7} {r.swaps:>5} "
            f"{r.migrations:>5} {r.drops:>5} {r.peak_group_size:>5} {r.exchange_bytes / 1e9:>7.1f}"
        )
    kun = results["kunserve"]
    print("ratios baseline / kunserve (TTFT: >1 = KunServe faster; TBT: >1 = KunServe smoother; tok/s: <1 = higher)")
    for name in BASELINES:
        r = results[name]
        print(
            f"  vs {name:<8} TTFT p50 {ratio(r.ttft_p(50), kun.ttft_p(50)):>8}  TTFT p99 "
            f"{ratio(r.ttft_p(99), kun.ttft_p(99)):>8}  TBT p99 {ratio(r.tbt_p(99), kun.tbt_p(99)):>7}  "
            f"tok/s {ratio(r.throughput, kun.throughput):>6}"
        )


def points(instances: int, seed: int, quick: bool) -> list[Point]:
    start = busiest_window(TRACE, WINDOW_S)
    c0 = choose_compression(start, instances)
    i = LADDER.index(c0)
    factors = LADDER[i : i + (1 if quick else 3)]
    print(
        f"Azure window: trace seconds {start:.0f}-{start + WINDOW_S:.0f} (most prompt+output tokens of any "
        f"{WINDOW_S:.0f} s window); vLLM first overloads memory at {c0:g}x compression; grid {list(factors)}"
    )
    out = [
        Point("azure-conv", f"x{f:g}", trace_window(TRACE, start=start, duration=WINDOW_S, compression=f))
        for f in factors
    ]
    for k in BURST_FACTORS[: 1 if quick else None]:
        schedule = [(30.0, BASE_RATE), (20.0, BASE_RATE * k), (60.0, BASE_RATE)]
        specs = burst_workload(
            schedule, prompt=LengthSpec.uniform(256, 2048), output=LengthSpec.zipf(200, cap=1000), seed=seed
        )
        out.append(Point("burst", f"{k:g}x for 20 s (seed {seed})", specs))
    return out


def summary_line(rows: Sequence[tuple[Point, dict[str, MemSimResult]]]) -> str:
    parts = []
    for name in BASELINES:
        ratios = [r[name].ttft_p(99) / r["kunserve"].ttft_p(99) for _, r in rows if r["kunserve"].ttft_p(99) > 0]
        if ratios:
            parts.append(f"{name} {min(ratios):.2f}-{max(ratios):.2f}x")
    tbt = [r["kunserve"].tbt_p(99) / r["vllm"].tbt_p(99) for _, r in rows if r["vllm"].tbt_p(99) > 0]
    return (
        f"SUMMARY: over {len(rows)} grid points, baseline p99 TTFT / KunServe p99 TTFT: {', '.join(parts)}; "
        f"KunServe p99 TBT is {min(tbt):.2f}-{max(tbt):.2f}x vLLM's"
    )


def plot(directory: Path, rows: Sequence[tuple[Point, dict[str, MemSimResult]]]) -> None:
    """TTFT and TBT CDFs per system (the baselines and KunServe), one panel per grid point."""
    from scripts.plotting import cdf_grid

    panels = {f"{p.workload} {p.label}": results for p, results in rows}
    cdf_grid(
        directory,
        "kunserve_ttft_cdf",
        {panel: {name: r.ttft for name, r in results.items()} for panel, results in panels.items()},
        xlabel="TTFT (s)",
        title="TTFT under memory overload, per system (simulated LLaMA-7B on A100-40GB)",
        log_x=True,
        columns=2,
    )
    cdf_grid(
        directory,
        "kunserve_tbt_cdf",
        {panel: {name: r.tbt_gaps.tolist() for name, r in results.items()} for panel, results in panels.items()},
        xlabel="time between tokens (ms)",
        title="Time between tokens under memory overload, per system",
        scale=1e3,
        log_x=True,
        columns=2,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one point per workload")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    print(f"# KunServe memory benchmark: {args.instances} instances, LLaMA-7B fp16 on A100-40GB (simulated)")
    rows = []
    for point in points(args.instances, args.seed, args.quick):
        results = run_point(point, args.instances)
        print_point(point, results)
        rows.append((point, results))
    print(f"\n{summary_line(rows)} (wall {time.perf_counter() - t0:.1f} s)")
    if args.plot:
        plot(args.plot, rows)


if __name__ == "__main__":
    main()
