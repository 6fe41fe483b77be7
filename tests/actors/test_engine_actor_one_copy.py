"""The engine actor never runs two copies of one request id (actors/engine_actor.py): a new dispatch of an id
whose copy still runs or ends here starts only after that copy's end and continues after every token it sent,
so each output index reaches the client once. Real nats-server, sim engines, no control plane: the test sends
what the scheduler would."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client

from actors.local_cluster import InProcessCluster
from control.settings import load_settings
from engines.sim.engine import SimEngine, request_seed, token_at
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import (
    PROTOCOL_VERSION,
    AdminReply,
    EngineAbort,
    EngineAdd,
    EngineFence,
    Message,
    RequestDone,
    SamplingParams,
    TokenChunk,
    decode,
    encode,
)

# Paced at the cost model's speed (25 s for this many tokens) until the test has stepped in, so the request is
# still running then even on a starved core; the engine then runs at full speed (time_scale 0).
MAX_TOKENS = 1000


class Inbox:
    """A client's inbox: every chunk and final reply as received (duplicates kept)."""

    def __init__(self) -> None:
        self.subject = f"{subjects.INBOX_ROOT}.one-copy.{uuid.uuid4().hex[:8]}"
        self.chunks: list[TokenChunk] = []
        self.finals: list[Message] = []
        self.done = asyncio.Event()
        self.grew = asyncio.Event()

    async def on_message(self, msg: nats.aio.msg.Msg) -> None:
        message = decode(msg.data)
        if isinstance(message, TokenChunk):
            self.chunks.append(message)
            self.grew.set()
        else:
            self.finals.append(message)
            self.done.set()

    def tokens(self) -> list[int]:
        """The tokens in index order, each index once (what a client delivers)."""
        by_index: dict[int, int] = {}
        for chunk in self.chunks:
            for offset, token in enumerate(chunk.token_ids):
                by_index.setdefault(chunk.index + offset, token)
        return [by_index[i] for i in range(len(by_index))]

    async def wait_for_tokens(self, count: int) -> None:
        while len(self.tokens()) < count and not self.done.is_set():
            self.grew.clear()
            await asyncio.wait_for(self.grew.wait(), 30)


@pytest.fixture
async def solo(nats_url: str) -> AsyncIterator[tuple[InProcessCluster, SimEngine, Client]]:
    settings = load_settings(overrides={"nats": {"url": nats_url}, "engine": {"heartbeat_interval_s": 0.05}})
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    engine = SimEngine("solo", num_blocks=256, max_model_len=2048, time_scale=1.0)
    await asyncio.to_thread(cluster.add_engine, engine)
    nc = await nats.connect(nats_url)
    try:
        yield cluster, engine, nc
    finally:
        await nc.close()
        await asyncio.to_thread(cluster.stop)


def first_add(inbox: Inbox, request_id: str) -> EngineAdd:
    return EngineAdd(
        v=PROTOCOL_VERSION,
        request_id=request_id,
        prompt_token_ids=list(range(3, 43)),
        sampling=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        reply_to=inbox.subject,
        stream_text=False,
    )


def resumed_add(add: EngineAdd, have: list[int]) -> EngineAdd:
    """The scheduler's dispatch of ``add`` again, resuming after the ``have`` tokens its client has."""
    return msgspec.structs.replace(add, output_token_ids=have, served_by=["solo"])


def assert_exactly_once(inbox: Inbox, request_id: str) -> None:
    expected = [token_at(request_seed(0, request_id), p) for p in range(MAX_TOKENS)]
    indices = [chunk.index + k for chunk in inbox.chunks for k in range(len(chunk.token_ids))]
    assert sorted(indices) == list(range(MAX_TOKENS)), "an output index was sent twice, or not at all"
    assert inbox.tokens() == expected
    assert len(inbox.finals) == 1
    done = inbox.finals[0]
    assert isinstance(done, RequestDone) and done.finish_reason == "length"
    assert done.output_token_ids == expected


async def test_a_new_dispatch_of_an_id_that_still_ends_here_starts_after_it(
    solo: tuple[InProcessCluster, SimEngine, Client],
) -> None:
    """An eviction's abort and the request's next dispatch back to the same instance arrive together: the
    dispatch waits for the evicted copy's end (it was dropped as a duplicate, and the request lost, before)."""
    _, engine, nc = solo
    inbox = Inbox()
    await nc.subscribe(inbox.subject, cb=inbox.on_message)
    add = first_add(inbox, "oc-1")
    await nc.request(subjects.engine("solo"), encode(add), timeout=10)
    await inbox.wait_for_tokens(5)
    # the dispatch resumes from fewer tokens than the copy sent (its read-back lagged): the new copy goes on
    # after all of them, so none of the client's indices comes twice
    have = inbox.tokens()[:3]
    again = resumed_add(add, have)
    # one flush: the dispatch reaches the actor before the evicted copy's end does
    await nc.publish(subjects.engine("solo"), encode(EngineAbort(request_id="oc-1", reason="evicted")))
    await nc.publish(subjects.engine("solo"), encode(again))
    await nc.flush()
    await inbox.wait_for_tokens(len(have) + 20)  # the new dispatch streams (the old copy stopped at once)
    resent = decode((await nc.request(subjects.engine("solo"), encode(again), timeout=10)).data)
    assert isinstance(resent, AdminReply) and not resent.ok  # a re-send of that dispatch changes nothing
    engine.time_scale = 0.0
    await asyncio.wait_for(inbox.done.wait(), 60)
    assert_exactly_once(inbox, "oc-1")
    assert not engine.core.requests


async def test_a_resume_onto_the_instance_that_was_fenced_runs_one_copy(
    solo: tuple[InProcessCluster, SimEngine, Client],
) -> None:
    """The failover's fence stops the copy mid-step (the engine lets go of it at that step's end), then the
    request resumes on the same instance from what its client has: only the resumed copy streams."""
    _, engine, nc = solo
    inbox = Inbox()
    await nc.subscribe(inbox.subject, cb=inbox.on_message)
    add = first_add(inbox, "oc-2")
    await nc.request(subjects.engine("solo"), encode(add), timeout=10)
    await inbox.wait_for_tokens(5)
    reply = decode((await nc.request(subjects.engine("solo"), encode(EngineFence(request_id="oc-2")), timeout=10)).data)
    assert isinstance(reply, AdminReply) and reply.ok and reply.details["ended"] is True
    have = inbox.tokens()  # the fence answers after the copy's last chunk, on the same connection
    assert len(have) == reply.details["sent"]
    resumed = resumed_add(add, have)
    await nc.request(subjects.engine("solo"), encode(resumed), timeout=10)
    engine.time_scale = 0.0
    await asyncio.wait_for(inbox.done.wait(), 60)
    assert_exactly_once(inbox, "oc-2")
    assert not engine.core.requests
