"""Request lifecycle on a real nats-server with sim engines: client resume, deadlines, clients that go away,
admission limits, slow consumers, the bounded request table, and protocol-version negotiation."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, DroverError
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    EngineInfo,
    ErrorCode,
    ErrorReply,
    InstanceHeartbeat,
    InstanceLoad,
    SamplingParams,
    decode,
    encode,
)


def _cluster(nats_url: str, engines: int = 2, time_scale: float = 1.0, **sections: dict[str, Any]) -> InProcessCluster:
    overrides: dict[str, dict[str, Any]] = {
        "nats": {"url": nats_url},
        "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
        "policy": {"migration_enabled": False},
        "lifecycle": {"probe_period_s": 0.1, "probe_timeout_s": 0.5, "client_gone_after_s": 0.5},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    cluster = InProcessCluster(settings=load_settings(overrides=overrides), tokenizer=ByteTokenizer())
    cluster.start_control()
    for index in range(engines):
        cluster.add_engine(
            MigratableSimEngine(f"lc-{index}", num_blocks=256, max_model_len=2048, time_scale=time_scale)
        )
    return cluster


async def _start(nats_url: str, engines: int = 2, **kwargs: Any) -> InProcessCluster:
    return await asyncio.to_thread(_cluster, nats_url, engines, **kwargs)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def _all_idle(client: DroverClient) -> bool:
    """No request in the table and every instance's blocks free again."""
    status = await client.status()
    return not status.requests and all(
        i.load.num_free_blocks == i.load.num_total_blocks and i.load.num_running == 0 for i in status.instances
    )


def _expected(request_id: str, n: int) -> list[int]:
    seed = request_seed(0, request_id)
    return [token_at(seed, p) for p in range(n)]


