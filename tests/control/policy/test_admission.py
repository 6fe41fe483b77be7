"""Admission control: each documented limit refuses at once with its code; nothing else does."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.policy.admission import (
    AdmissionLimits,
    AdmissionLoad,
    AdmissionRequest,
    Verdict,
    admit,
    client_key,
)

LIMITS = AdmissionLimits(
    max_prompt_tokens=100,
    max_new_tokens=50,
    max_queued_total=10,
    max_queued_interactive=6,
    max_queued_batch=4,
    max_in_flight_per_client=3,
    max_in_flight_requests=20,
    max_deadline_s=60.0,
    max_queued_per_client=5,
)
OVERLOADED = Verdict.OVERLOADED
REQUEST = AdmissionRequest(prompt_tokens=10, max_tokens=5, request_class="interactive")
IDLE = AdmissionLoad(in_flight=0, client_in_flight=0, queued_total=0, queued_in_class=0, can_dispatch_now=True)


def test_an_ordinary_request_is_admitted() -> None:
    assert admit(REQUEST, IDLE, LIMITS).admitted


@pytest.mark.parametrize(
    ("request_changes", "load_changes", "verdict"),
    [
        ({"prompt_tokens": 101}, {}, Verdict.PROMPT_TOO_LONG),
        ({"max_tokens": 51}, {}, Verdict.INVALID_REQUEST),
        ({"max_tokens": 0}, {}, Verdict.INVALID_REQUEST),
        ({"deadline_s": 0.0}, {}, Verdict.INVALID_REQUEST),
        ({"deadline_s": 61.0}, {}, Verdict.INVALID_REQUEST),
        ({}, {"in_flight": 20}, Verdict.OVERLOADED),
        ({}, {"client_in_flight": 3}, Verdict.OVERLOADED),
        ({}, {"queued_in_class": 6, "queued_total": 6, "can_dispatch_now": False}, Verdict.OVERLOADED),
        ({"request_class": "batch"}, {"queued_in_class": 4, "can_dispatch_now": False}, Verdict.OVERLOADED),
        ({}, {"queued_in_class": 1, "queued_total": 10, "can_dispatch_now": False}, Verdict.OVERLOADED),
        # one client's share of the queue
        ({}, {"queued_in_class": 5, "queued_total": 5, "client_queued": 5, "can_dispatch_now": False}, OVERLOADED),
        ({}, {"queued_in_class": 5, "queued_total": 5, "client_queued": 5, "can_dispatch_now": True}, Verdict.ADMIT),
        ({}, {"queued_in_class": 5, "queued_total": 5, "client_queued": 4, "can_dispatch_now": False}, Verdict.ADMIT),
        # a full queue does not matter when an instance takes the request at once
        ({}, {"queued_in_class": 6, "queued_total": 10, "can_dispatch_now": True}, Verdict.ADMIT),
        (
            {"request_class": "batch"},
            {"queued_in_class": 3, "queued_total": 9, "can_dispatch_now": False},
            Verdict.ADMIT,
        ),
    ],
)
def test_each_limit(request_changes: dict, load_changes: dict, verdict: Verdict) -> None:
    decision = admit(dataclasses.replace(REQUEST, **request_changes), dataclasses.replace(IDLE, **load_changes), LIMITS)
    assert decision.verdict is verdict
    assert decision.admitted == (verdict is Verdict.ADMIT)
    assert decision.admitted or decision.reason


def test_the_request_itself_is_judged_before_load() -> None:
    busy = dataclasses.replace(IDLE, in_flight=20)
    assert admit(dataclasses.replace(REQUEST, prompt_tokens=500), busy, LIMITS).verdict is Verdict.PROMPT_TOO_LONG


@given(
    in_flight=st.integers(0, 40),
    client=st.integers(0, 10),
    queued=st.integers(0, 20),
    in_class=st.integers(0, 20),
    now=st.booleans(),
    batch=st.booleans(),
    client_queued=st.integers(0, 10),
)
def test_admitted_never_exceeds_a_bound(
    in_flight: int, client: int, queued: int, in_class: int, now: bool, batch: bool, client_queued: int
) -> None:
    request = dataclasses.replace(REQUEST, request_class="batch" if batch else "interactive")
    load = AdmissionLoad(in_flight, client, queued, in_class, now, client_queued)
    if admit(request, load, LIMITS).admitted:
        assert in_flight < LIMITS.max_in_flight_requests and client < LIMITS.max_in_flight_per_client
        if not now:
            assert queued < LIMITS.max_queued_total and client_queued < LIMITS.max_queued_per_client
            assert in_class < (LIMITS.max_queued_batch if batch else LIMITS.max_queued_interactive)


def test_client_key() -> None:
    assert client_key("gw-user", "drover.v1.inbox.x.1", "drover.v1.inbox") == "gw-user"
    assert client_key("", "drover.v1.inbox.alice.abc", "drover.v1.inbox") == "alice"
    assert client_key("", "_INBOX.zz", "drover.v1.inbox") == "_INBOX.zz"
