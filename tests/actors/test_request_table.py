"""The scheduler's request table: per-client counts, and finished ids remembered for a bounded time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from control.core.requests import RequestTable
from control.settings import LifecycleSettings
from transport.messages import SubmitRequest


@dataclass
class _Record:
    submit: SubmitRequest
    request_id: str
    cancel_token: str = "t"
    arrival: float = 0.0
    instance_id: str | None = None
    state: str = "queued"


def _record(request_id: str, client: str) -> _Record:
    return _Record(SubmitRequest(reply_to=f"drover.v1.inbox.{client}.{request_id}", prompt="p"), request_id)


def test_counts_follow_inserts_and_removals() -> None:
    table: RequestTable[_Record] = RequestTable(LifecycleSettings(), clock=time.monotonic)
    for i in range(3):
        table[f"a{i}"] = _record(f"a{i}", "alice")
    table["b0"] = _record("b0", "bob")
    table["b0"] = _record("b0", "bob")  # replaced, not counted twice
    assert table.client_in_flight("alice") == 3 and table.client_in_flight("bob") == 1
    table.pop("a0")
    del table["a1"]
    assert table.pop("nope", None) is None
    with pytest.raises(KeyError):
        table.pop("nope")
    table.pop("b0")
    assert table.per_client == {"alice": 1}
    assert list(table.finished) == ["a0", "a1", "b0"]


def test_finished_ids_are_bounded_by_count_and_age() -> None:
    table: RequestTable[_Record] = RequestTable(
        LifecycleSettings(finished_max_entries=3, finished_retention_s=10.0), clock=time.monotonic
    )
    for i in range(5):
        table[str(i)] = _record(str(i), "c")
        table.pop(str(i))
    assert list(table.finished) == ["2", "3", "4"]
    assert table.forget_expired(time.monotonic()) == 3
    assert table.forget_expired(time.monotonic() + 11.0) == 0
    assert len(table) == 0
