"""NATS failures, on real servers with real actors and sim engines:

- a 3-node NATS cluster loses one node (kill -9, then a clean stop) while requests stream: every request
  completes with every token exactly once, in order (checked against the sim engine's deterministic tokens);
- the single embedded server restarts on the same URL: the control plane, the engine hosts and the client
  reconnect and resubscribe; requests in flight complete and requests submitted afterwards complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, RequestStream
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.bus import Bus
from transport.messages import SamplingParams
from transport.nats_cluster import EmbeddedNatsCluster
from transport.nats_server import EmbeddedNatsServer

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[EmbeddedNatsCluster]:
    cluster = EmbeddedNatsCluster(3)
    cluster.start()
    yield cluster
    cluster.stop()


def _drover(url: str, replicas: int, prefix: str, *, ha: bool = True) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": url},
            "engine": {"heartbeat_interval_s": 0.1},
            "reliability": {"output_replicas": replicas},
            "ha": {"replicas": replicas, "enabled": ha},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for index in range(3):
        # time_scale 2: each request streams for a few seconds, so faults land mid-stream.
        cluster.add_engine(MigratableSimEngine(f"{prefix}-{index}", num_blocks=512, max_model_len=1024, time_scale=2.0))
    return cluster


async def _submit(client: DroverClient, prefix: str, count: int) -> list[RequestStream]:
    return [
        await client.submit(
            f"{prefix} request {i}",
            sampling=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
            request_id=f"{prefix}-{i}",
        )
        for i in range(count)
    ]


async def _wait_streaming(streams: list[RequestStream], tokens: int = 5) -> None:
    """Read each stream until it has ``tokens`` tokens (the iterator resumes where it stopped)."""
    for stream in streams:
        async for _ in stream.events():
            if len(stream.result_data.token_ids) >= tokens:
                break


async def _check_exactly_once(streams: list[RequestStream]) -> None:
    for stream in streams:
        result = await asyncio.wait_for(stream.result(), 60)
        expected = [token_at(request_seed(0, stream.request_id or ""), p) for p in range(MAX_TOKENS)]
        assert result.token_ids == expected, f"{stream.request_id}: tokens missing, duplicated or out of order"
        assert result.done is not None and result.done.num_tokens == MAX_TOKENS


def _connected_port(bus: Bus) -> int:
    url = bus.nc.connected_url
    assert url is not None and url.port is not None
    return url.port


async def test_killing_one_cluster_node_loses_no_request_and_no_token(nats_cluster: EmbeddedNatsCluster) -> None:
    # HA off here: this test is about streams surviving a node loss. With HA on, a loaded machine can keep
    # the lease bucket unavailable for > 15 s after a node kill (the leader steps down and cannot re-take
    # the lease); a known gap, see docs/reliability.md.
    drover = await asyncio.to_thread(_drover, nats_cluster.url, 3, "nk", ha=False)
    try:
        async with DroverClient(nats_cluster.url, name="cluster-kill") as client:
            await client.wait_for_instances(3, timeout_s=20)
            for round_, (fault, victim_of) in enumerate([("kill", "control"), ("stop", "client"), ("kill", "engine")]):
                streams = await _submit(client, f"nk{round_}", 9)
                await _wait_streaming(streams)
                assert drover.control_bus is not None
                bus_of = {"control": drover.control_bus, "engine": next(iter(drover._buses.values()))}
                port = client.nc.connected_url.port if victim_of == "client" else _connected_port(bus_of[victim_of])
                victim = nats_cluster.client_ports.index(port)
                if fault == "kill":
                    await asyncio.to_thread(nats_cluster.kill_node, victim)
                else:
                    await asyncio.to_thread(nats_cluster.stop_node, victim)
                await _check_exactly_once(streams)
                # Submitted while the node is down: the survivors serve it.
                await _check_exactly_once(await _submit(client, f"nk{round_}-down", 3))
                await asyncio.to_thread(nats_cluster.start_node, victim)
                await asyncio.to_thread(nats_cluster.wait_jetstream_ready)
            status = await client.status()
            assert len(status.instances) == 3 and not status.requests
    finally:
        await asyncio.to_thread(drover.stop)


async def test_single_server_restart_on_the_same_url_is_survived_by_every_component() -> None:
    server = EmbeddedNatsServer()
    url = server.start()
    drover = await asyncio.to_thread(_drover, url, 1, "rs")
    try:
        async with DroverClient(url, name="restart") as client:
            await client.wait_for_instances(3, timeout_s=20)
            streams = await _submit(client, "rs-before", 6)
            await _wait_streaming(streams)
            assert await asyncio.to_thread(server.restart) == url
            await _check_exactly_once(streams)
            await _check_exactly_once(await _submit(client, "rs-after", 6))
            assert client.reconnects >= 1
            assert drover.control_bus is not None and drover.control_bus.reconnects >= 1
            assert all(bus.reconnects >= 1 for bus in drover._buses.values())
            status = await client.status()
            assert len(status.instances) == 3 and not status.requests
    finally:
        await asyncio.to_thread(drover.stop)
        server.stop()
