"""What control-plane HA costs and how fast it recovers, in one run on simulated engines (real nats-server).

1. Submission cost: the same workload against a control plane with HA off (state in memory) and on
   (state in a JetStream KV bucket; ``Accepted`` only after the request's record is stored), alternating
   rounds: submit -> ``Accepted`` latency and end-to-end time per request, and requests/s.
2. Takeover: two control planes; the leader stops without releasing its lease (a crash, as far as the
   lease is concerned) or hands over (SIGTERM path). Time from the stop until the other one answers on
   the control subjects.

    python -m scripts.bench_ha [--requests 400] [--concurrency 32] [--rounds 3] [--takeovers 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import nats
from rich.console import Console
from rich.table import Table

from actors.control_plane import ControlPlane
from actors.local_cluster import InProcessCluster
from control.apps.launcher import percentile
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.bus import Bus, BusOptions
from transport.messages import SamplingParams, StatusQuery, encode
from transport.nats_server import EmbeddedNatsServer

console = Console()


def _cluster(url: str, *, ha: bool, ttl_s: float = 3.0, renew_s: float = 1.0) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.1},
            "policy": {"migration_enabled": False},
            "ha": {"enabled": ha, "lease_ttl_s": ttl_s, "renew_period_s": renew_s},
            "observability": {"exporter": "none"},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for i in range(2):
        cluster.add_engine(MigratableSimEngine(f"bench-{i}", num_blocks=4096, max_num_seqs=256, time_scale=0.0))
    return cluster


async def _workload(url: str, requests: int, concurrency: int, tag: str) -> tuple[list[float], list[float], float]:
    accepted_ms: list[float] = []
    e2e_ms: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with DroverClient(url, name=f"bench-ha-{tag}") as client:
        await client.wait_for_instances(2, timeout_s=30)

        async def one(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                stream = await client.submit(f"p{i}", sampling=SamplingParams(max_tokens=4), request_id=f"{tag}-{i}")
                await stream.accepted
                accepted_ms.append((time.perf_counter() - started) * 1e3)
                await stream.result()
                e2e_ms.append((time.perf_counter() - started) * 1e3)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    return accepted_ms, e2e_ms, requests / elapsed


async def _served(url: str, timeout_s: float = 60.0) -> float:
    """Seconds until a status request is answered (only a leader answers). One request at a time, every
    10 ms: ``DroverClient.status`` asks again by itself, with pauses after "no responders" that would set the
    resolution of this figure."""
    started = time.perf_counter()
    nc = await nats.connect(url)
    try:
        while time.perf_counter() - started < timeout_s:
            try:
                await nc.request(subjects.STATUS, encode(StatusQuery()), timeout=0.5)
                return time.perf_counter() - started
            except Exception:
                await asyncio.sleep(0.01)
    finally:
        await nc.close()
    raise TimeoutError("no leader answered")


async def _takeovers(url: str, count: int, ttl_s: float, renew_s: float) -> dict[str, list[float]]:
    cluster = await asyncio.to_thread(_cluster, url, ha=True, ttl_s=ttl_s, renew_s=renew_s)
    times: dict[str, list[float]] = {"crash (lease lapses)": [], "SIGTERM (lease released)": []}
    try:
        standby = await asyncio.to_thread(cluster.start_standby)
        assert cluster.control is not None and cluster.control_bus is not None
        planes: list[tuple[ControlPlane, Bus]] = [(cluster.control, cluster.control_bus), cluster.standbys[0]]
        assert planes[1][0] is standby
        for round_ in range(2 * count):
            leader_index = next(i for i, (p, _) in enumerate(planes) if p.leading)
            plane, bus = planes[leader_index]
            crash = round_ % 2 == 0
            stop_started = time.perf_counter()
            await asyncio.to_thread(plane.stop, release=not crash)
            await _served(url)
            took = time.perf_counter() - stop_started
            times["crash (lease lapses)" if crash else "SIGTERM (lease released)"].append(took)
            await asyncio.to_thread(bus.stop)
            new_bus = await asyncio.to_thread(Bus(BusOptions(url=url, name=f"bench-cp-{round_}")).start)
            new_plane = await asyncio.to_thread(ControlPlane(cluster.settings, new_bus, ByteTokenizer()).start)
            planes[leader_index] = (new_plane, new_bus)
        cluster.control, cluster.control_bus = planes[0]
        cluster.standbys = [planes[1]]
    finally:
        await asyncio.to_thread(cluster.stop)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--takeovers", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=3.0, help="lease TTL (s)")
    parser.add_argument("--renew", type=float, default=1.0, help="lease renew period (s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    server = EmbeddedNatsServer()
    url = server.start()
    try:
        results: dict[str, tuple[list[float], list[float], list[float]]] = {"off": ([], [], []), "on": ([], [], [])}
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                cluster = await asyncio.to_thread(_cluster, url, ha=mode == "on")
                try:
                    acc, e2e, rate = await _workload(url, args.requests, args.concurrency, f"{mode}{round_}")
                finally:
                    await asyncio.to_thread(cluster.stop)
                results[mode][0].extend(acc)
                results[mode][1].extend(e2e)
                results[mode][2].append(rate)
        table = Table(title=f"submission cost: {args.rounds} x {args.requests} requests, {args.concurrency} in flight")
        for column in ("HA", "accepted p50 ms", "accepted p99 ms", "e2e p50 ms", "e2e p99 ms", "requests/s"):
            table.add_column(column, justify="right")
        for mode, (acc, e2e, rates) in results.items():
            table.add_row(
                mode,
                f"{percentile(acc, 50):.2f}",
                f"{percentile(acc, 99):.2f}",
                f"{percentile(e2e, 50):.2f}",
                f"{percentile(e2e, 99):.2f}",
                f"{statistics.median(rates):.0f}",
            )
        console.print(table)
        off, on = results["off"], results["on"]
        console.print(
            f"HA on / off: accepted p50 {percentile(on[0], 50) / percentile(off[0], 50):.2f}x, "
            f"e2e p50 {percentile(on[1], 50) / percentile(off[1], 50):.2f}x, "
            f"throughput {statistics.median(on[2]) / statistics.median(off[2]):.2f}x"
        )
        times = await _takeovers(url, args.takeovers, args.ttl, args.renew)
        table = Table(title=f"takeover: lease TTL {args.ttl} s, renew {args.renew} s ({args.takeovers} of each)")
        for column in ("leader stops by", "min s", "p50 s", "max s"):
            table.add_column(column, justify="right")
        for kind, values in times.items():
            table.add_row(kind, f"{min(values):.2f}", f"{percentile(values, 50):.2f}", f"{max(values):.2f}")
        console.print(table)
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
