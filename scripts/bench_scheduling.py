"""Scheduling benchmark: round-robin vs INFaaS++ vs Llumnix in the cluster simulator, dispatch cost, speed.

    python -m scripts.bench_scheduling [--quick] [--plot DIR] [--json FILE]

Every comparison runs the three policies side by side on the same generated requests (same seed):

  round_robin  - round-robin dispatch, no migration;
  infaas++     - least_loaded dispatch (lowest KV-memory load), no migration (Llumnix's strong baseline);
  llumnix      - freeness dispatch (virtual usage) + migration (plan_migrations every 50 ms).

The grid was fixed before any policy comparison ran, from a round-robin-only pilot on 16 instances: with
Llumnix's generated lengths (Zipf, means 256/256, capped at 6,144) round-robin first preempts at about
35 req/s and queues heavily by 45; the grid spans that onset up to about twice it. The Azure trace is
compressed 7x, 8x and 9x (8x is where round-robin starts queueing). Nothing else was tuned: instance shape,
cost model and migration constants are the simulator's documented defaults.

Sections: (1) generated workloads, Poisson and Gamma (CV 4) arrivals; (2) the Azure 2023 conversation trace;
(3) priorities (10 % high-priority requests, headroom on/off); (4) per-decision dispatch cost at 16, 128
and 1,000 instances for every policy, and the cost of one migration round; (5) simulator wall time for
the one-hour Azure trace on 16 and 256 instances. Ends with a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.policy.dispatch import POLICY_NAMES, make_dispatch_policy, prefix_block_hashes
from control.policy.migration import plan_migrations
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot
from control.simulator import ClusterConfig, LengthSpec, SimulationResult, generate_workload, load_trace, simulate
from control.simulator.traces import AZURE_CONV
from control.simulator.workload import RequestSpec, describe

AZURE_TRACE = AZURE_CONV
NUM_INSTANCES = 16
RATES = (35.0, 45.0, 55.0, 65.0, 75.0)
ARRIVALS = (("poisson", 1.0), ("gamma cv4", 4.0))
AZURE_COMPRESSIONS = (7.0, 8.0, 9.0)
LENGTHS = LengthSpec.zipf(256, 6144)
MAX_MODEL_LEN = ClusterConfig().engine.max_model_len

POLICIES: tuple[tuple[str, PolicyParams], ...] = (
    ("round_robin", PolicyParams(dispatch_policy="round_robin", migration_enabled=False)),
    ("infaas++", PolicyParams(dispatch_policy="least_loaded", migration_enabled=False)),
    ("llumnix", PolicyParams(dispatch_policy="freeness", migration_enabled=True)),
)


# ---------------------------------------------------------------------------------------------------------
# Latency comparisons
# ---------------------------------------------------------------------------------------------------------


def run_policies(requests: Sequence[RequestSpec], instances: int = NUM_INSTANCES) -> dict[str, SimulationResult]:
    return {
        name: simulate(ClusterConfig(num_instances=instances, policy=params), requests) for name, params in POLICIES
    }


HEADER = (
    f"{'point':>10} {'policy':<12} {'req mean':>9} {'req p99':>9} {'pre mean':>9} {'pre p99':>9} "
    f"{'dec mean':>9} {'dec p99':>9} {'preempt':>8} {'loss s/r':>9} {'migr':>6} {'down ms':>8} {'wall s':>7}"
)


def print_point(point: str, results: dict[str, SimulationResult]) -> None:
    for name, r in results.items():
        print(
            f"{point:>10} {name:<12} {r.request.mean:>9.2f} {r.request.p99:>9.2f} {r.prefill.mean:>9.3f} "
            f"{r.prefill.p99:>9.3f} {r.decode.mean * 1e3:>9.1f} {r.decode.p99 * 1e3:>9.1f} {r.preemptions:>8} "
            f"{r.preemption_loss_mean:>9.3f} {r.migrations_committed:>6} "
            f"{(r.downtime.mean * 1e3 if r.migrations_committed else 0.0):>8.1f} {r.wall_s:>7.1f}"
        )


RATIO_METRICS = (
    ("req mean", lambda r: r.request.mean),
    ("req p99", lambda r: r.request.p99),
    ("pre mean", lambda r: r.prefill.mean),
    ("pre p99", lambda r: r.prefill.p99),
    ("dec mean", lambda r: r.decode.mean),
    ("dec p99", lambda r: r.decode.p99),
    ("loss", lambda r: r.preemption_loss_mean),
)


def ratios(results: dict[str, SimulationResult], baseline: str) -> dict[str, float]:
    """baseline / llumnix per metric (> 1: Llumnix is better)."""
    out = {}
    for label, metric in RATIO_METRICS:
        base, ours = metric(results[baseline]), metric(results["llumnix"])
        out[label] = (base / ours) if ours > 0 else (math.inf if base > 0 else 1.0)
    return out


def print_ratios(points: list[tuple[str, dict[str, SimulationResult]]]) -> None:
    print("\n  ratios baseline/llumnix (> 1: llumnix better)")
    print(f"{'point':>10} {'vs':<12} " + " ".join(f"{label:>9}" for label, _ in RATIO_METRICS))
    for point, results in points:
        for baseline in ("round_robin", "infaas++"):
            row = ratios(results, baseline)
            print(f"{point:>10} {baseline:<12} " + " ".join(f"{_fmt_ratio(v):>9}" for v in row.values()))


def _fmt_ratio(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}x"


def section_generated(num_requests: int, seed: int) -> dict[str, list[tuple[str, dict[str, SimulationResult]]]]:
    out: dict[str, list[tuple[str, dict[str, SimulationResult]]]] = {}
    for label, cv in ARRIVALS:
        print(
            f"\n== generated: {label} arrivals, Zipf lengths {LENGTHS.describe()} (prompt and output), "
            f"{NUM_INSTANCES} instances, {num_requests} requests, seed {seed}"
        )
        print("   latencies: request and prefill (TTFT) in s, decode in ms per token; loss = preemption loss")
        print(HEADER)
        points = []
        for rate in RATES:
            requests = generate_workload(
                num_requests, rate, prompt=LENGTHS, output=LENGTHS, cv=cv, seed=seed, max_total_len=MAX_MODEL_LEN
            )
            results = run_policies(requests)
            print_point(f"{rate:g}/s", results)
            points.append((f"{rate:g}/s", results))
        print_ratios(points)
        out[label] = points
    return out


def section_azure(limit: int | None) -> list[tuple[str, dict[str, SimulationResult]]]:
    points = []
    print(f"\n== Azure 2023 conversation trace ({AZURE_TRACE.name}), {NUM_INSTANCES} instances, time-compressed")
    for compression in AZURE_COMPRESSIONS:
        requests = load_trace(AZURE_TRACE, time_compression=compression, max_total_len=MAX_MODEL_LEN, limit=limit)
        print(f"   {compression:g}x: {describe(requests)}")
    print(HEADER)
    for compression in AZURE_COMPRESSIONS:
        requests = load_trace(AZURE_TRACE, time_compression=compression, max_total_len=MAX_MODEL_LEN, limit=limit)
        results = run_policies(requests)
        print_point(f"{compression:g}x", results)
        points.append((f"{compression:g}x", results))
    print_ratios(points)
    return points


def section_priorities(num_requests: int, seed: int) -> dict[str, Any]:
    """Llumnix priorities: 10 % high-priority requests, with and without the headroom."""
    rate = RATES[len(RATES) // 2]
    requests = generate_workload(
        num_requests,
        rate,
        prompt=LENGTHS,
        output=LENGTHS,
        seed=seed,
        high_priority_fraction=0.1,
        max_total_len=MAX_MODEL_LEN,
    )
    print(f"\n== priorities: Poisson {rate:g}/s, 10 % high priority, llumnix with and without headroom")
    print(
        f"{'variant':<22} {'class':<7} {'n':>6} {'req mean':>9} {'req p99':>9} {'pre mean':>9} {'pre p99':>9} "
        f"{'dec mean':>9} {'dec p99':>9}"
    )
    out: dict[str, Any] = {}
    for variant, isolation in (("headroom (isolation)", True), ("no headroom", False)):
        params = PolicyParams(dispatch_policy="freeness", migration_enabled=True, priority_isolation=isolation)
        result = simulate(ClusterConfig(policy=params), requests)
        out[variant] = {}
        for cls, prio in (("high", 1), ("normal", 0)):
            done = [r for r in result.requests if r.done and r.spec.priority == prio]
            e2e = [r.e2e for r in done]
            pre = [r.prefill for r in done]
            dec = [d for d in (r.decode_per_token for r in done) if d is not None]
            row = {
                "n": len(done),
                "req_mean": statistics.fmean(e2e),
                "req_p99": _p99(e2e),
                "pre_mean": statistics.fmean(pre),
                "pre_p99": _p99(pre),
                "dec_mean": statistics.fmean(dec),
                "dec_p99": _p99(dec),
            }
            out[variant][cls] = row
            print(
                f"{variant:<22} {cls:<7} {row['n']:>6} {row['req_mean']:>9.2f} {row['req_p99']:>9.2f} "
                f"{row['pre_mean']:>9.3f} {row['pre_p99']:>9.3f} {row['dec_mean'] * 1e3:>9.1f} "
                f"{row['dec_p99'] * 1e3:>9.1f}"
            )
    return out


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else math.nan


# ---------------------------------------------------------------------------------------------------------
# Dispatch cost
# ---------------------------------------------------------------------------------------------------------


def _random_snapshot(rng: random.Random, iid: str, model: str) -> InstanceSnapshot:
    total = 2560
    running = tuple(
        RunningSnapshot(
            f"{iid}/{k}",
            num_tokens=rng.randint(16, 4000),
            num_blocks=rng.randint(1, 250),
            priority=1 if rng.random() < 0.05 else 0,
        )
        for k in range(rng.randint(0, 40))
    )
    waiting = rng.randint(0, 3)
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=rng.randint(0, total),
        num_running=len(running),
        num_waiting=waiting,
        waiting_blocks=waiting * rng.randint(1, 60),
        head_waiting_blocks=rng.randint(1, 60) if waiting else 0,
        num_preempted=1 if rng.random() < 0.05 else 0,
        draining=rng.random() < 0.01,
        model=model,
        block_size=16,
        running=running,
    )


def _percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return ordered[len(ordered) // 2] / 1e3, ordered[int(len(ordered) * 0.99)] / 1e3


def section_dispatch_cost(decisions: int, seed: int) -> dict[str, Any]:
    """choose + on_dispatched per decision, and upsert per heartbeat (one heartbeat per decision)."""
    print(
        f"\n== dispatch cost per decision (choose + on_dispatched) and per heartbeat (upsert), µs, "
        f"GC off while timing; "
        f"{decisions} decisions, one heartbeat per decision, 5 % high priority, 2 models"
    )
    print(
        f"{'instances':>9} {'policy':<16} {'decide p50':>10} {'decide p99':>10} {'upsert p50':>10} {'upsert p99':>10}"
    )
    prefixes = [list(range(k * 1000, k * 1000 + 128)) for k in range(100)]
    out: dict[str, Any] = {}
    for n in (16, 128, 1000):
        for name in POLICY_NAMES:
            rng = random.Random(seed)
            index = make_dispatch_policy(name)
            models = ("llama", "qwen")
            for i in range(n):
                index.upsert(_random_snapshot(rng, f"i{i}", models[i % 2]))
            decide: list[int] = []
            upsert: list[int] = []
            gc.collect()
            gc.disable()  # collections are process-wide and amortised; time the policy itself
            for k in range(decisions):
                prompt = prefixes[rng.randrange(100)] + [rng.randrange(259) for _ in range(rng.randint(0, 64))]
                demand = RequestDemand(
                    f"r{k}",
                    num_prompt_tokens=len(prompt),
                    num_blocks=-(-len(prompt) // 16),
                    priority=1 if rng.random() < 0.05 else 0,
                    model=models[k % 2],
                    prefix_block_hashes=prefix_block_hashes(prompt, 16),
                )
                t0 = time.perf_counter_ns()
                chosen = index.choose(demand)
                if chosen is not None:
                    index.on_dispatched(chosen, demand)
                decide.append(time.perf_counter_ns() - t0)
                i = rng.randrange(n)
                snapshot = _random_snapshot(rng, f"i{i}", models[i % 2])
                t0 = time.perf_counter_ns()
                index.upsert(snapshot)
                upsert.append(time.perf_counter_ns() - t0)
            gc.enable()
            d50, d99 = _percentiles_us(decide)
            u50, u99 = _percentiles_us(upsert)
            out[f"{n}/{name}"] = {
                "decide_p50_us": d50,
                "decide_p99_us": d99,
                "upsert_p50_us": u50,
                "upsert_p99_us": u99,
            }
            print(f"{n:>9} {name:<16} {d50:>10.1f} {d99:>10.1f} {u50:>10.1f} {u99:>10.1f}")
    rounds_per_size = 50
    print("\n   one migration round (plan_migrations over every instance, random loads), µs, GC off")
    print(f"{'instances':>9} {'p50':>10} {'p99':>10} {'decisions/round':>16}")
    for n in (16, 128, 1000):
        rng = random.Random(seed)
        params = PolicyParams()
        samples: list[int] = []
        made = 0
        rounds = [[_random_snapshot(rng, f"i{i}", "llama") for i in range(n)] for _ in range(rounds_per_size)]
        gc.collect()
        gc.disable()
        for snapshots in rounds:
            t0 = time.perf_counter_ns()
            made += len(plan_migrations(snapshots, [], params))
            samples.append(time.perf_counter_ns() - t0)
        gc.enable()
        p50, p99 = _percentiles_us(samples)
        out[f"{n}/plan_migrations"] = {"p50_us": p50, "p99_us": p99}
        print(f"{n:>9} {p50:>10.1f} {p99:>10.1f} {made / rounds_per_size:>16.1f}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Simulator speed
# ---------------------------------------------------------------------------------------------------------


def section_speed() -> dict[str, Any]:
    requests = load_trace(AZURE_TRACE, max_total_len=MAX_MODEL_LEN)
    print(f"\n== simulator wall time: the one-hour Azure trace uncompressed ({describe(requests)})")
    print(
        f"{'instances':>9} {'policy':<12} {'wall s':>8} {'virtual s':>10} {'x real time':>11} {'steps':>10} "
        f"{'steps/s':>10} {'migrations':>10}"
    )
    out: dict[str, Any] = {}
    for n in (16, 256):
        for name, params in (POLICIES[0], POLICIES[2]):
            r = simulate(ClusterConfig(num_instances=n, policy=params), requests)
            out[f"{n}/{name}"] = {"wall_s": r.wall_s, "virtual_s": r.virtual_s, "steps": r.steps}
            print(
                f"{n:>9} {name:<12} {r.wall_s:>8.2f} {r.virtual_s:>10.0f} {r.virtual_s / r.wall_s:>11.0f} "
                f"{r.steps:>10} {r.steps / r.wall_s:>10.0f} {r.migrations_committed:>10}"
            )
    return out


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _geomean(values: list[float]) -> float:
    finite = [v for v in values if v > 0 and not math.isinf(v)]
    return math.exp(sum(math.log(v) for v in finite) / len(finite)) if finite else math.nan


def summary(
    generated: dict[str, list[tuple[str, dict[str, SimulationResult]]]],
    azure: list[tuple[str, dict[str, SimulationResult]]],
    cost: dict[str, Any],
    speed: dict[str, Any],
) -> str:
    points = [p for pts in generated.values() for p in pts]

    def span(baseline: str, metric: str, pts: list[tuple[str, dict[str, SimulationResult]]]) -> str:
        values = [ratios(results, baseline)[metric] for _, results in pts]
        finite = [v for v in values if not math.isinf(v)]
        lo, hi = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        return f"{_geomean(values):.2f}x ({lo:.2f}-{hi:.2f}x)"

    return (
        f"SUMMARY llumnix p99 prefill vs round-robin {span('round_robin', 'pre p99', points)}, "
        f"vs INFaaS++ {span('infaas++', 'pre p99', points)} over {len(points)} generated points; "
        f"Azure {span('round_robin', 'pre p99', azure)} / {span('infaas++', 'pre p99', azure)}; "
        f"p99 request latency vs INFaaS++ {span('infaas++', 'req p99', points)}; "
        f"dispatch p99 at 1,000 instances: freeness {cost['1000/freeness']['decide_p99_us']:.1f} µs, "
        f"prefix_affinity {cost['1000/prefix_affinity']['decide_p99_us']:.1f} µs; "
        f"1 h Azure trace: {speed['16/llumnix']['wall_s']:.1f} s on 16 instances, "
        f"{speed['256/llumnix']['wall_s']:.1f} s on 256 (llumnix)"
    )


def _latencies(result: SimulationResult, metric: str) -> list[float]:
    done = [r for r in result.requests if r.done]
    return [r.prefill for r in done] if metric == "prefill" else [r.e2e for r in done]


def plot(
    directory: Path,
    generated: dict[str, list[tuple[str, dict[str, SimulationResult]]]],
    azure: list[tuple[str, dict[str, SimulationResult]]],
) -> None:
    """p99 vs rate per policy, and latency CDFs per policy (one panel per load point)."""
    from scripts.plotting import cdf_grid, line_plot

    for label, points in generated.items():
        stem = "scheduling_" + "".join(c if c.isalnum() else "_" for c in label)
        rates = [float(p.rstrip("/s")) for p, _ in points]
        for metric, what, scale, unit in (
            ("request", "request latency", 1.0, "s"),
            ("prefill", "prefill latency (TTFT)", 1.0, "s"),
            ("decode", "decode latency per token", 1e3, "ms"),
        ):
            line_plot(
                directory,
                f"{stem}_{metric}_p99",
                {name: (rates, [getattr(r[name], metric).p99 * scale for _, r in points]) for name, _ in POLICIES},
                xlabel="request rate (req/s)",
                ylabel=f"p99 {what} ({unit})",
                title=f"{label}, {NUM_INSTANCES} instances",
                log_y=True,
            )
        for metric in ("prefill", "request"):
            cdf_grid(
                directory,
                f"{stem}_{metric}_cdf",
                {point: {name: _latencies(res, metric) for name, res in r.items()} for point, r in points},
                xlabel=f"{metric} latency (s)",
                title=f"{label}: {metric} latency CDF per policy, {NUM_INSTANCES} instances",
                log_x=True,
            )
    for metric in ("prefill", "request"):
        cdf_grid(
            directory,
            f"scheduling_azure_{metric}_cdf",
            {point: {name: _latencies(res, metric) for name, res in r.items()} for point, r in azure},
            xlabel=f"{metric} latency (s)",
            title=f"Azure trace: {metric} latency CDF per policy",
            log_x=True,
        )


def to_json(generated: Any, azure: Any, priorities: Any, cost: Any, speed: Any) -> dict[str, Any]:
    def rows(points: list[tuple[str, dict[str, SimulationResult]]]) -> list[dict[str, Any]]:
        return [{"point": p, **{name: r.row() for name, r in results.items()}} for p, results in points]

    return {
        "generated": {label: rows(points) for label, points in generated.items()},
        "azure": rows(azure),
        "priorities": priorities,
        "dispatch_cost": cost,
        "speed": speed,
        "grid": {
            "rates": RATES,
            "arrivals": ARRIVALS,
            "azure_compressions": AZURE_COMPRESSIONS,
            "lengths": dataclasses.asdict(LENGTHS),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per generated point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer requests and decisions (smoke run)")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    num_requests = 1500 if args.quick else args.requests
    started = time.perf_counter()
    generated = section_generated(num_requests, args.seed)
    azure = section_azure(limit=3000 if args.quick else None)
    priorities = section_priorities(num_requests, args.seed)
    cost = section_dispatch_cost(2000 if args.quick else 20_000, args.seed)
    speed = section_speed()
    if args.plot:
        plot(args.plot, generated, azure)
    if args.json:
        args.json.write_text(json.dumps(to_json(generated, azure, priorities, cost, speed), indent=1, default=str))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    print(summary(generated, azure, cost, speed))


if __name__ == "__main__":
    main()