def _long(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


# ------------------------------------------------------------------------------------------- client resume
async def test_resume_after_the_client_restarts_delivers_each_token_once(nats_url: str) -> None:
    cluster = await _start(nats_url)
    try:
        async with DroverClient(cluster.url, name="resumer") as first:
            await first.wait_for_instances(2, timeout_s=10)
            stream = await first.submit("resume me", sampling=_long(120), request_id="rs-1")
            async for _ in stream.events():
                if len(stream.result_data.token_ids) >= 10:
                    break
            accepted = await stream.accepted
            inbox, seen, resume_from = stream.inbox, list(stream.result_data.token_ids), stream.next_index
        # the first connection is gone; a new one picks the request up where the caller stopped
        async with DroverClient(cluster.url, name="resumer") as second:
            resumed = await second.resume("rs-1", inbox, resume_from=resume_from, cancel_token=accepted.cancel_token)
            result = await resumed.result()
        assert seen + result.token_ids == _expected("rs-1", 120)
        assert result.done is not None and result.done.num_tokens == 120
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_resume_of_a_finished_request_reads_the_output_stream(nats_url: str) -> None:
    cluster = await _start(nats_url, time_scale=0.0)
    try:
        async with DroverClient(cluster.url, name="late-reader") as client:
            await client.wait_for_instances(2, timeout_s=10)
            stream = await client.submit("done already", sampling=_long(40), request_id="rs-2")
            full = await stream.result()
            assert full.token_ids == _expected("rs-2", 40)
            for start in (0, 17, 40):
                again = await (await client.resume("rs-2", stream.inbox, resume_from=start)).result()
                assert again.token_ids == _expected("rs-2", 40)[start:]
                assert again.done is not None and again.done.finish_reason == "length"
    finally:
        await asyncio.to_thread(cluster.stop)


# ------------------------------------------------------------------------------------------- deadlines
async def test_deadline_stops_a_running_request_and_frees_its_blocks(nats_url: str) -> None:
    cluster = await _start(nats_url)
    try:
        async with DroverClient(cluster.url, name="hasty") as client:
            await client.wait_for_instances(2, timeout_s=10)
            stream = await client.submit("slow", sampling=_long(1900), deadline_s=0.5, request_id="dl-1")
            with pytest.raises(DroverError) as info:
                await stream.result()
            assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
            got = stream.result_data.token_ids
            assert len(got) < 1900 and got == _expected("dl-1", len(got))  # in order up to the stop
            await _eventually(lambda: _all_idle(client))
            # others are unaffected
            ok = await client.generate("fine", max_tokens=8)
            assert ok.done is not None and len(ok.token_ids) == 8
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_deadline_of_a_queued_request(nats_url: str) -> None:
    cluster = await _start(nats_url, engines=0)  # nothing can run it: it waits in the queue
    try:
        async with DroverClient(cluster.url, name="queued") as client:
            stream = await client.submit("never runs", max_tokens=4, deadline_s=0.3)
            with pytest.raises(DroverError) as info:
                await stream.result()
            assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
            assert (await client.status()).requests == []
            with pytest.raises(DroverError) as bad:
                await (await client.submit("x", max_tokens=4, deadline_s=-1.0)).result()
            assert bad.value.code == ErrorCode.INVALID_REQUEST
    finally:
        await asyncio.to_thread(cluster.stop)


# ------------------------------------------------------------------------------------------- clients that go away
async def test_a_client_that_stops_answering_probes_loses_its_request(nats_url: str) -> None:
    cluster = await _start(nats_url)
    try:
        async with DroverClient(cluster.url, name="observer") as client:
            await client.wait_for_instances(2, timeout_s=10)
            nc = client.nc
            inbox = subjects.client_inbox_prefix("raw-gone") + ".r1"
            sub = await nc.subscribe(inbox)

            async def answer(msg: Any) -> None:
                await nc.publish(msg.reply, b"")

            alive = await nc.subscribe(subjects.alive(inbox), cb=answer)
            raw = {
                "kind": "submit",
                "v": 2,
                "reply_to": inbox,
                "request_id": "gone-1",
                "prompt": "walk away",
                "sampling": {"max_tokens": 1900, "ignore_eos": True},
                "liveness": True,
            }
            await nc.publish(subjects.SUBMIT, msgspec.msgpack.encode(raw))
            chunks = 0
            while chunks < 5:  # probes are answered meanwhile: the request keeps running
                if type(decode((await sub.next_msg(timeout=10)).data)).__name__ == "TokenChunk":
                    chunks += 1
            await alive.unsubscribe()  # the client is gone (its inbox is still read, to see the end)
            while True:
                message = decode((await sub.next_msg(timeout=10)).data)
                if isinstance(message, ErrorReply):
                    break
                assert type(message).__name__ == "TokenChunk"
            assert message.code == ErrorCode.CLIENT_GONE and message.request_id == "gone-1"
            await sub.unsubscribe()
            await _eventually(lambda: _all_idle(client))
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_closed_client_connection_stops_its_requests(nats_url: str) -> None:
    cluster = await _start(nats_url)
    try:
        async with DroverClient(cluster.url, name="watcher") as watcher:
            await watcher.wait_for_instances(2, timeout_s=10)
            leaver = await DroverClient(cluster.url, name="leaver").connect()
            streams = [await leaver.submit(f"bye {i}", sampling=_long(1900)) for i in range(3)]
            for stream in streams:
                await stream.accepted
            await _eventually(lambda: _running(watcher, 3))
            await leaver.nc.close()  # no drain, no cancel: the process just went away
            await _eventually(lambda: _all_idle(watcher))
            stays = await watcher.submit("I stay", sampling=_long(30))  # a present client is never cut off
            assert len((await stays.result()).token_ids) == 30
    finally:
        await asyncio.to_thread(cluster.stop)


async def _running(client: DroverClient, n: int) -> bool:
    return sum(1 for r in (await client.status()).requests if r.state == "running") >= n


# ------------------------------------------------------------------------------------------- admission
async def test_admission_limits_refuse_at_once(nats_url: str) -> None:
    limits = {
        "max_in_flight_per_client": 2,
        "max_queued_interactive": 3,
        "max_queued_batch": 3,
        "max_in_flight_requests": 4,
        "max_new_tokens": 100,
    }
    cluster = await _start(nats_url, engines=0, limits=limits)  # no engine: every admitted request queues
    try:
        async with (
            DroverClient(cluster.url, name="ca") as a,
            DroverClient(cluster.url, name="cb") as b,
            DroverClient(cluster.url, name="cc") as c,
        ):

            async def outcome(client: DroverClient, **kwargs: Any) -> str:
                stream = await client.submit("q", max_tokens=4, **kwargs)
                done, pending = await asyncio.wait(
                    [asyncio.ensure_future(asyncio.shield(stream.accepted)), asyncio.ensure_future(stream.result())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for waiter in pending:  # a queued request never ends here: stop waiting for it
                    waiter.cancel()
                try:
                    done.pop().result()
                except DroverError as exc:
                    assert exc.code == ErrorCode.OVERLOADED, exc
                    return "overloaded"
                return "queued"

            assert await outcome(a) == "queued"
            assert await outcome(a) == "queued"
            assert await outcome(a) == "overloaded"  # a's share: 2 in flight
            assert await outcome(b) == "queued"  # interactive queue now 3
            assert await outcome(b) == "overloaded"  # interactive queue full
            assert await outcome(b, request_class="batch") == "queued"  # the batch queue is separate
            assert await outcome(c, request_class="batch") == "overloaded"  # 4 in flight in all
            with pytest.raises(DroverError) as too_many:
                await (await c.submit("q", max_tokens=101)).result()
            assert too_many.value.code == ErrorCode.INVALID_REQUEST
            status = await a.status()
            assert status.queued == 4 and len(status.requests) == 4
    finally:
        await asyncio.to_thread(cluster.stop)


# ------------------------------------------------------------------------------------------- slow consumers
def _raw_socket_subscriber(url: str, inbox: str, submits: list[bytes]) -> socket.socket:
    """A NATS client that subscribes and submits, then never reads its socket again (the worst consumer)."""
    host, port = url.removeprefix("nats://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.recv(4096)  # INFO
    frames = [b'CONNECT {"verbose":false,"pedantic":false}\r\n', f"SUB {inbox} 1\r\n".encode()]
    for data in submits:
        frames.append(f"PUB {subjects.SUBMIT} {len(data)}\r\n".encode() + data + b"\r\n")
    frames.append(b"PING\r\n")
    sock.sendall(b"".join(frames))
    return sock


async def test_a_slow_consumer_does_not_slow_engines_or_other_clients(nats_url: str) -> None:
    cluster = await _start(nats_url, time_scale=0.0)  # engines as fast as they go: the most pressure
    slow_errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        slow_errors.append(exc)

    slow = await nats.connect(nats_url, error_cb=on_error)
    sock: socket.socket | None = None
    try:
        async with DroverClient(cluster.url, name="normal") as client:
            await client.wait_for_instances(2, timeout_s=10)
            slow_inbox = subjects.client_inbox_prefix("slow") + ".never-read"
            await slow.subscribe(slow_inbox, pending_msgs_limit=8, pending_bytes_limit=4096)  # never drained
            for i in range(6):
                submit = {
                    "kind": "submit",
                    "v": 2,
                    "reply_to": slow_inbox,
                    "request_id": f"slow-{i}",
                    "prompt": "flood me",
                    "sampling": {"max_tokens": 1500, "ignore_eos": True},
                }
                await slow.publish(subjects.SUBMIT, msgspec.msgpack.encode(submit))
            socket_inbox = subjects.client_inbox_prefix("stuck") + ".sock"
            socket_submits = [
                msgspec.msgpack.encode(
                    {
                        "kind": "submit",
                        "v": 2,
                        "reply_to": socket_inbox,
                        "request_id": f"sock-{i}",
                        "prompt": "x" * 200,
                        "sampling": {"max_tokens": 1500, "ignore_eos": True},
                    }
                )
                for i in range(6)
            ]
            sock = await asyncio.to_thread(_raw_socket_subscriber, nats_url, socket_inbox, socket_submits)
            normal = [
                await client.submit(f"normal {i}", sampling=_long(200), request_id=f"normal-{i}") for i in range(8)
            ]
            results = await asyncio.gather(*(s.result() for s in normal))
            for i, result in enumerate(results):
                assert result.token_ids == _expected(f"normal-{i}", 200)
                assert result.done is not None and result.done.finish_reason == "length"
            # the slow consumers' requests ran to their end on the engines too: nothing waits on them
            await _eventually(lambda: _all_idle(client), timeout_s=60)
            assert any(isinstance(e, nats.errors.SlowConsumerError) for e in slow_errors)  # it really was slow
    finally:
        if sock is not None:
            sock.close()
        await slow.close()
        await asyncio.to_thread(cluster.stop)


# ------------------------------------------------------------------------------------------- bounded state
async def test_finished_requests_leave_the_table_and_are_forgotten_after_retention(nats_url: str) -> None:
    cluster = await _start(nats_url, time_scale=0.0, lifecycle={"finished_retention_s": 1.5, "finished_max_entries": 5})
    try:
        assert cluster.control is not None and cluster.control.scheduler is not None
        ref = cluster.control.scheduler.ref
        assert ref is not None
        async with DroverClient(cluster.url, name="bounded") as client:
            await client.wait_for_instances(2, timeout_s=10)
            await asyncio.gather(*(client.generate(f"b {i}", max_tokens=5, request_id=f"bt-{i}") for i in range(8)))
            table = await asyncio.to_thread(lambda: ref.proxy().requests.get(timeout=5))
            await _eventually(lambda: _true(len(table) == 0))
            assert len(table.finished) <= 5  # at most finished_max_entries ids remembered
            assert table.per_client == {}
            # a retry from the same inbox of a finished request does not run again (a new inbox may reuse an id)
            inbox = subjects.client_inbox_prefix("bounded") + ".retry"
            sub = await client.nc.subscribe(inbox)
            submit = msgspec.msgpack.encode(
                {
                    "kind": "submit",
                    "v": 2,
                    "reply_to": inbox,
                    "request_id": "bt-raw",
                    "prompt": "p",
                    "sampling": {"max_tokens": 3},
                }
            )

            async def send() -> list[str]:
                await client.nc.publish(subjects.SUBMIT, submit)
                kinds = [msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data)["kind"]]
                while kinds[-1] not in ("done", "error"):
                    kinds.append(msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data)["kind"])
                return kinds

            assert (await send())[-1] == "done"
            await _eventually(lambda: _true("bt-raw" in table.finished))
            assert await send() == ["error"]  # duplicate_request
            await _eventually(lambda: _true(len(table.finished) == 0))  # retention passed: forgotten
            assert (await send())[-1] == "done"
            await sub.unsubscribe()
    finally:
        await asyncio.to_thread(cluster.stop)


async def _true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------------------------------- versions
async def _collect(sub: Any, until: str) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    while not raw or raw[-1]["kind"] != until:
        raw.append(msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data))
        if raw[-1]["kind"] == "error":
            raise AssertionError(raw[-1])
    return raw


async def test_a_previous_version_client_gets_replies_at_its_version(nats_url: str) -> None:
    cluster = await _start(nats_url, time_scale=0.0)
    try:
        async with DroverClient(cluster.url, name="modern") as client:
            await client.wait_for_instances(2, timeout_s=10)
            inbox = subjects.client_inbox_prefix("old-client") + ".1"
            sub = await client.nc.subscribe(inbox)
            v1_submit = {
                "kind": "submit",
                "v": MIN_PROTOCOL_VERSION,
                "reply_to": inbox,
                "prompt": "from the past",
                "sampling": {"max_tokens": 6},
            }  # exactly what a client of the previous version sends (on its subject without an identity)
            await client.nc.publish(subjects.SUBMIT, msgspec.msgpack.encode(v1_submit))
            raw = await _collect(sub, "done")
            assert raw[0]["kind"] == "accepted"
            assert {m["v"] for m in raw} == {MIN_PROTOCOL_VERSION}
            assert sum(len(m["token_ids"]) for m in raw if m["kind"] == "chunk") == 6
            # bad input from such a client gets an error it can read
            await client.nc.publish(subjects.SUBMIT, msgspec.msgpack.encode({**v1_submit, "prompt": ""}))
            error = msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data)
            assert (
                error["kind"] == "error" and error["v"] == MIN_PROTOCOL_VERSION and error["code"] == "invalid_request"
            )
            await sub.unsubscribe()
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (
            {"kind": "submit", "v": PROTOCOL_VERSION + 1, "reply_to": "x", "prompt": "from the future"},
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        (
            {"kind": "submit", "v": MIN_PROTOCOL_VERSION - 1, "reply_to": "x", "prompt": "too old"},
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        ({"kind": "submit_future_batch", "v": PROTOCOL_VERSION + 1, "reply_to": "x"}, ErrorCode.UNSUPPORTED_VERSION),
        ({"kind": "warp_drive", "v": PROTOCOL_VERSION}, ErrorCode.UNKNOWN_KIND),
    ],
)
async def test_other_versions_on_the_bus_get_clear_errors(
    nats_url: str, message: dict[str, Any], code: ErrorCode
) -> None:
    cluster = await _start(nats_url, engines=0)
    try:
        async with DroverClient(cluster.url, name="versions") as client:
            reply = await client.nc.request(subjects.SUBMIT, msgspec.msgpack.encode(message), timeout=5)
            error = decode(reply.data)
            assert isinstance(error, ErrorReply) and error.code == code
            assert str(message["v"]) in error.message or code == ErrorCode.UNKNOWN_KIND
    finally:
        await asyncio.to_thread(cluster.stop)


