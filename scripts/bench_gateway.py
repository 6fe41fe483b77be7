"""Latency the OpenAI-compatible gateway adds over Drover's direct NATS client, in one run.

One local cluster (embedded nats-server, a control-plane process, engine-host processes), one
``drover gateway`` process. Each prompt is sent twice, one request at a time, alternating paths:
  direct  - DroverClient.submit in this process (NATS);
  gateway - the official openai client (AsyncOpenAI, streamed completions) -> gateway -> NATS.
Both paths see the same engine and the same step times (sim engines model them; vLLM runs them), so:
  TTFT           - submit to the first text; "paired" rows: gateway minus direct for the same prompt
                   (each path's own percentiles mix requests whose first character needs 1 or 2 tokens);
  inter-token    - gap between text pieces, per token;
  token arrival  - the k-th text piece's arrival after submit, gateway minus direct, paired by prompt and
                   k: the per-token latency the extra hop adds (gaps alone cannot show a constant delay).
Both paths use the same request id per prompt, so (seeded by it) they stream the same text: the pieces
pair up exactly. Tokens whose bytes do not yet make a character ride with the next piece on both paths.

    python -m scripts.bench_gateway [--kind sim|vllm] [--requests 24] [--max-tokens 64] [--warmup 3] [--quick]
                                    [--plot DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.table import Table

from control.apps.launcher import DEMO_PROMPTS, LocalCluster, local_cluster, percentile, wait_ready
from control.client import DroverClient
from control.settings import load_settings
from transport.messages import SamplingParams


@dataclass
class Samples:
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    arrivals: list[list[float]] = field(default_factory=list)  # per request: each text piece's arrival


@dataclass
class Run:
    """One request's text pieces: arrival after submit, and the text (tokens whose bytes do not yet form a
    character arrive with the next piece: the gateway sends text, so both paths are compared on pieces)."""

    arrivals: list[float]
    texts: list[str]
    tokens: list[int]  # tokens per piece (direct path only)


async def direct_once(client: DroverClient, request_id: str, prompt: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    stream = await client.submit(
        prompt, request_id=request_id, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    run = Run([], [], [])
    pending = 0
    async for event in stream.events():
        pending += len(event.token_ids)
        if event.text:
            run.arrivals.append(time.perf_counter() - started)
            run.texts.append(event.text)
            run.tokens.append(pending)
            pending = 0
    return run


async def gateway_once(api: openai.AsyncOpenAI, model: str, request_id: str, prompt: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    stream = await api.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        extra_body={"request_id": request_id, "ignore_eos": True},
    )
    run = Run([], [], [])
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            run.arrivals.append(time.perf_counter() - started)
            run.texts.append(chunk.choices[0].text)
    return run


def per_token_gaps_ms(arrivals: list[float], tokens: list[int]) -> list[float]:
    """A piece of n tokens that arrived d after the previous one gives n gaps of d/n (as DroverClient)."""
    gaps: list[float] = []
    for (previous, at), n in zip(itertools.pairwise(arrivals), tokens[1:], strict=False):
        gaps.extend([(at - previous) * 1e3 / n] * n)
    return gaps


async def measure(
    url: str, gateway_url: str, model: str, prompts: list[str], max_tokens: int, warmup: int
) -> tuple[Samples, Samples, int]:
    """Each prompt on both paths with the same request id, one after the other: engines seed their
    output by request id, so both runs stream the same text in the same pieces."""
    direct, gateway = Samples(), Samples()
    mismatched = 0
    api = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="bench", max_retries=0)
    async with DroverClient(url, name="bench-gateway") as client:
        for n, prompt in enumerate(prompts):
            rid = f"bench-gateway-{n}"
            a = await direct_once(client, rid, prompt, max_tokens)
            b = await gateway_once(api, model, rid, prompt, max_tokens)
            mismatched += a.texts != b.texts
            if n < warmup:
                continue
            for samples, run in ((direct, a), (gateway, b)):
                samples.ttft_ms.append(run.arrivals[0] * 1e3)
                samples.itl_ms.extend(per_token_gaps_ms(run.arrivals, a.tokens))
                samples.arrivals.append(run.arrivals)
    await api.close()
    return direct, gateway, mismatched


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gateway_process(cluster: LocalCluster) -> Iterator[str]:
    """`drover gateway` on the cluster's config, as its own process; yields its URL once ready."""
    port = _free_port()
    log = open(cluster.work_dir / "gateway.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control.apps.cli",
            "--config",
            str(cluster.work_dir / "drover.toml"),
            "gateway",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {(cluster.work_dir / 'gateway.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("gateway not ready after 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def paired_arrival_delays_ms(direct: Samples, gateway: Samples) -> list[float]:
    return [
        (g - d) * 1e3
        for ds, gs in zip(direct.arrivals, gateway.arrivals, strict=True)
        for d, g in zip(ds, gs, strict=False)
    ]


def plot(directory: Path, kind: str, direct: Samples, gateway: Samples) -> None:
    """Gateway vs direct: TTFT and inter-token CDFs, and the paired per-token arrival delay."""
    from scripts.plotting import cdf_plot

    title = f"Gateway (openai client -> HTTP/SSE -> NATS) vs direct NATS client ({kind})"
    cdf_plot(
        directory,
        "gateway_ttft_cdf",
        {"direct": direct.ttft_ms, "gateway": gateway.ttft_ms},
        xlabel="TTFT (ms)",
        title=title,
        log_x=True,
    )
    cdf_plot(
        directory,
        "gateway_itl_cdf",
        {"direct": direct.itl_ms, "gateway": gateway.itl_ms},
        xlabel="inter-token latency (ms)",
        title=title,
        log_x=True,
    )
    cdf_plot(
        directory,
        "gateway_added_delay_cdf",
        {
            "TTFT": [g - d for d, g in zip(direct.ttft_ms, gateway.ttft_ms, strict=True)],
            "token arrival": paired_arrival_delays_ms(direct, gateway),
        },
        xlabel="gateway - direct, paired by prompt (ms)",
        title=f"Latency the gateway adds ({kind})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="sim", choices=["sim", "vllm"])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None, help="Where process logs go.")
    parser.add_argument("--quick", action="store_true", help="smoke run: sim engine, 8 requests of 16 tokens")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.kind, args.requests, args.max_tokens, args.warmup = "sim", 8, 16, 1

    settings = load_settings(overrides={"engine": {"kind": args.kind}, "observability": {"exporter": "none"}})
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.requests + args.warmup)]
    console = Console()
    console.print(
        f"engine={args.kind} requests={args.requests} (+{args.warmup} warm-up) per path, one at a "
        f"time, max_tokens={args.max_tokens}"
    )
    with (
        console.status("starting nats-server, control plane, engine and gateway processes..."),
        local_cluster(settings, 1, args.work_dir) as cluster,
    ):
        asyncio.run(wait_ready(cluster, 1, timeout_s=600))
        with gateway_process(cluster) as gateway_url:
            direct, gateway, mismatched = asyncio.run(
                measure(cluster.url, gateway_url, settings.model.name, prompts, args.max_tokens, args.warmup)
            )

    table = Table(title=f"Gateway (openai client -> HTTP/SSE -> NATS) vs direct NATS client, ms ({args.kind})")
    for column in ("metric", "direct", "gateway", "gateway - direct"):
        table.add_column(column, justify="right")
    for name, a, b in (("TTFT", direct.ttft_ms, gateway.ttft_ms), ("inter-token", direct.itl_ms, gateway.itl_ms)):
        for q in (50, 99):
            da, db = percentile(a, q), percentile(b, q)
            table.add_row(f"{name} p{q}", f"{da:.3f}", f"{db:.3f}", f"{db - da:+.3f}")
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        table.add_row(f"{name} mean", f"{ma:.3f}", f"{mb:.3f}", f"{mb - ma:+.3f}")
    delays = paired_arrival_delays_ms(direct, gateway)
    ttft_delays = [g - d for d, g in zip(direct.ttft_ms, gateway.ttft_ms, strict=True)]
    for q in (50, 99):
        table.add_row(f"TTFT paired p{q}", "", "", f"{percentile(ttft_delays, q):+.3f}")
    for q in (50, 99):
        table.add_row(f"token arrival p{q}", "", "", f"{percentile(delays, q):+.3f}")
    console.print(table)
    load = os.getloadavg()
    console.print(
        f"{len(delays)} text pieces paired; runs whose text differed between paths: {mismatched}; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs (p99 is sensitive to other work)"
    )
    if mismatched:
        console.print("[red]the paths streamed different text: pairing is not exact[/]")
    ttft50, ttft99 = percentile(ttft_delays, 50), percentile(ttft_delays, 99)
    console.print(
        f"summary: gateway adds TTFT p50 {ttft50:+.3f} ms / p99 {ttft99:+.3f} ms and per-token "
        f"arrival p50 {percentile(delays, 50):+.3f} ms / p99 {percentile(delays, 99):+.3f} ms "
        f"over the direct NATS client ({args.kind} engine)"
    )
    if args.plot:
        plot(args.plot, args.kind, direct, gateway)


if __name__ == "__main__":
    main()
