"""The ends of requests in the scheduler: an engine's ``EngineRequestEnded``, and a request a KunServe member
hands over when it joins a group.

A request that finished or failed at its engine is over: :meth:`RequestEnds.forget` drops it from the request
table, the state store and the migration planner, the one place that does (a queued cancel and the failover's
drop and fail call it too), and the request classes, the dispatcher's queues and the prefill/decode core let
it go. One that ended "evicted" lives on: evicted for an interactive request (Chiron), it goes back to the
batch queue from what its client has, through the failover path (``actors/scheduler_failover.py``); handed
back by a KunServe group step, it runs again after its outputs. One that ended "migrated" lives on at its
destination (the migration's end moves its record).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.control_state import ControlState
from actors.dispatching import Placements
from actors.request_classes import RequestClasses
from actors.scheduler_migration import SchedulerMigrations
from control.core.dispatch import Dispatcher
from control.core.pd import PdCore
from control.core.requests import Fail, RequestRecord, RequestTable, Resume
from transport.messages import EngineRequestEnded


@dataclass(frozen=True, slots=True)
class Handed:
    """A request a member joining a KunServe group handed over (``MemoryManager.on_handed``)."""

    request_id: str
    source: str
    destination: str | None
    outputs: list[int]


class RequestEnds:
    """Requests that end (see the module docstring).

    Collaborators: the request table (``requests``), the state store (``state``), the ``migrations`` (the
    planner's move record of a request), the request ``classes``, the core's ``dispatch`` loop, the ``pd``
    core, ``placements`` (a request run again) and ``resume(commands)``, which carries out the core's failover
    commands (an evicted request is recovered as a failed-over one is)."""

    def __init__(
        self,
        requests: RequestTable[RequestRecord],
        state: ControlState,
        migrations: SchedulerMigrations,
        classes: RequestClasses,
        dispatch: Dispatcher,
        pd: PdCore,
        placements: Placements,
        resume: Callable[[list[Resume | Fail]], None],
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.requests = requests
        self.state = state
        self.migrations = migrations
        self.classes = classes
        self.dispatch = dispatch
        self.pd = pd
        self.placements = placements
        self.resume = resume

    def forget(self, request_id: str) -> None:
        """Drop a request that is over from the request table, the state store and the planner's moves.

        Thread: the scheduler actor's thread."""
        self.requests.pop(request_id, None)
        self.state.drop_request(request_id)
        self.migrations.forget(request_id)  # the planner's move record of it is moot now

    def on_engine_ended(self, ended: EngineRequestEnded) -> None:
        """A request's copy on an instance ended (see the module docstring).

        Thread: the scheduler actor's thread."""
        if ended.finish_reason == "migrated":
            return  # it lives on at the destination; MigrationEnded moves the record
        record = self.requests.get(ended.request_id)
        if record is None or record.instance_id != ended.instance_id:
            return  # a late or duplicate event (e.g. after migration): the current owner reports again
        if ended.finish_reason == "evicted" and self.classes.on_evicted(ended.request_id):
            # preempted for an interactive request (Chiron): back to the batch queue from what the client has
            record.state, record.instance_id = "recovering", None
            self.resume([Resume(record.request_id)])
            return
        if ended.finish_reason == "evicted":  # a KunServe group step handed it back: resume after its outputs
            self.resume_after(record, ended.output_token_ids)
            return
        self.forget(ended.request_id)
        self.classes.on_ended(ended.request_id)
        self.dispatch.forget(ended.request_id)
        self.pd.on_request_ended(ended.request_id)

    def resume_after(self, record: RequestRecord, outputs: list[int]) -> None:
        """Run a request again after the output tokens its client has (recomputed where it lands).

        Thread: the scheduler actor's thread."""
        record.resume_tokens, record.state, record.instance_id = list(outputs), "queued", None
        self.state.save_request(record)
        self.placements.dispatch_or_wait(record, time.monotonic())

    def on_handed(self, handed: Handed) -> None:
        """A member joining a KunServe group handed its request over: it is being added to the group's leader
        (``destination``; on its KV, as a migrated request), or (None: it was not) resumes after its outputs.

        Thread: the scheduler actor's thread (the memory manager's call on the bus loop is handed over to it)."""
        record = self.requests.get(handed.request_id)
        if record is None or record.instance_id != handed.source:
            return  # ended (or moved) meanwhile
        if handed.destination is None:
            self.resume_after(record, handed.outputs)
            return
        self.migrations.moved(record, handed.destination)
