"""Engine failure: missed heartbeats declare it dead and each of its requests resumes on another instance
from the tokens its client already has (read back from the output stream): no gap, no duplicate."""

from __future__ import annotations

import asyncio
import time

import nats

from actors.engine_actor import Heartbeater
from actors.local_cluster import InProcessCluster
from actors.migrator import MigratorActor  # noqa: F401  (the control plane runs one)
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.messages import RequestDone, SamplingParams, TokenChunk, decode


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
            await asyncio.to_thread(cluster.crash_engine, victim)
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


def _stall_heartbeats(cluster: InProcessCluster, instance_id: str, seconds: float) -> None:
    """A live engine that looks dead (a long pause of its heartbeat thread, an overloaded host): no heartbeat
    for ``seconds``, then heartbeats again. It never stops streaming by itself."""
    host = cluster.hosts[instance_id]
    host.heartbeater.stop()
    time.sleep(seconds)
    host.heartbeater = Heartbeater(host.bus, host.engine, host.heartbeater.interval_s)
    host.heartbeater.start()


async def test_a_live_engine_declared_dead_stops_streaming_before_its_request_resumes(nats_url: str) -> None:
    """Failover fences the old instance first: a late but live engine stops streaming the request (no chunk
    and no RequestDone after its last one), so each output index reaches the client exactly once."""
    cluster = await asyncio.to_thread(_cluster, nats_url)
    chunks: list[TokenChunk] = []
    dones: list[RequestDone] = []
    try:
        async with DroverClient(cluster.url, name="failover-zombie") as client:
            raw = await nats.connect(cluster.url)  # every message of the inbox, nothing deduplicated

            async def on_message(msg: nats.aio.msg.Msg) -> None:
                message = decode(msg.data)
                if isinstance(message, TokenChunk) and message.request_id == "fo-zombie":
                    chunks.append(message)
                elif isinstance(message, RequestDone) and message.request_id == "fo-zombie":
                    dones.append(message)

            await raw.subscribe(f"{client.inbox_prefix}.>", cb=on_message)
            await client.wait_for_instances(2, timeout_s=10)
            sampling = SamplingParams(max_tokens=400, ignore_eos=True)
            stream = await client.submit("failover zombie", sampling=sampling, request_id="fo-zombie")
            async for _ in stream.events():
                if len(stream.result_data.token_ids) >= 10:
                    break
            victim = next(r.instance_id for r in (await client.status()).requests if r.request_id == "fo-zombie")
            assert victim is not None
            await asyncio.to_thread(_stall_heartbeats, cluster, victim, 1.5)  # declared dead at 0.6 s
            result = await stream.result()
            await raw.flush()
            await asyncio.sleep(0.5)  # a zombie's late chunks would arrive meanwhile
            await raw.drain()
            seed = request_seed(0, "fo-zombie")
            assert result.token_ids == [token_at(seed, p) for p in range(400)]
            covered = [0] * 400
            for chunk in chunks:
                for index in range(chunk.index, chunk.index + len(chunk.token_ids)):
                    covered[index] += 1
            assert covered == [1] * 400, [i for i, n in enumerate(covered) if n != 1][:20]
            assert len(dones) == 1
            assert result.done is not None and result.done.instances[0] == victim
            assert result.done.instances[-1] != victim  # it failed over
    finally:
        await asyncio.to_thread(cluster.stop)
