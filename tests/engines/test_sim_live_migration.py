"""Live migration between simulated engines (engines/sim/live_migration.py): a copy past the destination's
reservation grows it from the destination's free blocks, as the live engines' data plane does, and is refused
only when the destination has no room."""

from __future__ import annotations

import asyncio

import pytest

from engines.base import EngineError, EngineRequest
from engines.sim.live_migration import MigratableSimEngine
from transport.messages import SamplingParams

BLOCK = 4  # tokens per block: a request outgrows a small reservation within a few steps
MAX_TOKENS = 200


def request(rid: str, outputs: list[int] | None = None, kv_transfer: dict[str, object] | None = None) -> EngineRequest:
    return EngineRequest(
        rid,
        prompt_token_ids=list(range(3, 13)),
        sampling=SamplingParams(max_tokens=MAX_TOKENS),
        output_token_ids=outputs or [],
        kv_transfer=kv_transfer,
    )


class Stream:
    """One request's tokens as a client sees them across engines."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reasons: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def on(self, engine: MigratableSimEngine, req: EngineRequest) -> None:
        async def consume() -> None:
            async for out in engine.generate(req):
                self.tokens += out.new_token_ids
                if out.finish_reason is not None:
                    self.reasons.append(out.finish_reason)

        self.tasks.append(asyncio.create_task(consume()))

    async def wait_tokens(self, count: int) -> None:
        async with asyncio.timeout(30):
            while len(self.tokens) < count:
                await asyncio.sleep(0.001)

    async def finish(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)


async def engines(num_blocks_b: int) -> tuple[MigratableSimEngine, MigratableSimEngine]:
    a = MigratableSimEngine("sa", block_size=BLOCK, num_blocks=256, time_scale=0.05)
    b = MigratableSimEngine("sb", block_size=BLOCK, num_blocks=num_blocks_b, time_scale=0.05)
    await a.start()
    await b.start()
    return a, b


async def reference() -> list[int]:
    ref = MigratableSimEngine("sa", block_size=BLOCK, num_blocks=256, time_scale=0.0)
    await ref.start()
    try:
        tokens: list[int] = []
        async for out in ref.generate(request("m")):
            tokens += out.new_token_ids
        return tokens
    finally:
        await ref.shutdown()


async def test_a_stop_past_the_reservation_grows_it_from_free_blocks() -> None:
    expected = await reference()
    a, b = await engines(num_blocks_b=256)
    try:
        stream = Stream()
        stream.on(a, request("m"))
        await stream.wait_tokens(20)  # 10 prompt + 20 output tokens: 8 blocks, far past a 1-block reservation
        endpoint = await b.migrate_in_reserve("g", 1)
        assert endpoint is not None
        await a.migrate_out_begin("m", "g", endpoint)
        frozen = await a.migrate_out_stop("g")
        assert frozen.num_blocks > 1 and frozen.kv_transfer
        assert b.core.reserved_blocks == frozen.num_blocks  # grown to exactly its size, counted as used
        assert b.load().num_free_blocks == 256 - frozen.num_blocks
        await stream.finish()  # the source's stream ended ("migrated"): what it yielded is all in
        stream.tokens += frozen.output_token_ids[len(stream.tokens) :]
        stream.on(b, request("m", list(stream.tokens), frozen.kv_transfer))
        await a.migrate_out_commit("g")
        await stream.finish()
        assert stream.tokens == expected and stream.reasons == ["migrated", "length"]
        assert b.core.reserved_blocks == 0 and a.core.outgoing_blocks == 0
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_a_stop_past_the_reservation_is_refused_when_the_destination_is_full() -> None:
    expected = await reference()
    a, b = await engines(num_blocks_b=64)
    try:
        stream = Stream()
        stream.on(a, request("m"))
        await stream.wait_tokens(20)
        endpoint = await b.migrate_in_reserve("g", 1)
        assert endpoint is not None
        assert await b.migrate_in_reserve("hog", b.core.num_free_blocks) is not None  # nothing left to grow into
        await a.migrate_out_begin("m", "g", endpoint)
        with pytest.raises(EngineError, match="exceeds the reservation of 1 blocks"):
            await a.migrate_out_stop("g")
        assert b.core.reserved_blocks == 64  # the refused growth took nothing
        frozen = await a.migrate_out_abort("g")  # stopped: its state comes back without KV
        assert frozen is not None and frozen.kv_transfer == {}
        await b.migrate_in_release("g")
        await b.migrate_in_release("hog")
        assert b.core.reserved_blocks == 0 and a.core.outgoing_blocks == 0
        await stream.finish()  # the source's stream ended ("migrated"): what it yielded is all in
        stream.tokens += frozen.output_token_ids[len(stream.tokens) :]
        stream.on(a, request("m", list(stream.tokens)))  # resumed at its source by recompute
        await stream.finish()
        assert stream.tokens == expected and stream.reasons == ["migrated", "length"]
    finally:
        await a.shutdown()
        await b.shutdown()
