"""The embedded 3-node NATS cluster (real nats-server processes): routes, clustered JetStream, and single
nodes stopped, killed and restarted on the same URL while a Bus connected to every URL keeps working."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import nats
import pytest

from transport import subjects
from transport.bus import Bus, BusOptions, Envelope
from transport.messages import ErrorCode, ErrorReply, encode
from transport.nats_cluster import EmbeddedNatsCluster
from transport.nats_server import EmbeddedNatsServer
from transport.output_stream import ensure_output_stream, read_subject


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(3) as c:
        yield c


def _wait(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_cluster_has_three_routed_nodes_and_a_replicated_output_stream(cluster: EmbeddedNatsCluster) -> None:
    assert len(cluster.urls) == 3 and cluster.url == ",".join(cluster.urls)

    async def check() -> None:
        nc = await nats.connect(cluster.urls[0])
        try:
            assert await ensure_output_stream(nc, max_age_s=60, max_bytes=1 << 20, replicas=3)
            info = await nc.jetstream().stream_info(subjects.OUTPUT_STREAM)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            # A message published on node 0 reaches a subscriber on node 2 (routes) and the stream.
            other = await nats.connect(cluster.urls[2])
            try:
                got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

                async def on_msg(msg: nats.aio.msg.Msg) -> None:
                    if not got.done():
                        got.set_result(msg.data)

                await other.subscribe("drover.v1.inbox.t.routes", cb=on_msg)
                await other.flush()
                await asyncio.sleep(0.2)  # interest travels over the routes
                await nc.publish("drover.v1.inbox.t.routes", b"hello")
                assert await asyncio.wait_for(got, 5) == b"hello"
                # The stream stores a core publish on its own (replicated) path: the live copy on node 2 can come
                # before the stream has it, so wait for it there (a read gives what the stream held when it began).
                stored: list[bytes] = []
                deadline = time.monotonic() + 15
                while not stored and time.monotonic() < deadline:
                    stored = await read_subject(other, "drover.v1.inbox.t.routes")
                assert stored == [b"hello"]
            finally:
                await other.close()
        finally:
            await nc.close()

    asyncio.run(check())


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_bus_on_every_url_survives_losing_its_node(cluster: EmbeddedNatsCluster, fault: str) -> None:
    bus = Bus(BusOptions(url=cluster.url, name="cluster-test")).start()
    received: list[str] = []
    try:
        bus.subscribe("drover.v1.inbox.t.survive", lambda env: received.append(getattr(env.message, "message", "")))
        port = bus.nc.connected_url.port if bus.nc.connected_url else None
        victim = cluster.client_ports.index(port)  # type: ignore[arg-type]
        (cluster.kill_node if fault == "kill" else cluster.stop_node)(victim)
        _wait(lambda: bus.reconnects >= 1 and bus.connected)
        assert bus.nc.connected_url is not None and bus.nc.connected_url.port != cluster.client_ports[victim]
        # The subscription came back with the connection: a message from another node arrives.
        survivor = next(i for i in range(3) if i != victim)

        async def publish() -> None:
            nc = await nats.connect(cluster.urls[survivor])
            await asyncio.sleep(0.2)
            await nc.publish(
                "drover.v1.inbox.t.survive",
                encode(ErrorReply(code=ErrorCode.INTERNAL, message=f"after {fault}")),
            )
            await nc.flush()
            await nc.close()

        asyncio.run(publish())
        _wait(lambda: f"after {fault}" in received)
    finally:
        bus.stop()
        cluster.start_node(victim)
        cluster.wait_jetstream_ready()
    assert all(node.is_running() for node in cluster.nodes)


def test_a_node_restarted_on_its_url_rejoins_and_the_stream_stays_replicated(cluster: EmbeddedNatsCluster) -> None:
    url = cluster.urls[1]
    assert cluster.restart_node(1, graceful=False) == url
    cluster.wait_jetstream_ready()

    async def check() -> None:
        nc = await nats.connect(url)
        try:
            deadline = time.monotonic() + 20
            peers: list[str | None] = []
            while True:
                try:
                    info = await nc.jetstream(timeout=2).stream_info(subjects.OUTPUT_STREAM)
                    assert info.cluster is not None and info.config.num_replicas == 3
                    peers = [info.cluster.leader] + [p.name for p in info.cluster.replicas or [] if p.current]
                    if len(set(peers)) == 3:
                        break
                except nats.errors.TimeoutError:
                    pass  # the node is still catching up with the meta group
                assert time.monotonic() < deadline, f"stream peers after restart: {peers}"
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    asyncio.run(check())


def test_single_server_restart_keeps_its_url_and_the_bus_resubscribes() -> None:
    server = EmbeddedNatsServer()
    url = server.start()
    bus = Bus(BusOptions(url=url, name="restart-test")).start()
    seen: list[Envelope] = []
    try:
        bus.subscribe("drover.v1.inbox.t.restart", seen.append)
        assert server.restart() == url
        _wait(lambda: bus.reconnects >= 1 and bus.connected)
        bus.publish("drover.v1.inbox.t.restart", ErrorReply(code=ErrorCode.INTERNAL, message="after restart"))
        _wait(lambda: len(seen) == 1)
    finally:
        bus.stop()
        server.stop()


def test_embedded_cluster_from_settings_gives_every_url_and_replicated_output() -> None:
    from control.apps.processes import embedded_nats_if_needed
    from control.settings import load_settings

    settings = load_settings(overrides={"nats": {"embedded_cluster_size": 3}})
    with embedded_nats_if_needed(settings) as running:
        assert running.nats.url is not None and len(running.nats.url.split(",")) == 3
        assert running.reliability.output_replicas == 3
        bus = Bus(BusOptions(url=running.nats.url, name="embedded-cluster")).start()
        try:
            assert bus.run(ensure_output_stream(bus.nc, max_age_s=60, max_bytes=1 << 20, replicas=3)).result(timeout=20)
        finally:
            bus.stop()
