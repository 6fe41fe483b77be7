"""Live migration through the MigratorActor, over real NATS and real actors, on simulated engines
(modelled copy time; the vLLM tests in tests/engines and tests/integration/test_vllm_cluster.py move real KV)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.msg import Msg

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, DroverError, RequestResult, RequestStream
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from tests.integration.conftest import make_sim_cluster
from transport.messages import ErrorCode, ErrorReply, Message, RequestDone, decode


@pytest.fixture(scope="module")
def mig_cluster(nats_url: str) -> Iterator[InProcessCluster]:
    # Migration is operator-driven here: the policy loop stays off so tests control every move.
    cluster = make_sim_cluster(nats_url, 0)
    cluster.settings.policy.validate()
    for name, blocks in (("mig-a", 512), ("mig-b", 512), ("mig-small", 4)):
        cluster.add_engine(MigratableSimEngine(name, num_blocks=blocks, max_model_len=1024, time_scale=1.0))
    yield cluster
    cluster.stop()


@pytest.fixture
async def client(mig_cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(mig_cluster.url, name="mig-client").connect()
    await c.wait_for_instances(2, timeout_s=10)
    await c.policy({"migration_enabled": "false", "dispatch_policy": "freeness"})
    # mig-small only ever receives explicit migrations (a drained instance gets no dispatches): an empty
    # instance has infinite freeness, and this one is too small for the test requests.
    await c.drain("mig-small")
    yield c
    await c.close()


def expected_tokens(request_id: str, n: int) -> list[int]:
    seed = request_seed(0, request_id)
    return [token_at(seed, p) for p in range(n)]


async def wait_tokens(stream: RequestStream, count: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= count:
            return


async def where(client: DroverClient, request_id: str) -> str | None:
    status = await client.status()
    return next((r.instance_id for r in status.requests if r.request_id == request_id), None)


async def submit_on(client: DroverClient, request_id: str, instance: str, max_tokens: int) -> RequestStream:
    """Submit and move the request to ``instance`` if dispatch put it elsewhere (round robin)."""
    stream = await client.submit("x" * 100, max_tokens=max_tokens, request_id=request_id)
    await wait_tokens(stream, 2)
    current = await where(client, request_id)
    if current != instance:
        reply = await client.migrate(request_id, instance)
        assert reply.ok, reply.message
    return stream


async def free_blocks(client: DroverClient) -> dict[str, tuple[int, int]]:
    await asyncio.sleep(0.3)  # a heartbeat after the last change
    status = await client.status()
    return {i.info.instance_id: (i.load.num_free_blocks, i.load.num_total_blocks) for i in status.instances}


def assert_exact(result: RequestResult, request_id: str, max_tokens: int) -> None:
    assert result.done is not None
    assert result.token_ids == expected_tokens(request_id, max_tokens)
    assert result.done.num_tokens == max_tokens


async def test_migrated_request_gives_the_same_tokens_exactly_once(client: DroverClient) -> None:
    stream = await submit_on(client, "mig-1", "mig-a", 300)
    await wait_tokens(stream, 20)
    reply = await client.migrate("mig-1", "mig-b")
    assert reply.ok, reply.message
    assert reply.details["stages"] >= 1
    assert await where(client, "mig-1") == "mig-b"
    result = await stream.result()
    assert_exact(result, "mig-1", 300)
    assert result.done is not None and result.done.instances[-2:] == ["mig-a", "mig-b"]


async def test_back_and_forth(client: DroverClient) -> None:
    stream = await submit_on(client, "mig-2", "mig-a", 400)
    for destination in ("mig-b", "mig-a", "mig-b"):
        await wait_tokens(stream, len(stream.result_data.token_ids) + 10)
        reply = await client.migrate("mig-2", destination)
        assert reply.ok, reply.message
    result = await stream.result()
    assert_exact(result, "mig-2", 400)
    assert result.done is not None and result.done.instances[-4:] == ["mig-a", "mig-b", "mig-a", "mig-b"]


async def test_destination_without_room_aborts_and_the_request_goes_on(client: DroverClient) -> None:
    before = await free_blocks(client)
    stream = await submit_on(client, "mig-3", "mig-a", 200)
    await wait_tokens(stream, 10)
    reply = await client.migrate("mig-3", "mig-small")  # 4 blocks: the request needs more
    assert not reply.ok
    # the refusal names the destination's limit with its numbers (a sim engine has no staging pool)
    assert re.search(r"mig-small cannot reserve (\d+) blocks: \d+ KV blocks free, asked \1 more", reply.message)
    result = await stream.result()
    assert_exact(result, "mig-3", 200)
    assert await free_blocks(client) == before  # nothing leaked on either side


async def test_concurrent_migrations_all_complete(client: DroverClient) -> None:
    streams = {}
    for i, home in enumerate(("mig-a", "mig-b", "mig-a", "mig-b")):
        streams[f"mig-c{i}"] = (await submit_on(client, f"mig-c{i}", home, 150), home)
    replies = await asyncio.gather(
        *(client.migrate(rid, "mig-b" if home == "mig-a" else "mig-a") for rid, (_, home) in streams.items())
    )
    # The per-instance cap (1) refuses some; every request still completes exactly.
    assert any(r.ok for r in replies)
    for rid, (stream, _) in streams.items():
        assert_exact(await stream.result(), rid, 150)


async def test_drain_moves_everything_off(client: DroverClient) -> None:
    await client.policy({"migration_enabled": "true"})
    try:
        streams = [await submit_on(client, f"mig-d{i}", "mig-a", 300) for i in range(3)]
        reply = await client.drain("mig-a")
        assert reply.ok
        for _ in range(200):
            status = await client.status()
            state = next(i.state for i in status.instances if i.info.instance_id == "mig-a")
            if state == "drained":
                break
            await asyncio.sleep(0.05)
        assert state == "drained"
        for i, stream in enumerate(streams):
            result = await stream.result()
            assert_exact(result, f"mig-d{i}", 300)
            assert result.done is not None and result.done.instances[-1] != "mig-a"
        new = await client.generate("after drain", max_tokens=3)
        assert new.done is not None and new.done.instances == ["mig-b"]
    finally:
        await client.policy({"migration_enabled": "false"})
        await client.drain("mig-a", undo=True)


async def test_bad_migrate_and_drain_commands(client: DroverClient) -> None:
    with pytest.raises(DroverError) as unknown:
        await client.migrate("no-such-request", "mig-b")
    assert unknown.value.code == ErrorCode.UNKNOWN_REQUEST
    with pytest.raises(DroverError) as bad_instance:
        await client.drain("no-such-instance")
    assert bad_instance.value.code == ErrorCode.UNKNOWN_INSTANCE
    stream = await submit_on(client, "mig-e", "mig-b", 50)
    with pytest.raises(DroverError) as same:
        await client.migrate("mig-e", "mig-b")
    assert same.value.code == ErrorCode.MIGRATION_FAILED
    assert_exact(await stream.result(), "mig-e", 50)


@pytest.mark.parametrize("stage", ["before_reserve", "mid_copy", "stop_and_copy", "commit"])
async def test_abort_injected_at_each_stage_runs_the_request_once_and_leaks_no_blocks(
    client: DroverClient, mig_cluster: InProcessCluster, stage: str
) -> None:
    before = await free_blocks(client)
    request_id = f"mig-f-{stage}"
    stream = await submit_on(client, request_id, "mig-a", 300)
    assert stream._subscription is not None
    seen: list[Message] = []  # what the client's inbox received, as a second subscriber sees it

    async def tap(msg: Msg) -> None:
        seen.append(decode(msg.data))

    tap_nc = await nats.connect(mig_cluster.url)
    try:
        await tap_nc.subscribe(stream._subscription.subject, cb=tap)
        await wait_tokens(stream, len(stream.result_data.token_ids) + 10)
        # The migrator reads its settings object at each step: the fault hook applies from now on.
        mig_cluster.settings.migration.fault_stage = stage
        try:
            reply = await client.migrate(request_id, "mig-b")
        finally:
            mig_cluster.settings.migration.fault_stage = ""
        if stage == "commit":  # resumed at the destination: a lost commit must not undo that
            assert reply.ok, reply.message
            assert await where(client, request_id) == "mig-b"
        else:
            assert not reply.ok and f"injected fault at {stage}" in reply.message
            assert await where(client, request_id) == "mig-a"
        result = await stream.result()
        assert_exact(result, request_id, 300)  # every token once, in order
        await asyncio.sleep(0.3)  # anything sent late arrives now
        assert sum(isinstance(m, RequestDone) for m in seen) == 1  # it ran exactly once
        assert not [m for m in seen if isinstance(m, ErrorReply)]
        assert await free_blocks(client) == before  # no block leaked on either side
    finally:
        await tap_nc.drain()
