from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    EngineAdd,
    ErrorCode,
    ProtocolError,
    SamplingParams,
    SubmitRequest,
    TokenChunk,
    decode,
    decode_as,
    encode,
)


def test_round_trip_keeps_every_field() -> None:
    submit = SubmitRequest(
        reply_to="_INBOX.x",
        request_id="r1",
        prompt="hi",
        sampling=SamplingParams(max_tokens=7, temperature=0.5),
        priority=2,
    )
    decoded = decode(encode(submit))
    assert decoded == submit
    assert decoded.v == PROTOCOL_VERSION


def test_version_is_always_on_the_wire() -> None:
    raw = msgspec.msgpack.decode(encode(Accepted(request_id="r", cancel_token="t", prompt_tokens=3)))
    assert raw["v"] == PROTOCOL_VERSION
    assert raw["kind"] == "accepted"


def test_unknown_fields_are_ignored() -> None:
    raw = msgspec.msgpack.decode(encode(TokenChunk(request_id="r", index=0, token_ids=[5])))
    raw["added_by_a_newer_sender"] = {"x": 1}
    assert decode(msgspec.msgpack.encode(raw)) == TokenChunk(request_id="r", index=0, token_ids=[5])


def test_unknown_kind_is_a_typed_error() -> None:
    data = msgspec.msgpack.encode({"kind": "teleport", "v": 1, "request_id": "r9"})
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == ErrorCode.UNKNOWN_KIND
    assert info.value.request_id == "r9"


def test_unsupported_version_is_a_typed_error() -> None:
    data = msgspec.msgpack.encode({"kind": "cancel", "v": 99, "request_id": "r", "cancel_token": "t"})
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"kind": "submit", "v": MIN_PROTOCOL_VERSION}),  # missing reply_to
        msgspec.msgpack.encode(
            {"kind": "chunk", "v": MIN_PROTOCOL_VERSION, "request_id": "r", "index": "zero", "token_ids": []}
        ),
    ],
)
def test_malformed_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == ErrorCode.MALFORMED


def test_decode_as_checks_the_kind() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_as(encode(Cancel(request_id="r", cancel_token="t")), EngineAdd)
    assert info.value.code == ErrorCode.INVALID_REQUEST


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["submit", "chunk", "cancel", "engine_add", "heartbeat", "done", "nope"]),
    st.dictionaries(
        st.sampled_from(["v", "request_id", "reply_to", "prompt", "token_ids", "index", "sampling", "info"]),
        json_like,
        max_size=6,
    ),
)
def test_wrong_typed_fields_never_escape_as_other_exceptions(kind: str, fields: dict) -> None:
    data = msgspec.msgpack.encode({"kind": kind, **fields})
    with contextlib.suppress(ProtocolError):
        decode(data)


def test_version_negotiation_rules() -> None:
    from transport.messages import MIN_PROTOCOL_VERSION, SUPPORTED_VERSIONS, error_version, peer_version

    assert {PROTOCOL_VERSION - 1, PROTOCOL_VERSION} == set(SUPPORTED_VERSIONS)
    assert peer_version(1) == MIN_PROTOCOL_VERSION and peer_version(PROTOCOL_VERSION + 5) == PROTOCOL_VERSION
    assert error_version(ErrorCode.MALFORMED) == MIN_PROTOCOL_VERSION
    assert error_version(ErrorCode.DEADLINE_EXCEEDED) == 2
    old = msgspec.msgpack.decode(encode(TokenChunk(request_id="r", index=0, token_ids=[1]), version=1))
    assert old["v"] == 1
    # an older sender's message (no newer fields) decodes with the defaults
    v2 = decode(msgspec.msgpack.encode({"kind": "submit", "v": 2, "reply_to": "x", "prompt": "p"}))
    assert isinstance(v2, SubmitRequest) and v2.v == 2 and v2.deadline_s is None and not v2.liveness
    with pytest.raises(ProtocolError) as too_old:  # v3 (security) dropped version 1: N-1 only
        decode(msgspec.msgpack.encode({"kind": "submit", "v": 1, "reply_to": "x", "prompt": "p"}))
    assert too_old.value.code == ErrorCode.UNSUPPORTED_VERSION
    for data, code in [
        ({"kind": "submit", "v": PROTOCOL_VERSION + 1, "reply_to": "x"}, ErrorCode.UNSUPPORTED_VERSION),
        ({"kind": "hologram", "v": PROTOCOL_VERSION + 1}, ErrorCode.UNSUPPORTED_VERSION),
        ({"kind": "hologram", "v": PROTOCOL_VERSION}, ErrorCode.UNKNOWN_KIND),
    ]:
        with pytest.raises(ProtocolError) as info:
            decode(msgspec.msgpack.encode(data))
        assert info.value.code == code
