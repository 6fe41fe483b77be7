"""Security, issue 13: a client acts only as itself. Each test attacks a real secured nats-server + sim-engine
cluster with the credentials a client gets, the way the issue's report did, and checks that nothing happens
on the client's behalf with the control plane's (or an engine's, or JetStream's) broader rights.

A "spy" user that may read and write every subject watches what the attacks would reach; the attacks
themselves use only alice's client credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.local_cluster import InProcessCluster
from actors.span_receiver import SpanBudget
from control.client import DroverClient, DroverError
from control.settings import NatsSettings, load_settings
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import (
    Accepted,
    Cancel,
    CancelAck,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    ReplayReply,
    ReplayRequest,
    RequestDone,
    SamplingParams,
    SpanBatch,
    StatusQuery,
    StatusReply,
    SubmitRequest,
    TokenChunk,
    Usage,
    decode,
    encode,
)
from transport.nats_auth import Permissions, Role, SecureBundle, UserSpec, connect_options, default_users, make_bundle
from transport.nats_server import EmbeddedNatsServer

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@dataclasses.dataclass(frozen=True)
class SpyUser(UserSpec):
    """A test-only user with every right: it watches where attacks would land."""

    @property
    def permissions(self) -> Permissions:
        return Permissions(publish=(">",), subscribe=(">",))


class Conn:
    """A raw nats-py connection recording the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, server: EmbeddedNatsServer, bundle: SecureBundle, user: str) -> Conn:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        spec = bundle.user(user)
        prefix = subjects.client_inbox_prefix(spec.client_id) if spec.client_id else None
        import nats

        self.nc = await nats.connect(
            server.url,
            error_cb=on_error,
            allow_reconnect=False,
            inbox_prefix=prefix or "_INBOX",
            **connect_options(bundle.auth[user]),
        )
        return self

    async def violation(self, fragment: str, timeout_s: float = 3.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if any("permissions violation" in e.lower() and fragment.lower() in e.lower() for e in self.errors):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {fragment!r}; errors: {self.errors}")

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


REPLY_KINDS = (Accepted, ErrorReply, CancelAck, StatusReply, ReplayReply, TokenChunk, RequestDone)


class Spy:
    """Records every Drover message published on the watched subjects."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.seen: list[tuple[str, Any]] = []

    async def watch(self, subject: str) -> None:
        async def record(msg: Any) -> None:
            with contextlib.suppress(ProtocolError):  # the cluster's own traffic there (lease renewals, API calls)
                message = decode(msg.data)
                if isinstance(message, REPLY_KINDS):  # what the control plane answers clients with
                    self.seen.append((msg.subject, message))

        await self.conn.nc.subscribe(subject, cb=record)
        await registered(self.conn.nc)


async def registered(nc: Any, timeout_s: float = 30.0) -> None:
    """Return once the server has every subscription ``nc`` made so far. Not ``nc.flush()``: nats-py (2.16)
    writes a flush's PING straight to the socket, ahead of SUBs still in its write buffer, so its PONG can come
    back before the server has them. A message this connection sends itself goes through that buffer behind
    them, and the server handles a connection's commands in order: when it comes back, they are in."""
    echo = nc.new_inbox()
    back = asyncio.Event()

    async def on_echo(msg: Any) -> None:
        back.set()

    sub = await nc.subscribe(echo, cb=on_echo)
    await nc.publish(echo, b"")
    await asyncio.wait_for(back.wait(), timeout_s)
    await sub.unsubscribe()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster]]:
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    directory = tmp_path_factory.mktemp("identity")
    users = [*default_users(clients=["alice", "bob"]), SpyUser("spy", Role.OPERATOR, client_id="spy")]
    bundle = make_bundle(directory / "auth", users)
    server = EmbeddedNatsServer(config_text=bundle.config_text)
    server.start()
    settings = load_settings(
        overrides={
            "nats": {"url": server.url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "observability": {"jsonl_path": str(directory / "traces.jsonl")},
            "limits": {"max_in_flight_per_client": 2},
        }
    )
    cluster = InProcessCluster(
        settings=settings,
        tokenizer=ByteTokenizer(),
        control_auth=bundle.auth["control"],
        engine_auth=bundle.auth["engine"],
        reply_auth=bundle.auth["control-reply"],
    )
    cluster.start_control()
    for index in range(2):
        cluster.add_engine(SimEngine(f"sim-{index}", time_scale=1.0, max_model_len=4096))  # type: ignore[arg-type]
    yield server, bundle, cluster
    cluster.stop()
    server.stop()


def client_settings(bundle: SecureBundle, user: str, url: str) -> NatsSettings:
    return NatsSettings(url=url, client_id=bundle.user(user).client_id, **dataclasses.asdict(bundle.auth[user]))


@pytest.fixture
async def alice(world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster]) -> AsyncIterator[DroverClient]:
    server, bundle, _ = world
    client = await DroverClient(
        server.url, name="alice", nats_settings=client_settings(bundle, "alice", server.url)
    ).connect()
    await client.wait_for_instances(2, timeout_s=15)
    yield client
    await client.close()


