"""Engine failure: missed heartbeats declare it dead and each of its requests resumes on another instance
from the tokens its client already has (read back from the output stream): no gap, no duplicate."""

from __future__ import annotations

import asyncio

from actors.local_cluster import InProcessCluster
from actors.migrator import MigratorActor  # noqa: F401  (the control plane runs one)
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.messages import SamplingParams


def _cluster(nats_url: str) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": 0.6},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for name in ("fo-a", "fo-b"):
        cluster.add_engine(MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
    return cluster


def _crash(cluster: InProcessCluster, instance_id: str) -> None:
    """What a kill -9 looks like from outside: heartbeats stop and nothing more is published."""
    host = cluster.hosts.pop(instance_id)
    host.heartbeater.stop()
    bus = cluster._buses.pop(instance_id)
    bus.loop.call_soon_threadsafe(bus.loop.stop)  # its connection goes silent mid-stream


async def test_requests_of_a_dead_engine_resume_elsewhere_exactly_once(nats_url: str) -> None:
    cluster = await asyncio.to_thread(_cluster, nats_url)
    try:
        async with DroverClient(cluster.url, name="failover-test") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"failover {i}", sampling=SamplingParams(max_tokens=120, ignore_eos=True), request_id=f"fo-{i}"
                )
                for i in range(4)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 10:
                        break
            status = await client.status()
            victim = status.requests[0].instance_id
            assert victim is not None
            on_victim = {r.request_id for r in status.requests if r.instance_id == victim}
            await asyncio.to_thread(_crash, cluster, victim)
            for i, stream in enumerate(streams):
                result = await stream.result()
                seed = request_seed(0, f"fo-{i}")
                assert result.token_ids == [token_at(seed, p) for p in range(120)]
                assert result.done is not None
                if f"fo-{i}" in on_victim:
                    assert result.done.instances[0] == victim and result.done.instances[-1] != victim
            after = await client.status()
            assert victim not in {i.info.instance_id for i in after.instances}
    finally:
        await asyncio.to_thread(cluster.stop)
