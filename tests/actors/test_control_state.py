"""The stored form of a request table row (actors/control_state.py) is what a restarted control plane derives
a failover's hold from: a ``recovering`` row names the instance it failed over from (the last of
``served_by``), and rows written by the previous version (a ``v`` field) read the same."""

from __future__ import annotations

import msgspec

from actors.control_state import decode_request, encode_request
from control.core.requests import RequestRecord, Resume, recover_restored
from transport import subjects
from transport.messages import SubmitRequest


def failing_over() -> RequestRecord:
    return RequestRecord(
        submit=SubmitRequest(reply_to=f"{subjects.INBOX_ROOT}.alice.r", prompt_token_ids=[1, 2, 3]),
        request_id="r1",
        cancel_token="t",
        prompt_token_ids=[1, 2, 3],
        arrival=12.5,
        state="recovering",
        served_by=["i0", "i1"],
        resume_tokens=[7, 8],
        failovers=2,
    )


class StoredBefore(msgspec.Struct, kw_only=True):
    """A row as the previous stored form (``StoredRequest``) wrote it: the same fields plus ``v``."""

    v: int = 1
    submit: SubmitRequest
    request_id: str
    cancel_token: str
    prompt_token_ids: list[int]
    arrival: float
    headers: dict[str, str] = {}
    instance_id: str | None = None
    state: str = "queued"
    served_by: list[str] = []
    resume_tokens: list[int] = []
    failovers: int = 0


def test_a_failing_over_row_round_trips_and_its_hold_is_derived_from_it() -> None:
    record = failing_over()
    restored = decode_request(encode_request(record))
    assert restored == record
    assert recover_restored(restored, registered={"i1"}) == Resume("r1", fence_on="i1")  # fenced again


def test_a_row_written_by_the_previous_version_reads_the_same() -> None:
    record = failing_over()
    old = decode_request(msgspec.msgpack.encode(StoredBefore(**msgspec.structs.asdict(record))))
    assert old == record
    assert recover_restored(old, registered={"i0", "i1"}) == Resume("r1", fence_on="i1")
    assert recover_restored(decode_request(encode_request(record)), registered={"i0"}) == Resume("r1")
