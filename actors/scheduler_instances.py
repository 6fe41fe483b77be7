"""The scheduler's instance registry: a record per instance (from its heartbeats), the snapshot the control
core reads of each, and the dispatch index kept in step with them.

Kept out of ``actors/scheduler.py`` so the SchedulerActor only wires heartbeats and ticks to it. Everything
here runs on the scheduler actor's thread; the registry owns ``records`` (the actor, the state store's
restore and the request lifecycle read the same dict as ``SchedulerActor.instances``).
"""

from __future__ import annotations

from collections.abc import Callable

from control.core.dispatch import Dispatcher
from control.core.pd import PdCore
from control.core.record import DecisionLog
from control.core.requests import InstanceRecord, record_takes_no_dispatch
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot, running_totals
from observability.metrics import metrics
from transport.messages import EngineInfo, InstanceLoad, peer_version


def instance_state(record: InstanceRecord) -> str:
    """The state ``drover status`` and the metrics show: a drained or draining instance says so."""
    if record.drain_requested or record.draining:
        return "drained" if record.load.num_running == 0 and record.load.num_waiting == 0 else "draining"
    return record.state


class InstanceRegistry:
    """Instance records by id, their snapshots, and the dispatch index's copy of them.

    ``blocks_dispatch(instance_id)``: True while the instance takes no dispatches for another reason than its
    own report (a KunServe group holds it: the memory manager's answer)."""

    def __init__(
        self,
        dispatch: Dispatcher,
        pd: PdCore,
        blocks_dispatch: Callable[[str], bool],
        decision_log: DecisionLog | None = None,
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.records: dict[str, InstanceRecord] = {}
        self.dispatch = dispatch
        self.pd = pd
        self.blocks_dispatch = blocks_dispatch
        self.decision_log = decision_log
        # instance id -> (load, info, draining, snapshot) it was built from: migration planning asks for every
        # instance's snapshot each period, and a fresh object per instance made the incremental planner
        # re-rate all of them (O(instances) snapshot builds 20 times a second)
        self.built: dict[str, tuple[InstanceLoad, EngineInfo, object, InstanceSnapshot]] = {}

    def log_decision(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        """Log one core call for the replay parity test (nothing without a log).

        Thread: the scheduler actor's thread."""
        if self.decision_log is not None:
            self.decision_log.add(what, key, inputs, output)

    def version(self, instance_id: str | None) -> int:
        """The protocol version to speak to an instance (1 for one not known, the oldest).

        Thread: the scheduler actor's thread."""
        instance = self.records.get(instance_id) if instance_id is not None else None
        return peer_version(instance.info.protocol_version if instance else 1)

    def upsert(self, record: InstanceRecord) -> None:
        """Give the dispatch index an instance's fresh snapshot.

        Thread: the scheduler actor's thread."""
        snapshot = self.snapshot(record)
        self.dispatch.index.upsert(snapshot)
        self.log_decision("upsert", record.info.instance_id, (snapshot,), None)

    def refresh(self, instance_id: str) -> None:
        """Re-read whether an instance takes dispatches (the memory manager grouped or released it).

        Thread: the scheduler actor's thread."""
        record = self.records.get(instance_id)
        if record is not None:
            self.upsert(record)

    def remove(self, instance_id: str) -> None:
        """An instance declared dead leaves the registry, the dispatch index, the phase registry and the
        metrics.

        Thread: the scheduler actor's thread."""
        self.records.pop(instance_id)
        self.built.pop(instance_id, None)
        self.dispatch.index.remove(instance_id)
        self.pd.forget_instance(instance_id)
        self.log_decision("remove", instance_id, (), None)
        metrics().remove_instance(instance_id)

    def serving(self) -> list[InstanceRecord]:
        """The instances in service (not restored-only, starting or stopping).

        Thread: the scheduler actor's thread."""
        return [r for r in self.records.values() if r.state == "serving"]

    def takes_no_dispatch(self, record: InstanceRecord) -> bool:
        """The core's rule (:func:`control.core.requests.takes_no_dispatch`) for a row of this registry: its
        snapshot's ``draining``, class-aware placement, the fair queue's room and an operator's migration
        without a destination all read this.

        Thread: the scheduler actor's thread."""
        return record_takes_no_dispatch(record, self.blocks_dispatch(record.info.instance_id))

    def snapshot(self, record: InstanceRecord) -> InstanceSnapshot:
        """The instance's snapshot; the same object while its heartbeat, info and draining view are (a
        heartbeat's load is a fresh object, never changed in place).

        Thread: the scheduler actor's thread."""
        load = record.load
        info = record.info
        draining = self.takes_no_dispatch(record)
        cached = self.built.get(info.instance_id)
        if cached is not None and cached[0] is load and cached[1] is info and cached[2] == draining:
            return cached[3]
        snapshot = snapshot_from_load(load, info, draining)
        self.built[info.instance_id] = (load, info, draining, snapshot)
        return snapshot


def snapshot_from_load(load: InstanceLoad, info: EngineInfo, draining: bool) -> InstanceSnapshot:
    """What dispatch and planning read of an instance, built from its heartbeat's load and its info."""
    running = tuple(
        RunningSnapshot(
            request_id=r.request_id,
            num_tokens=r.num_tokens,
            num_blocks=r.num_blocks,
            priority=r.priority,
            decoding=r.decoding,
        )
        for r in load.running
    )
    block_size = info.block_size
    return InstanceSnapshot(
        instance_id=info.instance_id,
        num_total_blocks=load.num_total_blocks,
        num_free_blocks=load.num_free_blocks,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        waiting_blocks=load.waiting_blocks,
        head_waiting_blocks=load.head_waiting_blocks,
        num_preempted=load.num_preempted,
        draining=draining,
        model=info.model,
        block_size=block_size,
        running=running,
        # counted and summed while the requests just built are in the CPU cache, not again on dispatch's upsert
        high_priority_count=sum(1 for r in running if r.priority > 0),
        running_totals=running_totals(running, block_size) if block_size > 0 else None,
    )
