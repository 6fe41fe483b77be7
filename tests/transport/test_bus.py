"""The bus against a real nats-server: publish/subscribe across threads, request/reply, bad input."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import msgspec
import pytest

from transport.bus import Bus, BusOptions, Envelope
from transport.messages import (
    Accepted,
    Cancel,
    CancelAck,
    ErrorCode,
    ErrorReply,
    TokenChunk,
    decode,
)


@pytest.fixture
def bus(nats_url: str) -> Iterator[Bus]:
    b = Bus(BusOptions(url=nats_url, name="test-bus")).start()
    yield b
    b.stop()


def test_publish_from_another_thread_reaches_a_subscriber(bus: Bus) -> None:
    received: queue.Queue[Envelope] = queue.Queue()
    bus.subscribe("t.pubsub", received.put)
    chunk = TokenChunk(request_id="r", index=3, token_ids=[1, 2])
    threading.Thread(target=bus.publish, args=("t.pubsub", chunk), kwargs={"headers": {"x-a": "1"}}).start()
    envelope = received.get(timeout=5)
    assert envelope.message == chunk
    assert envelope.headers["x-a"] == "1"
    assert envelope.subject == "t.pubsub"


def test_request_reply(bus: Bus) -> None:
    async def answer(envelope: Envelope) -> None:
        assert isinstance(envelope.message, Cancel)
        await bus.apublish(envelope.reply, CancelAck(request_id=envelope.message.request_id))

    bus.subscribe("t.rr", answer)
    reply = bus.request("t.rr", Cancel(request_id="abc", cancel_token="t")).result(timeout=5)
    assert reply == CancelAck(request_id="abc")


def test_malformed_message_gets_an_error_reply_and_never_reaches_the_handler(bus: Bus) -> None:
    handled: list[Envelope] = []
    bus.subscribe("t.bad", handled.append)
    nc_reply = bus.run(bus.nc.request("t.bad", b"\x00garbage", timeout=5)).result(timeout=6)
    error = decode(nc_reply.data)
    assert isinstance(error, ErrorReply)
    assert error.code == ErrorCode.MALFORMED
    assert handled == []


def test_error_goes_to_reply_to_field_when_no_nats_reply(bus: Bus) -> None:
    inbox: queue.Queue[Envelope] = queue.Queue()
    bus.subscribe("t.client_inbox", inbox.put)
    bus.subscribe("t.submit_bad", lambda e: None)
    bad = msgspec.msgpack.encode({"kind": "submit", "v": 2, "reply_to": "t.client_inbox", "sampling": "x"})
    bus.publish_raw("t.submit_bad", bad)
    envelope = inbox.get(timeout=5)
    assert isinstance(envelope.message, ErrorReply)
    assert envelope.message.code == ErrorCode.MALFORMED


def test_a_failing_handler_does_not_stop_the_subscription(bus: Bus) -> None:
    seen: queue.Queue[int] = queue.Queue()

    def handler(envelope: Envelope) -> None:
        assert isinstance(envelope.message, Accepted)
        if envelope.message.prompt_tokens == 0:
            raise RuntimeError("boom")
        seen.put(envelope.message.prompt_tokens)

    bus.subscribe("t.fail", handler)
    bus.publish("t.fail", Accepted(request_id="a", cancel_token="t", prompt_tokens=0))
    bus.publish("t.fail", Accepted(request_id="b", cancel_token="t", prompt_tokens=7))
    assert seen.get(timeout=5) == 7


def test_a_clients_malformed_message_is_answered_only_in_its_own_inbox(bus: Bus) -> None:
    """Security (issue 13): a bad message on a client subject names a reply target outside the sender's inbox:
    the bus publishes nothing there (it would with the receiver's rights), and counts the refusal."""
    from transport import subjects

    foreign: queue.Queue[Envelope] = queue.Queue()
    own: queue.Queue[Envelope] = queue.Queue()
    bus.subscribe(subjects.client_inbox_prefix("bob") + ".x", foreign.put)
    bus.subscribe(subjects.client_inbox_prefix("mallory") + ".x", own.put)
    bus.subscribe(subjects.submit("mallory"), lambda e: None)
    for target in (subjects.client_inbox_prefix("bob") + ".x", subjects.client_inbox_prefix("mallory") + ".x"):
        bad = msgspec.msgpack.encode({"kind": "submit", "v": 3, "reply_to": target, "sampling": "x"})
        bus.publish_raw(subjects.submit("mallory"), bad)
    assert isinstance(own.get(timeout=5).message, ErrorReply)
    assert foreign.empty() and bus.refused_replies == 1
