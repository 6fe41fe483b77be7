"""Scheduling benchmark: round-robin vs INFaaS++ vs Llumnix in the cluster simulator, dispatch cost, speed.

    python -m scripts.bench_scheduling [--quick] [--plot DIR] [--json FILE]
    python -m scripts.bench_scheduling --goodput [--seeds 3] [--settings "a10 poisson,a10 azure,…"]
                                       [--policies round_robin,least_loaded,llumnix,drover] [--plot DIR]
    python -m scripts.bench_scheduling --ablation [--seeds 3] [--settings …] [--ablation-goodput]

``--goodput``: per setting and policy, the highest rate at which >= 99 % of submitted requests meet both
SLOs (bisection to 5 %, rejected/unfinished = misses), mean and 95 % CI over seeds, then p99 TTFT and p99
TPOT and p99 ITL at fixed loads (0.25-1.25x least_loaded's mean goodput); the default settings are the
issue-17 grid (``GRID``). ``--ablation``: drover with one rule changed at a
time, at a fixed load of 1.5x least_loaded's goodput. Definitions and the SLO rule: docs/policies.md.

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
import functools
import gc
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.policy.dispatch import POLICY_NAMES, make_dispatch_policy, prefix_block_hashes
from control.policy.migration import plan_migrations
from control.policy.params import PolicyParams
from control.policy.recommended import STEP_BUDGET_SHARE, user_policy_params
from control.policy.snapshots import RequestDemand
from control.simulator import ClusterConfig, LengthSpec, SimulationResult, generate_workload, load_trace, simulate
from control.simulator.cluster import ClusterSimulator
from control.simulator.prefix import PrefixTrace
from control.simulator.presets import get_preset
from control.simulator.runner import ObservedCluster, ObservedPrefixCluster, weighted_percentile
from control.simulator.step_budget import with_slo_step_budget
from control.simulator.traces import AZURE_CONV, MOONCAKE_SYNTHETIC
from control.simulator.workload import RequestSpec, describe
from engines.sim.core import SimEngineConfig
from engines.sim.cost_model import CostModel
from engines.sim.prefix_cache import TRACE_BLOCK_TOKENS
from scripts.bench_policy_scale import percentiles_us, random_snapshot

FEASIBLE = "drover+feasible"
"""``drover`` with the goodput-first queue order on, at the setting's TTFT SLO (``queue_ttft_slo_s`` -1)."""


def named_policy(name: str) -> PolicyParams:
    """A user-facing policy's params (``drover sim run --policy``), or :data:`FEASIBLE`."""
    if name.strip().lower() == FEASIBLE:
        return dataclasses.replace(user_policy_params("drover"), queue_ttft_slo_s=-1.0)
    return user_policy_params(name)


AZURE_TRACE = AZURE_CONV
MOONCAKE_TRACE = MOONCAKE_SYNTHETIC
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
    ("drover", named_policy("drover")),
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
                index.upsert(random_snapshot(rng, f"i{i}", models[i % 2]))
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
                snapshot = random_snapshot(rng, f"i{i}", models[i % 2])
                t0 = time.perf_counter_ns()
                index.upsert(snapshot)
                upsert.append(time.perf_counter_ns() - t0)
            gc.enable()
            d50, d99 = percentiles_us(decide)
            u50, u99 = percentiles_us(upsert)
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
        rounds = [[random_snapshot(rng, f"i{i}", "llama") for i in range(n)] for _ in range(rounds_per_size)]
        gc.collect()
        gc.disable()
        for snapshots in rounds:
            t0 = time.perf_counter_ns()
            made += len(plan_migrations(snapshots, [], params))
            samples.append(time.perf_counter_ns() - t0)
        gc.enable()
        p50, p99 = percentiles_us(samples)
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


# ---------------------------------------------------------------------------------------------------------
# Goodput: the highest rate at which >= 99 % of submitted requests meet both SLOs
# ---------------------------------------------------------------------------------------------------------

# LLaMA-7B fp16 on one A10-24GB, the Llumnix paper's setting, until the simulator's presets land (issue 16):
# weights 13.5 GB over 600 GB/s HBM -> ~22 ms per decode step floor; prefill at ~0.19 ms/token (2 x 6.7 GFLOP
# per token at ~70 TFLOP/s sustained of the card's 125 fp16 peak); KV reads 0.5 MiB/token over 600 GB/s ->
# 0.00087 ms per context token; ~0.1 ms per sequence of batch overhead. KV: 24 GB x 0.9 - 13.5 GB weights
# -> ~6.8 GB = 850 blocks of 16 tokens (issue 16's numbers).
A10_COST = CostModel(
    name="llama7b-a10 (stand-in)",
    fixed_ms=22.0,
    prefill_ms_per_token=0.19,
    decode_ms_per_seq=0.1,
    decode_ms_per_context_token=0.00087,
)
A10_ENGINE = SimEngineConfig(
    block_size=16, num_blocks=850, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192
)

