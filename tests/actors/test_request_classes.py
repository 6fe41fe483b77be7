"""The scheduler's request classes (Chiron), as the live shell drives the control core's dispatch loop: batch
requests wait in the global queue and are released into batch and mixed instances' spare slots, never
interactive ones; interactive requests follow the role rule and wait in the scheduler's queue when every
interactive-capable instance is full."""

from __future__ import annotations

from collections.abc import Mapping

from actors.dispatching import SchedulerView
from actors.request_classes import RequestClasses
from control.core.dispatch import Dispatcher
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.dispatch import make_dispatch_policy
from control.policy.snapshots import RequestDemand
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

SETTINGS = load_settings(overrides={"autoscaler": {"class_dispatch": True}})


def classes() -> RequestClasses:
    return RequestClasses(SETTINGS)


def dispatcher(rc: RequestClasses) -> Dispatcher:
    core = Dispatcher(make_dispatch_policy("freeness"), classes=SETTINGS.autoscaling)
    rc.batch_queue = core.batch
    return core


def view(
    rc: RequestClasses, instances: Mapping[str, InstanceRecord], requests: Mapping[str, RequestRecord]
) -> SchedulerView:
    return SchedulerView(instances, requests, rc, lambda r: RequestDemand(r.request_id, 2, 1), now=0.0)


def submit(
    core: Dispatcher, rc: RequestClasses, record: RequestRecord, instances: Mapping[str, InstanceRecord]
) -> None:
    """What the scheduler does with a new request: class bookkeeping, then the core."""
    rc.hold(record, now=0.0)
    assert list(core.submit(record.request_id, view(rc, instances, {record.request_id: record}), 0.0)) == []


def released(
    core: Dispatcher, rc: RequestClasses, instances: Mapping[str, InstanceRecord], requests: Mapping[str, RequestRecord]
) -> list[tuple[str, str]]:
    return [(p.request_id, p.instance_id) for p in core.release_batch(view(rc, instances, requests))]


def route(
    core: Dispatcher,
    rc: RequestClasses,
    record: RequestRecord,
    instances: Mapping[str, InstanceRecord],
    requests: Mapping[str, RequestRecord],
) -> str | None:
    waiting = view(rc, instances, {**requests, record.request_id: record})
    w = waiting.waiting(record.request_id)
    assert w is not None
    place = core.place(w, waiting)
    return place.instance_id if place is not None else None


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
    core = dispatcher(rc)
    instances = {"i": instance(rc, "i", "interactive", 4), "b": instance(rc, "b", "batch", 2)}
    requests = {
        rid: request(rid, RequestClass.BATCH, deadline)
        for rid, deadline in (("late", 900.0), ("soon", 60.0), ("default", None))
    }
    for r in requests.values():
        submit(core, rc, r, instances)
    assert len(core.batch) == 3
    assert not rc.hold(request("chat", RequestClass.INTERACTIVE))
    assert released(core, rc, instances, requests) == [
        ("soon", "b"),
        ("late", "b"),
    ]  # 2 spare slots; the default deadline (1 h) waits
    groups = rc.snapshot(instances, requests, 0, "plan").view.batch
    assert [g.num_requests for g in groups] == [1, 1, 1] and groups[-1].tokens == 12


def test_interactive_requests_wait_when_every_interactive_capable_instance_is_full() -> None:
    rc = classes()
    core = dispatcher(rc)
    instances = {"i": instance(rc, "i", "interactive", 1), "b": instance(rc, "b", "batch", 4)}
    first = request("a", RequestClass.INTERACTIVE)
    assert route(core, rc, first, instances, {}) == "i"
    first.instance_id, first.state = "i", "running"
    assert route(core, rc, request("c", RequestClass.INTERACTIVE), instances, {"a": first}) is None


def test_class_aware_dispatch_skips_an_instance_the_registry_blocks() -> None:
    """A KunServe group's member takes no dispatch: class-aware placement reads it as draining, as the freeness
    index does (its record alone says serving)."""
    rc = classes()
    core = dispatcher(rc)
    instances = {"member": instance(rc, "member", "interactive", 4)}
    record = request("a", RequestClass.INTERACTIVE)
    blocked = SchedulerView(
        instances,
        {"a": record},
        rc,
        lambda r: RequestDemand(r.request_id, 2, 1),
        now=0.0,
        blocked={"member"}.__contains__,
    )
    w = blocked.waiting("a")
    assert w is not None
    assert core.place(w, blocked) is None
    assert route(core, rc, record, instances, {}) == "member"  # the same instance, not blocked


def test_a_relabelled_instance_is_routed_by_its_new_role() -> None:
    from actors.request_classes import SetRole

    rc = classes()
    core = dispatcher(rc)
    instances = {"x": instance(rc, "x", "interactive", 2)}
    rc.on_message(SetRole("x", "batch"), instances, {}, 0)
    assert rc.role_of("x") == "batch"
    job = request("j", RequestClass.BATCH, 30.0)
    submit(core, rc, job, instances)
    assert released(core, rc, instances, {"j": job}) == [("j", "x")]


def test_a_batch_request_resumed_after_failover_goes_back_to_the_batch_queue() -> None:
    rc = classes()
    core = dispatcher(rc)
    record = request("r", RequestClass.BATCH, 30.0)
    submit(core, rc, record, {})
    tables = view(rc, {}, {"r": record, "i": request("i", RequestClass.INTERACTIVE)})
    assert core.dispatch_or_wait("r", tables, 1.0) is None and len(core.batch) == 1  # already queued: not twice
    core.batch.clear()
    assert core.dispatch_or_wait("r", tables, 1.0) is None and len(core.batch) == 1 and not core.pending
    assert core.dispatch_or_wait("i", tables, 1.0) is None  # interactive: the scheduler's queue, not the batch one
    assert list(core.pending) == ["i"] and len(core.batch) == 1


def test_a_cancelled_batch_request_leaves_the_deadline_groups() -> None:
    rc = classes()
    core = dispatcher(rc)
    record = request("gone", RequestClass.BATCH, 30.0)
    submit(core, rc, record, {})
    assert rc.snapshot({}, {"gone": record}, 0, "watch").view.batch
    assert rc.snapshot({}, {}, 0, "watch").view.batch == ()  # the scheduler forgot it (cancel, failure)
    assert released(core, rc, {}, {}) == [] and len(rc.batch_queue) == 0
