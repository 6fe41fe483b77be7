"""The gateway's pure parts: stop strings, token bucket, keys and quotas, chat template, error mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.apps.gateway.access import AccessControl, TokenBucket
from control.apps.gateway.errors import GatewayError, from_drover
from control.apps.gateway.prompts import message_text, render_chat
from control.apps.gateway.schema import ChatCompletionRequest, CompletionRequest, chat_spec, completion_spec
from control.apps.gateway.stops import StopMatcher
from control.gateway_settings import ApiKeySettings, GatewaySettings
from transport.messages import ErrorCode


def run_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    return out, matcher.stopped


@given(
    st.lists(st.text(alphabet="abc", max_size=6), max_size=12),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3),
)
def test_stop_strings_cut_at_the_first_occurrence_however_the_text_is_split(
    pieces: list[str], stops: list[str]
) -> None:
    text = "".join(pieces)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    out, stopped = run_stops(pieces, stops)
    assert out == (text[: min(cuts)] if cuts else text)
    assert stopped == bool(cuts)


def test_stop_text_is_held_back_until_decided() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abcE") == "abc"
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"  # not a stop after all
    assert matcher.push("..EN") == ".."
    assert matcher.push("D and more") == ""
    assert matcher.stopped and matcher.flush() == ""


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(60, now=0.0)  # one per second, bursts of 60
    assert all(bucket.take(now=0.0) == 0.0 for _ in range(60))
    assert bucket.take(now=0.0) == pytest.approx(1.0)
    assert bucket.take(now=0.5) == pytest.approx(0.5)
    assert bucket.take(now=1.0) == 0.0


def test_keys_limits_and_usage() -> None:
    access = AccessControl(
        GatewaySettings(
            token_quota=10,
            requests_per_minute=100,
            api_keys=[
                ApiKeySettings(key="sk-aaaaaaaa", client_id="a"),
                ApiKeySettings(key="sk-bbbbbbbb", client_id="b", token_quota=0, requests_per_minute=1),
            ],
        )
    )
    with pytest.raises(GatewayError) as missing:
        access.authenticate(None)
    assert missing.value.status == 401
    with pytest.raises(GatewayError):
        access.authenticate("Bearer sk-cccccccc")
    a, b = access.authenticate("Bearer sk-aaaaaaaa"), access.authenticate("bearer sk-bbbbbbbb")
    assert (a.client_id, a.token_quota, a.requests_per_minute) == ("a", 10, 100)
    assert (b.token_quota, b.requests_per_minute) == (0, 1)
    access.admit(a)
    access.record(a, 4, 6)
    with pytest.raises(GatewayError) as quota:
        access.admit(a)
    assert (quota.value.status, quota.value.code) == (429, "insufficient_quota")
    access.admit(b)
    with pytest.raises(GatewayError) as rate:
        access.admit(b)
    assert rate.value.code == "rate_limit_exceeded" and "Retry-After" in rate.value.headers
    assert access.report(a)["remaining_tokens"] == 0 and access.report(a)["rejected"] == 1


def test_without_keys_everyone_is_anonymous() -> None:
    access = AccessControl(GatewaySettings())
    assert not access.keys_required
    assert access.authenticate(None).client_id == "anonymous"


def test_settings_refuse_half_tls_and_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="ssl"):
        GatewaySettings(ssl_certfile="cert.pem")
    with pytest.raises(ValueError, match="twice"):
        GatewaySettings(
            api_keys=[
                ApiKeySettings(key="sk-aaaaaaaa", client_id="a"),
                ApiKeySettings(key="sk-aaaaaaaa", client_id="b"),
            ]
        )


def test_chat_template() -> None:
    assert render_chat([("system", "S"), ("user", "U")]) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], 0) == "ab"
    with pytest.raises(GatewayError) as image:
        message_text([{"type": "image_url", "image_url": {"url": "x"}}], 2)
    assert image.value.param == "messages[2].content"


def test_request_translation() -> None:
    spec = completion_spec(
        CompletionRequest(
            model="m",
            prompt=[1, 5, 7],
            max_tokens=3,
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop="\n",
            priority=2,
            request_class="batch",
            ignore_eos=True,
        )
    )
    assert spec.prompt is None and spec.prompt_token_ids == [1, 5, 7]
    assert (spec.sampling.max_tokens, spec.sampling.temperature, spec.sampling.top_p, spec.sampling.seed) == (
        3,
        0.5,
        0.9,
        7,
    )
    assert spec.stops == ("\n",) and spec.priority == 2 and spec.request_class == "batch"
    assert spec.sampling.ignore_eos
    assert spec.request_id.startswith("cmpl-")
    chat = chat_spec(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]), 99)
    assert chat.sampling.max_tokens == 99 and chat.sampling.temperature == 1.0  # OpenAI's defaults
    with pytest.raises(GatewayError, match="one prompt"):
        completion_spec(CompletionRequest(model="m", prompt=["a", "b"]))
    with pytest.raises(GatewayError, match="role"):
        chat_spec(ChatCompletionRequest(model="m", messages=[{"role": "wizard", "content": "x"}]), 1)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.INVALID_REQUEST, 400),
        (ErrorCode.PROMPT_TOO_LONG, 400),
        (ErrorCode.OVERLOADED, 503),
        (ErrorCode.NO_INSTANCE, 503),
        (ErrorCode.ENGINE_FAILED, 502),
        (ErrorCode.DUPLICATE_REQUEST, 409),
        (ErrorCode.INTERNAL, 500),
        ("some_future_code", 500),
    ],
)
def test_drover_codes_map_to_http_statuses(code: str, status: int) -> None:
    error = from_drover(code, "why")
    assert error.status == status
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