@pytest.fixture
async def raw(world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster]) -> AsyncIterator[Conn]:
    """alice's credentials on a bare connection: what an attacker with them can send."""
    server, bundle, _ = world
    conn = await Conn().open(server, bundle, "alice")
    yield conn
    await conn.close()


@pytest.fixture
async def spy(world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster]) -> AsyncIterator[Spy]:
    server, bundle, _ = world
    conn = await Conn().open(server, bundle, "spy")
    yield Spy(conn)
    await conn.close()


def foreign_targets(cluster: InProcessCluster) -> dict[str, str]:
    """Every JetStream stream, KV bucket and API subject Drover uses, engine subjects, another client's inbox."""
    ha = cluster.settings.ha
    out = subjects.OUTPUT_STREAM
    return {
        "purge-output": f"$JS.API.STREAM.PURGE.{out}",
        "delete-output": f"$JS.API.STREAM.DELETE.{out}",
        "purge-state": f"$JS.API.STREAM.PURGE.KV_{ha.state_bucket}",
        "purge-lease": f"$JS.API.STREAM.PURGE.KV_{ha.lease_bucket}",
        "consumer-create": f"$JS.API.CONSUMER.CREATE.{out}",
        "lease-key": f"$KV.{ha.lease_bucket}.leader",
        "state-key": f"$KV.{ha.state_bucket}.req.victim",
        "engine": subjects.engine("sim-0"),
        "engine-events": subjects.ENGINE_EVENTS,
        "heartbeat": subjects.heartbeat("sim-0"),
        "bobs-submit": subjects.submit("bob"),
        "bobs-inbox": subjects.client_inbox_prefix("bob") + ".victim",
        "control-inbox": "_INBOX.control",
    }


TARGET_NAMES = [
    "purge-output",
    "delete-output",
    "purge-state",
    "purge-lease",
    "consumer-create",
    "lease-key",
    "state-key",
    "engine",
    "engine-events",
    "heartbeat",
    "bobs-submit",
    "bobs-inbox",
    "control-inbox",
]


async def own_reply(conn: Conn, subject: str, data: bytes) -> Any:
    reply = await conn.nc.request(subject, data, timeout=5)
    return decode(reply.data)


