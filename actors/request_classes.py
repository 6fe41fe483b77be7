"""Request classes in the scheduler (Chiron): interactive vs batch, instance roles, and the cluster view the
AutoscalerActor plans from.

The SchedulerActor owns one :class:`RequestClasses` and calls it from a few hooks (heartbeat, submit,
dispatch, request end); everything here runs on the scheduler's thread. The decisions are the control
core's: the dispatch loop (``control/core/dispatch.py``) routes an interactive request by role (or holds it
back) and releases the global batch queue into spare slots, in the live scheduler and in the simulator
alike. This class is the shell's bookkeeping around them: it reads the clock and the scheduler's tables
(each instance's load per class, the batch requests that may be evicted, each batch request's deadline),
and turns the core's evictions into engine messages.

With class dispatch off (``[autoscaler] class_dispatch``, default: on exactly when the autoscaler is
enabled) every request is dispatched by the scheduler's dispatch policy as before; the counters the
autoscaler reads (arrivals, service times, deadlines) are kept either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any, Protocol

from control.core.requests import record_takes_no_dispatch
from control.policy.autoscaling import (
    ROLES,
    AutoscaleParams,
    ClusterView,
    FleetInstance,
    InstanceRole,
    RunningBatch,
    batch_groups,
)
from control.settings import Settings
from transport import subjects
from transport.messages import InstanceHeartbeat, LocalReport, RequestClass

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Messages between the AutoscalerActor and the SchedulerActor (in-process, pykka tell)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetClusterView:
    """Autoscaler -> scheduler: answer with a :class:`ClusterSnapshot` told to ``reply_to``."""

    reply_to: Any  # a pykka ActorRef (or anything with .tell)
    purpose: str = "plan"
    """"plan": a scaling decision follows (the rate counters are consumed); "watch" or "manual": not."""


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Scheduler -> autoscaler: the cluster as the global autoscaler sees it, plus what it needs to act."""

    view: ClusterView
    purpose: str
    empty: frozenset[str]
    """Instances with nothing running, waiting or held, and no request assigned in the scheduler."""
    local: Mapping[str, LocalReport]
    batch_queue: int
    first_seen: Mapping[str, float]
    """When each instance's first heartbeat arrived (time.monotonic()): the end of its start-up."""


@dataclass(frozen=True, slots=True)
class SetRole:
    """Autoscaler -> scheduler: treat ``instance_id`` as ``role`` from now on (a RoleChange of the plan)."""

    instance_id: str
    role: InstanceRole


class _InstanceRecord(Protocol):
    info: Any
    load: Any
    state: str
    draining: bool
    drain_requested: bool


class _RequestRecord(Protocol):
    submit: Any
    request_id: str
    prompt_token_ids: list[int]
    instance_id: str | None
    state: str


def class_dispatch_enabled(settings: Settings) -> bool:
    auto = settings.autoscaler
    return auto.enabled if auto.class_dispatch is None else auto.class_dispatch


