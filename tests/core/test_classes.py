"""The control core's request classes: class placement (held back rather than overflowing onto a full
instance) and the global batch queue."""

from __future__ import annotations

from control.core.classes import BatchQueue, place_by_class
from control.policy.autoscaling import AutoscaleParams, FleetInstance, RunningBatch

PARAMS = AutoscaleParams()


def load(iid: str, role: str, slots: int, interactive: int = 0, batch: int = 0) -> FleetInstance:
    return FleetInstance(
        instance_id=iid,
        role=role,
        capacity=slots,
        num_interactive=interactive,
        num_batch=batch,  # type: ignore[arg-type]
    )


def test_overflow_onto_a_full_instance_with_nothing_to_evict_is_held_back() -> None:
    loads = [load("m", "mixed", 2, interactive=2)]
    placement = place_by_class("interactive", loads, lambda _: [], PARAMS)
    assert placement.instance_id is None and placement.evict == ()


def test_overflow_evicts_the_batch_request_with_least_progress() -> None:
    loads = [load("m", "mixed", 2, interactive=1, batch=1)]
    running = [RunningBatch("old", 50, 1.0), RunningBatch("new", 3, 2.0)]
    placement = place_by_class("interactive", loads, lambda _: running, PARAMS)
    assert (placement.instance_id, placement.evict) == ("m", ("new",))


def test_batch_requests_always_wait_in_the_queue() -> None:
    assert place_by_class("batch", [load("b", "batch", 4)], lambda _: [], PARAMS).instance_id is None


def test_batch_queue_releases_earliest_deadline_first_into_spare_slots() -> None:
    queue = BatchQueue()
    queue.push("late", 900.0, 10, now=0.0)
    queue.push("soon", 60.0, 10, now=1.0)
    queue.push("gone", 30.0, 10, now=2.0)
    queue.push("soon", 60.0, 10, now=3.0)  # already queued: once
    assert len(queue) == 3
    released = queue.release([load("b", "batch", 2)], PARAMS, alive={"late": 1, "soon": 1})
    assert released == [("soon", "b"), ("late", "b")] and len(queue) == 0


def test_a_requeued_request_keeps_its_first_place() -> None:
    queue = BatchQueue()
    queue.push("a", 60.0, 10, now=0.0)
    queue.push("b", 60.0, 10, now=1.0)
    assert queue.release([load("x", "batch", 1)], PARAMS) == [("a", "x")]
    queue.push("a", 60.0, 10, now=5.0)  # evicted: back in the queue, ahead of b (enqueued first at 0)
    assert queue.release([load("x", "batch", 1)], PARAMS) == [("a", "x")]
    queue.forget("b")
    assert queue.release([load("x", "batch", 1)], PARAMS) == [] and len(queue) == 0
