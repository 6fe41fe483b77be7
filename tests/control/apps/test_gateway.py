"""The OpenAI-compatible gateway against a real cluster: the official ``openai`` client and raw HTTP, over
uvicorn on a free port, a real nats-server, real actors and simulated engines."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest
from nats.aio.msg import Msg
from openai.types.chat import ChatCompletionMessageParam

from actors.local_cluster import InProcessCluster
from control.apps.gateway.prompts import render_chat
from control.apps.gateway.server import GatewayThread
from control.client import DroverClient
from control.gateway_settings import ApiKeySettings, GatewaySettings
from observability import spans
from tests.integration.conftest import make_sim_cluster
from transport import subjects
from transport.messages import EngineRequestEnded, decode
from transport.nats_server import EmbeddedNatsServer

MODEL = "drover-tiny"
ALICE = "sk-test-alice-0001"  # admin
BOB = "sk-test-bob-000002"  # 3 requests per minute
CAROL = "sk-test-carol-0003"  # 40 tokens


@pytest.fixture(scope="module")
def cluster(nats_url: str) -> Iterator[InProcessCluster]:
    # time_scale 0.2: short requests finish in tens of ms, long ones stay in flight long enough to cancel.
    c = make_sim_cluster(nats_url, 2, time_scale=0.2, max_model_len=2048)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gateway(cluster: InProcessCluster, span_exporter: object) -> Iterator[GatewayThread]:
    settings = GatewaySettings(
        port=0,
        api_keys=[
            ApiKeySettings(key=ALICE, client_id="alice", admin=True),
            ApiKeySettings(key=BOB, client_id="bob", requests_per_minute=3),
            ApiKeySettings(key=CAROL, client_id="carol", token_quota=40),
        ],
    )
    with GatewayThread(settings, cluster.url) as gw:
        deadline = time.monotonic() + 10
        while httpx.get(f"{gw.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.05)
        yield gw


def client(gw: GatewayThread, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
async def drover(cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(cluster.url, name="gateway-test").connect()
    yield c
    await c.close()


# ----------------------------------------------------------------------------------------------- happy paths
def test_models_come_from_the_instances(gateway: GatewayThread) -> None:
    models = client(gateway).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(gateway).models.retrieve(MODEL).id == MODEL


def test_completion(gateway: GatewayThread) -> None:
    result = client(gateway).completions.create(model=MODEL, prompt="hello drover", max_tokens=7)
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == len(b"hello drover") + 1  # bytes + BOS


def test_chat_completion_uses_the_documented_template(gateway: GatewayThread) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    result = client(gateway).chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.usage is not None and result.usage.completion_tokens == 5
    prompt = render_chat([("system", "be brief"), ("user", "hi")])
    assert result.usage.prompt_tokens == len(prompt.encode()) + 1


def test_streamed_chat_equals_the_whole_answer(gateway: GatewayThread) -> None:
    # The same request id gives the same tokens (sim engines are seeded by it), so the two must match.
    c = client(gateway)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream me"}]
    whole = c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, extra_body={"request_id": "gw-stream-1"}
    )
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"request_id": "gw-stream-1"},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert {ch.id for ch in chunks} == {"gw-stream-1"}


def test_streamed_completion_sends_done(gateway: GatewayThread) -> None:
    body = {
        "model": MODEL,
        "prompt": "raw sse",
        "max_tokens": 6,
        "stream": True,
        "priority": 1,
        "request_class": "batch",
    }
    with httpx.stream(
        "POST", f"{gateway.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" for p in payloads)


def test_stop_strings_truncate_and_end_the_request(gateway: GatewayThread) -> None:
    c = client(gateway)
    full = (
        c.completions.create(model=MODEL, prompt="stop probe", max_tokens=40, extra_body={"request_id": "gw-stop-1"})
        .choices[0]
        .text
    )
    stop = full[12:14]
    expected = full[: full.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = c.completions.create(
                model=MODEL,
                prompt="stop probe",
                max_tokens=40,
                stop=[stop],
                stream=True,
                extra_body={"request_id": "gw-stop-1"},
            )
            pieces = list(chunks)
            text = "".join(p.choices[0].text for p in pieces)
            reason = pieces[-1].choices[0].finish_reason
        else:
            one = c.completions.create(
                model=MODEL, prompt="stop probe", max_tokens=40, stop=stop, extra_body={"request_id": "gw-stop-1"}
            )
            text, reason = one.choices[0].text, one.choices[0].finish_reason
        assert text == expected
        assert reason == "stop"
        _wait_until_forgotten(gateway, "gw-stop-1")  # cancelled on Drover, so the id is free again


def _wait_until_forgotten(gateway: GatewayThread, request_id: str) -> None:
    async def check() -> None:
        async with DroverClient(gateway.app.state.gateway.client.url, name="gateway-test-wait") as d:
            await _until_no_request(d, request_id)

    asyncio.run(check())


async def _until_no_request(d: DroverClient, request_id: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(r.request_id == request_id for r in (await d.status()).requests):
        assert time.monotonic() < deadline, f"{request_id} still known to the scheduler"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_or_missing_key_is_401(gateway: GatewayThread) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, "sk-not-a-real-key").models.list()
    assert info.value.code == "invalid_api_key"
    response = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_too_long_prompt_is_400_context_length_exceeded(gateway: GatewayThread) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).completions.create(model=MODEL, prompt="x" * 3000, max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 5}, "temperature"),
        ({"extra_body": {"request_id": "has.dots"}}, "request_id"),
    ],
)
def test_unsupported_or_invalid_parameters_are_400(gateway: GatewayThread, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).completions.create(model=MODEL, prompt="x", max_tokens=2, **kwargs)
    assert info.value.param == param


def test_unknown_model_is_404(gateway: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_malformed_body_is_an_openai_shaped_400(gateway: GatewayThread) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json={"model": MODEL}, headers={"Authorization": f"Bearer {ALICE}"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


# ----------------------------------------------------------------------------------------------- limits and usage
def test_rate_limit_is_429_with_retry_after(gateway: GatewayThread) -> None:
    c = client(gateway, BOB)
    for _ in range(3):
        c.completions.create(model=MODEL, prompt="bob", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        c.completions.create(model=MODEL, prompt="bob", max_tokens=1)
    assert info.value.code == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_token_quota_and_usage(gateway: GatewayThread) -> None:
    c = client(gateway, CAROL)
    c.completions.create(model=MODEL, prompt="carol", max_tokens=30)  # 6 prompt + 30 completion
    c.completions.create(model=MODEL, prompt="carol", max_tokens=30)  # admitted: 36 < 40 before it ran
    with pytest.raises(openai.RateLimitError) as info:
        c.completions.create(model=MODEL, prompt="carol", max_tokens=1)
    assert info.value.code == "insufficient_quota"
    own = httpx.get(f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {CAROL}"}).json()
    assert own["client_id"] == "carol"
    assert (own["requests"], own["rejected"], own["prompt_tokens"], own["completion_tokens"]) == (2, 1, 12, 60)
    assert own["token_quota"] == 40 and own["remaining_tokens"] == 0
    everyone = httpx.get(f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert {"alice", "carol"} <= {row["client_id"] for row in everyone["data"]}


# ----------------------------------------------------------------------------------------------- disconnects
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
    return future


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_the_request(gateway: GatewayThread, drover: DroverClient, stream: bool) -> None:
    request_id = f"gw-disconnect-{int(stream)}"
    ended = await _engine_end_of(drover.url, request_id)
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 1500, "stream": stream, "request_id": request_id}
    headers = {"Authorization": f"Bearer {ALICE}"}
    async with httpx.AsyncClient(timeout=30) as http:
        if stream:
            async with http.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status_code == 200
                got = 0
                async for line in resp.aiter_lines():
                    got += line.startswith("data: ")
                    if got >= 3:
                        break  # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    assert await asyncio.wait_for(ended, 10) == "abort"
    await _until_no_request(drover, request_id)


# ----------------------------------------------------------------------------------------------- operations
def test_health_readiness_and_metrics(gateway: GatewayThread) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["status"] == "ready" and sorted(ready["serving_instances"]) == ["sim-0", "sim-1"]
    client(gateway).completions.create(model=MODEL, prompt="metered", max_tokens=3)
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'drover_gateway_requests_total{client="alice",endpoint="/v1/completions",status="200"}' in text
    assert "drover_gateway_ttft_seconds_bucket" in text
    assert 'drover_gateway_tokens_total{client="alice",kind="completion"}' in text


def test_without_a_control_plane_ready_is_503_and_requests_are_503() -> None:
    server = EmbeddedNatsServer()  # a NATS server nobody serves Drover on
    try:
        with GatewayThread(GatewaySettings(port=0), server.start()) as gw:
            assert httpx.get(f"{gw.url}/healthz").status_code == 200
            ready = httpx.get(f"{gw.url}/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            with pytest.raises(openai.InternalServerError) as info:
                client(gw).completions.create(model=MODEL, prompt="anyone?", max_tokens=1)
            assert info.value.status_code == 503 and info.value.code == "control_plane_unavailable"
    finally:
        server.stop()


def test_gateway_without_nats_fails_to_start_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"did not start: cannot reach NATS at nats://127\.0\.0\.1:1"):
        GatewayThread(GatewaySettings(port=0, nats_connect_timeout_s=0.5), "nats://127.0.0.1:1").start()


def test_gateway_span_parents_the_drover_trace(gateway: GatewayThread, span_exporter: Any) -> None:
    result = client(gateway).completions.create(
        model=MODEL, prompt="traced", max_tokens=2, extra_body={"request_id": "gw-traced-1"}
    )
    deadline = time.monotonic() + 5
    while True:
        finished = span_exporter.get_finished_spans()
        ours = [
            s for s in finished if s.name == spans.GATEWAY_REQUEST and s.attributes.get(spans.REQUEST_ID) == result.id
        ]
        if ours and any(
            s.name == spans.ENGINE_REQUEST and s.context.trace_id == ours[0].context.trace_id for s in finished
        ):
            break
        assert time.monotonic() < deadline, "gateway and engine spans not exported"
        time.sleep(0.05)
    trace_spans = [s for s in finished if s.context.trace_id == ours[0].context.trace_id]
    submit = next(s for s in trace_spans if s.name == spans.CLIENT_SUBMIT)
    assert submit.parent is not None and submit.parent.span_id == ours[0].context.span_id
    assert ours[0].attributes.get(spans.CLIENT_ID) == "alice"


def test_https_when_a_certificate_is_configured(cluster: InProcessCluster, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = GatewaySettings(port=0, ssl_certfile=str(cert), ssl_keyfile=str(key))
    with GatewayThread(settings, cluster.url) as gw:
        assert gw.url.startswith("https://")
        assert httpx.get(f"{gw.url}/healthz", verify=False).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=2)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    del crypto
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_drover_gateway_command_serves_openai_clients(cluster: InProcessCluster) -> None:
    """`drover gateway` as its own process (the CLI wiring, flags and API keys)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control.apps.cli",
            "--nats-url",
            cluster.url,
            "gateway",
            "--port",
            str(port),
            "--api-key",
            f"{ALICE}=alice",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DROVER_OBSERVABILITY__EXPORTER": "none"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "drover gateway did not become ready"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0)
        assert c.completions.create(model=MODEL, prompt="cli", max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key", max_retries=0).models.list()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode in (0, -15), out  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert f"gateway on http://127.0.0.1:{port}/v1" in out and "Application shutdown complete" in out


async def test_concurrent_streams_each_get_their_whole_answer(gateway: GatewayThread) -> None:
    api = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ALICE, max_retries=0, timeout=60)

    async def one(i: int) -> tuple[int, str | None]:
        tokens, reason = 0, None
        stream = await api.completions.create(
            model=MODEL, prompt=f"concurrent {i}", max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        return tokens, reason

    results = await asyncio.gather(*(one(i) for i in range(16)))
    await api.close()
    assert results == [(20, "length")] * 16