# ------------------------------------------------------------------------------------------------ 1, 2, 3
@pytest.mark.parametrize("verb", ["submit", "cancel", "status"])
@pytest.mark.parametrize("name", TARGET_NAMES)
async def test_reply_targets_outside_the_senders_inbox_get_nothing(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], raw: Conn, spy: Spy, name: str, verb: str
) -> None:
    _, _, cluster = world
    assert cluster.control is not None
    target = foreign_targets(cluster)[name]
    await spy.watch(target)
    refused = cluster.control.replies.refused
    if verb == "submit":
        submit = SubmitRequest(reply_to=target, prompt="attack", sampling=SamplingParams(max_tokens=2))
        answer = await own_reply(raw, subjects.submit("alice"), encode(submit))
        assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.INVALID_REQUEST, answer
        assert "own inbox" in answer.message
    elif verb == "cancel":
        answer = await own_reply(
            raw, subjects.cancel("alice"), encode(Cancel(request_id="r", cancel_token="t", reply_to=target))
        )
        assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.INVALID_REQUEST, answer
    else:  # the status query's reply is the NATS reply subject itself: nobody to tell
        await raw.nc.publish(subjects.status("alice"), encode(StatusQuery()), reply=target)
        await raw.nc.flush()
    for _ in range(100):  # the refusal is counted before anything would be published
        if cluster.control.replies.refused > refused:
            break
        await asyncio.sleep(0.02)
    assert cluster.control.replies.refused > refused
    await asyncio.sleep(0.3)  # anything the control plane would have published there has arrived by now
    assert spy.seen == [], spy.seen


async def test_victims_stream_and_cancel_survive_an_attack(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], raw: Conn, alice: DroverClient
) -> None:
    """The issue's scenario: purge the state bucket via a reply, then the victim cancels with its token."""
    _, _, cluster = world
    stream = await alice.submit("the victim's request", max_tokens=2000)
    await stream.accepted
    for target in foreign_targets(cluster).values():
        submit = SubmitRequest(reply_to=target, prompt="attack", sampling=SamplingParams(max_tokens=2))
        await raw.nc.publish(subjects.submit("alice"), encode(submit))
    await raw.nc.flush()
    await stream.cancel()
    await stream.result()
    assert stream.result_data.done is not None and stream.result_data.done.finish_reason == "abort"
    assert cluster.control is not None and cluster.control.leading


async def test_control_plane_answers_over_a_user_that_reaches_only_client_inboxes(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster],
) -> None:
    server, bundle, cluster = world
    assert cluster.reply_bus is not None and cluster.control is not None
    assert cluster.control.replies.bus is cluster.reply_bus
    conn = await Conn().open(server, bundle, "control-reply")
    try:
        await conn.nc.publish(f"$JS.API.STREAM.PURGE.{subjects.OUTPUT_STREAM}", b"")
        await conn.violation("$JS.API.STREAM.PURGE")
        await conn.nc.publish(subjects.engine("sim-0"), b"")
        await conn.violation(subjects.engine("sim-0"))
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ 4: JetStream
async def test_client_creates_no_consumer_and_replays_only_its_own_inbox(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], raw: Conn, spy: Spy
) -> None:
    stream = subjects.OUTPUT_STREAM
    filt = subjects.client_inbox_prefix("alice") + ".>"
    push = {"stream_name": stream, "config": {"deliver_subject": subjects.engine("sim-0"), "filter_subject": filt}}
    api = f"$JS.API.CONSUMER.CREATE.{stream}.evil.{filt}"
    await raw.nc.publish(api, json.dumps(push).encode(), reply=subjects.client_inbox_prefix("alice") + ".api")
    await raw.violation(f"$JS.API.CONSUMER.CREATE.{stream}")
    await raw.nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.anyones", b"")
    await raw.violation(f"$JS.API.CONSUMER.DELETE.{stream}")
    # replay goes through the control plane, for alice's inboxes only
    answer = await own_reply(
        raw, subjects.replay("alice"), encode(ReplayRequest(inbox=subjects.client_inbox_prefix("bob") + ".x"))
    )
    assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.INVALID_REQUEST