GOODPUT_POLICIES = ("round_robin", "least_loaded", "llumnix", "drover")
SLO_TTFT_FACTOR = 10.0
SLO_TPOT_FACTOR = 5.0
ATTAINMENT = 0.99


@dataclasses.dataclass(frozen=True)
class Setting:
    """A workload family and the cluster it runs on; ``rate`` scales it (req/s, or trace compression)."""

    name: str
    engine: SimEngineConfig
    cost: CostModel
    cv: float = 1.0  # generated arrivals; ignored for the trace
    trace: Path | None = None
    duration_s: float = 300.0
    """Seconds of arrivals per run at any rate (a fixed request count would make high rates short runs
    that end before queues build)."""
    start_rate: float = 4.0
    instances: int = NUM_INSTANCES
    trace_span_s: float = 3501.7
    """Length of the trace (seconds): seeded windows start inside it with room for the whole window."""
    preset: str | None = None
    """A simulator preset (``drover sim presets``): its model, KV bytes per token and migration bandwidth
    too, exactly as ``drover sim run --preset`` builds the cluster; None: the stand-in engine and cost."""

    def workload(self, rate: float, seed: int) -> list[RequestSpec]:
        if self.trace is not None:
            window = self.duration_s * rate
            offset = (seed * 397.0) % max(1.0, self.trace_span_s - window)  # seeded windows of the trace
            return load_trace(
                self.trace,
                time_compression=rate,
                max_total_len=self.engine.max_model_len,
                start=offset,
                duration=window,
            )
        return generate_workload(
            max(100, int(rate * self.duration_s)),
            rate,
            prompt=LENGTHS,
            output=LENGTHS,
            cv=self.cv,
            seed=seed,
            max_total_len=self.engine.max_model_len,
        )

    prefix_caching: bool = False
    """Engines model vLLM's automatic prefix caching from the trace's ``hash_ids`` (every policy alike; those
    that keep a prefix index are fed the engines' cache events, as live)."""

    def simulator(self, policy: PolicyParams, rate: float, seed: int) -> ClusterSimulator:
        """The simulator of one run, with the per-token gaps observed (ITL)."""
        specs = self.workload(rate, seed)
        if self.prefix_caching:
            trace = PrefixTrace(specs, {s.request_id: s.prefix_hashes for s in specs}, TRACE_BLOCK_TOKENS)
            return ObservedPrefixCluster(self.config(policy), trace)
        return ObservedCluster(self.config(policy), specs)

    def simulate(self, policy: PolicyParams, rate: float, seed: int) -> SimulationResult:
        return self.simulator(policy, rate, seed).run()

    def config(self, policy: PolicyParams) -> ClusterConfig:
        if self.preset is not None:
            config = get_preset(self.preset).cluster_config(self.instances, policy)
            config = dataclasses.replace(config, engine=self.engine, cost_model=self.cost)
        else:
            config = ClusterConfig(
                num_instances=self.instances, engine=self.engine, cost_model=self.cost, policy=policy
            )
        if policy.queue_ttft_slo_s < 0:  # goodput-first queue order: the setting's TTFT SLO, as the rule fixes it
            config = dataclasses.replace(
                config, policy=dataclasses.replace(policy, queue_ttft_slo_s=cached_slo(self)[0])
            )
        if policy.step_budget_slo_share > 0:  # SLO-sized step budget: the setting's TPOT SLO, as the rule fixes it
            config = with_slo_step_budget(config, cached_slo(self)[1])
        return config


GRID = ("a10 poisson", "a10 gamma4", "a10 azure", "h200 mooncake")
"""The goodput grid (issue 17), fixed before any policy was tuned: the LLaMA-7B/A10 preset (Llumnix's
setting) with generated Zipf(256, 6144) lengths under Poisson and Gamma CV 4 arrivals, the Azure 2023
conversation trace on the same preset (16 instances each), and the Mooncake long-context trace on the one
preset whose context holds it (LLaMA-3-8B/H200, 128k), 8 instances (16 H200s would serve the whole trace
at 8x compression, leaving windows of seconds). All vLLM-v1 admission."""


