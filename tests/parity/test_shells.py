"""Parity (b): each shell turns the same control-core decision into equivalent engine actions.

The scenario: one mixed instance with 4 SLO-safe slots (1 reserved for interactive requests) runs three batch
requests released one after another; two interactive requests arrive. The first fits; the second overflows
and the core's placement (its dispatch loop, control/core/dispatch.py) evicts the newest batch request. The live
shell (the scheduler's view of its tables and its RequestClasses) turns that into an EngineAbort "evicted" to
the instance and routes the request there; the simulator's shell
removes the same request from the same simulated engine, re-queues it, and places the interactive one.
"""

from __future__ import annotations

from actors.dispatching import SchedulerView
from actors.request_classes import RequestClasses
from control.core.dispatch import Dispatcher
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.policy.dispatch import make_dispatch_policy
from control.policy.snapshots import RequestDemand
from control.settings import load_settings
from control.simulator import ClusterConfig, ElasticConfig, simulate_elastic
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig
from transport import subjects
from transport.messages import (
    EngineInfo,
    InstanceHeartbeat,
    InstanceLoad,
    LocalReport,
    RequestClass,
    RunningRequest,
    SamplingParams,
    SubmitRequest,
)

SLOTS = 4
BATCH = ("b0", "b1", "b2")


def _live() -> tuple[list[tuple[str, str]], str | None]:
    evicted: list[tuple[str, str]] = []
    settings = load_settings(overrides={"autoscaler": {"class_dispatch": True}})
    rc = RequestClasses(settings, evict=lambda iid, rid: evicted.append((iid, rid)))
    dispatcher = Dispatcher(make_dispatch_policy("freeness"), classes=settings.autoscaling)
    info = EngineInfo(
        instance_id="m",
        engine_kind="sim",
        model="m",
        dtype="float16",
        block_size=16,
        num_blocks=400,
        max_model_len=4096,
    )
    running = [
        RunningRequest(request_id=rid, num_tokens=100 + 10 * (2 - k), num_blocks=8) for k, rid in enumerate(BATCH)
    ]
    load = InstanceLoad(num_total_blocks=400, num_free_blocks=300, num_running=3, num_waiting=0, running=running)
    local = LocalReport(batch_limit=SLOTS, capacity=SLOTS, backpressure=0.0)
    rc.on_heartbeat(InstanceHeartbeat(info=info, load=load, seq=1, sent_at=0.0, role="mixed", local=local))
    instances = {"m": InstanceRecord(info=info, load=load, last_seen=0.0)}

    def record(rid: str, request_class: RequestClass) -> RequestRecord:
        submit = SubmitRequest(
            reply_to=f"{subjects.INBOX_ROOT}.client",
            request_id=rid,
            prompt="x",
            sampling=SamplingParams(max_tokens=10),
            request_class=request_class,
            deadline_s=1000.0,
        )
        return RequestRecord(
            submit=submit, request_id=rid, cancel_token="t", prompt_token_ids=[1] * 90, arrival=0.0, headers={}
        )

    requests: dict[str, RequestRecord] = {}
    for rid in BATCH:  # dispatched one after another: b2 is the newest, with the least progress
        rec = requests[rid] = record(rid, RequestClass.BATCH)
        rec.instance_id, rec.state = "m", "running"
        rc.on_dispatched(rec, "m")

    def route(rec: RequestRecord) -> str | None:  # what the scheduler does with a new interactive request
        requests[rec.request_id] = rec
        view = SchedulerView(instances, requests, rc, lambda r: RequestDemand(r.request_id, 90, 6), now=0.0)
        waiting = view.waiting(rec.request_id)
        assert waiting is not None
        place = dispatcher.place(waiting, view)
        if place is None:
            return None
        rc.evicting_for(place.instance_id, place.evict, place.request_id)
        return place.instance_id

    first = record("i0", RequestClass.INTERACTIVE)
    assert route(first) == "m" and not evicted
    first.instance_id, first.state = "m", "running"
    return evicted, route(record("i1", RequestClass.INTERACTIVE))


def _simulated() -> tuple[list[str], list[int]]:
    engine = SimEngineConfig(block_size=16, num_blocks=400, max_num_seqs=SLOTS, max_num_batched_tokens=1024)
    params = AutoscaleParams(local=LocalParams(initial_batch=SLOTS))
    config = ElasticConfig(
        cluster=ClusterConfig(engine=engine),
        scaling="none",
        initial=PerRole(0, 1, 0),
        local_autoscaler=False,
        autoscale=params,
    )
    requests = [
        *(RequestSpec(rid, 0.2 * k, 90, 2000, request_class="batch", deadline=1000.0) for k, rid in enumerate(BATCH)),
        RequestSpec("i0", 1.0, 90, 50),
        RequestSpec("i1", 1.01, 90, 50),
    ]
    result = simulate_elastic(config, requests)
    assert result.evictions == 1
    moved = [r.spec.request_id for r in result.sim.requests if r.spec.request_id in BATCH and len(r.instances) > 1]
    i1 = next(r for r in result.sim.requests if r.spec.request_id == "i1")
    return moved, i1.instances


def test_both_shells_evict_the_same_batch_request_and_place_the_same_way() -> None:
    evicted, target = _live()
    moved, i1_instances = _simulated()
    assert evicted == [("m", "b2")] and target == "m"
    assert moved == ["b2"] and i1_instances[0] == 0
