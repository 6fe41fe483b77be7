"""KV-cache-aware routing benchmark: prefix hit rate, TTFT and goodput per dispatch policy (simulator), and
the cost of one ``kv_aware`` decision at 1,000 instances.

    python -m scripts.bench_kv_routing [--sizes 4,16,64] [--seeds 0,1,2] [--goodput-sizes 4,16,64] [--limit N]
        [--dispatch-sizes 16,1000,10000] [--plot DIR] [--json FILE]

Workload: the Mooncake synthetic trace (``traces/mooncake_synthetic.csv`` in the repository: long prompts, real
prefix-block hashes, 512 tokens an id), mapped onto the engines' 16-token blocks. Every engine runs vLLM's
automatic prefix caching (``engines/sim/prefix_cache.py``), whatever the policy, so the policies differ only
in where they send requests:

  round_robin      cycle, no migration;
  least_loaded     INFaaS++ (lowest KV-memory load), no migration;
  prefix_affinity  Drover's history-based affinity (learns holders from its own dispatches), no migration;
  kv_aware         expected cache hits against virtual usage, from a prefix index fed by the engines'
                   cache events every heartbeat (control/policy/kv_aware.py), no migration;
  llumnix          freeness dispatch + migration;
  drover           kv_aware dispatch + migration whose destinations prefer the request's prefix holders.

Instance ("preset"): LLaMA-7B fp16 on an 80 GB card (the simulator's A100 cost model), 8,192 blocks of 16
tokens (131k tokens of KV, what 80 GB leaves after weights), max_model_len 131,072 (prompts longer than that
are rejected and counted, never truncated), 256 seats, chunked prefill of 2,048 tokens a step.

Load: the trace's arrivals are replayed ``rate / 3.91`` times faster (3.91 req/s is its own rate). The
fixed-load point gives every instance the same ``--per-instance-rate`` (default 0.3 req/s). Goodput is the
highest rate at which >= 99 % of *submitted* requests meet both SLOs (rejected and unfinished ones count as
misses), found by doubling/halving and then bisection to ``--resolution``. SLOs (one rule, never tuned per
policy): TTFT within 5x the request's own prefill time run alone on the preset without any cache hit (the
prompts span 100 to 130k tokens, so a single TTFT bound would be missed by the longest prompts even on an
idle cluster), and TPOT within 5x that of the trace's median request run alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.policy.dispatch import make_dispatch_policy
from control.policy.kv_aware import KvAwareIndex
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.simulator.cluster import ClusterConfig, ClusterSimulator
from control.simulator.prefix import PrefixClusterSimulator, PrefixSummary, PrefixTrace, load_prefix_trace
from control.simulator.traces import MOONCAKE_SYNTHETIC
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig

MOONCAKE_TRACE = MOONCAKE_SYNTHETIC
TRACE_RATE = 3.91  # req/s of the trace as recorded (its README)
ENGINE = SimEngineConfig(
    block_size=16, num_blocks=8192, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=131072
)
POLICIES: dict[str, tuple[str, bool, bool]] = {  # name -> (dispatch policy, migration, prefix-aware migration)
    "round_robin": ("round_robin", False, False),
    "least_loaded": ("least_loaded", False, False),
    "prefix_affinity": ("prefix_affinity", False, False),
    "kv_aware": ("kv_aware", False, False),
    "llumnix": ("freeness", True, False),
    "drover": ("kv_aware", True, True),
}
ATTAINMENT = 0.99


@dataclasses.dataclass(frozen=True, slots=True)
class Slo:
    ttft_factor: float  # TTFT <= this x the request's own prefill alone
    tpot_s: float

    def ttft_s(self, prompt_len: int) -> float:
        return self.ttft_factor * prefill_alone_s(prompt_len)


def prefill_alone_s(prompt_len: int) -> float:
    """Seconds to prefill ``prompt_len`` tokens alone on the preset (chunked, no cache hit)."""
    cost = ClusterConfig().cost_model
    budget = ENGINE.max_num_batched_tokens
    total_ms = 0.0
    left = prompt_len
    while left > 0:
        chunk = min(budget, left)
        total_ms += cost.step_ms(chunk, 0, 0)
        left -= chunk
    return total_ms / 1000.0


@dataclasses.dataclass(slots=True)
class Point:
    """One run: a policy at one size and rate."""

    policy: str
    instances: int
    rate: float
    attainment: float
    ttft_p50: float
    ttft_p99: float
    tpot_p99: float
    hit_rate: float
    tokens_saved: int
    rejected: int
    unfinished: int
    migrations: int
    wall_s: float


def scaled(trace: PrefixTrace, rate: float) -> PrefixTrace:
    """The trace replayed at ``rate`` req/s (arrival times divided by rate / the trace's own rate)."""
    factor = rate / TRACE_RATE
    requests = [dataclasses.replace(r, arrival=r.arrival / factor) for r in trace.requests]
    return PrefixTrace(requests, trace.hash_ids, trace.trace_block_tokens)


def reseeded(trace: PrefixTrace, seed: int) -> PrefixTrace:
    """Seed 0: the trace as recorded. Another seed: each gap between consecutive arrivals is multiplied by
    an exponential draw of mean 1 (same order, same prompts and prefixes, same mean rate, Poisson-like
    burstiness), so the spread over seeds shows how much a result owes to one arrival pattern."""
    if seed == 0:
        return trace
    rng = random.Random(seed)
    requests = []
    previous = clock = 0.0
    for r in trace.requests:
        clock += max(0.0, r.arrival - previous) * rng.expovariate(1.0)
        previous = r.arrival
        requests.append(dataclasses.replace(r, arrival=clock))
    return PrefixTrace(requests, trace.hash_ids, trace.trace_block_tokens)


def config_for(policy: str, instances: int) -> tuple[ClusterConfig, bool]:
    dispatch, migration, prefix_migration = POLICIES[policy]
    params = PolicyParams(dispatch_policy=dispatch, migration_enabled=migration)
    return ClusterConfig(num_instances=instances, engine=ENGINE, policy=params), prefix_migration


def slo_for(trace: PrefixTrace) -> Slo:
    """TTFT: 5x the request's own prefill alone; TPOT: 5x that of the trace's median request run alone."""
    prompt = int(statistics.median(r.prompt_len for r in trace.requests))
    output = max(2, int(statistics.median(r.output_len for r in trace.requests)))
    alone = ClusterSimulator(
        ClusterConfig(num_instances=1, engine=ENGINE, policy=PolicyParams(migration_enabled=False)),
        [RequestSpec("median", 0.0, prompt, output)],
    ).run()
    record = alone.requests[0]
    tpot = record.decode_per_token or 0.0
    return Slo(ttft_factor=5.0, tpot_s=5 * tpot)


def run_point(policy: str, instances: int, rate: float, trace: PrefixTrace, slo: Slo) -> Point:
    config, prefix_migration = config_for(policy, instances)
    sim = PrefixClusterSimulator(config, scaled(trace, rate), prefix_aware_migration=prefix_migration)
    started = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - started
    summary: PrefixSummary = sim.prefix_summary()
    met = 0
    tpots: list[float] = []
    for record in result.requests:
        if not record.done:
            continue
        tpot = record.decode_per_token
        if tpot is not None:
            tpots.append(tpot)
        if record.prefill <= slo.ttft_s(record.spec.prompt_len) and (tpot is None or tpot <= slo.tpot_s):
            met += 1
    tpots.sort()
    return Point(
        policy=policy,
        instances=instances,
        rate=rate,
        attainment=met / max(1, len(result.requests)),
        ttft_p50=result.prefill.p50,
        ttft_p99=result.prefill.p99,
        tpot_p99=tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))] if tpots else float("nan"),
        hit_rate=summary.hit_rate,
        tokens_saved=summary.prefill_tokens_saved,
        rejected=result.rejected,
        unfinished=result.unfinished,
        migrations=result.migrations_committed,
        wall_s=wall,
    )