def goodput_settings() -> list[Setting]:
    default = ClusterConfig()
    a10 = get_preset("llama7b-a10")
    a10_engine = a10.engine_config(max_model_len=8192)
    a10_full = a10.engine_config()
    h200 = get_preset("llama3-8b-h200")
    qwen = get_preset("qwen2.5-7b-a10")
    return [
        Setting("a10 poisson", a10_engine, a10.cost_model, cv=1.0, start_rate=8.0, preset=a10.name),
        Setting("a10 gamma4", a10_engine, a10.cost_model, cv=4.0, start_rate=8.0, preset=a10.name),
        Setting("a10 azure", a10_full, a10.cost_model, trace=AZURE_TRACE, start_rate=1.0, preset=a10.name),
        Setting(
            "h200 mooncake",
            h200.engine_config(),
            h200.cost_model,
            trace=MOONCAKE_TRACE,
            start_rate=1.0,
            instances=8,
            trace_span_s=1022.0,
            preset=h200.name,
            prefix_caching=True,
        ),
        # issue 17: the Azure trace where KV does not bind (GQA), for the prefill-interference ablation
        Setting(
            "qwen azure",
            qwen.engine_config(max_model_len=a10_full.max_model_len),
            qwen.cost_model,
            trace=AZURE_TRACE,
            start_rate=1.0,
            preset=qwen.name,
        ),
        # the stand-in used before the presets landed, and the default instance of the first round
        Setting("paper poisson", A10_ENGINE, A10_COST, cv=1.0),
        Setting("paper gamma4", A10_ENGINE, A10_COST, cv=4.0),
        Setting("azure", default.engine, default.cost_model, trace=AZURE_TRACE, start_rate=4.0),
    ]


def run_alone(setting: Setting, prompt: int, output: int) -> tuple[float, float]:
    """(TTFT s, TPOT s) of one request run alone on one instance of the setting's preset: the simulator's own
    cost (a long prompt's later chunks attend to its earlier ones, which a per-token estimate misses: the
    Mooncake trace's 131k-token prompts take 10.1 s alone, not 3.3 s)."""
    config = dataclasses.replace(setting.config(named_policy("least_loaded")), num_instances=1)
    record = simulate(config, [RequestSpec("alone", 0.0, prompt, max(2, output))]).requests[0]
    return record.prefill, record.decode_per_token or 0.0


SLO_SAMPLE_REQUESTS = 20_000
"""Generated settings: the SLO rule reads this many requests drawn with seed 0 (lengths are i.i.d., so this
is the length distribution itself, not one run's sample)."""


def slo_sample(setting: Setting) -> list[RequestSpec]:
    """The requests the SLO rule reads: a trace's *whole* trace (every window at every seeded offset and rate
    is judged by the same numbers), or a large seed-0 sample of a generated workload's lengths."""
    if setting.trace is not None:
        return load_trace(setting.trace, max_total_len=setting.engine.max_model_len)
    return generate_workload(
        SLO_SAMPLE_REQUESTS,
        setting.start_rate,
        prompt=LENGTHS,
        output=LENGTHS,
        cv=1.0,  # arrivals do not enter the rule: Poisson and Gamma settings of one preset share their SLOs
        seed=0,
        max_total_len=setting.engine.max_model_len,
    )


