"""The control core's request table rows and failover decisions (control/core/requests.py)."""

from __future__ import annotations

import msgspec
import pytest

from control.core.requests import (
    FENCE_ANSWERS,
    Drop,
    Fail,
    FailoverHolds,
    Hold,
    InstanceRecord,
    Redispatch,
    RequestRecord,
    Resume,
    expired_instances,
    fail_over,
    on_recovered,
    on_released,
    recover,
    recover_restored,
    still_held_on,
)
from transport import subjects
from transport.messages import EngineInfo, InstanceLoad, SubmitRequest

INBOX = f"{subjects.INBOX_ROOT}.alice.r"


def record(rid: str, instance: str | None, reply_to: str = INBOX, state: str = "running") -> RequestRecord:
    submit = SubmitRequest(reply_to=reply_to, prompt_token_ids=[1, 2, 3])
    return RequestRecord(
        submit=submit,
        request_id=rid,
        cancel_token="t",
        prompt_token_ids=[1, 2, 3],
        arrival=0.0,
        instance_id=instance,
        state=state,
        served_by=[instance] if instance else [],
    )


def test_fail_over_resumes_what_ran_on_the_dead_instance_and_fences_it() -> None:
    rows = [record("a", "dead"), record("b", "alive"), record("c", "dead", state="recovering")]
    commands = fail_over(rows, "dead", max_attempts=3)
    assert commands == [Resume("a", fence_on="dead")]
    assert (rows[0].state, rows[0].instance_id, rows[0].failovers) == ("recovering", None, 1)
    assert rows[1].state == "running" and rows[1].failovers == 0


def test_fail_over_gives_up_after_the_retry_limit_and_where_the_stream_is_not_kept() -> None:
    tired = record("a", "dead")
    tired.failovers = 2
    plain = record("b", "dead", reply_to="_INBOX.xyz")
    commands = fail_over([tired, plain], "dead", max_attempts=2)
    first, second = commands
    assert isinstance(first, Fail) and isinstance(second, Fail)
    assert "retry limit" in first.why and subjects.INBOX_ROOT in second.why
    assert tired.state == "running"  # a failed request is not marked recovering: the shell drops it


def test_recover_and_what_the_client_had() -> None:
    row = record("a", "i1")
    assert recover(row) == Resume("a") and row.state == "recovering"
    assert on_recovered(row, [5, 6], finished=False) == Redispatch("a")
    assert (row.state, row.resume_tokens) == ("queued", [5, 6])
    assert on_recovered(row, [5, 6], finished=False) is None  # a duplicate answer: no longer recovering
    row.state = "recovering"
    assert on_recovered(row, [5, 6, 7], finished=True) == Drop("a")
    assert on_recovered(row, [], finished=False, error="unreadable") == Fail("a", "unreadable")
    assert on_recovered(None, [], finished=True) is None
    assert recover(record("b", "i1", reply_to="_INBOX.x"), unresumable="restarted") == Fail("b", "restarted")


def test_a_failed_over_request_resumes_on_its_fenced_instance_only_once_no_copy_can_run_there() -> None:
    """A restart signal of a live instance: the fence finds the request there. Resumed at once (anywhere, the
    fenced instance included) when the fence saw the copy end, when the process answering never had it (a real
    restart) or nobody answers on its subject; otherwise it waits for that instance to let go of it."""
    for answer in ("stopped", "not_here", "gone"):
        assert still_held_on("i1", answer, registered=True) == ""
    for answer in ("stopping", "silent"):
        assert still_held_on("i1", answer, registered=True) == "i1"
        assert still_held_on("i1", answer, registered=False) == ""  # declared dead: nothing is dispatched there
    assert all(still_held_on("", answer, registered=True) == "" for answer in FENCE_ANSWERS)  # nothing fenced
    with pytest.raises(ValueError, match="unknown fence answer"):
        still_held_on("i1", "maybe", registered=True)

    row = record("a", "i1")
    assert fail_over([row], "i1", max_attempts=3) == [Resume("a", fence_on="i1")]
    held_on = still_held_on("i1", "stopping", registered=True)
    assert on_recovered(row, [5, 6], finished=False, held_on=held_on) == Hold("a", "i1")
    assert (row.state, row.instance_id, row.resume_tokens) == ("recovering", None, [5, 6])
    assert on_recovered(row, [5, 6], finished=True, held_on="i1") == Drop("a")  # finished: nothing to hold
    assert on_released(row) == Redispatch("a") and row.state == "queued"
    assert on_released(row) is None and on_released(None) is None  # not recovering any more


