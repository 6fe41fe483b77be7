"""One rule for which instance takes no new request (``control.core.requests.takes_no_dispatch``), read alike by
every place that picks an instance, in the live shell and in the simulator.

Before, the rule was written in the registry's snapshots (draining, drain asked, not serving, held by a
KunServe group), again in the class-aware loads (without the KunServe hold, patched in afterwards), and in
parts elsewhere: the fair queue's room counted every ``serving`` instance, and ``drover migrate`` without a
destination excluded only a drain an operator asked, and the memory simulator dispatched to a unit whose group
forms or restores (live blocks its leader). Those three fail on the code before the rule was one.
"""

from __future__ import annotations

from typing import cast

import pytest

from actors.dispatching import SchedulerView
from actors.request_classes import RequestClasses
from actors.scheduler_instances import InstanceRegistry
from actors.scheduler_migration import SchedulerMigrations
from control.core.dispatch import Dispatcher
from control.core.pd import PdCore
from control.core.record import DecisionLog
from control.core.requests import InstanceRecord, takes_no_dispatch
from control.policy.dispatch import make_dispatch_policy
from control.policy.params import PolicyParams
from control.policy.pd import PdParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator
from control.simulator.memory import MemorySimulator, MemSimConfig
from transport.messages import EngineInfo, InstanceLoad

SETTINGS = load_settings(overrides={"autoscaler": {"class_dispatch": True}})

# instance id -> why it takes no new request (None: it takes them)
CASES: dict[str, str | None] = {
    "open": None,
    "leaving": "the engine drains",
    "drained": "an operator (or scale-in) asked",
    "restored": "restored from the state store, not heard since",
    "member": "a KunServe group's member (the MemoryManager blocks it)",
}


def _record(iid: str, free: int) -> InstanceRecord:
    info = EngineInfo(
        instance_id=iid, engine_kind="sim", model="m", dtype="float16", block_size=16, num_blocks=64, max_model_len=512
    )
    load = InstanceLoad(num_total_blocks=64, num_free_blocks=free, num_running=0, num_waiting=0)
    record = InstanceRecord(info=info, load=load, last_seen=0.0, can_migrate=True)
    record.draining = iid == "leaving"
    record.drain_requested = iid == "drained"
    if iid == "restored":
        record.state = "restored"
    return record


def _live(ids: list[str], free: dict[str, int]) -> tuple[InstanceRegistry, SchedulerView, SchedulerMigrations]:
    dispatch = Dispatcher(make_dispatch_policy("freeness"), classes=SETTINGS.autoscaling)
    registry = InstanceRegistry(dispatch, PdCore(PdParams()), {"member"}.__contains__)
    for iid in ids:
        registry.records[iid] = _record(iid, free.get(iid, 8))
    rc = RequestClasses(SETTINGS)
    view = SchedulerView(
        registry.records, {}, rc, lambda r: RequestDemand(r.request_id, 2, 1), 0.0, blocked=registry.blocks_dispatch
    )
    migrations = SchedulerMigrations(
        None,  # type: ignore[arg-type]  # no bus: pick_destination reads the registry only
        {},
        registry,
        {},
        dispatch,
        registry.pd,
        None,  # type: ignore[arg-type]  # no state store
        PolicyParams,
    )
    return registry, view, migrations


def test_every_live_reader_closes_the_same_instances() -> None:
    """The dispatch index (snapshots), class-aware placement, the fair queue's room and the registry's own
    answer name the same instances. Before: the fair queue's room counted all but ``restored``."""
    registry, view, _ = _live(list(CASES), {})
    closed = {iid for iid, why in CASES.items() if why is not None}
    assert {i for i, r in registry.records.items() if registry.takes_no_dispatch(r)} == closed
    assert {i for i, r in registry.records.items() if registry.snapshot(r).draining} == closed
    assert {load.instance_id for load in view.class_loads() if load.state == "draining"} == closed
    assert {i for i, _ in view.serving_waiting()} == {"open"}


@pytest.mark.parametrize("iid", [i for i, why in CASES.items() if why is not None])
def test_drover_migrate_without_a_destination_skips_an_instance_that_takes_no_request(iid: str) -> None:
    """The freest compatible instance, among those that take new requests. Before: any but one an operator
    drained, so a draining engine, a restored record or a KunServe member with more free blocks won."""
    registry, _, migrations = _live(["source", "open", iid], {"open": 4, iid: 60})
    assert migrations.pick_destination(registry.records["source"]) == "open"


def test_the_simulator_reads_the_same_rule() -> None:
    """The simulator's instances answer through the same function: a draining one is draining in its
    snapshot and gives the fair queue no room, as live."""
    sim = ClusterSimulator(ClusterConfig(num_instances=2), [])
    first, second = sim.instances
    sim.start_drain(second)
    assert [first.draining, second.draining] == [False, True]
    assert [i for i, _ in sim.serving_waiting()] == [first.instance_id]
    assert sim._snapshot(second).draining and not sim._snapshot(first).draining
    for state in ("starting", "active", "draining", "stopped"):
        first.set_state(state)
        assert first.draining == takes_no_dispatch(serving=state == "active", draining=state == "draining")


@pytest.mark.parametrize("changing", ["hold", "reloading"])
def test_the_memory_simulator_closes_a_unit_that_changes_layout(changing: str) -> None:
    """A unit forming a group (``hold``) or restoring one (``reloading``) takes no new request, as live the
    MemoryManager blocks a group's leader while the group forms or restores (``blocks_dispatch``); the
    dispatch index reads it as draining. Before: the memory simulator kept dispatching to it."""
    log = DecisionLog()
    sim = MemorySimulator(MemSimConfig(mode="kunserve", num_instances=2), [], decision_log=log)
    first, second = sim.units.values()
    setattr(first, changing, True)
    sim._show_units()
    shown = {d.key: cast(InstanceSnapshot, d.inputs[0]) for d in log.entries() if d.what == "upsert"}
    assert shown[sim._view_id(first)].draining and not shown[sim._view_id(second)].draining
    setattr(first, changing, False)
    sim._show_units()
    shown = {d.key: cast(InstanceSnapshot, d.inputs[0]) for d in log.entries() if d.what == "upsert"}
    assert not shown[sim._view_id(first)].draining  # open again once its layout is done