def _heartbeat(instance_id: str, version: int, protocol: int | None) -> bytes:
    """A heartbeat as an engine of another version sends it (``protocol`` None: the field is absent, as in v1)."""
    beat = InstanceHeartbeat(
        info=EngineInfo(
            instance_id=instance_id,
            engine_kind="sim",
            model="drover-tiny",
            dtype="float16",
            block_size=32,
            num_blocks=64,
            max_model_len=1024,
        ),
        load=InstanceLoad(num_total_blocks=64, num_free_blocks=64, num_running=0, num_waiting=0),
        seq=1,
        sent_at=time.time(),
    )
    raw = msgspec.msgpack.decode(encode(beat))
    raw["v"] = version
    if protocol is None:
        raw["info"].pop("protocol_version", None)
    else:
        raw["info"]["protocol_version"] = protocol
    return msgspec.msgpack.encode(raw)


async def test_scheduler_talks_the_old_version_to_an_old_engine_and_skips_a_newer_one(nats_url: str) -> None:
    cluster = await _start(nats_url, engines=0)
    try:
        async with DroverClient(cluster.url, name="mixed") as client:
            nc = client.nc
            old_cmds = await nc.subscribe(subjects.engine("old-1"))
            new_cmds = await nc.subscribe(subjects.engine("future-1"))
            stop = asyncio.Event()

            async def beat() -> None:
                while not stop.is_set():
                    await nc.publish(
                        subjects.heartbeat("future-1"),
                        _heartbeat("future-1", MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1),
                    )
                    await nc.publish(
                        subjects.heartbeat("old-1"), _heartbeat("old-1", MIN_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION)
                    )
                    await asyncio.sleep(0.05)

            beater = asyncio.create_task(beat())
            try:
                status = await client.wait_for_instances(1, timeout_s=10)
                assert [i.info.instance_id for i in status.instances] == ["old-1"]  # future-1 never joins
                stream = await client.submit("via an old engine", max_tokens=3, request_id="mixed-1")
                add = msgspec.msgpack.decode((await old_cmds.next_msg(timeout=10)).data)
                assert (
                    add["kind"] == "engine_add" and add["v"] == MIN_PROTOCOL_VERSION and add["request_id"] == "mixed-1"
                )
                # play the old engine: chunks and done at its version, exactly as its code would send them
                reply_to = add["reply_to"]
                for index in range(3):
                    chunk = {
                        "kind": "chunk",
                        "v": MIN_PROTOCOL_VERSION,
                        "request_id": "mixed-1",
                        "index": index,
                        "token_ids": [70 + index],
                    }
                    await nc.publish(reply_to, msgspec.msgpack.encode(chunk))
                done = {
                    "kind": "done",
                    "v": MIN_PROTOCOL_VERSION,
                    "request_id": "mixed-1",
                    "finish_reason": "length",
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
                    "num_tokens": 3,
                }
                await nc.publish(reply_to, msgspec.msgpack.encode(done))
                ended = {
                    "kind": "engine_ended",
                    "v": MIN_PROTOCOL_VERSION,
                    "instance_id": "old-1",
                    "request_id": "mixed-1",
                    "finish_reason": "length",
                    "num_output_tokens": 3,
                }
                await nc.publish(subjects.ENGINE_EVENTS, msgspec.msgpack.encode(ended))
                result = await stream.result()
                assert result.token_ids == [70, 71, 72]
                await _eventually(lambda: _true_status_empty(client))
                with pytest.raises(nats.errors.TimeoutError):
                    await new_cmds.next_msg(timeout=0.2)  # nothing was ever sent to the incompatible engine
            finally:
                stop.set()
                await beater
    finally:
        await asyncio.to_thread(cluster.stop)


