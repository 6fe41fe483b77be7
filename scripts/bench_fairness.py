"""Fair share between clients: an interactive client's TTFT beside a client that floods the cluster, with
``scheduler.fairness`` off and on.

    python -m scripts.bench_fairness [--instances 1] [--flood 100] [--flood-tokens 256] [--interactive 10]
                                     [--interval-s 0.5] [--time-scale 1] [--plot DIR]

Per mode: an embedded nats-server and an in-process cluster (control plane + ``--instances`` sim engines of
``--max-num-seqs`` sequences), then client "flood" submits ``--flood`` requests of ``--flood-tokens`` output
tokens at once and, half a second later, client "interactive" submits ``--interactive`` short requests, one
every ``--interval-s`` (each on its own). Prints the interactive TTFT p50/p99/max per mode (the flood is
cancelled once the interactive requests are done), and with ``--plot`` their CDFs. The two clients are two
identities (their per-identity subjects); the fair queue is keyed by them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from actors.local_cluster import InProcessCluster
from control.apps.launcher import percentile
from control.client import DroverClient, DroverError, RequestStream
from control.settings import load_settings
from engines.sim.engine import SimEngine
from engines.tokenizer import ByteTokenizer
from transport.nats_server import EmbeddedNatsServer


async def _interactive_ttfts(url: str, args: argparse.Namespace) -> list[float]:
    """One short request every ``interval_s`` (each on its own: they do not wait for each other)."""
    async with DroverClient(url, name="interactive") as client:

        async def one(index: int) -> float:
            try:
                result = await asyncio.wait_for(
                    client.generate(f"interactive {index}", max_tokens=args.interactive_tokens), args.timeout_s
                )
                return result.ttft_s
            except (TimeoutError, DroverError):
                return float("inf")  # no first token within the timeout

        tasks = []
        for index in range(args.interactive):
            tasks.append(asyncio.create_task(one(index)))
            await asyncio.sleep(args.interval_s)
        return list(await asyncio.gather(*tasks))


async def _run(url: str, args: argparse.Namespace) -> tuple[list[float], int]:
    async with DroverClient(url, name="flood") as flood:
        await flood.wait_for_instances(args.instances, timeout_s=30)
        streams: list[RequestStream] = [
            await flood.submit(f"flood {index}", max_tokens=args.flood_tokens, liveness=False)
            for index in range(args.flood)
        ]
        readers = [asyncio.create_task(stream.result()) for stream in streams]
        await asyncio.sleep(0.5)
        ttfts = await _interactive_ttfts(url, args)
        finished = sum(1 for task in readers if task.done())
        for stream in streams:
            with contextlib.suppress(Exception):
                if not stream.finished:
                    await stream.cancel(timeout_s=2)
        await asyncio.wait(readers, timeout=10)
        return ttfts, finished


def run_mode(fairness: bool, args: argparse.Namespace) -> tuple[list[float], int]:
    with EmbeddedNatsServer() as server:
        settings = load_settings(
            overrides={
                "nats": {"url": server.url},
                "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
                "scheduler": {
                    "fairness": fairness,
                    "fairness_quantum_tokens": args.quantum,
                    "fairness_max_waiting": args.max_waiting,
                },
                "limits": {"max_in_flight_per_client": max(256, args.flood + 1)},
                "ha": {"enabled": False},
            }
        )
        cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
        cluster.start_control()
        for index in range(args.instances):
            engine = SimEngine(f"sim-{index}", max_num_seqs=args.max_num_seqs, time_scale=args.time_scale)
            cluster.add_engine(engine)
        try:
            return asyncio.run(_run(server.url, args))
        finally:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--flood", type=int, default=100)
    parser.add_argument("--flood-tokens", type=int, default=512)
    parser.add_argument("--interactive", type=int, default=10)
    parser.add_argument("--interactive-tokens", type=int, default=8)
    parser.add_argument("--interval-s", type=float, default=0.5)
    parser.add_argument("--time-scale", type=float, default=1.0, help="Sim engine time scale (1: real time).")
    parser.add_argument("--quantum", type=int, default=1024, help="scheduler.fairness_quantum_tokens")
    parser.add_argument("--max-waiting", type=int, default=1, help="scheduler.fairness_max_waiting")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="Give up on one interactive request.")
    parser.add_argument("--plot", type=Path, default=None, help="Write a TTFT CDF PNG into this directory.")
    args = parser.parse_args()

    results = {mode: run_mode(mode == "on", args) for mode in ("off", "on")}
    table = Table(title=f"interactive TTFT beside a flood of {args.flood} x {args.flood_tokens} tokens")
    for column in ("fairness", "interactive", "TTFT p50 s", "TTFT p99 s", "TTFT max s", "flood done"):
        table.add_column(column)
    for mode, (ttfts, finished) in results.items():
        table.add_row(
            mode,
            str(len(ttfts)),
            f"{percentile(ttfts, 50):.3f}",
            f"{percentile(ttfts, 99):.3f}",
            f"{max(ttfts):.3f}",
            str(finished),
        )
    Console().print(table)
    off, on = (percentile(results[m][0], 50) for m in ("off", "on"))
    ratio = off / max(on, 1e-9)
    print(f"summary: interactive TTFT p50 {off:.3f} s without fairness, {on:.3f} s with it ({ratio:.1f}x)")
    if args.plot is not None:
        from scripts.plotting import cdf_plot

        cdf_plot(
            args.plot,
            "fairness_ttft",
            {f"fairness {m}": results[m][0] for m in results},
            xlabel="interactive TTFT (s)",
            title="Interactive TTFT beside a flooding client",
            log_x=True,
        )


if __name__ == "__main__":
    main()