# ------------------------------------------------------------------------------------------------ 5: spans
async def test_spans_only_from_engines_and_bounded(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], raw: Conn
) -> None:
    server, bundle, cluster = world
    assert cluster.control is not None
    path = Path(cluster.settings.observability.jsonl_path)
    forged = {"name": "forged-by-alice", "trace_id": "0" * 32, "span_id": "1" * 16, "attributes": {}}
    await raw.nc.publish(subjects.SPANS, encode(SpanBatch(spans=[forged])))
    await raw.violation(subjects.SPANS)
    cluster.control.span_budget = SpanBudget(spans_per_s=0.001, burst=100)  # a tight budget, no clock involved
    engine = await Conn().open(server, bundle, "engine")
    try:
        huge = {"name": "huge", "attributes": {"blob": "x" * 100_000}}
        await engine.nc.publish(subjects.SPANS, encode(SpanBatch(spans=[huge])))
        for batch in range(10):
            spans = [{"name": f"engine-span-{batch}-{i}", "attributes": {}} for i in range(50)]
            await engine.nc.publish(subjects.SPANS, encode(SpanBatch(spans=spans)))
        await engine.nc.flush()
    finally:
        await engine.close()
    budget = cluster.control.span_budget
    for _ in range(200):
        if sum(budget.dropped.values()) >= 401:
            break
        await asyncio.sleep(0.02)
    assert budget.dropped.get("size") == 1 and budget.dropped.get("rate", 0) >= 400
    text = path.read_text() if path.exists() else ""
    assert "forged-by-alice" not in text and '"huge"' not in text
    assert 0 < text.count("engine-span-") <= 100


# ------------------------------------------------------------------------------------------------ identity
async def test_a_claimed_client_id_is_not_an_identity(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], alice: DroverClient
) -> None:
    """max_in_flight_per_client is 2: alice claiming to be bob neither exhausts bob's share nor escapes hers."""
    server, bundle, _ = world
    streams = [await alice.submit("long", max_tokens=3000, client_id="bob") for _ in range(2)]
    for stream in streams:
        await stream.accepted
    try:
        with pytest.raises(DroverError) as escaped:
            await (await alice.submit("a fresh id", max_tokens=4, client_id="fresh-id")).accepted
        assert escaped.value.code == ErrorCode.OVERLOADED
        async with DroverClient(
            server.url, name="bob", nats_settings=client_settings(bundle, "bob", server.url)
        ) as bob:
            result = await bob.generate("bob's own", max_tokens=4)
            assert len(result.token_ids) == 4
    finally:
        for stream in streams:
            await stream.cancel()
            await stream.result()


# ------------------------------------------------------------------------------------------------ 6: bounds
async def test_oversized_lists_and_deep_nesting_are_malformed(raw: Conn) -> None:
    big = SubmitRequest(
        reply_to=subjects.client_inbox_prefix("alice") + ".big",
        prompt="x",
        sampling=SamplingParams(max_tokens=2, stop_token_ids=list(range(100_000))),
    )
    answer = await own_reply(raw, subjects.submit("alice"), msgspec.msgpack.encode(big))
    assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.MALFORMED, answer
    assert "stop_token_ids" in answer.message
    head = msgspec.msgpack.encode(
        {"kind": "submit", "v": 3, "reply_to": subjects.client_inbox_prefix("alice") + ".deep", "prompt": "x"}
    )
    deep = bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("extra") + b"\x81\xa1a" * 5000 + b"\x80"
    answer = await own_reply(raw, subjects.submit("alice"), deep)
    assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.MALFORMED, answer