class RequestClasses:
    """The scheduler's request-class state (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        evict: Callable[[str, str], None] | None = None,
        batch_queue: Sized = (),
    ) -> None:
        """Thread: the one that builds the actor (before its own thread starts)."""
        self.params: AutoscaleParams = settings.autoscaling
        self.evict = evict or (lambda instance_id, request_id: None)
        """Stops a batch request on an instance (EngineAbort reason "evicted"); it comes back through the
        batch queue with what its client already has."""
        self.evicting: set[str] = set()
        self.enabled = class_dispatch_enabled(settings)
        self.reported_roles: dict[str, InstanceRole] = {}
        self.role_overrides: dict[str, InstanceRole] = {}
        self.local: dict[str, LocalReport] = {}
        self.first_seen: dict[str, float] = {}
        self.batch_queue = batch_queue
        """The core's global batch queue (the dispatcher's): only its length is read here (the autoscaler's view)."""
        self.deadlines: dict[str, tuple[float, int]] = {}  # unfinished batch request -> (deadline, tokens)
        self.dispatched_at: dict[str, float] = {}  # interactive request -> dispatch time (monotonic)
        self.batch_admitted_at: dict[str, float] = {}  # running batch request -> dispatch time (monotonic)
        self.prompt_tokens_in: dict[str, int] = {}  # instance -> prompt tokens dispatched since the last view
        self.arrivals = 0
        self.service_samples: list[float] = []
        self.last_view_at = time.monotonic()
        self.service_s = 0.0

    # ------------------------------------------------------------------------------------------- hooks
    def handles(self, message: object) -> bool:
        """Thread: the scheduler actor's thread."""
        return isinstance(message, GetClusterView | SetRole)

    def on_message(
        self, message: object, instances: Mapping[str, Any], requests: Mapping[str, Any], queued: int
    ) -> None:
        """Thread: the scheduler actor's thread."""
        if isinstance(message, SetRole):
            if message.role in ROLES:
                self.role_overrides[message.instance_id] = message.role
                log.info("instance %s now serves as %s", message.instance_id, message.role)
        elif isinstance(message, GetClusterView):
            message.reply_to.tell(self.snapshot(instances, requests, queued, message.purpose))

    def on_heartbeat(self, beat: InstanceHeartbeat) -> None:
        """Thread: the scheduler actor's thread."""
        iid = beat.info.instance_id
        self.first_seen.setdefault(iid, time.monotonic())
        role = beat.role if beat.role in ROLES else "mixed"
        self.reported_roles[iid] = role
        if beat.local is not None:
            self.local[iid] = beat.local

    def hold(self, record: _RequestRecord, now: float | None = None) -> bool:
        """A new request arrived (its deadline counts from ``now``, the scheduler's monotonic clock). True:
        it is a batch request and class dispatch is on, so it waits in the global batch queue.

        Thread: the scheduler actor's thread."""
        submit = record.submit
        now = time.monotonic() if now is None else now
        if submit.request_class != RequestClass.BATCH:
            self.arrivals += 1
            return False
        deadline_s = submit.deadline_s if submit.deadline_s is not None else self.params.slo.batch_deadline_s
        deadline = now + max(0.0, deadline_s)
        self.deadlines[record.request_id] = (deadline, len(record.prompt_token_ids) + submit.sampling.max_tokens)
        return self.enabled

    def deadline_of(self, request_id: str, now: float, tokens: int) -> tuple[float, int]:
        """A batch request's (deadline, tokens) for the batch queue; one not seen arriving (restored after a
        restart) is due now. Thread: the scheduler actor's thread."""
        return self.deadlines.get(request_id, (now, tokens))

    def evicting_for(self, instance_id: str, victims: tuple[str, ...], request_id: str) -> None:
        """Carry out the core's eviction: stop each victim on the instance (it comes back through the batch
        queue). Thread: the scheduler actor's thread."""
        for victim in victims:
            log.info("evicting batch request %s from %s for %s", victim, instance_id, request_id)
            self.evicting.add(victim)
            self.evict(instance_id, victim)

    def evictable(
        self, instance_id: str, instances: Mapping[str, Any], requests: Mapping[str, Any]
    ) -> list[RunningBatch]:
        """Batch requests running there that can come back where they left off (their client's inbox is
        under the output stream, as for failover). Thread: the scheduler actor's thread."""
        num_tokens = {r.request_id: r.num_tokens for r in instances[instance_id].load.running}
        return [
            RunningBatch(
                rec.request_id,
                max(0, num_tokens.get(rec.request_id, 0) - len(rec.prompt_token_ids)),
                self.batch_admitted_at.get(rec.request_id, 0.0),
            )
            for rec in requests.values()
            if rec.instance_id == instance_id
            and rec.state == "running"
            and rec.submit.request_class == RequestClass.BATCH
            and rec.request_id not in self.evicting
            and rec.submit.reply_to.startswith(subjects.INBOX_ROOT + ".")
        ]

    def on_evicted(self, request_id: str) -> bool:
        """The engine let an evicted request go: True when the scheduler should recover it (read back what
        its client has, then back to the batch queue). Thread: the scheduler actor's thread."""
        self.batch_admitted_at.pop(request_id, None)
        if request_id not in self.evicting:
            return False
        self.evicting.discard(request_id)
        return True

    def on_dispatched(self, record: _RequestRecord, instance_id: str) -> None:
        """Thread: the scheduler actor's thread."""
        if record.submit.request_class == RequestClass.BATCH:
            self.batch_admitted_at[record.request_id] = time.monotonic()
        elif record.request_id not in self.dispatched_at:
            self.dispatched_at[record.request_id] = time.monotonic()
        self.prompt_tokens_in[instance_id] = self.prompt_tokens_in.get(instance_id, 0) + len(record.prompt_token_ids)

    def on_ended(self, request_id: str) -> None:
        """Thread: the scheduler actor's thread."""
        self.deadlines.pop(request_id, None)
        self.batch_admitted_at.pop(request_id, None)
        self.evicting.discard(request_id)
        started = self.dispatched_at.pop(request_id, None)
        if started is not None:
            self.service_samples.append(time.monotonic() - started)

    # ------------------------------------------------------------------------------------------- views
    def role_of(self, instance_id: str) -> InstanceRole:
        """Thread: the scheduler actor's thread."""
        return self.role_overrides.get(instance_id) or self.reported_roles.get(instance_id, "mixed")

    def loads(
        self,
        instances: Mapping[str, Any],
        requests: Mapping[str, Any],
        blocked: Callable[[str], bool] = lambda _instance_id: False,
    ) -> list[FleetInstance]:
        """Every known instance as the autoscaling policies read it; request counts come from the scheduler's
        own table, so they include dispatches the instance has not reported yet. An instance that takes no
        dispatch (the core's ``takes_no_dispatch``) is ``draining``. ``blocked``: the registry's
        ``blocks_dispatch``, which class-aware placement passes; the autoscaler's view passes none, so a
        KunServe group's member counts there as the capacity it still is (a pipeline stage), not as leaving.

        Thread: the scheduler actor's thread."""
        counts: dict[str, list[int]] = {}
        for rec in requests.values():
            if rec.instance_id is not None and rec.state == "running":
                slot = counts.setdefault(rec.instance_id, [0, 0])
                slot[rec.submit.request_class == RequestClass.BATCH] += 1
        out = []
        for iid, rec in instances.items():
            local = self.local.get(iid)
            n_int, n_batch = counts.get(iid, [0, 0])
            draining = record_takes_no_dispatch(rec, blocked(iid))
            load = rec.load
            capacity = local.capacity if local is not None else 0
            slots = capacity or load.batch_limit or self.params.local.initial_batch
            backpressure = (
                local.backpressure if local is not None else (load.num_running + load.num_waiting) / max(1, slots)
            )
            out.append(
                FleetInstance(
                    instance_id=iid,
                    role=self.role_of(iid),
                    state="draining" if draining else "active",
                    batch_limit=local.batch_limit if local is not None else load.batch_limit,
                    capacity=capacity,
                    num_interactive=n_int,
                    num_batch=n_batch,
                    backpressure=backpressure,
                    tokens_per_s=local.tokens_per_s if local is not None else 0.0,
                )
            )
        return out

    def snapshot(
        self, instances: Mapping[str, Any], requests: Mapping[str, Any], queued: int, purpose: str
    ) -> ClusterSnapshot:
        """Thread: the scheduler actor's thread."""
        now = time.monotonic()
        window = max(1e-3, now - self.last_view_at)
        for table in (self.deadlines, self.dispatched_at, self.batch_admitted_at):  # cancelled or failed
            for gone in [rid for rid in table if rid not in requests]:
                table.pop(gone)
        tick = purpose == "plan"  # only a view the autoscaler plans from consumes the rate counters
        loads = []
        for load in self.loads(instances, requests):  # work tokens: output (measured) + prompts dispatched
            prompt = self.prompt_tokens_in.pop(load.instance_id, 0) if tick else 0
            loads.append(_with_tokens(load, load.tokens_per_s + prompt / window))
        if tick and self.service_samples:
            self.service_s = sum(self.service_samples) / len(self.service_samples)
            self.service_samples.clear()
        assigned = {rec.instance_id for rec in requests.values() if rec.instance_id is not None}
        empty = frozenset(
            iid
            for iid, rec in instances.items()
            if iid not in assigned and rec.load.num_running == 0 and rec.load.num_waiting == 0
        )
        pending_interactive = sum(
            1 for rec in requests.values() if rec.state == "queued" and rec.submit.request_class != RequestClass.BATCH
        )
        queued_interactive = sum(
            min(instances[load.instance_id].load.num_waiting, load.num_interactive) for load in loads
        )
        view = ClusterView(
            now=now,
            instances=tuple(loads),
            interactive_rate=self.arrivals / window if tick else 0.0,
            interactive_service_s=self.service_s,
            pending_interactive=pending_interactive,
            queued_interactive=queued_interactive,
            batch=batch_groups(self.deadlines.values()),
        )
        if tick:
            self.arrivals, self.last_view_at = 0, now
        for gone in (set(self.local) | set(self.first_seen)) - set(instances):
            self.first_seen.pop(gone, None)
            self.local.pop(gone, None)
            self.reported_roles.pop(gone, None)
            self.role_overrides.pop(gone, None)
        return ClusterSnapshot(
            view=view,
            purpose=purpose,
            empty=empty,
            local=dict(self.local),
            batch_queue=len(self.batch_queue),
            first_seen=dict(self.first_seen),
        )


def _with_tokens(load: FleetInstance, tokens_per_s: float) -> FleetInstance:
    import dataclasses

    return dataclasses.replace(load, tokens_per_s=tokens_per_s)