def goodput(
    policy: str, instances: int, trace: PrefixTrace, slo: Slo, start_rate: float, resolution: float
) -> tuple[float, float, int]:
    """(goodput req/s, lowest rate tried, runs): doubling/halving to a bracket, then bisection."""
    runs = 0

    def ok(rate: float) -> bool:
        nonlocal runs
        runs += 1
        return run_point(policy, instances, rate, trace, slo).attainment >= ATTAINMENT

    lo, hi = 0.0, 0.0
    rate = start_rate
    lowest = rate
    if ok(rate):
        lo = rate
        for _ in range(4):
            rate *= 2
            if not ok(rate):
                hi = rate
                break
            lo = rate
        else:
            return lo, lowest, runs  # never failed: report the highest rate tried
    else:
        hi = rate
        for _ in range(4):
            rate /= 2
            lowest = rate
            if ok(rate):
                lo = rate
                break
            hi = rate
        else:
            return 0.0, lowest, runs
    while hi / lo > 1 + resolution:
        mid = (lo * hi) ** 0.5
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, lowest, runs


# ---------------------------------------------------------------------------------------------------------
# Dispatch cost with the index at 1,000 instances


def dispatch_cost(num_instances: int, decisions: int, seed: int = 0) -> dict[str, float]:
    """p50/p99 of one ``kv_aware`` decision (``choose`` alone, and choose + on_dispatched + the heartbeat
    upsert that follows). Every instance holds 100-1,000 blocks of one of 64 shared 1,000-block prefixes plus
    ``extra`` blocks of its own (1,000; 100 at more than 2,000 instances, to keep the index near 6 M entries);
    prompts are 200-1,000 blocks of one prefix plus 20 new blocks."""
    rng = random.Random(seed)
    extra = 1000 if num_instances <= 2000 else 100
    index = make_dispatch_policy("kv_aware")
    assert isinstance(index, KvAwareIndex)
    prefixes = [[rng.getrandbits(62) for _ in range(1000)] for _ in range(64)]
    snapshots = []
    for i in range(num_instances):
        iid = f"inst-{i:05d}"
        snapshot = InstanceSnapshot(
            instance_id=iid,
            num_total_blocks=8192,
            num_free_blocks=rng.randint(0, 8192),
            num_running=rng.randint(0, 64),
            num_waiting=rng.randint(0, 4),
            waiting_blocks=rng.randint(0, 500),
            block_size=16,
        )
        snapshots.append(snapshot)
        index.upsert(snapshot)
        held = prefixes[i % len(prefixes)][: rng.randint(100, 1000)]
        index.prefix_index.apply(iid, epoch="e", seq=0, stored=held + [rng.getrandbits(62) for _ in range(extra)])
    times: list[float] = []
    choose_times: list[float] = []
    cpu_times: list[int] = []  # thread CPU time: excludes time descheduled on a shared machine
    choose_cpu: list[int] = []
    gc.disable()
    try:
        for n in range(decisions):
            prefix = prefixes[rng.randrange(len(prefixes))]
            hashes = tuple(prefix[: rng.randint(200, 1000)]) + tuple(rng.getrandbits(62) for _ in range(20))
            demand = RequestDemand(f"r{n}", len(hashes) * 16, len(hashes), prefix_block_hashes=hashes)
            refreshed = snapshots[rng.randrange(num_instances)]
            cpu_started = time.thread_time_ns()
            started = time.perf_counter()
            chosen = index.choose(demand)
            chose_at = time.perf_counter()
            chose_cpu = time.thread_time_ns()
            assert chosen is not None
            index.on_dispatched(chosen, demand)
            index.upsert(refreshed)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.thread_time_ns() - cpu_started)
            choose_times.append(chose_at - started)
            choose_cpu.append(chose_cpu - cpu_started)
    finally:
        gc.enable()
    times.sort()
    choose_times.sort()
    cpu_times.sort()
    choose_cpu.sort()
    return {
        "choose_cpu_p50_us": choose_cpu[len(times) // 2] / 1e3,
        "choose_cpu_p99_us": choose_cpu[int(0.99 * len(times))] / 1e3,
        "cpu_p50_us": cpu_times[len(times) // 2] / 1e3,
        "cpu_p99_us": cpu_times[int(0.99 * len(times))] / 1e3,
        "instances": num_instances,
        "choose_p50_us": choose_times[len(times) // 2] * 1e6,
        "choose_p99_us": choose_times[int(0.99 * len(times))] * 1e6,
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(0.99 * len(times))] * 1e6,
        "index_entries": index.prefix_index.total_entries(),
    }


# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=MOONCAKE_TRACE)
    parser.add_argument("--sizes", default="4,16,64", help="instance counts (comma-separated)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, from: " + ", ".join(POLICIES))
    parser.add_argument("--limit", type=int, default=None, help="first N requests of the trace (default: all)")
    parser.add_argument("--per-instance-rate", type=float, default=0.3, help="fixed-load point, req/s per instance")
    parser.add_argument("--resolution", type=float, default=0.15, help="goodput bisection stops at hi/lo <= 1+this")
    parser.add_argument("--no-goodput", action="store_true", help="only the fixed-load point")
    parser.add_argument("--goodput-sizes", default="16", help="sizes whose goodput is searched (each ~5 runs)")
    parser.add_argument("--decisions", type=int, default=20000, help="dispatch decisions timed per instance count")
    parser.add_argument("--dispatch-sizes", default="16,1000,10000", help="instance counts of the dispatch-cost run")
    parser.add_argument("--seeds", default="0", help="arrival seeds (0: the trace as recorded; see reseeded())")
    parser.add_argument("--plot", type=Path, help="write PNG plots into this directory")
    parser.add_argument("--json", type=Path, help="write every number as JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    goodput_sizes = {int(s) for s in args.goodput_sizes.split(",") if s}
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if not args.trace.exists():
        parser.error(f"trace not found: {args.trace}")

    trace = load_prefix_trace(args.trace, limit=args.limit)
    slo = slo_for(trace)
    print(
        f"trace: {len(trace.requests)} requests of {args.trace.name}; SLO: TTFT <= {slo.ttft_factor:g}x its own "
        f"prefill alone, TPOT <= {slo.tpot_s * 1000:.1f} ms (5x the median request alone)"
    )
    report: dict[str, Any] = {"slo": dataclasses.asdict(slo), "requests": len(trace.requests), "grid": []}
    header = (
        f"{'inst':>4} {'policy':<16} {'rate':>6} {'hit':>6} {'saved Mtok':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p99':>9} {'SLO ok':>7} {'goodput':>8} {'wall':>6}"
    )
    print(header)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for instances in sizes:
        rate = args.per_instance_rate * instances
        for policy in policies:
            for seed in seeds:
                seeded = reseeded(trace, seed)
                point = run_point(policy, instances, rate, seeded, slo)
                entry: dict[str, Any] = dataclasses.asdict(point)
                entry["seed"] = seed
                good_text = "-"
                if not args.no_goodput and instances in goodput_sizes:
                    good, lowest, runs = goodput(policy, instances, seeded, slo, rate, args.resolution)
                    entry.update(goodput=good, goodput_lowest_tried=lowest, goodput_runs=runs)
                    good_text = f"{good:.2f}" if good > 0 else f"0(<{lowest:.2f})"
                report["grid"].append(entry)
                print(
                    f"{instances:>4} {policy:<16} {rate:>6.2f} {point.hit_rate:>6.3f} "
                    f"{point.tokens_saved / 1e6:>10.2f} {point.ttft_p50:>9.2f} {point.ttft_p99:>9.2f} "
                    f"{point.tpot_p99 * 1000:>8.1f}m {point.attainment:>7.3f} {good_text:>8} {point.wall_s:>5.1f}s"
                    f"  seed {seed}",
                    flush=True,
                )
    report["spread"] = spread = _spread(report["grid"])
    if len(seeds) > 1:
        print(f"over seeds {args.seeds}: mean ± 95 % CI [min, max]")
        for row in spread:
            print(
                f"{row['instances']:>4} {row['policy']:<16} "
                + "  ".join(
                    f"{k} {row[k]['mean']:.3g} ± {row[k]['ci95']:.2g} [{row[k]['min']:.3g}, {row[k]['max']:.3g}]"
                    for k in _SPREAD_KEYS
                    if k in row
                ),
                flush=True,
            )
    report["dispatch_cost"] = costs = []
    for num in [int(n) for n in args.dispatch_sizes.split(",") if n]:
        cost = dispatch_cost(num, args.decisions)
        costs.append(cost)
        print(
            f"kv_aware dispatch at {cost['instances']} instances ({cost['index_entries']:.0f} index entries): "
            f"choose p50 {cost['choose_p50_us']:.1f} us, p99 {cost['choose_p99_us']:.1f} us; choose + "
            f"on_dispatched + upsert p50 {cost['p50_us']:.1f} us, p99 {cost['p99_us']:.1f} us; thread CPU time of "
            f"choose p50 {cost['choose_cpu_p50_us']:.1f} us, p99 {cost['choose_cpu_p99_us']:.1f} us, of choose + "
            f"bookkeeping p50 {cost['cpu_p50_us']:.1f} us, p99 {cost['cpu_p99_us']:.1f} us",
            flush=True,
        )
    means = [
        {"instances": r["instances"], "policy": r["policy"], **{k: r[k]["mean"] for k in _SPREAD_KEYS if k in r}}
        for r in spread
    ]
    best = _summary(means, sizes)
    print(best)
    report["summary"] = best
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        _plots(args.plot, means, sizes, policies, goodput=not args.no_goodput)


_SPREAD_KEYS = ("hit_rate", "tokens_saved", "ttft_p50", "ttft_p99", "attainment", "goodput")
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)  # Student t, 97.5 %, df 1..9


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t; 0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    return t * statistics.stdev(values) / n**0.5


def _spread(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (instances, policy): mean, min and max over seeds of each headline number."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in grid:
        groups.setdefault((row["instances"], row["policy"]), []).append(row)
    out = []
    for (instances, policy), rows in groups.items():
        item: dict[str, Any] = {"instances": instances, "policy": policy, "seeds": [r.get("seed", 0) for r in rows]}
        for key in _SPREAD_KEYS:
            values = [float(r[key]) for r in rows if key in r]
            if values:
                item[key] = {
                    "mean": statistics.fmean(values),
                    "ci95": ci95(values),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(item)
    return out


def _summary(grid: list[dict[str, Any]], sizes: list[int]) -> str:
    parts = []
    for instances in sizes:
        rows = {r["policy"]: r for r in grid if r["instances"] == instances}
        if "kv_aware" in rows and "round_robin" in rows:
            kv, rr = rows["kv_aware"], rows["round_robin"]
            parts.append(
                f"{instances} inst: kv_aware hit {kv['hit_rate']:.2f} vs rr {rr['hit_rate']:.2f}, "
                f"TTFT p99 {kv['ttft_p99']:.2f} vs {rr['ttft_p99']:.2f} s"
            )
    return "summary: " + "; ".join(parts) if parts else "summary: (no kv_aware/round_robin pair)"


def _plots(
    directory: Path, grid: list[dict[str, Any]], sizes: list[int], policies: list[str], *, goodput: bool
) -> None:
    from scripts.plotting import bar_plot  # matplotlib only when plotting

    def series(key: str, with_sizes: list[int]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for policy in policies:
            by_size = {r["instances"]: r for r in grid if r["policy"] == policy}
            out[policy] = [float(by_size[n].get(key, 0.0)) if n in by_size else 0.0 for n in with_sizes]
        return out

    groups = [f"{n} inst" for n in sizes]
    bar_plot(
        directory,
        "kv_routing_hit_rate",
        groups,
        series("hit_rate", sizes),
        ylabel="prefix hit rate",
        title="Prefix hit rate",
    )
    bar_plot(
        directory,
        "kv_routing_ttft_p50",
        groups,
        series("ttft_p50", sizes),
        ylabel="TTFT p50 (s)",
        title="TTFT p50",
        log_y=True,
    )
    bar_plot(
        directory,
        "kv_routing_ttft_p99",
        groups,
        series("ttft_p99", sizes),
        ylabel="TTFT p99 (s)",
        title="TTFT p99",
        log_y=True,
    )
    searched = sorted({r["instances"] for r in grid if "goodput" in r})
    if goodput and searched:
        bar_plot(
            directory,
            "kv_routing_goodput",
            [f"{n} inst" for n in searched],
            series("goodput", searched),
            ylabel="req/s",
            title="Goodput (99% of requests within both SLOs)",
        )


if __name__ == "__main__":
    main()
