"""Per-token and per-request overhead of Drover's NATS/actor path against calling the same engine directly.

One run, same engine settings, same prompts, one engine alive at a time:
  direct  - the engine (VllmEngine over AsyncLLM) called in this process;
  drover  - embedded nats-server, control-plane process, engine-host process, client in this process.
Prints p50/p99 TTFT and inter-token latency both ways, their differences and ratios, and the exact
engine->client transit time of each chunk (the engine stamps ``produced_at``).

    python -m scripts.bench_overhead [--kind vllm|sim] [--requests 24] [--max-tokens 64] [--quick] [--plot DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from actors.engine_host import build_engine
from control.apps.launcher import DEMO_PROMPTS, local_cluster, percentile, wait_ready
from control.client import DroverClient
from control.settings import Settings, load_settings
from engines.base import EngineRequest
from transport.messages import SamplingParams


@dataclass
class Samples:
    ttft_ms: list[float]
    itl_ms: list[float]
    transit_ms: list[float]


async def run_direct(settings: Settings, prompts: list[list[int]], max_tokens: int, warmup: int) -> Samples:
    engine, _ = build_engine(settings, "direct-0")
    await engine.start()
    ttft: list[float] = []
    itl: list[float] = []
    try:
        for n, prompt in enumerate(prompts):
            request = EngineRequest(
                request_id=f"direct-{n}",
                prompt_token_ids=prompt,
                sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            )
            started = time.perf_counter()
            times: list[float] = []
            async for output in engine.generate(request):
                now = time.perf_counter()
                times.extend([now] * len(output.new_token_ids))
            if n < warmup:
                continue
            ttft.append((times[0] - started) * 1e3)
            itl.extend((b - a) * 1e3 for a, b in itertools.pairwise(times))
    finally:
        await engine.shutdown()
    return Samples(ttft, itl, [])


async def run_drover(url: str, prompts: list[list[int]], max_tokens: int, warmup: int) -> Samples:
    ttft: list[float] = []
    itl: list[float] = []
    transit: list[float] = []
    async with DroverClient(url, name="bench-overhead") as client:
        for n, prompt in enumerate(prompts):
            result = await client.generate(
                prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            )
            if n < warmup:
                continue
            ttft.append(result.ttft_s * 1e3)
            itl.extend(gap * 1e3 for gap in result.inter_token_s)
            transit.extend(t * 1e3 for t in result.transit_s)
    return Samples(ttft, itl, transit)


def plot(directory: Path, kind: str, direct: Samples, drover: Samples) -> None:
    """CDFs of TTFT and inter-token latency (direct vs Drover) and of the engine->client transit."""
    from scripts.plotting import cdf_plot

    title = f"Drover NATS/actor path vs direct engine calls ({kind})"
    cdf_plot(
        directory,
        "overhead_ttft_cdf",
        {"direct": direct.ttft_ms, "drover": drover.ttft_ms},
        xlabel="TTFT (ms)",
        title=title,
        log_x=True,
    )
    cdf_plot(
        directory,
        "overhead_itl_cdf",
        {"direct": direct.itl_ms, "drover": drover.itl_ms},
        xlabel="inter-token latency (ms)",
        title=title,
        log_x=True,
    )
    cdf_plot(
        directory,
        "overhead_transit_cdf",
        {"engine -> client": drover.transit_ms},
        xlabel="transit per chunk (ms)",
        title=f"Overhead: engine -> client transit ({kind})",
        log_x=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="vllm", choices=["vllm", "sim"])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: sim engine, 8 requests of 16 tokens")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.kind, args.requests, args.max_tokens, args.warmup = "sim", 8, 16, 1

    settings = load_settings(overrides={"engine": {"kind": args.kind}, "observability": {"exporter": "none"}})
    from engines.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(DEMO_PROMPTS[i % len(DEMO_PROMPTS)]) for i in range(args.requests + args.warmup)]
    console = Console()
    console.print(f"engine={args.kind} requests={args.requests} (+{args.warmup} warm-up) max_tokens={args.max_tokens}")

    with console.status("direct: starting the engine in this process and generating..."):
        direct = asyncio.run(run_direct(settings, prompts, args.max_tokens, args.warmup))
    with (
        console.status("drover: starting nats-server, control plane and engine host..."),
        local_cluster(settings, 1) as cluster,
    ):
        asyncio.run(wait_ready(cluster, 1, timeout_s=600))
        drover = asyncio.run(run_drover(cluster.url, prompts, args.max_tokens, args.warmup))

    table = Table(title="Drover NATS/actor path vs direct engine calls (ms)")
    for column in ("metric", "direct", "drover", "drover - direct", "ratio"):
        table.add_column(column, justify="right")
    for name, a, b in (("TTFT", direct.ttft_ms, drover.ttft_ms), ("inter-token", direct.itl_ms, drover.itl_ms)):
        for q in (50, 99):
            da, db = percentile(a, q), percentile(b, q)
            table.add_row(f"{name} p{q}", f"{da:.3f}", f"{db:.3f}", f"{db - da:+.3f}", f"{db / da:.3f}")
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        table.add_row(f"{name} mean", f"{ma:.3f}", f"{mb:.3f}", f"{mb - ma:+.3f}", f"{mb / ma:.3f}")
    console.print(table)
    t50, t99 = percentile(drover.transit_ms, 50), percentile(drover.transit_ms, 99)
    console.print(
        f"engine->client transit per chunk: p50 {t50:.3f} ms, p99 {t99:.3f} ms ({len(drover.transit_ms)} chunks)"
    )
    added50 = percentile(drover.itl_ms, 50) - percentile(direct.itl_ms, 50)
    added99 = percentile(drover.itl_ms, 99) - percentile(direct.itl_ms, 99)
    console.print(
        f"summary: added per token p50 {added50:+.3f} ms, p99 {added99:+.3f} ms "
        f"(target <= 1 ms / <= 3 ms); transit p50 {t50:.3f} ms p99 {t99:.3f} ms"
    )
    if args.plot:
        plot(args.plot, args.kind, direct, drover)


if __name__ == "__main__":
    main()
