"""The scheduler's request-class state (Chiron): batch requests wait in the global queue and are released
into batch and mixed instances' spare slots, never interactive ones; interactive requests follow the role
rule and wait in the scheduler's queue when every interactive-capable instance is full."""

from __future__ import annotations

from actors.request_classes import RequestClasses
from control.core.requests import InstanceRecord, RequestRecord
from control.settings import load_settings
from transport.messages import (
    EngineInfo,
    InstanceHeartbeat,
    InstanceLoad,
    LocalReport,
    RequestClass,
    SamplingParams,
    SubmitRequest,
)


def classes() -> RequestClasses:
    return RequestClasses(load_settings(overrides={"autoscaler": {"class_dispatch": True}}))


def instance(rc: RequestClasses, iid: str, role: str, capacity: int) -> InstanceRecord:
    info = EngineInfo(
        instance_id=iid, engine_kind="sim", model="m", dtype="float16", block_size=32, num_blocks=64, max_model_len=512
    )
    load = InstanceLoad(num_total_blocks=64, num_free_blocks=64, num_running=0, num_waiting=0)
    local = LocalReport(batch_limit=capacity, capacity=capacity, backpressure=0.0)
    rc.on_heartbeat(InstanceHeartbeat(info=info, load=load, seq=1, sent_at=0.0, role=role, local=local))
    return InstanceRecord(info=info, load=load, last_seen=0.0)


def request(rid: str, request_class: RequestClass, deadline_s: float | None = None) -> RequestRecord:
    submit = SubmitRequest(
        reply_to="inbox",
        request_id=rid,
        prompt="x",
        sampling=SamplingParams(max_tokens=10),
        request_class=request_class,
        deadline_s=deadline_s,
    )
    return RequestRecord(
        submit=submit, request_id=rid, cancel_token="t", prompt_token_ids=[1, 2], arrival=0.0, headers={}
    )


def test_batch_requests_are_released_earliest_deadline_first_into_batch_slots_only() -> None:
    rc = classes()
    instances = {"i": instance(rc, "i", "interactive", 4), "b": instance(rc, "b", "batch", 2)}
    requests = {
        rid: request(rid, RequestClass.BATCH, deadline)
        for rid, deadline in (("late", 900.0), ("soon", 60.0), ("default", None))
    }
    assert all(rc.hold(r) for r in requests.values())
    assert not rc.hold(request("chat", RequestClass.INTERACTIVE))
    released = rc.release(instances, requests)
    assert released == [("soon", "b"), ("late", "b")]  # 2 spare slots; the default deadline (1 h) waits
    groups = rc.snapshot(instances, requests, 0, "plan").view.batch
    assert [g.num_requests for g in groups] == [1, 1, 1] and groups[-1].tokens == 12


def test_interactive_requests_wait_when_every_interactive_capable_instance_is_full() -> None:
    rc = classes()
    instances = {"i": instance(rc, "i", "interactive", 1), "b": instance(rc, "b", "batch", 4)}
    first = request("a", RequestClass.INTERACTIVE)
    assert rc.route(first, instances, {}) == "i"
    first.instance_id, first.state = "i", "running"
    assert rc.route(request("c", RequestClass.INTERACTIVE), instances, {"a": first}) is None


def test_a_relabelled_instance_is_routed_by_its_new_role() -> None:
    from actors.request_classes import SetRole

    rc = classes()
    instances = {"x": instance(rc, "x", "interactive", 2)}
    rc.on_message(SetRole("x", "batch"), instances, {}, 0)
    assert rc.role_of("x") == "batch"
    assert rc.hold(request("j", RequestClass.BATCH, 30.0))
    assert rc.release(instances, {"j": request("j", RequestClass.BATCH)}) == [("j", "x")]


def test_a_batch_request_resumed_after_failover_goes_back_to_the_batch_queue() -> None:
    rc = classes()
    record = request("r", RequestClass.BATCH, 30.0)
    assert rc.hold(record)
    assert rc.requeue_batch(record) and len(rc.batch_queue) == 1  # already queued: not twice
    rc.batch_queue.clear()
    assert rc.requeue_batch(record) and len(rc.batch_queue) == 1
    assert not rc.requeue_batch(request("i", RequestClass.INTERACTIVE))


def test_a_cancelled_batch_request_leaves_the_deadline_groups() -> None:
    rc = classes()
    record = request("gone", RequestClass.BATCH, 30.0)
    assert rc.hold(record)
    assert rc.snapshot({}, {"gone": record}, 0, "watch").view.batch
    assert rc.snapshot({}, {}, 0, "watch").view.batch == ()  # the scheduler forgot it (cancel, failure)
    assert rc.release({}, {}) == [] and len(rc.batch_queue) == 0
