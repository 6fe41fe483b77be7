"""Live cluster, real engines: does Llumnix-style migration help tail latency under a bursty load?

Same bursty workload (fixed seed) against a fresh local cluster (embedded NATS, control plane and engine
host processes) per configuration:
  round_robin     - round-robin dispatch, no migration
  infaas++        - least-loaded dispatch, no migration
  llumnix         - freeness dispatch + the migration loop (Drover defaults)
KV pools are kept small so that bursts exhaust them (preemption or queueing), as in Llumnix's experiments.

    python -m scripts.bench_live_policy [--kind vllm|sim] [--requests 48] [--rate 6] [--cv 3] [--quick]
                                        [--plot DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from control.apps.launcher import local_cluster, percentile, wait_ready
from control.client import DroverClient
from control.settings import load_settings
from transport.messages import SamplingParams

CONFIGS = {
    "round_robin": {"dispatch_policy": "round_robin", "migration_enabled": False},
    "infaas++": {"dispatch_policy": "least_loaded", "migration_enabled": False},
    "llumnix": {"dispatch_policy": "freeness", "migration_enabled": True},
}


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def bursty_workload(n: int, rate: float, cv: float, seed: int, max_len: int) -> list[Arrival]:
    """Gamma inter-arrivals (CV ``cv``) and long-tailed lengths (Pareto-like), capped to the context."""
    rng = random.Random(seed)
    shape = 1 / (cv * cv)
    t = 0.0
    arrivals = []
    for _ in range(n):
        t += rng.gammavariate(shape, 1 / (rate * shape))
        prompt = min(max_len // 2, int(32 * rng.paretovariate(1.2)))
        output = min(max_len - prompt - 1, int(48 * rng.paretovariate(1.1)))
        arrivals.append(Arrival(t, max(8, prompt), max(8, output)))
    return arrivals


@dataclass
class Outcome:
    ttft_ms: list[float]
    e2e_s: list[float]
    itl_ms: list[float]
    migrations: int
    wall_s: float
    tokens: int


async def drive(url: str, arrivals: list[Arrival]) -> Outcome:
    async with DroverClient(url, name="bench-live-policy") as client:
        started = time.perf_counter()

        async def one(i: int, arrival: Arrival) -> tuple[float, float, list[float], int]:
            await asyncio.sleep(max(0.0, arrival.at_s - (time.perf_counter() - started)))
            prompt = [3 + (i * 31 + k) % 250 for k in range(arrival.prompt_tokens)]
            result = await client.generate(
                prompt_token_ids=prompt,
                sampling=SamplingParams(max_tokens=arrival.output_tokens, ignore_eos=True),
            )
            e2e = result.token_times[-1] - result.submitted_at if result.token_times else float("nan")
            return result.ttft_s * 1e3, e2e, [g * 1e3 for g in result.inter_token_s], len(result.token_ids)

        results = await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
        wall = time.perf_counter() - started
        status = await client.status()
    return Outcome(
        ttft_ms=[r[0] for r in results],
        e2e_s=[r[1] for r in results],
        itl_ms=[g for r in results for g in r[2]],
        migrations=status.migrations_completed,
        wall_s=wall,
        tokens=sum(r[3] for r in results),
    )


def plot(directory: Path, kind: str, outcomes: dict[str, Outcome]) -> None:
    """TTFT, end-to-end and inter-token latency CDFs, one line per policy."""
    from scripts.plotting import cdf_plot

    for stem, what, pick in (
        ("ttft", "TTFT (ms)", lambda o: o.ttft_ms),
        ("e2e", "end-to-end latency (s)", lambda o: o.e2e_s),
        ("itl", "inter-token latency (ms)", lambda o: o.itl_ms),
    ):
        cdf_plot(
            directory,
            f"live_policy_{stem}_cdf",
            {name: pick(o) for name, o in outcomes.items()},
            xlabel=what,
            title=f"Live cluster ({kind} engines), same bursty workload per policy",
            log_x=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="vllm", choices=["vllm", "sim"])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second")
    parser.add_argument("--cv", type=float, default=3.0, help="burstiness: CV of inter-arrival times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=0.02, help="per instance; small to force pressure")
    parser.add_argument("--quick", action="store_true", help="smoke run: sim engines, 16 requests")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.kind, args.requests = "sim", 16
    console = Console()
    max_len = 2048
    arrivals = bursty_workload(args.requests, args.rate, args.cv, args.seed, max_len)
    console.print(
        f"{args.kind}: {args.instances} instances, {len(arrivals)} requests over "
        f"{arrivals[-1].at_s:.1f} s (rate {args.rate}/s, CV {args.cv}), "
        f"prompt mean {statistics.fmean(a.prompt_tokens for a in arrivals):.0f}, "
        f"output mean {statistics.fmean(a.output_tokens for a in arrivals):.0f} tokens, "
        f"KV {args.kv_cache_gib} GiB per instance"
    )
    outcomes: dict[str, Outcome] = {}
    for name, policy in CONFIGS.items():
        settings = load_settings(
            overrides={
                "engine": {"kind": args.kind, "kv_cache_gib": args.kv_cache_gib, "sim_num_blocks": 96},
                "model": {"max_model_len": max_len},
                "policy": policy,
                "observability": {"exporter": "none"},
            }
        )
        with (
            console.status(f"{name}: starting a fresh cluster and replaying the workload"),
            local_cluster(settings, args.instances) as cluster,
        ):
            asyncio.run(wait_ready(cluster, args.instances, timeout_s=600))
            outcomes[name] = asyncio.run(drive(cluster.url, arrivals))
    table = Table(title="live cluster: dispatch and migration policies on the same bursty workload")
    for column in (
        "policy",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "e2e mean s",
        "e2e p99 s",
        "ITL p99 ms",
        "tokens/s",
        "migrations",
    ):
        table.add_column(column, justify="right")
    for name, o in outcomes.items():
        table.add_row(
            name,
            f"{percentile(o.ttft_ms, 50):.1f}",
            f"{percentile(o.ttft_ms, 99):.1f}",
            f"{statistics.fmean(o.e2e_s):.2f}",
            f"{percentile(o.e2e_s, 99):.2f}",
            f"{percentile(o.itl_ms, 99):.1f}",
            f"{o.tokens / o.wall_s:.0f}",
            str(o.migrations),
        )
    console.print(table)
    ll = outcomes["llumnix"]
    parts = []
    for base in ("round_robin", "infaas++"):
        b = outcomes[base]
        parts.append(
            f"TTFT p99 {percentile(b.ttft_ms, 99) / percentile(ll.ttft_ms, 99):.2f}x vs {base}, "
            f"e2e p99 {percentile(b.e2e_s, 99) / percentile(ll.e2e_s, 99):.2f}x vs {base}"
        )
    console.print(f"summary: llumnix ({ll.migrations} migrations) " + "; ".join(parts))
    if args.plot:
        plot(args.plot, args.kind, outcomes)


if __name__ == "__main__":
    main()