# ------------------------------------------------------------------------------------------------ 7: client
async def test_client_delivers_only_its_requests_messages(alice: DroverClient, spy: Spy) -> None:
    # Far longer than the test needs (a sim engine in real time), and cancelled once the forged messages are in:
    # they must arrive while the stream is open, and on a starved host a short request could end first.
    stream = await alice.submit("mine", max_tokens=3500, request_id="mine-1")
    # The forged messages come over another connection: alice's inbox subscription must be on the server first,
    # or the server has nobody to give them to. The Accepted came to alice through that subscription, so it is.
    # (Not alice.nc.flush(): nats-py writes its PING ahead of the SUB still in alice's write buffer, and the
    # PONG can come back before the server has the SUB; on a starved host the forged messages then beat it.)
    await asyncio.wait_for(stream.accepted, 30)
    forged = [
        TokenChunk(request_id="someone-else", index=0, token_ids=[999_999] * 6),
        RequestDone(request_id="someone-else", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=0)),
    ]
    for message in forged:
        await spy.conn.nc.publish(stream.inbox, encode(message))
    await spy.conn.nc.flush()
    for _ in range(500):
        if stream.dropped >= 2 or stream.finished:
            break
        await asyncio.sleep(0.02)
    seen = (stream.dropped, stream.finished, len(stream.raw_chunks), stream.resubmits, spy.conn.errors)
    seen += (alice.nc.is_connected, dict(alice.nc.stats), dict(spy.conn.nc.stats))  # what each connection moved
    assert stream.dropped == 2 and not stream.finished, seen  # both dropped, and the forged end did not end it
    await stream.cancel()
    result = await stream.result()
    assert 999_999 not in result.token_ids
    assert result.done is not None and result.done.request_id == "mine-1"


# ------------------------------------------------------------------------------------------------ 8: fair share
@pytest.fixture(scope="module")
def fair_world(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessCluster]:
    """A second cluster on the same secured server: one sim engine of 4 sequences, fairness on."""
    from engines.sim.engine import SimEngine

    server, bundle, _ = world
    settings = load_settings(
        overrides={
            "nats": {"url": server.url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "scheduler": {"fairness": True, "fairness_quantum_tokens": 1024, "fairness_max_waiting": 1},
            "observability": {"jsonl_path": str(tmp_path_factory.mktemp("fair") / "traces.jsonl")},
        }
    )
    cluster = InProcessCluster(
        settings=settings,
        tokenizer=ByteTokenizer(),
        control_auth=bundle.auth["control"],
        engine_auth=bundle.auth["engine"],
        reply_auth=bundle.auth["control-reply"],
    )
    world[2].stop()  # one control plane per server: the subjects are the same
    cluster.start_control()
    cluster.add_engine(SimEngine("fair-0", max_num_seqs=4, time_scale=1.0))  # type: ignore[arg-type]
    yield cluster
    cluster.stop()


async def test_a_flooding_client_does_not_hold_an_interactive_one(
    world: tuple[EmbeddedNatsServer, SecureBundle, InProcessCluster], fair_world: InProcessCluster
) -> None:
    """Counted, not timed: with fairness, the interactive request's first token comes before all but a few
    flood requests (the engine's running batch, its one waiting slot, one quantum) have started."""
    server, bundle, _ = world
    flood_settings = client_settings(bundle, "alice", server.url)
    async with (
        DroverClient(server.url, name="flood", nats_settings=flood_settings) as flood,
        DroverClient(server.url, name="bob", nats_settings=client_settings(bundle, "bob", server.url)) as bob,
    ):
        await flood.wait_for_instances(1, timeout_s=15)
        streams = [await flood.submit(f"flood {i}", max_tokens=256, liveness=False) for i in range(20)]
        readers = [asyncio.create_task(s.result()) for s in streams]
        await asyncio.sleep(0.5)
        interactive = await bob.generate("interactive", max_tokens=4)
        first = interactive.submitted_at + interactive.ttft_s
        for stream in streams:
            with contextlib.suppress(DroverError):
                if not stream.finished:
                    await stream.cancel()
        await asyncio.wait(readers, timeout=15)
    started_before = sum(1 for s in streams if s.result_data.token_times and s.result_data.token_times[0] < first)
    # 4 running + 1 waiting at the engine + one quantum of 1024 tokens (~3 flood requests of ~270 tokens)
    assert started_before <= 4 + 1 + 4, started_before
