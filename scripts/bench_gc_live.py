"""The cyclic GC in a live control plane: how many collections of each generation, started on which thread, and
how long they paused everything (every thread waits behind a collection, the scheduler's dispatches too).

    python -m scripts.bench_gc_live [--requests 3000] [--concurrency 32] [--gc service|defaults]

One process: an embedded nats-server, a control plane, two simulated engines (steps take no wall time) and a
client submitting short requests (4 prompt tokens, 4 output tokens). ``--gc service`` (default): the control
plane's own setting (control/gc_tuning.py, taken in ``ControlPlane.start``); ``defaults``: given back right
after start-up, so Python's default thresholds and nothing frozen. The engines and the client share the process,
so the counts are the whole process's, not the control plane's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import threading
import time
from collections import defaultdict
from typing import Any

from actors.local_cluster import InProcessCluster
from control import gc_tuning
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.nats_server import EmbeddedNatsServer


class CollectionLog:
    """Per (thread, generation): collections started, their total and longest pause (s), via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        thread = threading.current_thread().name.split("-")[0]  # pykka names actors' threads "Class-N"
        row = self.rows[(thread, info["generation"])]
        row[0] += 1
        row[1] += pause
        row[2] = max(row[2], pause)


async def drive(url: str, requests: int, concurrency: int, log: CollectionLog) -> float:
    client = await DroverClient(url, name="bench-gc-live").connect()
    try:
        await client.wait_for_instances(2, timeout_s=60)
        gate = asyncio.Semaphore(concurrency)

        async def one(k: int) -> None:
            async with gate:
                await client.generate(prompt_token_ids=[1 + k % 200, 2, 3, 4], max_tokens=4)

        gc.callbacks.append(log)
        started = time.perf_counter()
        try:
            await asyncio.gather(*(one(k) for k in range(requests)))
        finally:
            gc.callbacks.remove(log)
        return time.perf_counter() - started
    finally:
        await client.close()


def run(requests: int, concurrency: int, gc_mode: str) -> tuple[str, float, CollectionLog]:
    """The collector's setting, the seconds the requests took and the collections meanwhile."""
    server = EmbeddedNatsServer()
    url = server.start()
    settings = load_settings(overrides={"nats": {"url": url}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}})
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    try:
        cluster.start_control()
        for index in range(2):
            cluster.add_engine(MigratableSimEngine(f"sim-{index}", time_scale=0.0))
        if gc_mode == "defaults":
            gc_tuning.restore()  # what the control plane took in start(): Python's defaults for this run
        setting = gc_tuning.describe()
        log = CollectionLog()
        elapsed = asyncio.run(drive(url, requests, concurrency, log))
        return setting, elapsed, log
    finally:
        cluster.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gc", choices=("service", "defaults"), default="service")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    setting, elapsed, log = run(args.requests, args.concurrency, args.gc)
    print(f"== {args.requests} requests, {args.concurrency} at a time; {setting}")
    paused = sum(row[1] for row in log.rows.values())
    print(f"   {elapsed:.2f} s, {paused * 1e3:.1f} ms of it in collections")
    print(f"{'thread':<16} {'generation':>10} {'collections':>11} {'per request':>11}", end="")
    print(f" {'total ms':>9} {'max ms':>7}")
    for (thread, generation), (count, total, longest) in sorted(log.rows.items(), key=lambda kv: kv[0][::-1]):
        print(
            f"{thread:<16} {generation:>10} {int(count):>11} {count / args.requests:>11.3f} {total * 1e3:>9.1f} "
            f"{longest * 1e3:>7.2f}"
        )


if __name__ == "__main__":
    main()