def test_held_requests_are_released_when_their_instance_lets_go_dies_or_the_hold_times_out() -> None:
    holds = FailoverHolds()
    holds.hold("a", "i1", now=0.0)
    holds.hold("b", "i1", now=1.0)
    holds.hold("c", "i2", now=2.0)
    assert len(holds) == 3
    assert holds.on_heartbeat("i1", listed={"a", "b"}) == []  # still runs both
    assert holds.on_heartbeat("i2", listed={"a"}) == ["c"]  # i2 let go of c; a waits for i1, not i2
    assert holds.on_heartbeat("i1", listed={"b"}) == ["a"]
    assert holds.expired(now=5.0, hold_s=10.0) == []
    holds.hold("d", "i3", now=5.0)
    assert holds.expired(now=11.5, hold_s=10.0) == ["b"]
    assert holds.on_instance_gone("i3") == ["d"] and len(holds) == 0
    assert holds.on_heartbeat("i1", listed=()) == []


def test_expired_instances_are_the_silent_and_the_stopping_ones() -> None:
    info = EngineInfo(
        instance_id="x", engine_kind="sim", model="m", dtype="float16", block_size=16, num_blocks=8, max_model_len=64
    )
    load = InstanceLoad(num_total_blocks=8, num_free_blocks=8, num_running=0, num_waiting=0)
    instances = {
        "fresh": InstanceRecord(info=info, load=load, last_seen=9.0),
        "silent": InstanceRecord(info=info, load=load, last_seen=1.0),
        "stopping": InstanceRecord(info=info, load=load, last_seen=9.5, state="stopping"),
    }
    assert expired_instances(instances, now=10.0, stale_after_s=5.0) == ["silent", "stopping"]


def test_the_stored_form_is_the_record_and_older_rows_still_decode() -> None:
    row = record("a", "i1")
    row.resume_tokens = [4]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(row), type=RequestRecord) == row
    # what the previous StoredRequest wrote: the same fields plus a version number
    old = msgspec.msgpack.encode({"v": 1, **msgspec.structs.asdict(row)})
    assert msgspec.msgpack.decode(old, type=RequestRecord) == row


def test_a_restored_failover_fences_the_instance_it_left_again_so_its_hold_is_derived_again() -> None:
    """After a control-plane restart a stored ``recovering`` request is recovered with a fence on the instance
    it failed over from (the last of ``served_by``) while that instance is known: the fence's fresh answer
    decides (hold or resume) by the same rule as before the restart. Nothing is fenced where nothing can run."""
    row = record("a", "i1")
    fail_over([row], "i1", max_attempts=3)
    assert on_recovered(row, [5], finished=False, held_on="i1") == Hold("a", "i1")  # held when it stopped
    stored = msgspec.msgpack.decode(msgspec.msgpack.encode(row), type=RequestRecord)  # what a restart reads
    assert (stored.state, stored.served_by, stored.resume_tokens) == ("recovering", ["i1"], [5])
    assert recover_restored(stored, registered={"i1", "i2"}) == Resume("a", fence_on="i1")
    held_on = still_held_on("i1", "silent", registered=True)  # still silent: held again
    assert on_recovered(stored, [5], finished=False, held_on=held_on) == Hold("a", "i1")
    assert on_released(stored) == Redispatch("a") and stored.resume_tokens == [5]

    moved = record("b", "i1")  # failed over from i1, then resumed on i2 and failed over from there
    moved.served_by, moved.state, moved.instance_id = ["i1", "i2"], "recovering", None
    assert recover_restored(moved, registered={"i1", "i2"}) == Resume("b", fence_on="i2")
    assert recover_restored(moved, registered={"i1"}) == Resume("b")  # i2 is gone: nothing of it runs there
    assert moved.state == "recovering" and moved.instance_id is None

    lost = record("c", "gone")  # restored running on an instance nobody knows: no fence, read back
    assert recover_restored(lost, registered={"i1"}) == Resume("c")
    assert lost.state == "recovering"
    never = record("d", None, state="recovering")  # never dispatched: nothing to fence
    assert recover_restored(never, registered={"i1"}) == Resume("d")
    plain = record("e", "i1", reply_to="_INBOX.x", state="recovering")
    assert recover_restored(plain, registered={"i1"}, unresumable="restarted") == Fail("e", "restarted")