async def _true_status_empty(client: DroverClient) -> bool:
    return not (await client.status()).requests


# ------------------------------------------------------------------------------------------- client reconnect
class _CuttableProxy:
    """A TCP proxy in front of nats-server whose open connections can be cut (a network blip for the client
    only: the server and every other component stay up)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("nats://").split(":")
        self.target = (host, int(port))
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.url = ""
        self.refuse_until = 0.0  # loop time until which new connections are dropped (the link is down)

    async def start(self) -> _CuttableProxy:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if asyncio.get_running_loop().time() < self.refuse_until:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self, down_s: float = 0.0) -> None:
        self.refuse_until = asyncio.get_running_loop().time() + down_s
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_chunks_sent_while_the_client_reconnects_are_replayed(nats_url: str) -> None:
    cluster = await _start(nats_url, lifecycle={"client_gone_after_s": 10.0})
    proxy = await _CuttableProxy(nats_url).start()
    reconnects: list[float] = []

    async def on_reconnect() -> None:
        reconnects.append(time.monotonic())

    client = DroverClient(proxy.url, name="blinker")
    try:
        await client.connect(reconnect_time_wait=0.3, disconnected_cb=on_reconnect)
        await client.wait_for_instances(2, timeout_s=10)
        stream = await client.submit("through a blip", sampling=_long(600), request_id="blip-1")
        async for _ in stream.events():
            if len(stream.result_data.token_ids) >= 20:
                break
        before = len(stream.result_data.token_ids)
        proxy.cut(down_s=1.0)  # the engine keeps streaming; the client misses what is sent until it is back
        result = await stream.result()
        assert reconnects, "the connection was not cut"
        assert result.token_ids == _expected("blip-1", 600)  # nothing missing, nothing twice, in order
        assert result.done is not None and result.done.num_tokens == 600 and before < 600
    finally:
        await client.close()
        await proxy.stop()
        await asyncio.to_thread(cluster.stop)


async def test_an_engine_works_under_a_previous_version_control_plane(nats_url: str) -> None:
    """The test plays a control plane of the previous version (hand-built messages); the engine is this code's."""
    settings = load_settings(
        overrides={"nats": {"url": nats_url}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())  # engines only, no control plane
    await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("v2-engine", time_scale=0.0))
    nc = await nats.connect(nats_url)
    try:
        beats = await nc.subscribe(subjects.heartbeat("v2-engine"))
        beat = msgspec.msgpack.decode((await beats.next_msg(timeout=10)).data)
        assert beat["v"] == MIN_PROTOCOL_VERSION and beat["info"]["protocol_version"] == PROTOCOL_VERSION
        events = await nc.subscribe(subjects.ENGINE_EVENTS)
        inbox = subjects.client_inbox_prefix("v1-cp") + ".1"
        sub = await nc.subscribe(inbox)
        add = {
            "kind": "engine_add",
            "v": MIN_PROTOCOL_VERSION,
            "request_id": "v1-add",
            "prompt_token_ids": [1, 5, 6, 7],
            "sampling": {"max_tokens": 5},
            "reply_to": inbox,
        }
        reply = await nc.request(subjects.engine("v2-engine"), msgspec.msgpack.encode(add), timeout=10)
        assert msgspec.msgpack.decode(reply.data)["v"] == MIN_PROTOCOL_VERSION  # answered at the requester's version
        raw = await _collect(sub, "done")
        assert {m["v"] for m in raw} == {MIN_PROTOCOL_VERSION}
        assert [t for m in raw if m["kind"] == "chunk" for t in m["token_ids"]] == _expected("v1-add", 5)
        ended = msgspec.msgpack.decode((await events.next_msg(timeout=10)).data)
        assert (
            ended["kind"] == "engine_ended" and ended["v"] == MIN_PROTOCOL_VERSION and ended["request_id"] == "v1-add"
        )
    finally:
        await nc.close()
        await asyncio.to_thread(cluster.stop)
