"""The leader lease on a real nats-server's JetStream KV: one holder at a time, release hands over at once,
a lease nobody renews is taken over (by revision, no clock comparison), and a deposed leader notices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest

from actors.leadership import LEASE_KEY, Leadership, LeaseRecord
from transport.kv_store import KvWriter, delete_bucket, kv_key, open_bucket, read_all


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def _pair(nc: nats.NATS, ttl_s: float = 1.0) -> tuple[Leadership, Leadership, str]:
    bucket = f"lease_test_{uuid.uuid4().hex[:8]}"
    one = Leadership(nc, bucket, ttl_s=ttl_s, renew_period_s=ttl_s / 4, holder="one")
    two = Leadership(nc, bucket, ttl_s=ttl_s, renew_period_s=ttl_s / 4, holder="two")
    await one.open()
    await two.open()
    return one, two, bucket


def _record(holder: str) -> bytes:
    return msgspec.msgpack.encode(LeaseRecord(holder=holder, host="h", pid=1, acquired_at=0.0, renewed_at=0.0))


async def test_one_holder_and_release_hands_over(nc: nats.NATS) -> None:
    one, two, bucket = await _pair(nc)
    try:
        assert await one.try_acquire()
        assert not await two.try_acquire()
        assert await one.renew()
        assert not await two.try_acquire()
        assert one.is_leader() and not two.is_leader()
        await one.stop(release=True)
        assert not one.is_leader()
        assert await two.try_acquire()
    finally:
        await delete_bucket(nc, bucket)


async def test_unrenewed_lease_is_taken_over_and_the_old_leader_notices(nc: nats.NATS) -> None:
    one, two, bucket = await _pair(nc, ttl_s=1.0)
    try:
        assert await one.try_acquire()
        # `one` stops renewing (hung or dead). `two` takes over once the revision has not moved for the TTL
        # (or the bucket's TTL removed the key); never before `one`'s own view of its lease has lapsed.
        took_over = False
        for _ in range(60):
            if await two.try_acquire():
                took_over = True
                break
            await asyncio.sleep(0.1)
        assert took_over
        assert not one.is_leader()  # its lease lapsed on its own clock before the takeover
        assert not await one.renew()  # the revision moved: deposed
        assert one.revision == 0
    finally:
        await delete_bucket(nc, bucket)


async def test_renewal_keeps_the_lease(nc: nats.NATS) -> None:
    one, two, bucket = await _pair(nc, ttl_s=1.0)
    try:
        assert await one.try_acquire()
        for _ in range(12):  # three TTLs of renewals
            await asyncio.sleep(0.25)
            assert await one.renew()
            assert not await two.try_acquire()
        assert one.is_leader()
    finally:
        await delete_bucket(nc, bucket)


async def test_a_renewal_applied_though_reported_failed_keeps_the_lease(nc: nats.NATS) -> None:
    """A renewal whose reply was lost (a timeout on a starved loop) moved the key under the leader's own name:
    the next renewal must keep the lease, not take it for another control plane's (CI: a lone control plane
    stepped down and stood by, and status and drain went unanswered)."""
    one, two, bucket = await _pair(nc)
    try:
        assert await one.try_acquire()
        assert one.kv is not None
        applied = await one.kv.update(LEASE_KEY, _record("one"), last=one.revision)  # the "lost" renewal
        assert applied != one.revision
        assert await one.renew()
        assert one.is_leader() and one.revision > applied
        # another holder's write is still a lost lease
        assert two.kv is not None
        await two.kv.update(LEASE_KEY, _record("two"), last=one.revision)
        assert not await one.renew()
        assert not one.is_leader()
    finally:
        await delete_bucket(nc, bucket)


async def test_writer_orders_coalesces_and_fences(nc: nats.NATS) -> None:
    bucket = f"state_test_{uuid.uuid4().hex[:8]}"
    kv = await open_bucket(nc, bucket, memory=True)
    leading = True
    writer = KvWriter(
        asyncio.get_running_loop(), kv, nc=nc, bucket=bucket, fence=lambda: leading, retry_s=0.05, give_up_s=0.5
    )
    writer.start()
    try:
        done = asyncio.Event()
        for i in range(50):
            writer.put(kv_key("req", "a"), str(i).encode())
        writer.put(kv_key("req", "weird id:1"), b"x")
        writer.put(kv_key("req", "gone"), b"y")
        writer.delete(kv_key("req", "gone"))
        writer.then(done.set)
        await asyncio.wait_for(done.wait(), 10)
        values = await read_all(nc, bucket)
        assert values == {"req.a": b"49", kv_key("req", "weird id:1"): b"x"}
        assert writer.writes < 50  # coalesced
        leading = False
        writer.put(kv_key("req", "late"), b"z")
        fenced = asyncio.Event()
        writer.then(fenced.set)
        await asyncio.wait_for(fenced.wait(), 10)
        assert "req.late" not in await read_all(nc, bucket)  # not the leader: held, then dropped
        leading = True
        writer.put(kv_key("req", "held"), b"h")
        leading = False
        held = asyncio.Event()
        writer.then(held.set)
        await asyncio.sleep(0.2)
        leading = True  # a late renewal: the held write goes through
        await asyncio.wait_for(held.wait(), 10)
        assert (await read_all(nc, bucket))["req.held"] == b"h"
    finally:
        await writer.stop()
        await delete_bucket(nc, bucket)


async def test_writer_compacts_delete_markers(nc: nats.NATS) -> None:
    bucket = f"state_compact_{uuid.uuid4().hex[:8]}"
    kv = await open_bucket(nc, bucket, memory=True)
    writer = KvWriter(asyncio.get_running_loop(), kv, nc=nc, bucket=bucket, compact_period_s=0.3)
    writer.start()
    try:
        for i in range(5):
            writer.put(kv_key("req", f"r{i}"), b"x")
            writer.delete(kv_key("req", f"r{i}"))
        writer.put(kv_key("req", "live"), b"y")
        messages = -1
        for _ in range(50):  # markers older than a period go at the next compaction
            await asyncio.sleep(0.1)
            messages = (await nc.jetstream().stream_info(f"KV_{bucket}")).state.messages
            if messages == 1:
                break
        assert messages == 1  # only the live key is left
        assert await read_all(nc, bucket) == {"req.live": b"y"}
        await writer.stop()
        # each compaction's read deleted its consumer (a KV watch's outlived it)
        assert (await nc.jetstream().stream_info(f"KV_{bucket}")).state.consumer_count == 0
    finally:
        await writer.stop()
        await delete_bucket(nc, bucket)
