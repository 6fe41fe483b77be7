"""SIGTERM on an engine host drains it by migration before it stops: its requests finish elsewhere,
every token exactly once (EngineHost.drain is what serve_engine runs on SIGTERM)."""

from __future__ import annotations

import asyncio

from control.client import DroverClient
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from tests.integration.conftest import make_sim_cluster
from transport.messages import SamplingParams


async def test_draining_engine_hands_its_requests_over_before_stopping(nats_url: str) -> None:
    cluster = await asyncio.to_thread(make_sim_cluster, nats_url, 0)
    try:
        for name in ("gd-a", "gd-b"):
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine(name, num_blocks=256))
        async with DroverClient(cluster.url, name="graceful") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"drain {i}", sampling=SamplingParams(max_tokens=300, ignore_eos=True), request_id=f"gd-{i}"
                )
                for i in range(4)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 5:
                        break
            host = cluster.hosts["gd-a"]
            emptied = await asyncio.to_thread(host.drain, 30.0)
            assert emptied
            await asyncio.to_thread(cluster.remove_engine, "gd-a")
            for i, stream in enumerate(streams):
                result = await stream.result()
                assert result.token_ids == [token_at(request_seed(0, f"gd-{i}"), p) for p in range(300)]
                assert result.done is not None and result.done.finish_reason == "length"
                assert result.done.instances[-1] == "gd-b"
    finally:
        await asyncio.to_thread(cluster.stop)
