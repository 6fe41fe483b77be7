"""The whole path on real vLLM-CPU engines: client -> NATS -> actors -> vLLM -> client, and live migration
of real KV through the MigratorActor. Engines come from the session's shared factory (at most 3 alive);
their engine hosts run on the test loop with their own bus connections, the control plane on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from control.client import DroverClient, DroverError, RequestStream
from control.settings import load_settings
from engines.base import EngineRequest
from engines.tokenizer import ByteTokenizer
from tests.vllm_cluster import VllmCluster, idle_free_blocks
from transport.messages import ErrorCode, SamplingParams

pytest_plugins = ["tests.conftest_vllm"]
pytestmark = pytest.mark.vllm

PROMPTS = ["The quick brown fox", "Drover moves requests", "Once upon a time", "KV blocks"]


@pytest.fixture(scope="module")
async def vllm_cluster(nats_url: str, vllm_engine_factory: Any) -> AsyncIterator[VllmCluster]:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "model": {"max_model_len": 2048},
            "engine": {"heartbeat_interval_s": 0.1},
            "policy": {"migration_enabled": False},  # tests decide every migration
        }
    )
    assert settings.migration.reserve_headroom_blocks == 2  # the default: a stop that outgrows it grows it
    cluster = VllmCluster(nats_url, settings)
    for name in ("a", "b"):
        await cluster.add(await vllm_engine_factory.engine(name))
    yield cluster
    await cluster.close()


@pytest.fixture
async def client(vllm_cluster: VllmCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(vllm_cluster.url, name="vllm-client").connect()
    await c.wait_for_instances(2, timeout_s=30)
    yield c
    await c.close()


async def direct_greedy(engine: Any, prompt_ids: list[int], max_tokens: int, rid: str) -> list[int]:
    tokens: list[int] = []
    request = EngineRequest(rid, prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    async for output in engine.generate(request):
        tokens.extend(output.new_token_ids)
    return tokens


async def test_greedy_tokens_through_drover_equal_direct_vllm(client: DroverClient, vllm_engine_factory: Any) -> None:
    tokenizer = ByteTokenizer()
    engine_a = await vllm_engine_factory.engine("a")
    for n, prompt in enumerate(PROMPTS[:2]):
        direct = await direct_greedy(engine_a, tokenizer.encode(prompt), 24, f"direct-{n}")
        via = await client.generate(prompt, sampling=SamplingParams(max_tokens=24, ignore_eos=True))
        assert via.token_ids == direct
        assert via.done is not None and via.done.num_tokens == 24


async def test_both_instances_serve(client: DroverClient) -> None:
    results = await asyncio.gather(*(client.generate(p, max_tokens=8) for p in PROMPTS))
    assert {r.done.instances[0] for r in results if r.done} == {"a", "b"}


async def test_cancel_mid_stream(client: DroverClient) -> None:
    stream = await client.submit("cancel me", sampling=SamplingParams(max_tokens=500, ignore_eos=True))
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= 3:
            break
    await stream.cancel()
    result = await stream.result()
    assert result.done is not None and result.done.finish_reason == "abort"
    assert 3 <= len(result.token_ids) < 500


async def _location(client: DroverClient, request_id: str) -> str | None:
    status = await client.status()
    return next((r.instance_id for r in status.requests if r.request_id == request_id), None)


async def _advance(stream: RequestStream, tokens: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= tokens:
            return


async def test_live_migration_back_and_forth_is_token_exact(client: DroverClient, vllm_engine_factory: Any) -> None:
    prompt = "Live migration moves the KV cache " * 8
    # Long enough that the request is still decoding at the last hop: vLLM's EngineCore decodes in its own
    # process while a loaded host starves this loop; 600 tokens had once ended at the engine by the first hop.
    # 272 prompt tokens + 1,700 stay inside max_model_len 2,048
    max_tokens = 1700
    reference = await client.generate(prompt, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    before = await idle_free_blocks(client)
    stream = await client.submit(
        prompt, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id="vllm-mig-1"
    )
    await _advance(stream, 8)
    hops = []
    for target_tokens in (40, 80, 120):
        source = await _location(client, "vllm-mig-1")
        assert source is not None
        destination = "b" if source == "a" else "a"
        reply = await client.migrate("vllm-mig-1", destination)
        assert reply.ok, reply.message
        hops.append((source, destination, reply.details))
        # The operator's reply can come before the scheduler's table has the move: a status read right away
        # once named the old source, and the next hop asked it for a request it no longer had
        for _ in range(200):
            if await _location(client, "vllm-mig-1") == destination:
                break
            await asyncio.sleep(0.05)
        await _advance(stream, target_tokens)
    result = await stream.result()
    assert result.token_ids == reference.token_ids  # token-for-token, each exactly once, in order
    assert result.done is not None and len(result.done.instances) == 4
    assert await idle_free_blocks(client) == before  # no block leaked on either side


async def test_refused_migration_leaves_the_request_unharmed(client: DroverClient) -> None:
    prompt = "abort path " * 10
    # Long enough to still run at the migrate call: vLLM's EngineCore decodes in its own process while a loaded
    # host starves this loop; 60 and then 400 tokens had ended at the engine by then (answer: unknown_request)
    sampling = SamplingParams(max_tokens=1800, ignore_eos=True)
    reference = await client.generate(prompt, sampling=sampling)
    stream = await client.submit(prompt, sampling=sampling, request_id="vllm-mig-2")
    await _advance(stream, 5)
    source = await _location(client, "vllm-mig-2")
    await client.policy({"migration_enabled": "false"})
    with pytest.raises(DroverError) as refused:  # onto itself: refused, the request is unharmed
        await client.migrate("vllm-mig-2", source or "a")
    assert refused.value.code == ErrorCode.MIGRATION_FAILED
    result = await stream.result()
    assert result.token_ids == reference.token_ids


async def test_drain_moves_every_request_with_its_kv(client: DroverClient) -> None:
    prompt = "drain me " * 12
    # As long as max_model_len allows (108 + 1,900 tokens): with 1,200 a loaded host's EngineCore had finished a
    # request before the drain could move it ("the request finished at the source")
    sampling = SamplingParams(max_tokens=1900, ignore_eos=True)
    reference = await client.generate(prompt, sampling=sampling)
    streams = [await client.submit(prompt, sampling=sampling, request_id=f"drain-{i}") for i in range(2)]
    for i, stream in enumerate(streams):
        await _advance(stream, 4)
        if await _location(client, f"drain-{i}") != "a":  # both start on "a", so the drain has work
            assert (await client.migrate(f"drain-{i}", "a")).ok
    await client.policy({"migration_enabled": "true"})
    try:
        reply = await client.drain("a")
        assert reply.ok
        for stream in streams:
            result = await stream.result()
            assert result.token_ids == reference.token_ids
            assert result.done is not None and "a" in result.done.instances and result.done.instances[-1] == "b"
    finally:
        await client.policy({"migration_enabled": "false"})
        await client.drain("a", undo=True)
