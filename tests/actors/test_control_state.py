"""The stored form of a request table row (actors/control_state.py): a failover hold is stored with it, and
rows written before holds were stored read as not held."""

from __future__ import annotations

import msgspec

from actors.control_state import decode_request, encode_request
from control.core.requests import RequestRecord
from transport import subjects
from transport.messages import SubmitRequest


def held_record() -> RequestRecord:
    return RequestRecord(
        submit=SubmitRequest(reply_to=f"{subjects.INBOX_ROOT}.alice.r", prompt_token_ids=[1, 2, 3]),
        request_id="r1",
        cancel_token="t",
        prompt_token_ids=[1, 2, 3],
        arrival=12.5,
        state="recovering",
        served_by=["i1"],
        resume_tokens=[7, 8],
        failovers=1,
        held_on="i1",
    )


class RecordBeforeHolds(msgspec.Struct, kw_only=True):
    """The stored row as the previous version wrote it: the same fields but ``held_on``, plus ``v``."""

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


def test_a_hold_is_stored_with_its_request() -> None:
    record = held_record()
    data = encode_request(record)
    assert msgspec.msgpack.decode(data)["held_on"] == "i1"  # a field of the stored map, not a key of its own
    assert decode_request(data) == record


def test_a_row_stored_without_a_hold_reads_as_not_held() -> None:
    new = held_record()
    fields = {k: v for k, v in msgspec.structs.asdict(new).items() if k != "held_on"}
    old = decode_request(msgspec.msgpack.encode(RecordBeforeHolds(**fields)))
    assert old.held_on == ""
    assert msgspec.structs.replace(old, held_on="i1") == new  # everything else as stored
    unheld = msgspec.structs.replace(new, held_on="")
    assert "held_on" in msgspec.msgpack.decode(encode_request(unheld))  # written as "", read back as ""
    assert decode_request(encode_request(unheld)).held_on == ""