def slo_for(setting: Setting) -> tuple[float, float]:
    """(TTFT s, TPOT s), one rule for every setting and policy (the rule, not the numbers, is fixed), read
    from :func:`slo_sample` (the whole trace, never a window; docs/policies.md, "SLO rule"):

    * TTFT: the larger of 10x the TTFT of the workload's median request run alone and 2x that of its
      99th-percentile prompt run alone. The issue's example (10x the median alone) is unattainable for
      heavy-tailed lengths: with Zipf(256) prompts the median prompt is 7 tokens and 6 % of prompts take
      longer than 10x its TTFT to prefill even alone, so every policy's goodput would be 0.
    * TPOT: 5x the TPOT of the median request alone.

    Alone = simulated alone on one instance of the preset (:func:`run_alone`), with no prefix-cache hit
    (the rule does not depend on what a policy makes the cache hold).
    """
    specs = slo_sample(setting)
    prompts = sorted(s.prompt_len for s in specs)
    prompt = prompts[len(prompts) // 2]
    p99_prompt = prompts[min(len(prompts) - 1, int(0.99 * len(prompts)))]
    output = int(statistics.median(s.output_len for s in specs))
    median_ttft, median_tpot = run_alone(setting, prompt, output)
    p99_ttft, _ = run_alone(setting, p99_prompt, 2)
    return max(SLO_TTFT_FACTOR * median_ttft, 2.0 * p99_ttft), SLO_TPOT_FACTOR * median_tpot


@functools.cache
def cached_slo(setting: Setting) -> tuple[float, float]:
    """:func:`slo_for`, computed once per setting (policies that read the SLO ask for it at every run)."""
    return slo_for(setting)


def attainment(result: SimulationResult, slo_ttft: float, slo_tpot: float) -> float:
    """Share of *submitted* requests meeting both SLOs; rejected and unfinished ones are misses."""
    met = 0
    for r in result.requests:
        if r.rejected or not r.done or r.prefill > slo_ttft:
            continue
        tpot = r.decode_per_token
        if tpot is None or tpot <= slo_tpot:
            met += 1
    return met / max(1, len(result.requests))


def goodput(setting: Setting, policy: PolicyParams, seed: int, slo: tuple[float, float]) -> dict[str, Any]:
    """Bisection on the rate to 5 %: the highest rate whose attainment is >= 99 %; 0 with the lowest rate
    tried when even that fails."""
    cache: dict[float, float] = {}

    def ok(rate: float) -> bool:
        if rate not in cache:
            cache[rate] = attainment(setting.simulate(policy, rate, seed), *slo)
            print(
                f"   [{setting.name} {policy.dispatch_policy} seed {seed}] rate {rate:.2f}: {cache[rate]:.3f}",
                file=sys.stderr,
            )
        return cache[rate] >= ATTAINMENT

    lo, hi = 0.0, 0.0
    rate = setting.start_rate
    if ok(rate):
        lo = rate
        while ok(rate * 2) and rate < 1e4:
            rate *= 2
            lo = rate
        hi = rate * 2
    else:
        hi = rate
        floor = setting.start_rate / 64
        while rate > floor:
            rate /= 2
            if ok(rate):
                lo = rate
                break
            hi = rate
        if lo == 0.0:
            return {"goodput": 0.0, "lowest_tried": rate, "runs": len(cache)}
    while hi / lo > 1.05:
        mid = (lo * hi) ** 0.5
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"goodput": lo, "lowest_tried": min(cache), "runs": len(cache)}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 2.0)
    return mean, t * statistics.stdev(values) / math.sqrt(n)


TAIL_FRACTIONS = (0.25, 0.5, 0.8, 1.0, 1.25)
"""Fixed loads for the tails, as fractions of least_loaded's mean goodput: light load up to past its knee."""


def observed_run(setting: Setting, policy: PolicyParams, rate: float, seed: int) -> tuple[SimulationResult, float]:
    """One run with per-token gaps recorded: the result and p99 inter-token latency in seconds (every gap
    between consecutive tokens of a request, as ``drover sim run`` reports ``itl_p99_ms``)."""
    sim = setting.simulator(policy, rate, seed)
    assert isinstance(sim, (ObservedCluster, ObservedPrefixCluster))
    result = sim.run()
    itl = weighted_percentile(sim.gaps, sim.gap_weights, 99)
    return result, math.nan if itl is None else itl


