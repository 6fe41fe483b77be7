"""Overload: memory of every process stays bounded under a 10x burst, and what admission cannot take is
refused at once.

    python -m scripts.bench_overload [--instances 2] [--limit 256] [--factor 10] [--max-tokens 32]

Starts a real local cluster (embedded nats-server, a control-plane process, ``--instances`` sim engine
processes) with ``limits.max_in_flight_requests = --limit``, then submits two bursts at once from
``--clients`` clients: 1x the limit (everything fits) and ``--factor`` x the limit. While each burst runs,
the RSS of the control plane and of every engine is sampled every 20 ms (psutil). It prints, per burst:
submitted, completed, refused by code, the refusal latency p50/p99 (submit to ErrorReply), and each
process's RSS before / peak / after. Bounded means the 10x burst's peak is close to the 1x burst's, not
10x of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from control.apps.launcher import LocalCluster, local_cluster, percentile, wait_ready
from control.client import DroverClient, DroverError
from control.settings import Settings, load_settings
from transport.messages import RequestClass, SamplingParams


@dataclass
class Sampler:
    """Samples the RSS of some processes in a thread of its own."""

    pids: dict[str, int]
    interval_s: float = 0.02
    peak: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rss(self) -> dict[str, int]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                out[name] = 0
        return out

    def start(self) -> None:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, value in self.rss().items():
                self.peak[name] = max(self.peak.get(name, 0), value)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return dict(self.peak)


@dataclass
class BurstResult:
    name: str
    submitted: int
    completed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refusal_ms: list[float] = field(default_factory=list)
    accept_ms: list[float] = field(default_factory=list)  # submit to Accepted, for comparison
    wall_s: float = 0.0
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)


async def burst(url: str, name: str, count: int, clients: int, max_tokens: int, sampler: Sampler) -> BurstResult:
    result = BurstResult(name=name, submitted=count)
    connections = [await DroverClient(url, name=f"burst-{i}").connect() for i in range(clients)]
    try:
        result.before = sampler.rss()
        sampler.start()
        started = time.perf_counter()

        async def one(index: int) -> None:
            client = connections[index % clients]
            submitted = time.perf_counter()
            try:
                stream = await client.submit(
                    f"burst {name} {index}",
                    sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                    request_class=RequestClass.BATCH if index % 4 == 0 else RequestClass.INTERACTIVE,
                )
                with contextlib.suppress(DroverError):  # a refusal fails `accepted` at once
                    await asyncio.shield(stream.accepted)
                    result.accept_ms.append((time.perf_counter() - submitted) * 1e3)
                await stream.result()
                result.completed += 1
            except DroverError as exc:
                result.refused[str(exc.code)] += 1
                result.refusal_ms.append((time.perf_counter() - submitted) * 1e3)

        await asyncio.gather(*(one(i) for i in range(count)))
        result.wall_s = time.perf_counter() - started
        result.peak = sampler.stop()
        await asyncio.sleep(1.0)  # let finished requests leave every table
        result.after = sampler.rss()
    finally:
        for client in connections:
            await client.close()
    return result


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _p(values: list[float]) -> str:
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}" if values else "-"


def report(results: list[BurstResult], names: list[str], limit: int) -> None:
    console = Console(width=160)
    table = Table(title=f"Bursts against limits.max_in_flight_requests = {limit}")
    columns = ("burst", "submitted", "completed", "refused (code: n)", "refusal p50/p99 ms", "accept p50/p99 ms")
    for column in (*columns, "wall s"):
        table.add_column(column)
    for r in results:
        refused = ", ".join(f"{code}: {n}" for code, n in sorted(r.refused.items())) or "0"
        table.add_row(
            r.name, str(r.submitted), str(r.completed), refused, _p(r.refusal_ms), _p(r.accept_ms), f"{r.wall_s:.1f}"
        )
    console.print(table)
    rss = Table(title="RSS (MiB): before / peak / after each burst")
    rss.add_column("process")
    for r in results:
        rss.add_column(r.name)
    for name in names:
        rss.add_row(name, *(f"{_mib(r.before[name])} / {_mib(r.peak[name])} / {_mib(r.after[name])}" for r in results))
    console.print(rss)
    if len(results) >= 2:
        first, last = results[0], results[1]
        growth = {n: (last.peak[n] - first.before[n]) / max(1, first.peak[n] - first.before[n]) for n in names}
        ratio = {n: last.peak[n] / max(1, first.peak[n]) for n in names}
        console.print(
            "summary: peak RSS of the "
            + f"{last.name} burst vs the {first.name} burst: "
            + ", ".join(f"{n} {ratio[n]:.2f}x" for n in names)
            + f"; refused {sum(last.refused.values())} of {last.submitted} at once"
            + f" (its RSS rise over the 1x burst's rise: {', '.join(f'{n} {g:.1f}x' for n, g in growth.items())})"
        )


def report_baseline(limited: BurstResult, unlimited: BurstResult, names: list[str]) -> None:
    """The same burst with the in-flight limit raised to admit all of it: what the limit saves."""
    console = Console(width=160)
    table = Table(title=f"The {limited.name} burst with and without the in-flight limit (RSS rise, MiB)")
    for column in ("process", "limited: rise to peak", "everything admitted: rise to peak", "ratio"):
        table.add_column(column)
    for n in names:
        lim = limited.peak[n] - limited.before[n]
        unl = unlimited.peak[n] - unlimited.before[n]
        table.add_row(n, _mib(lim), _mib(unl), f"{unl / max(1, lim):.1f}x")
    console.print(table)
    console.print(
        f"baseline: everything admitted completed {unlimited.completed} of {unlimited.submitted} "
        f"in {unlimited.wall_s:.1f}s; limited completed {limited.completed}, refused {sum(limited.refused.values())}"
    )


async def run(cluster: LocalCluster, args: argparse.Namespace) -> BurstResult:
    await wait_ready(cluster, args.instances, timeout_s=60)
    pids = {name: process.pid for name, process in cluster.processes.items()}
    sampler = Sampler(pids)
    results = [
        await burst(cluster.url, "1x", args.limit, args.clients, args.max_tokens, sampler),
        await burst(cluster.url, f"{args.factor}x", args.limit * args.factor, args.clients, args.max_tokens, sampler),
        await burst(cluster.url, "1x again", args.limit, args.clients, args.max_tokens, sampler),
    ]
    report(results, list(pids), args.limit)
    return results[1]


async def run_baseline(cluster: LocalCluster, args: argparse.Namespace) -> BurstResult:
    await wait_ready(cluster, args.instances, timeout_s=60)
    sampler = Sampler({name: process.pid for name, process in cluster.processes.items()})
    await burst(cluster.url, "warm-up", args.limit, args.clients, args.max_tokens, sampler)  # same history
    count = args.limit * args.factor
    return await burst(cluster.url, f"{args.factor}x", count, args.clients, args.max_tokens, sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--limit", type=int, default=256, help="limits.max_in_flight_requests")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-baseline", action="store_true", help="skip the run that admits the whole burst")
    args = parser.parse_args()

    def settings(limit: int) -> Settings:
        return load_settings(
            overrides={
                "engine": {"kind": "sim", "sim_time_scale": 1.0},
                "limits": {
                    "max_in_flight_requests": limit,
                    "max_in_flight_per_client": limit,
                    "max_queued_per_client": limit,
                },
                "scheduler": {"max_queued_requests": limit},
                "observability": {"exporter": "none"},
            }
        )

    with local_cluster(settings(args.limit), args.instances, Path(tempfile.mkdtemp(prefix="drover-overload-"))) as c:
        limited = asyncio.run(run(c, args))
    if args.no_baseline:
        return
    unlimited_limit = args.limit * args.factor
    with local_cluster(settings(unlimited_limit), args.instances, Path(tempfile.mkdtemp(prefix="drover-ovl-"))) as c:
        unlimited = asyncio.run(run_baseline(c, args))
    report_baseline(limited, unlimited, list(c.processes))


if __name__ == "__main__":
    main()
