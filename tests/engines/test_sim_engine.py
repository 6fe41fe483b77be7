"""SimEngine (live Engine protocol): streaming, determinism, resume, abort, load reports."""

from __future__ import annotations

import asyncio

import pytest

from engines.base import Engine, EngineError, EngineOutput, EngineRequest
from engines.sim import SimEngine, token_at
from engines.sim.engine import EOS_TOKEN_ID, request_seed
from transport.messages import InstanceLoad, SamplingParams


async def collect(engine: SimEngine, request: EngineRequest) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for out in engine.generate(request):
        assert isinstance(out, EngineOutput)
        tokens.extend(out.new_token_ids)
        reason = out.finish_reason
    return tokens, reason


def req(rid: str, n_prompt: int = 40, max_tokens: int = 12, outputs: list[int] | None = None) -> EngineRequest:
    return EngineRequest(
        rid,
        prompt_token_ids=list(range(3, 3 + n_prompt)),
        sampling=SamplingParams(max_tokens=max_tokens),
        output_token_ids=outputs or [],
    )


async def test_streams_max_tokens_in_byte_range_and_is_an_engine() -> None:
    engine = SimEngine("sim-0", time_scale=0.0)
    assert isinstance(engine, Engine)
    assert engine.info.engine_kind == "sim"
    await engine.start()
    try:
        tokens, reason = await collect(engine, req("a"))
        assert reason == "length" and len(tokens) == 12
        assert all(3 <= t <= 258 for t in tokens)
        assert tokens == [token_at(request_seed(0, "a"), p) for p in range(12)]
    finally:
        await engine.shutdown()


async def test_resume_continues_with_identical_tokens() -> None:
    a, b = SimEngine("a", time_scale=0.0), SimEngine("b", time_scale=0.0)
    await a.start()
    await b.start()
    try:
        full, _ = await collect(a, req("r", max_tokens=20))
        rest, reason = await collect(b, req("r", max_tokens=20, outputs=full[:7]))
        assert reason == "length"
        assert full[:7] + rest == full
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_concurrent_requests_batch_and_load_is_instance_load() -> None:
    engine = SimEngine("sim", time_scale=0.0, num_blocks=64, max_num_seqs=4)
    await engine.start()
    try:
        results = await asyncio.gather(*(collect(engine, req(f"r{i}", max_tokens=30)) for i in range(6)))
        assert all(len(t) == 30 and r == "length" for t, r in results)
        load = engine.load()
        assert isinstance(load, InstanceLoad)
        assert load.num_free_blocks == 64 and load.num_running == 0 and load.num_waiting == 0
        assert engine.core.num_steps < 6 * 30  # batched
    finally:
        await engine.shutdown()


async def test_abort_ends_stream_and_frees_blocks() -> None:
    engine = SimEngine("sim", time_scale=0.01)
    await engine.start()
    try:
        stream = engine.generate(req("x", max_tokens=1000, n_prompt=100))
        first = await stream.__anext__()
        assert first.new_token_ids
        assert engine.load().num_running == 1
        await engine.abort("x")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "abort"
        await asyncio.sleep(0.05)
        assert engine.load().num_free_blocks == 512
    finally:
        await engine.shutdown()


async def test_an_id_run_again_right_after_its_abort_streams_only_the_new_copy() -> None:
    """An abort during a step leaves the core when that step ends; a copy started again under the same id
    meanwhile (a failover onto this instance) must not run beside it: both would stream into the new copy."""
    engine = SimEngine("sim", time_scale=1.0)
    await engine.start()
    try:
        first = engine.generate(req("r", max_tokens=40))
        head: list[int] = []
        async for out in first:
            head.extend(out.new_token_ids)
            if len(head) >= 5:
                break
        await first.aclose()  # the consumer leaves, as the engine actor's fence does after its abort
        await engine.abort("r")
        assert "r" in engine.core.requests  # a step is under way: the old copy leaves at its end
        rest, reason = await collect(engine, req("r", max_tokens=40, outputs=head))
        assert reason == "length"
        assert head + rest == [token_at(request_seed(0, "r"), p) for p in range(40)]
        assert engine.load().num_running == 0 and not engine.core.requests
    finally:
        await engine.shutdown()


async def test_rejects_requests_that_cannot_fit() -> None:
    engine = SimEngine("sim", time_scale=0.0, max_model_len=128)
    await engine.start()
    try:
        with pytest.raises(EngineError):
            engine.generate(req("big", n_prompt=200))
    finally:
        await engine.shutdown()


async def test_stop_probability_is_deterministic_and_ends_with_eos() -> None:
    lengths = []
    for name in ("a", "b"):
        engine = SimEngine(name, time_scale=0.0, stop_probability=0.2, seed=3)
        await engine.start()
        try:
            tokens, reason = await collect(engine, req("same", max_tokens=500))
            lengths.append(len(tokens))
            assert reason == "stop" and tokens[-1] == EOS_TOKEN_ID
        finally:
            await engine.shutdown()
    assert lengths[0] == lengths[1] < 500
