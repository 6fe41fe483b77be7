"""Submit -> stream -> done over a real nats-server, real actors and simulated engines."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from actors.local_cluster import InProcessCluster
from actors.supervisor import GetStatus
from control.client import DroverClient, DroverError
from transport import subjects
from transport.messages import ErrorCode, ErrorReply, RequestDone, SubmitRequest, decode, encode


@pytest.fixture
async def client(sim_cluster: InProcessCluster) -> DroverClient:
    c = await DroverClient(sim_cluster.url, name="test-client").connect()
    await c.wait_for_instances(2, timeout_s=10)
    yield c  # type: ignore[misc]
    await c.close()


async def test_submit_streams_every_token_in_order_then_done(client: DroverClient) -> None:
    result = await client.generate("hello drover", max_tokens=12)
    assert result.accepted is not None
    assert len(result.token_ids) == 12
    assert result.done is not None
    assert result.done.finish_reason == "length"
    assert result.done.num_tokens == 12
    assert result.done.usage.prompt_tokens == len("hello drover") + 1  # bytes + BOS
    assert len(result.done.instances) == 1
    assert result.text == bytes(t - 3 for t in result.token_ids).decode("utf-8", errors="replace") or result.text


async def test_two_instances_are_both_used(client: DroverClient) -> None:
    # Long enough (about a second each) that every request is still running when the next is placed, even on a
    # loaded machine: 4-token requests could each end before the next arrived, and all land on one instance.
    results = await asyncio.gather(*(client.generate(f"prompt {i}", max_tokens=100) for i in range(8)))
    served = {r.done.instances[0] for r in results if r.done}
    assert served == {"sim-0", "sim-1"}


async def test_cancel_mid_stream(client: DroverClient) -> None:
    stream = await client.submit("a long one", max_tokens=1000)
    got = 0
    async for event in stream.events():
        got += len(event.token_ids)
        if got >= 3:
            await stream.cancel()
            break
    async for _ in stream.events():
        pass
    done = stream.result_data.done
    assert done is not None
    assert done.finish_reason == "abort"
    assert done.num_tokens < 1000


async def _raw_request(client: DroverClient, subject: str, data: bytes) -> object:
    reply = await client.nc.request(subject, data, timeout=5)
    return decode(reply.data)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x93garbage", ErrorCode.MALFORMED),
        (msgspec.msgpack.encode({"kind": "warp_drive", "v": 1}), ErrorCode.UNKNOWN_KIND),
        (msgspec.msgpack.encode({"kind": "submit", "v": 2, "prompt": "no reply_to field"}), ErrorCode.MALFORMED),
        (msgspec.msgpack.encode({"kind": "submit", "v": 7, "reply_to": "x"}), ErrorCode.UNSUPPORTED_VERSION),
    ],
)
async def test_bad_submissions_get_error_replies(client: DroverClient, data: bytes, code: ErrorCode) -> None:
    reply = await _raw_request(client, subjects.SUBMIT, data)
    assert isinstance(reply, ErrorReply)
    assert reply.code == code


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"prompt": "x" * 5000}, ErrorCode.PROMPT_TOO_LONG),
        ({"prompt": ""}, ErrorCode.INVALID_REQUEST),
        ({"prompt": "ok", "max_tokens": 0}, ErrorCode.INVALID_REQUEST),
        ({"prompt": "ok", "temperature": -1.0}, ErrorCode.INVALID_REQUEST),
        ({"prompt": "ok", "request_id": "has.dots"}, ErrorCode.INVALID_REQUEST),
        ({"prompt_token_ids": [], "prompt": None}, ErrorCode.INVALID_REQUEST),
    ],
)
async def test_invalid_requests_are_refused_with_a_clear_code(
    client: DroverClient, kwargs: dict, code: ErrorCode
) -> None:
    stream = await client.submit(**kwargs)
    with pytest.raises(DroverError) as info:
        await stream.result()
    assert info.value.code == code


async def test_wrong_message_kind_on_submit_subject(client: DroverClient) -> None:
    reply = await _raw_request(
        client,
        subjects.SUBMIT,
        encode(RequestDone(request_id="x", finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1})),
    )  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.INVALID_REQUEST


async def test_cancel_of_unknown_id_or_wrong_token(client: DroverClient) -> None:
    with pytest.raises(DroverError) as info:
        await client.cancel("no-such-request", "token")
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    stream = await client.submit("guarded", max_tokens=500)
    accepted = await stream.accepted
    with pytest.raises(DroverError) as wrong:
        await client.cancel(accepted.request_id, "not-the-token")
    assert wrong.value.code == ErrorCode.UNKNOWN_REQUEST
    assert str(wrong.value).replace(accepted.request_id, "ID") == str(info.value).replace("no-such-request", "ID")
    await stream.cancel()
    await stream.result()


async def test_bad_input_does_not_disturb_concurrent_requests(client: DroverClient) -> None:
    good = [await client.submit(f"good {i}", max_tokens=20) for i in range(4)]
    for i in range(50):
        await client.nc.publish(subjects.SUBMIT, bytes([i % 256]) * (i + 1))
        await client.nc.publish(subjects.CANCEL, b"\xff" * i)
        await client.nc.publish(subjects.heartbeat("bogus"), b"\x00")
    results = [await s.result() for s in good]
    assert all(len(r.token_ids) == 20 for r in results)


async def test_retry_with_same_request_id_is_deduplicated(client: DroverClient) -> None:
    inbox = client.nc.new_inbox()
    sub = await client.nc.subscribe(inbox)
    submit = SubmitRequest(reply_to=inbox, request_id="dedup-1", prompt="once", sampling={"max_tokens": 5})  # type: ignore[arg-type]
    await client.nc.publish(subjects.SUBMIT, encode(submit))
    await client.nc.publish(subjects.SUBMIT, encode(submit))
    kinds: list[str] = []
    tokens: list[int] = []
    while "done" not in kinds:
        msg = await sub.next_msg(timeout=5)
        message = decode(msg.data)
        kinds.append(type(message).__name__.lower().replace("requestdone", "done"))
        if hasattr(message, "token_ids"):
            tokens.extend(message.token_ids)  # type: ignore[union-attr]
    await sub.unsubscribe()
    assert kinds.count("accepted") == 2  # both attempts acknowledged ...
    assert len(tokens) == 5  # ... but the request ran once


async def test_scheduler_restarted_by_supervisor_keeps_serving(
    client: DroverClient, sim_cluster: InProcessCluster
) -> None:
    control = sim_cluster.control
    assert control is not None and control.scheduler is not None and control.supervisor is not None
    old = control.scheduler.ref
    assert old is not None
    old.stop()  # the actor dies (as after a crash)
    for _ in range(100):
        if control.scheduler.ref is not None and control.scheduler.ref is not old and control.scheduler.alive:
            break
        await asyncio.sleep(0.05)
    assert control.scheduler.alive and control.scheduler.ref is not old
    expected = {"scheduler": "running", "migrator": "running", "autoscaler": "running"}
    assert control.supervisor.ask(GetStatus()) == expected
    await client.wait_for_instances(2, timeout_s=10)  # the new scheduler relearns instances from heartbeats
    result = await client.generate("after restart", max_tokens=6)
    assert len(result.token_ids) == 6


async def test_one_trace_across_client_scheduler_and_engine(client: DroverClient, span_exporter) -> None:  # type: ignore[no-untyped-def]
    span_exporter.clear()
    result = await client.generate("traced", max_tokens=3)
    assert result.done is not None
    for _ in range(50):
        names = {s.name for s in span_exporter.get_finished_spans()}
        if {"drover.submit", "drover.dispatch", "drover.engine.request"} <= names:
            break
        await asyncio.sleep(0.05)
    spans_by_name = {s.name: s for s in span_exporter.get_finished_spans()}
    trace_ids = {
        spans_by_name[n].context.trace_id for n in ("drover.submit", "drover.dispatch", "drover.engine.request")
    }
    assert len(trace_ids) == 1


async def test_no_responders_without_control_plane(nats_url: str) -> None:
    # Sanity of the test setup: a subject nobody serves answers at once, it does not hang.
    nc = await nats.connect(nats_url)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("drover.v1.nobody", b"", timeout=2)
    await nc.close()
