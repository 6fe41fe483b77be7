"""Live cluster, real engines: does Llumnix-style migration help tail latency under a bursty load?

Same bursty workload (fixed seed) against a fresh local cluster (embedded NATS, control plane and engine
host processes) per configuration:
  round_robin     - round-robin dispatch, no migration
  infaas++        - least-loaded dispatch, no migration
  llumnix         - freeness dispatch + the migration loop (Drover defaults)
KV pools are kept small so that bursts exhaust them (preemption or queueing), as in Llumnix's experiments.

    python -m scripts.bench_live_policy [--kind vllm|sim] [--requests 48] [--rate 6] [--cv 3] [--quick]
                                        [--plot DIR]

``--policies`` picks other configurations by name, among them ``drover`` (the recommended keys, as
``drover sim run --policy drover`` uses them), ``drover-nohold`` (the same with
``predict_hold_prefill_tokens=0``: the prefill-backlog hold off) and ``drover-noshare`` (the same with
``predict_hold_growth_share=0``: the hold test's growth reserve not bounded by the free room). ``--seeds N``
replays N workloads (seeds ``--seed`` ... ``--seed``+N-1), a fresh cluster per policy and seed, and prints
each point per seed and the mean ± stdev over seeds. ``--long-share F`` makes a fraction F of the prompts long
(uniform between ``--long-min`` and max_model_len/2 tokens): the bursts of long prompts the prefill-backlog
hold acts on.
Attainment: the share of requests whose TTFT is within ``--slo-ttft-ms`` and whose mean inter-token gap is
within ``--slo-tpot-ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from control.apps.launcher import local_cluster, percentile, wait_ready
from control.client import DroverClient
from control.policy.recommended import user_policy_params
from control.settings import load_settings
from transport.messages import SamplingParams

CONFIGS = {
    "round_robin": {"dispatch_policy": "round_robin", "migration_enabled": False},
    "infaas++": {"dispatch_policy": "least_loaded", "migration_enabled": False},
    "llumnix": {"dispatch_policy": "freeness", "migration_enabled": True},
}
DEFAULT_CONFIGS = ("round_robin", "infaas++", "llumnix")
DROVER_CONFIGS = ("drover", "drover-nohold", "drover-noshare")


def policy_overrides(name: str) -> dict[str, object]:
    """The ``[policy]`` settings of configuration ``name`` (:data:`CONFIGS`, ``drover``, ``drover-nohold``,
    ``drover-noshare``)."""
    if name in CONFIGS:
        return dict(CONFIGS[name])
    if name in DROVER_CONFIGS:
        params = user_policy_params("drover")
        if name == "drover-nohold":
            params = dataclasses.replace(params, predict_hold_prefill_tokens=0)
        elif name == "drover-noshare":
            params = dataclasses.replace(params, predict_hold_growth_share=0.0)
        return dataclasses.asdict(params)
    raise SystemExit(f"unknown policy {name!r}; choose from {', '.join((*CONFIGS, *DROVER_CONFIGS))}")


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def bursty_workload(
    n: int,
    rate: float,
    cv: float,
    seed: int,
    max_len: int,
    long_share: float = 0.0,
    long_min: int = 512,
    max_output: int = 0,
) -> list[Arrival]:
    """Gamma inter-arrivals (CV ``cv``) and long-tailed lengths (Pareto-like), capped to the context; with
    ``long_share`` > 0 that share of prompts is drawn uniform in [long_min, max_len/2] instead (a separate
    random stream, so ``long_share`` 0 gives the workload of earlier rounds). ``max_output`` > 0 caps outputs."""
    rng = random.Random(seed)
    longs = random.Random(seed + 7919)
    shape = 1 / (cv * cv)
    t = 0.0
    arrivals = []
    for _ in range(n):
        t += rng.gammavariate(shape, 1 / (rate * shape))
        prompt = min(max_len // 2, int(32 * rng.paretovariate(1.2)))
        if long_share > 0 and longs.random() < long_share:
            prompt = longs.randint(min(long_min, max_len // 2), max_len // 2)
        output = min(max_len - prompt - 1, int(48 * rng.paretovariate(1.1)))
        if max_output > 0:
            output = min(output, max_output)
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


async def drive(url: str, arrivals: list[Arrival]) -> tuple[Outcome, list[list[float]]]:
    """The workload's outcome, and each request's inter-token gaps (ms) in arrival order."""
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
    outcome = Outcome(
        ttft_ms=[r[0] for r in results],
        e2e_s=[r[1] for r in results],
        itl_ms=[g for r in results for g in r[2]],
        migrations=status.migrations_completed,
        wall_s=wall,
        tokens=sum(r[3] for r in results),
    )
    return outcome, [r[2] for r in results]


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


def attainment(o: Outcome, gaps: list[list[float]], slo_ttft_ms: float, slo_tpot_ms: float) -> float:
    """Share of requests within both SLOs (TTFT, and mean inter-token gap; a one-token request has none)."""
    ok = sum(
        1
        for ttft, g in zip(o.ttft_ms, gaps, strict=True)
        if ttft <= slo_ttft_ms and (not g or statistics.fmean(g) <= slo_tpot_ms)
    )
    return ok / len(o.ttft_ms) if o.ttft_ms else float("nan")


def spread(values: list[float]) -> str:
    """mean ± stdev (sample) over seeds, and the values."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {sd:.2g} ({'/'.join(f'{v:.3g}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="vllm", choices=["vllm", "sim"])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second")
    parser.add_argument("--cv", type=float, default=3.0, help="burstiness: CV of inter-arrival times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="workloads replayed: seeds --seed .. --seed+N-1")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=0.02, help="per instance; small to force pressure")
    parser.add_argument("--sim-blocks", type=int, default=96, help="KV blocks of a sim engine")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--policies", default=",".join(DEFAULT_CONFIGS), help="comma-separated configurations")
    parser.add_argument("--long-share", type=float, default=0.0, help="share of long prompts (0: none)")
    parser.add_argument("--long-min", type=int, default=512, help="shortest long prompt (tokens)")
    parser.add_argument("--max-output", type=int, default=0, help="cap on output tokens (0: the context's room)")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="attainment: TTFT SLO")
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0, help="attainment: mean inter-token gap SLO")
    parser.add_argument("--json", type=Path, default=None, help="write every request's TTFT and gaps here")
    parser.add_argument("--quick", action="store_true", help="smoke run: sim engines, 16 requests")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.kind, args.requests = "sim", 16
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    overrides = {name: policy_overrides(name) for name in names}  # unknown names fail before any cluster starts
    console = Console()
    max_len = args.max_model_len
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    # per policy, per seed: (outcome, per-request gaps)
    runs: dict[str, list[tuple[Outcome, list[list[float]]]]] = {name: [] for name in names}
    for seed in seeds:
        arrivals = bursty_workload(
            args.requests, args.rate, args.cv, seed, max_len, args.long_share, args.long_min, args.max_output
        )
        console.print(
            f"{args.kind}: {args.instances} instances, seed {seed}, {len(arrivals)} requests over "
            f"{arrivals[-1].at_s:.1f} s (rate {args.rate}/s, CV {args.cv}), "
            f"prompt mean {statistics.fmean(a.prompt_tokens for a in arrivals):.0f} "
            f"(max {max(a.prompt_tokens for a in arrivals)}), "
            f"output mean {statistics.fmean(a.output_tokens for a in arrivals):.0f} tokens, "
            f"KV {args.kv_cache_gib} GiB per instance"
        )
        for name in names:
            settings = load_settings(
                overrides={
                    "engine": {"kind": args.kind, "kv_cache_gib": args.kv_cache_gib, "sim_num_blocks": args.sim_blocks},
                    "model": {"max_model_len": max_len},
                    "policy": overrides[name],
                    "observability": {"exporter": "none"},
                }
            )
            with (
                console.status(f"{name}: starting a fresh cluster and replaying the workload"),
                local_cluster(settings, args.instances) as cluster,
            ):
                asyncio.run(wait_ready(cluster, args.instances, timeout_s=600))
                runs[name].append(asyncio.run(drive(cluster.url, arrivals)))
    outcomes = {name: r[0][0] for name, r in runs.items()}
    if args.json:  # attainment at other SLOs can be recomputed from these without a new run
        args.json.write_text(
            json.dumps(
                {
                    name: [
                        {"seed": seed, "ttft_ms": o.ttft_ms, "gaps_ms": g}
                        for seed, (o, g) in zip(seeds, r, strict=True)
                    ]
                    for name, r in runs.items()
                }
            )
        )
    table = Table(title="live cluster: dispatch and migration policies on the same bursty workload")
    for column in (
        "policy",
        "seed",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "e2e mean s",
        "e2e p99 s",
        "ITL p99 ms",
        "attainment",
        "tokens/s",
        "migrations",
    ):
        table.add_column(column, justify="right")
    for name, r in runs.items():
        for seed, (o, gaps) in zip(seeds, r, strict=True):
            table.add_row(
                name,
                str(seed),
                f"{percentile(o.ttft_ms, 50):.1f}",
                f"{percentile(o.ttft_ms, 99):.1f}",
                f"{statistics.fmean(o.e2e_s):.2f}",
                f"{percentile(o.e2e_s, 99):.2f}",
                f"{percentile(o.itl_ms, 99):.1f}",
                f"{attainment(o, gaps, args.slo_ttft_ms, args.slo_tpot_ms):.3f}",
                f"{o.tokens / o.wall_s:.0f}",
                str(o.migrations),
            )
    console.print(table)
    if len(seeds) > 1:
        for name, r in runs.items():
            console.print(
                f"{name}: TTFT p99 ms {spread([percentile(o.ttft_ms, 99) for o, _ in r])}; "
                f"ITL p99 ms {spread([percentile(o.itl_ms, 99) for o, _ in r])}; "
                f"attainment {spread([attainment(o, g, args.slo_ttft_ms, args.slo_tpot_ms) for o, g in r])}"
            )
    if "llumnix" in outcomes:
        ll = outcomes["llumnix"]
        parts = []
        for base in ("round_robin", "infaas++"):
            if base not in outcomes:
                continue
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