def fixed_load_tails(
    setting: Setting, policies: Sequence[str], rates: Sequence[float], seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """p99 TTFT, p99 TPOT (per request) and p99 ITL (every token gap) at fixed rates, mean and CI over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for rate in rates:
        for name in policies:
            ttft: list[float] = []
            tpot: list[float] = []
            itl: list[float] = []
            for seed in seeds:
                result, itl_p99 = observed_run(setting, policy_by_name(name), rate, seed)
                ttft.append(result.prefill.p99)
                tpot.append(result.decode.p99 * 1e3)
                itl.append(itl_p99 * 1e3)
            out[f"{rate:g}/{name}"] = {
                "ttft_p99_s": mean_ci(ttft),
                "tpot_p99_ms": mean_ci(tpot),
                "itl_p99_ms": mean_ci(itl),
                "ttft_p99_per_seed": ttft,
                "tpot_p99_per_seed": tpot,
                "itl_p99_per_seed": itl,
            }
    return out


def policy_by_name(name: str) -> PolicyParams:
    """A user-facing policy (``drover``, ``least_loaded``, ...) or an ablation variant's name."""
    try:
        return named_policy(name)
    except ValueError:
        variants = ablation_variants()
        if name in variants:
            return variants[name]
        raise


def print_tails(setting: Setting, tails: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Print :func:`fixed_load_tails`' rows (mean ± 95 % CI, then per seed); returns them."""
    print(f"\n== fixed-load tails, {setting.name}")
    print(
        f"   {'rate':>7} {'policy':<26} {'p99 TTFT s':>18} {'p99 TPOT ms':>18} {'p99 ITL ms':>18}  per seed (TTFT/ITL)"
    )
    for key, row in tails.items():
        rate, name = key.split("/", 1)
        (t, tc), (d, dc), (i, ic) = row["ttft_p99_s"], row["tpot_p99_ms"], row["itl_p99_ms"]
        pairs = zip(row["ttft_p99_per_seed"], row["itl_p99_per_seed"], strict=True)
        per_seed = " ".join(f"{a:.2f}/{b:.0f}" for a, b in pairs)
        line = f"   {rate:>7} {name:<26} {t:>10.3f} ± {tc:<6.3f} {d:>10.1f} ± {dc:<6.1f} {i:>10.1f} ± {ic:<6.1f}"
        print(f"{line}  {per_seed}", flush=True)
    return tails


def section_goodput(
    settings: Sequence[Setting], policies: Sequence[str], seeds: Sequence[int], *, tails_wanted: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting in settings:
        slo = slo_for(setting)
        unit = "x compression" if setting.trace else "req/s"
        print(
            f"\n== goodput, {setting.name}: SLO TTFT {slo[0]:.2f} s, TPOT {slo[1] * 1e3:.0f} ms "
            f"(>= 99 % of submitted requests), {len(seeds)} seeds, rate in {unit}"
        )
        print(f"{'policy':<14} {'goodput':>9} {'± 95% CI':>9} {'per seed':<32} {'vs least_loaded':>15}")
        per_policy: dict[str, Any] = {}
        for name in policies:
            runs = [goodput(setting, policy_by_name(name), seed, slo) for seed in seeds]
            values = [r["goodput"] for r in runs]
            mean, ci = mean_ci(values)
            per_policy[name] = {"mean": mean, "ci95": ci, "per_seed": runs}
        base = per_policy.get("least_loaded", {}).get("mean", math.nan)
        for name, row in per_policy.items():
            seeds_text = " ".join(f"{r['goodput']:.2f}" for r in row["per_seed"])
            ratio = row["mean"] / base if base else math.nan
            print(f"{name:<14} {row['mean']:>9.2f} {row['ci95']:>9.2f} {seeds_text:<32} {ratio:>14.2f}x", flush=True)
        base_mean = per_policy.get("least_loaded", {}).get("mean", 0.0) if tails_wanted else 0.0
        rates = sorted({round(f * base_mean, 2) for f in TAIL_FRACTIONS} - {0.0})
        tails = fixed_load_tails(setting, policies, rates, seeds) if rates else {}
        if tails:
            print("   fixed loads (fractions of least_loaded's mean goodput): mean ± 95% CI over seeds")
            print_tails(setting, tails)
        out[setting.name] = {"slo_ttft_s": slo[0], "slo_tpot_s": slo[1], "goodput": per_policy, "tails": tails}
    return out


def ablation_variants() -> dict[str, PolicyParams]:
    """Drover's policy with one piece changed at a time (docs/policies.md, "Ablations")."""
    drover = named_policy("drover")
    llumnix_migration: dict[str, Any] = {
        "migration_cost_aware": False,
        "migration_budget_per_request": 0,
        "migration_cooldown_s": 0.0,
        "migration_pingpong_window_s": 0.0,
        "max_migrations_per_round": 0,
    }
    load_migration: dict[str, Any] = {"migration_sources": "freeness"}
    return {
        "least_loaded": named_policy("least_loaded"),
        "llumnix": named_policy("llumnix"),
        "predictive, no late binding": dataclasses.replace(drover, predict_hold=False),
        "drover, no prefix awareness": dataclasses.replace(drover, predict_prefix=False),
        "kv_aware": named_policy("kv_aware"),
        "drover + load migr. (freeness)": dataclasses.replace(drover, **load_migration),
        "drover + load migr. (pressure)": dataclasses.replace(drover, migration_sources="pressure"),
        "drover + llumnix migr.": dataclasses.replace(drover, **llumnix_migration, **load_migration),
        "freeness + load migr. (old)": dataclasses.replace(
            drover, dispatch_policy="freeness", predict_hold=False, **load_migration
        ),
        "old drover (round 22)": dataclasses.replace(drover, predict_hold=False, **load_migration),
        "old drover - cost rule": dataclasses.replace(
            drover, predict_hold=False, migration_cost_aware=False, **load_migration
        ),
        "old drover - budget": dataclasses.replace(
            drover, predict_hold=False, migration_budget_per_request=0, **load_migration
        ),
        "old drover - cooldown": dataclasses.replace(
            drover, predict_hold=False, migration_cooldown_s=0.0, **load_migration
        ),
        "old drover - ping-pong": dataclasses.replace(
            drover, predict_hold=False, migration_pingpong_window_s=0.0, **load_migration
        ),
        # one queue for the cluster (issue 17, Azure): each rule off in turn, then both (round 24's drover)
        "drover - hold all (round 24)": dataclasses.replace(drover, queue_hold_all=False),
        "drover, scan 32": dataclasses.replace(drover, queue_backfill_scan=32),
        "drover + aging 250": dataclasses.replace(drover, queue_aging_tokens_per_s=250.0),
        "drover + aging 250, scan 32": dataclasses.replace(
            drover, queue_aging_tokens_per_s=250.0, queue_backfill_scan=32
        ),
        # chunked-prefill-aware memory (issue 17, Azure, round 26): off, as drover was before
        "drover, no prefill blocks": dataclasses.replace(drover, predict_prefill_blocks=False),
        # prefill-interference placement (issue 17, qwen azure): opt-in
        "drover + interference 1/128": dataclasses.replace(drover, predict_interference=1 / 128),
        "drover + interference 1/32": dataclasses.replace(drover, predict_interference=1 / 32),
        # the hold test on physical room only, the growth reserve kept in the load key (issue 17, sweep)
        "drover + physical hold": dataclasses.replace(drover, predict_hold_physical=True),
        # a prompt's stall on the decodes where it starts, weighed against its wait (issue 17, sweep): opt-in
        "drover + decode stall": dataclasses.replace(drover, predict_decode_stall=1.0),
        # the hold test's growth reserve per hosted request, 1 or 2 blocks instead of 4 (issue 17, sweep)
        "drover + hold reserve 1": dataclasses.replace(drover, predict_hold_growth_blocks=1),
        "drover + hold reserve 2": dataclasses.replace(drover, predict_hold_growth_blocks=2),
        # SLO-sized step budget (issue 17, qwen azure): opt-in; and the baseline with it
        "drover + step budget": dataclasses.replace(
            drover, step_budget_slo_share=STEP_BUDGET_SHARE, step_budget_adaptive=False
        ),
        "least_loaded + step budget": dataclasses.replace(
            named_policy("least_loaded"), step_budget_slo_share=STEP_BUDGET_SHARE
        ),
        # the same budget only under pressure, per step (issue 17, round 28; drover's default since)
        "drover + adaptive budget": dataclasses.replace(
            drover, step_budget_slo_share=STEP_BUDGET_SHARE, step_budget_adaptive=True
        ),
        "drover - step budget": dataclasses.replace(drover, step_budget_slo_share=0.0, step_budget_adaptive=False),
        # goodput-first order of the cluster queue at the setting's TTFT SLO (issue 17, round 28): opt-in
        "drover + goodput-first": named_policy(FEASIBLE),
        # engines keep at most one full step of prompt work queued, the rest waits in the cluster queue (issue
        # 17, round 29; drover's default since)
        "drover - prefill hold": dataclasses.replace(drover, predict_hold_prefill_tokens=0),
        # the hold test's growth reserve bounded by half the free room (issue 17, round 30; drover's default
        # since): without the bound, as drover was before
        "drover - growth share": dataclasses.replace(drover, predict_hold_growth_share=0.0),
        "drover": drover,
    }


def section_ablation(
    settings: Sequence[Setting],
    seeds: Sequence[int],
    rate_factor: float,
    *,
    with_goodput: bool = False,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Every variant (or those named in ``only``) at a fixed, stressed load (``rate_factor`` x least_loaded's
    seed-0 goodput) and its goodput: what each rule buys."""
    out: dict[str, Any] = {}
    variants = ablation_variants()
    for setting in settings:
        slo = slo_for(setting)
        base = goodput(setting, variants["least_loaded"], seeds[0], slo)["goodput"] or setting.start_rate
        rate = round(base * rate_factor, 2)
        print(
            f"\n== ablation, {setting.name}: fixed rate {rate:g} ({rate_factor:g}x least_loaded's seed-0 goodput), "
            f"{len(seeds)} seeds; SLO TTFT {slo[0]:.2f} s, TPOT {slo[1] * 1e3:.0f} ms"
        )
        print(
            f"{'variant':<28} {'goodput':>8} {'± CI':>6} {'attain':>7} {'p99 TTFT':>9} {'p99 TPOT':>9} "
            f"{'migr':>6} {'max/req':>7} {'migr TPOT p99':>13} {'other TPOT p99':>14} {'preempt':>8}"
        )
        rows: dict[str, Any] = {}
        for name, params in variants.items():
            if only and name not in only:
                continue
            good = [goodput(setting, params, seed, slo)["goodput"] for seed in seeds] if with_goodput else [math.nan]
            att, ttft, tpot, migr, max_per, mtp, otp, pre = [], [], [], [], [], [], [], []
            for seed in seeds:
                result = setting.simulate(params, rate, seed)
                att.append(attainment(result, *slo))
                ttft.append(result.prefill.p99)
                tpot.append(result.decode.p99 * 1e3)
                migr.append(result.migrations_committed)
                max_per.append(max((r.migrations for r in result.requests), default=0))
                moved = [r.decode_per_token for r in result.requests if r.done and r.migrations]
                other = [r.decode_per_token for r in result.requests if r.done and not r.migrations]
                mtp.append(_p99([x for x in moved if x is not None]) * 1e3 if moved else math.nan)
                otp.append(_p99([x for x in other if x is not None]) * 1e3)
                pre.append(result.preemptions)
            g, gci = mean_ci(good)
            row = {
                "goodput": (g, gci),
                "attainment": statistics.fmean(att),
                "ttft_p99_s": statistics.fmean(ttft),
                "tpot_p99_ms": statistics.fmean(tpot),
                "migrations": statistics.fmean(migr),
                "max_migrations_per_request": max(max_per),
                "migrated_tpot_p99_ms": statistics.fmean(mtp) if all(not math.isnan(x) for x in mtp) else math.nan,
                "other_tpot_p99_ms": statistics.fmean(otp),
                "preemptions": statistics.fmean(pre),
            }
            rows[name] = row
            print(
                f"{name:<28} {g:>8.2f} {gci:>6.2f} {row['attainment']:>7.3f} {row['ttft_p99_s']:>9.2f} "
                f"{row['tpot_p99_ms']:>9.1f} {row['migrations']:>6.0f} {row['max_migrations_per_request']:>7} "
                f"{row['migrated_tpot_p99_ms']:>13.1f} {row['other_tpot_p99_ms']:>14.1f} {row['preemptions']:>8.0f}",
                flush=True,
            )
        out[setting.name] = {"rate": rate, "rows": rows}
    return out


CLIFF_FRACTIONS = (0.8, 1.0, 1.2, 1.4)


def section_cliff(
    setting: Setting, policies: Sequence[str], base: float, seeds: Sequence[int], kv_factor: float = 2.0
) -> dict[str, Any]:
    """Why a setting's knee is where it is: at fixed rates around ``base`` (least_loaded's goodput), per
    policy, SLO attainment, the time-averaged KV usage of the instances, which SLO the misses broke, and
    preemptions; then the same with ``kv_factor`` x the KV blocks (a capacity cliff moves with the KV for
    every policy alike; a dispatch inefficiency would not)."""
    slo = slo_for(setting)
    out: dict[str, Any] = {}
    bigger = dataclasses.replace(setting.engine, num_blocks=int(setting.engine.num_blocks * kv_factor))
    print(
        f"\n== capacity cliff, {setting.name}: SLO TTFT {slo[0]:.2f} s, TPOT {slo[1] * 1e3:.0f} ms; "
        f"rates = fractions of {base:g}; mean of {len(seeds)} seeds"
    )
    print(f"{'KV':>4} {'rate':>6} {'policy':<14} {'attain':>7} {'KV usage':>8} {'TTFT miss':>9} {'TPOT miss':>9}")
    for label, engine in (("1x", setting.engine), (f"{kv_factor:g}x", bigger)):
        shaped = dataclasses.replace(setting, engine=engine)
        for fraction in CLIFF_FRACTIONS:  # with more KV: the same fractions of kv_factor x base
            rate = round(base * fraction * (1.0 if label == "1x" else kv_factor), 3)
            for name in policies:
                att, kv, ttft_miss, tpot_miss = [], [], [], []
                for seed in seeds:
                    sim = shaped.simulator(named_policy(name), rate, seed)
                    assert isinstance(sim, (ObservedCluster, ObservedPrefixCluster))
                    result = sim.run()
                    att.append(attainment(result, *slo))
                    kv.append(sim.kv_area / sim.sampled_s if sim.sampled_s > 0 else math.nan)
                    n = max(1, len(result.requests))
                    ttft_miss.append(sum(1 for r in result.requests if not r.done or r.prefill > slo[0]) / n)
                    tpot_miss.append(
                        sum(1 for r in result.requests if r.done and (r.decode_per_token or 0.0) > slo[1]) / n
                    )
                row = {
                    "attainment": statistics.fmean(att),
                    "kv_usage": statistics.fmean(kv),
                    "ttft_miss": statistics.fmean(ttft_miss),
                    "tpot_miss": statistics.fmean(tpot_miss),
                }
                out[f"{label}/{rate:g}/{name}"] = row
                print(
                    f"{label:>4} {rate:>6.3g} {name:<14} {row['attainment']:>7.3f} {row['kv_usage']:>8.3f} "
                    f"{row['ttft_miss']:>9.3f} {row['tpot_miss']:>9.3f}",
                    flush=True,
                )
    return out


def plot_goodput(directory: Path, results: dict[str, Any]) -> None:
    from scripts import plotting

    settings = list(results)
    names = list(next(iter(results.values()))["goodput"]) if results else []
    plotting.bar_plot(
        directory,
        "goodput",
        settings,
        {
            n: [
                results[s]["goodput"][n]["mean"]
                / max(1e-9, results[s]["goodput"].get("least_loaded", results[s]["goodput"][n])["mean"])
                for s in settings
            ]
            for n in names
        },
        ylabel="goodput / least_loaded's (mean of seeds)",
        title="Goodput at 99 % SLO attainment, relative to INFaaS++",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per generated point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer requests and decisions (smoke run)")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--goodput", action="store_true", help="run only the goodput section (and fixed-load tails)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per goodput point (>= 3 for a CI)")
    parser.add_argument("--settings", default=",".join(GRID), help="goodput settings, comma-separated")
    parser.add_argument("--policies", default=",".join(GOODPUT_POLICIES), help="goodput policies, comma-separated")
    parser.add_argument("--ablation", action="store_true", help="run only the ablation of drover's rules")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per goodput run")
    parser.add_argument("--ablation-rate", type=float, default=1.5, help="fixed load, x least_loaded's goodput")
    parser.add_argument("--ablation-goodput", action="store_true", help="also bisect every variant's goodput (slow)")
    parser.add_argument("--no-tails", action="store_true", help="goodput only, without the fixed-load tails")
    parser.add_argument(
        "--tail-rates",
        default="",
        help="--goodput: only the fixed-load tails, at these rates (comma-separated), no bisection",
    )
    parser.add_argument(
        "--variants", default="", help="--ablation: only these variants (comma-separated names; default all)"
    )
    parser.add_argument(
        "--cliff", type=float, default=None, help="capacity-cliff check around this rate (first of --settings)"
    )
    args = parser.parse_args()
    if args.cliff is not None:
        wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
        chosen = [dataclasses.replace(s, duration_s=args.duration) for s in goodput_settings() if s.name in wanted]
        if not chosen:
            parser.error(f"--settings: choose from {', '.join(s.name for s in goodput_settings())}")
        names = [p.strip() for p in args.policies.split(",") if p.strip()]
        cliff = section_cliff(chosen[0], names, args.cliff, list(range(args.seed, args.seed + args.seeds)))
        if args.json:
            args.json.write_text(json.dumps(cliff, indent=1, default=str))
        return
    if args.ablation:
        wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
        chosen = [s for s in goodput_settings() if s.name in wanted]
        if len(chosen) != len(wanted):
            parser.error(f"--settings: choose from {', '.join(s.name for s in goodput_settings())}")
        chosen = [dataclasses.replace(s, duration_s=100.0 if args.quick else args.duration) for s in chosen]
        ablation = section_ablation(
            chosen,
            list(range(args.seed, args.seed + args.seeds)),
            args.ablation_rate,
            with_goodput=args.ablation_goodput,
            only=[v.strip() for v in args.variants.split(",") if v.strip()],
        )
        if args.json:
            args.json.write_text(json.dumps(ablation, indent=1, default=str))
        return
    if args.goodput:
        wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
        chosen = [s for s in goodput_settings() if s.name in wanted]
        if len(chosen) != len(wanted):
            parser.error(f"--settings: choose from {', '.join(s.name for s in goodput_settings())}")
        names = [p.strip() for p in args.policies.split(",") if p.strip()]
        for name in names:
            try:
                policy_by_name(name)
            except ValueError as exc:
                parser.error(str(exc))
        chosen = [dataclasses.replace(s, duration_s=100.0 if args.quick else args.duration) for s in chosen]
        started = time.perf_counter()
        if args.tail_rates:
            fixed = [float(r) for r in args.tail_rates.split(",") if r.strip()]
            seeds = list(range(args.seed, args.seed + args.seeds))
            tails_out = {s.name: print_tails(s, fixed_load_tails(s, names, fixed, seeds)) for s in chosen}
            if args.json:
                args.json.write_text(json.dumps(tails_out, indent=1, default=str))
            print(f"\n(tails took {time.perf_counter() - started:.0f} s)")
            return
        results = section_goodput(
            chosen, names, list(range(args.seed, args.seed + args.seeds)), tails_wanted=not args.no_tails
        )
        if args.plot:
            plot_goodput(args.plot, results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\n(goodput took {time.perf_counter() - started:.0f} s)")
        return
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
