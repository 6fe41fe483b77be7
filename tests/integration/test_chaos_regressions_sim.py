"""Failover bugs the chaos benchmark (scripts/chaos.py) found, each pinned by a test on real NATS and sim
engines."""

from __future__ import annotations

import asyncio

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.messages import SamplingParams


def _cluster(nats_url: str, names: tuple[str, ...], stale_after_s: float) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": stale_after_s},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for name in names:
        cluster.add_engine(MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
    return cluster


def _crash(cluster: InProcessCluster, instance_id: str) -> None:
    """kill -9 as seen from outside: heartbeats stop and the connection goes silent mid-stream."""
    host = cluster.hosts.pop(instance_id)
    host.heartbeater.stop()
    bus = cluster._buses.pop(instance_id)
    bus.loop.call_soon_threadsafe(bus.loop.stop)


async def test_an_engine_restarted_under_its_id_before_it_was_declared_dead_loses_nothing(nats_url: str) -> None:
    """A supervisor (systemd, the chaos script) restarts a killed engine in a second or two, well inside the
    heartbeat timeout: the scheduler must see the new incarnation (heartbeat seq restarts, new pid) and
    resume the old incarnation's requests, instead of waiting forever for them."""
    cluster = await asyncio.to_thread(_cluster, nats_url, ("rr-a", "rr-b"), 60.0)  # timeout never fires
    try:
        async with DroverClient(cluster.url, name="restart-same-id") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"restart {i}", sampling=SamplingParams(max_tokens=150, ignore_eos=True), request_id=f"rr-{i}"
                )
                for i in range(6)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 5:
                        break
            status = await client.status()
            on_a = {r.request_id for r in status.requests if r.instance_id == "rr-a"}
            assert on_a
            await asyncio.to_thread(_crash, cluster, "rr-a")
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("rr-a", num_blocks=256, max_model_len=1024))
            for i, stream in enumerate(streams):
                result = await asyncio.wait_for(stream.result(), 30)
                seed = request_seed(0, f"rr-{i}")
                assert result.token_ids == [token_at(seed, p) for p in range(150)]
    finally:
        await asyncio.to_thread(cluster.stop)
