"""One-off JetStream reads (``transport/js_read.py``) on a real nats-server: they leave no consumer behind and
read exactly what was stored."""

from __future__ import annotations

import uuid

import nats

from transport import subjects
from transport.kv_store import open_bucket, read_all
from transport.output_stream import ensure_output_stream, read_subject


async def test_reading_an_inbox_leaves_no_consumer_and_reads_every_message(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        assert await ensure_output_stream(nc, max_age_s=60, max_bytes=10**7)
        js = nc.jetstream()
        inbox = f"{subjects.INBOX_ROOT}.jsread.{uuid.uuid4().hex}"
        for i in range(520):  # more than one fetch batch
            await js.publish(inbox, str(i).encode())
        before = (await js.stream_info(subjects.OUTPUT_STREAM)).state.consumer_count
        for _ in range(3):
            assert await read_subject(nc, inbox) == [str(i).encode() for i in range(520)]
        # nats-py's pull_subscribe left one consumer per read until the server aged it out: a burst of
        # failovers or replays then hit the stream's consumer limit and every later read failed
        assert (await js.stream_info(subjects.OUTPUT_STREAM)).state.consumer_count == before
        assert await read_subject(nc, f"{inbox}.nothing") == []
    finally:
        await nc.close()


async def test_reading_a_bucket_gives_every_live_key_and_leaves_no_consumer(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    bucket = f"jsread_{uuid.uuid4().hex[:12]}"
    try:
        kv = await open_bucket(nc, bucket, memory=True)
        assert await read_all(nc, bucket) == {}
        for i in range(40):
            await kv.put(f"req.r{i}", f"v{i}".encode())
        await kv.put("req.r0", b"latest")  # the last value of a key
        await kv.delete("req.r1")  # a deleted key is left out
        await kv.purge("req.r2")
        expected = {f"req.r{i}": f"v{i}".encode() for i in range(3, 40)} | {"req.r0": b"latest"}
        for _ in range(3):
            assert await read_all(nc, bucket) == expected
        assert (await kv.status()).stream_info.state.consumer_count == 0
    finally:
        await nc.jetstream().delete_key_value(bucket)
        await nc.close()
