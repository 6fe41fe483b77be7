"""Operators' commands to the scheduler: drain (and undo), an instance's prefill/decode phase, the policy
parameters (query, update) and the status view.

They reach the SchedulerActor on ``drover.v1.admin.*`` subjects, audited by the control plane first
(``actors/audit.py``); :class:`SchedulerAdmin` answers each with an :class:`~transport.messages.AdminReply` (or
a typed error) on the operator's reply subject. ``drover migrate`` and the KunServe group commands are the
migration's and the memory manager's (``actors/scheduler_migration.py``, ``actors/memory_manager.py``).
Everything here runs on the scheduler actor's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from actors.control_state import ControlState
from actors.memory_manager import MemoryManager
from actors.scheduler_instances import InstanceRegistry, instance_state
from actors.scheduler_migration import SchedulerMigrations
from control.core.dispatch import Dispatcher
from control.core.pd import PdCore, make_dispatch
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.params import ENGINE_STARTUP_KEYS, PolicyParams
from control.policy.pd import parse_phase
from transport.bus import Bus
from transport.messages import (
    AdminReply,
    DrainCommand,
    ErrorCode,
    InstanceStatus,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    RequestStatus,
    StatusReply,
)

log = logging.getLogger(__name__)


class SchedulerAdmin:
    """The scheduler's answers to operators (see the module docstring).

    Collaborators: the bus, the instance ``registry``, the request table (``requests``), the core's
    ``dispatch`` loop and prefill/decode core (``pd``), the state store (``state``), the KunServe ``memory``
    manager and the ``migrations`` (for the status view); ``params()`` the policy parameters in force and
    ``adopt(params)`` which puts new ones in force in the scheduler."""

    def __init__(
        self,
        bus: Bus,
        registry: InstanceRegistry,
        requests: Mapping[str, RequestRecord],
        dispatch: Dispatcher,
        pd: PdCore,
        state: ControlState,
        memory: MemoryManager,
        migrations: SchedulerMigrations,
        params: Callable[[], PolicyParams],
        adopt: Callable[[PolicyParams], None],
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.bus = bus
        self.registry = registry
        self.requests = requests
        self.dispatch = dispatch
        self.pd = pd
        self.state = state
        self.memory = memory
        self.migrations = migrations
        self.params = params
        self.adopt = adopt

    def on_drain(self, command: DrainCommand, reply: str) -> None:
        """``drover drain``: no new dispatches to the instance (the planner moves its requests away when
        migration drains), or back in service on undo.

        Thread: the scheduler actor's thread."""
        record = self.known_instance(command.instance_id, reply)
        if record is None:
            return
        record.drain_requested = not command.undo
        self.state.save_instance(record)
        self.registry.upsert(record)  # no new dispatches from now on (or again, on undo)
        running = [r.request_id for r in record.load.running]
        if command.undo:
            self.bus.publish(reply, AdminReply(ok=True, message=f"{command.instance_id} is back in service"))
        elif reply:
            self.bus.publish(
                reply,
                AdminReply(
                    ok=True,
                    message=f"draining {command.instance_id}: {len(running)} requests to move",
                    details={"running": running, "can_migrate": record.can_migrate},
                ),
            )

    def known_instance(self, instance_id: str, reply: str) -> InstanceRecord | None:
        """The instance an operator's command names; None (and the operator told so) when there is none.

        Thread: the scheduler actor's thread."""
        record = self.registry.records.get(instance_id)
        if record is None:
            self.bus.reply_error(reply, ErrorCode.UNKNOWN_INSTANCE, f"no instance {instance_id}")
        return record

    def on_phase(self, command: PhaseCommand, reply: str) -> None:
        """An operator sets an instance's phase (audited by the control plane before it gets here).

        Thread: the scheduler actor's thread."""
        record = self.known_instance(command.instance_id, reply)
        if record is None:
            return
        try:
            phase = parse_phase(command.phase)
        except ValueError as exc:
            self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, str(exc))
            return
        self.pd.set_phase(command.instance_id, phase)
        self.state.save_phase(command.instance_id, phase)  # it outlives a control-plane restart
        self.registry.upsert(record)  # it changes dispatch pools at once
        log.info("instance %s now serves phase %s (operator %s)", command.instance_id, phase, command.operator or "-")
        note = "" if self.pd.enabled else " (pd.mode is off: phases take effect once it is on)"
        if reply:
            self.bus.publish(reply, AdminReply(ok=True, message=f"{command.instance_id} serves {phase}{note}"))

    def on_policy(self, message: PolicyQuery | PolicyUpdate, reply: str) -> None:
        """``drover policy show`` / ``set``: a new dispatch policy (or its parameters) rebuilds the dispatch
        index from every instance's snapshot; the migration planner re-rates every instance.

        Thread: the scheduler actor's thread."""
        if isinstance(message, PolicyUpdate):
            startup = sorted(ENGINE_STARTUP_KEYS & set(message.changes))
            if startup:  # read by each engine as it starts: a running control plane cannot change them
                names = ", ".join(startup)
                text = f"{names}: an engine start-up setting; set [engine] {startup[0]} where the engines start"
                self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, text)
                return
            current = self.params()
            try:
                params = current.with_updates(**message.changes)
            except ValueError as exc:
                self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, str(exc))
                return
            if (
                params.dispatch_policy != current.dispatch_policy
                or params.dispatch_params() != current.dispatch_params()
            ):
                self.dispatch.index = make_dispatch(params.dispatch_policy, params.dispatch_params(), self.pd)
                for record in self.registry.records.values():
                    self.registry.upsert(record)
            self.adopt(params)
            self.migrations.planner.set_params(params)
            log.info("policy updated: %s", message.changes)
        if reply:
            self.bus.publish(reply, AdminReply(ok=True, message="policy", details=self.params().as_dict()))

    def status(self) -> StatusReply:
        """What ``drover status`` shows: every instance and request, the queue, the migrations, the groups.

        Thread: the scheduler actor's thread."""
        now_mono, now = time.monotonic(), time.time()
        migrations = self.migrations
        return StatusReply(
            instances=[
                InstanceStatus(
                    info=r.info,
                    load=r.load,
                    age_s=now_mono - r.last_seen,
                    state=instance_state(r),
                    dispatched=r.dispatched,
                    cached_blocks=r.cached_blocks,
                    phase=self.pd.phase_of(r.info.instance_id),
                )
                for r in sorted(self.registry.records.values(), key=lambda r: r.info.instance_id)
            ],
            requests=[
                RequestStatus(
                    request_id=r.request_id,
                    instance_id=r.instance_id,
                    state=r.state,
                    prompt_tokens=len(r.prompt_token_ids),
                    age_s=now - r.arrival,
                    priority=r.submit.priority,
                    request_class=r.submit.request_class,
                )
                for r in self.requests.values()
            ],
            queued=self.dispatch.num_queued,
            dispatch_policy=self.dispatch.index.name,
            migrations_completed=migrations.done,
            migrations_aborted=migrations.aborted,
            migrations_in_flight=sorted(migrations.in_flight),
            groups=self.memory.status(),
        )
