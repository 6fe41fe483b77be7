"""AutoscalerActor: Chiron's global autoscaler, live. Sizes the instance pool per role from the instances'
backpressure, the interactive arrival rate and the batch deadlines, by the same pure :func:`plan_scaling`
the simulator runs.

Every tick (``min(1 s, [autoscaling] period_s)``) it asks the scheduler for a :class:`ClusterSnapshot`
(tell + reply message, never a blocking ask); when the answer arrives it

* marks provisioned instances that now heartbeat as ready (the provisioner measures their start-up, and the
  estimate replaces ``startup_s`` in the parameters the next plan uses),
* stops drained instances it owns once they are empty (and, past ``[autoscaler] drain_timeout_s``, anyway),
* every ``period_s``, when enabled: plans, then starts instances through the :class:`Provisioner`, drains
  victims by the scheduler's drain-by-migration path (``DrainCommand``), and relabels roles (``SetRole``).

With prefill/decode disaggregation on and ``[pd] autoscale_period_s`` set, the autoscaler sizes the prefill
and decode pools instead of the roles: each tick it asks the scheduler for the instances' phases
(:class:`~control.core.pd.PdPoolsQuery`) and the control core's :meth:`~control.core.pd.PdCore.autoscale`
(the simulator's decision too) says which pool gets an instance and which gives one back; a started
instance gets its phase (an audited-path ``PhaseCommand``, kept in the control state) once it heartbeats.

``drover scale ROLE N`` pins the role's min and max to N (the periodic plan then keeps it there) and acts at
once on a fresh snapshot: starts or drains the difference. ``drover scale ROLE --auto`` unpins.
Instances the provisioner did not start (e.g. ``drover up``'s) count as capacity but are never drained by
the autoscaler: it could not stop them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Any

import pykka

from actors.request_classes import ClusterSnapshot, GetClusterView, SetRole
from actors.supervisor import SupervisedActor
from control.core.pd import PdCore, PdPools, PdPoolsQuery
from control.core.provisioner import Provisioner
from control.core.record import DecisionLog
from control.core.scaling import ScalingClock
from control.policy.autoscaling import (
    ROLES,
    AutoscaleParams,
    ClusterView,
    FleetInstance,
    InstanceRole,
    PerRole,
    ScalingPlan,
    ScalingState,
    plan_scaling,
)
from control.policy.pd import Phase
from control.settings import Settings
from observability import spans
from observability.metrics import metrics
from observability.tracing import tracer
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    AdminReply,
    AutoscaleStatusQuery,
    AutoscaleStatusReply,
    DrainCommand,
    ErrorCode,
    InstanceScaleStatus,
    PhaseCommand,
    RoleScaleStatus,
    ScaleCommand,
    ScaleEventInfo,
    SetInstanceRole,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Tick:
    """Internal timer message."""


class AutoscalerActor(SupervisedActor):
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        scheduler: Any,  # an ActorSlot or ActorRef: .tell(GetClusterView | SetRole | Envelope)
        provisioner: Provisioner,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "autoscaler",
        decision_log: DecisionLog | None = None,
    ) -> None:
        """``decision_log``: the core's calls with their inputs, recorded (parity tests); None: off.

        Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__(supervisor, name)
        self.bus = bus
        self.settings = settings
        self.scheduler = scheduler
        self.provisioner = provisioner
        self.enabled = settings.autoscaler.enabled
        self.base_params: AutoscaleParams = settings.autoscaling
        self.pins: dict[InstanceRole, int] = {}
        self.state = ScalingState()
        # When to plan and when to stop a drained instance: the control core's, fed time.monotonic() (the
        # elastic simulator feeds the same object its virtual clock).
        # The first plan is one whole period after this start (control/core/scaling.py), as in the simulator.
        self.clock = ScalingClock(
            self.base_params.period_s, settings.autoscaler.drain_timeout_s, started_at=time.monotonic()
        )
        self.decision_log = decision_log
        self._record("scaling_clock", "", (self.clock.period_s, self.clock.drain_timeout_s), self.clock.last_plan_at)
        self.last_plan: ScalingPlan | None = None
        self.last_plan_at = 0.0  # time.time()
        self.last_snapshot: ClusterSnapshot | None = None
        self.last_view: ClusterView | None = None
        self.pending_manual: list[tuple[ScaleCommand, str]] = []
        self.events: deque[ScaleEventInfo] = deque(maxlen=settings.autoscaler.events_kept)
        self._timer: threading.Timer | None = None
        self._stopping = False
        # per-phase scaling ([pd] autoscale_period_s): the control core's decision, fed the scheduler's phases
        pd = settings.pd
        self.pd_scaling = self.enabled and pd.mode != "off" and pd.autoscale_period_s > 0
        self.pd_core = PdCore(pd)
        self.pd_pending: dict[str, Phase] = {}  # started for a pool, waiting for its first heartbeat

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def tick_s(self) -> float:
        """Thread: the autoscaler actor's thread."""
        return self.clock.poll_s

    def on_start(self) -> None:
        """Thread: the autoscaler actor's thread."""
        self.actor_ref.tell(_Tick())

    def on_stop(self) -> None:
        """Thread: the autoscaler actor's thread."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()

    def _schedule_tick(self) -> None:
        """Thread: the autoscaler actor's thread."""
        if self._stopping:
            return
        ref = self.actor_ref

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Tick())

        self._timer = threading.Timer(self.tick_s, fire)
        self._timer.daemon = True
        self._timer.start()

    def _record(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        """Thread: the autoscaler actor's thread (or its builder's, for the clock)."""
        if self.decision_log is not None:
            self.decision_log.add(what, key, inputs, output)

    # ------------------------------------------------------------------------------------------- messages
    def on_receive(self, message: Any) -> Any:
        """Thread: the autoscaler actor's thread."""
        if isinstance(message, _Tick):
            due = False
            if self.enabled:
                now = time.monotonic()
                due = self.clock.plan_due(now)
                self._record("plan_due", "", (now,), due)
            # Only a "plan" view consumes the scheduler's rate counters: they then cover one whole period.
            self.scheduler.tell(GetClusterView(self.actor_ref, "plan" if due else "watch"))
            if self.pd_scaling:
                self.scheduler.tell(PdPoolsQuery(self.actor_ref))
            self._schedule_tick()
        elif isinstance(message, ClusterSnapshot):
            self._on_snapshot(message)
        elif isinstance(message, PdPools):
            self._on_pools(message)
        elif isinstance(message, Envelope):
            self._on_envelope(message)
        return None

    def _on_envelope(self, envelope: Envelope) -> None:
        """Thread: the autoscaler actor's thread."""
        message = envelope.message
        if isinstance(message, ScaleCommand):
            problem = self._check_scale(message)
            if problem:
                log.warning("scale command refused: %s", problem)
                self.bus.reply_error(envelope.reply, ErrorCode.INVALID_REQUEST, problem)
                return
            self.pending_manual.append((message, envelope.reply))
            self.scheduler.tell(GetClusterView(self.actor_ref, "manual"))
        elif isinstance(message, AutoscaleStatusQuery):
            if envelope.reply:
                self.bus.publish(envelope.reply, self.status())
        else:
            self.bus.reply_error(
                envelope.reply, ErrorCode.INVALID_REQUEST, f"the autoscaler does not take {type(message).__name__}"
            )

    def _check_scale(self, command: ScaleCommand) -> str:
        """Thread: the autoscaler actor's thread."""
        if command.role not in ROLES:
            return f"unknown role {command.role!r}; roles: {', '.join(ROLES)}"
        if command.auto:
            return ""
        limit = self.base_params.max_total
        if not 0 <= command.count <= limit:
            return f"count must be in 0..{limit} (autoscaling.max_total)"
        if command.role == "interactive" and command.count == 0 and not self._other_capable(command.role):
            return "0 interactive instances would leave no instance for interactive requests (scale mixed up first)"
        return ""

    def _other_capable(self, role: str) -> bool:
        """Thread: the autoscaler actor's thread."""
        other: InstanceRole = "mixed" if role == "interactive" else "interactive"
        return self.pins.get(other, self.base_params.min_instances[other]) > 0

    # ------------------------------------------------------------------------------------------- parameters
    def params(self) -> AutoscaleParams:
        """Configured parameters with pins applied and the measured start-up time.

        Thread: the autoscaler actor's thread."""
        mins, maxs = self.base_params.min_instances, self.base_params.max_instances
        for role, count in self.pins.items():
            mins, maxs = mins.with_role(role, count), maxs.with_role(role, count)
        startup = self.provisioner.startup_estimate_s(self.base_params.startup_s)
        return dataclasses.replace(self.base_params, min_instances=mins, max_instances=maxs, startup_s=startup)

    # ------------------------------------------------------------------------------------------- snapshots
    def _on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        """Thread: the autoscaler actor's thread."""
        self.last_snapshot = snapshot
        seen = {load.instance_id for load in snapshot.view.instances}
        owned = {p.instance_id: p for p in self.provisioner.instances()}
        for iid, inst in owned.items():
            if iid in seen and inst.ready_at is None:
                seconds = self.provisioner.mark_ready(iid, snapshot.first_seen.get(iid))
                if seconds is not None:
                    self._event("ready", iid, inst.role, f"start-up {seconds:.1f} s")
        self._stop_drained(snapshot, owned)
        view = self._full_view(snapshot, owned)
        self.last_view = view
        for command, reply in self.pending_manual:
            self._manual(command, reply, view, owned)
        self.pending_manual.clear()
        if snapshot.purpose == "plan" and self.enabled and not self.pd_scaling:  # pools replace roles then
            self._plan(view, owned)

    def _full_view(self, snapshot: ClusterSnapshot, owned: dict[str, Any]) -> ClusterView:
        """The scheduler's view plus instances still starting (asked for, no heartbeat yet), minus the ones
        being stopped. Thread: the autoscaler actor's thread."""
        seen = {load.instance_id for load in snapshot.view.instances}
        stopping = {iid for iid, p in owned.items() if p.stopping}
        loads = [
            load if load.instance_id not in self.clock.draining else dataclasses.replace(load, state="draining")
            for load in snapshot.view.instances
            if load.instance_id not in stopping
        ]
        now = snapshot.view.now
        for iid, p in owned.items():
            if iid not in seen and not p.stopping and p.ready_at is None:
                loads.append(FleetInstance(instance_id=iid, role=p.role, state="starting", started_at=p.requested_at))
        started = {iid: p.requested_at for iid, p in owned.items()}
        loads = [dataclasses.replace(x, started_at=started.get(x.instance_id, x.started_at)) for x in loads]
        return dataclasses.replace(snapshot.view, instances=tuple(loads), now=now)

    def _stop_drained(self, snapshot: ClusterSnapshot, owned: dict[str, Any]) -> None:
        """Thread: the autoscaler actor's thread."""
        now = time.monotonic()
        for iid in list(self.clock.draining):
            if iid not in owned:
                self.clock.forget(iid)
                self._record("drain_forget", iid, (), None)
                continue
            why = self.clock.stop_reason(iid, iid in snapshot.empty, now)
            self._record("stop_reason", iid, (iid in snapshot.empty, now), why)
            if why is not None:
                self.provisioner.stop(iid)
                self._event("stop", iid, owned[iid].role, why)

    # ------------------------------------------------------------------------------------------- acting
    def _plan(self, view: ClusterView, owned: dict[str, Any]) -> None:
        """Thread: the autoscaler actor's thread."""
        params = self.params()
        plan = plan_scaling(view, self.state, params)
        self._record("scale_plan", "", (view, params), plan)
        self.state = plan.state
        self.last_plan, self.last_plan_at = plan, time.time()
        if not plan.acts:
            return
        self._event("decision", "", "", plan.reason)
        log.info("autoscaler: %s", plan.reason)
        # One span per acting decision (`drover trace` / Phoenix show why the pool changed); its children are
        # none: starting and draining are asynchronous and show up as scale events and metrics.
        with tracer().start_as_current_span(spans.AUTOSCALE_DECISION, attributes=self._decision_attributes(view, plan)):
            for change in plan.convert:
                self.scheduler.tell(SetRole(change.instance_id, change.to_role))
                self.bus.publish(subjects.engine(change.instance_id), SetInstanceRole(role=change.to_role))
                self._event("relabel", change.instance_id, change.to_role, f"{change.from_role} -> {change.to_role}")
                metrics().scale_event(change.to_role, "relabel")
            for iid in plan.drain:
                self._drain(iid, view, owned, "plan")
            for role in ROLES:
                for _ in range(plan.start[role]):
                    self._start(role, "plan")

    def _on_pools(self, pools: PdPools) -> None:
        """Per-phase scaling: give started instances their phase, then act on the core's decision.

        Thread: the autoscaler actor's thread."""
        seen = {snap.instance_id for snap, _ in pools.instances}
        assigned = {iid: phase for iid, phase in self.pd_pending.items() if iid in seen}
        for iid, phase in assigned.items():
            del self.pd_pending[iid]
            command = PhaseCommand(instance_id=iid, phase=phase, operator="autoscaler")
            self.scheduler.tell(Envelope(subject=subjects.admin("phase"), message=command))
        for snap, phase in pools.instances:  # the scheduler's phases, and the ones just given
            self.pd_core.on_report(snap.instance_id, assigned.get(snap.instance_id, phase))
        owned = {p.instance_id: p for p in self.provisioner.instances()}
        self.pd_pending = {iid: phase for iid, phase in self.pd_pending.items() if iid in owned}  # exited: gone

        def removable(iid: str) -> bool:
            return iid in owned and iid not in self.clock.draining

        snapshots = [snap for snap, _ in pools.instances]
        actions = self.pd_core.autoscale(snapshots, time.monotonic(), removable, tuple(self.pd_pending.values()))
        for action in actions:
            if action.delta > 0:
                started = self._start("mixed", f"{action.phase} pool: {action.reason}")
                if started is not None:
                    self.pd_pending[started] = action.phase
            elif self.last_view is not None:
                self._drain(action.instance_id, self.last_view, owned, f"{action.phase} pool: {action.reason}")

    @staticmethod
    def _decision_attributes(view: ClusterView, plan: ScalingPlan) -> dict[str, Any]:
        """The decision span's attributes: role counts before and after, what it does, why, and its inputs.
        Thread: the autoscaler actor's thread."""
        attributes: dict[str, Any] = {
            spans.AUTOSCALE_REASON: plan.reason,
            spans.AUTOSCALE_DRAIN: len(plan.drain),
            spans.AUTOSCALE_RELABEL: len(plan.convert),
        }
        for role in ROLES:
            live = sum(1 for x in view.instances if x.role == role and x.state != "draining")
            attributes[f"{spans.AUTOSCALE_BEFORE}.{role}"] = live
            attributes[f"{spans.AUTOSCALE_AFTER}.{role}"] = plan.targets[role]
            attributes[f"{spans.AUTOSCALE_START}.{role}"] = plan.start[role]
        est = plan.estimate
        inputs = {
            "interactive_rate": view.interactive_rate,
            "interactive_service_s": view.interactive_service_s,
            "pending_interactive": view.pending_interactive,
            "queued_interactive": view.queued_interactive,
            "batch_tokens": sum(g.tokens for g in view.batch),
            "interactive_demand": est.interactive_demand,
            "batch_tokens_per_s": est.batch_tokens_per_s,
        }
        for name, value in inputs.items():
            attributes[f"{spans.AUTOSCALE_INPUT}.{name}"] = float(value)
        return attributes

    def _start(self, role: InstanceRole, why: str) -> str | None:
        """Thread: the autoscaler actor's thread."""
        try:
            iid = self.provisioner.start(role)
        except Exception as exc:
            log.error("could not start a %s instance: %r", role, exc)
            self._event("start-failed", "", role, repr(exc))
            return None
        self._event("start", iid, role, why)
        metrics().scale_event(role, "out")
        return iid

    def _drain(self, iid: str, view: ClusterView, owned: dict[str, Any], why: str) -> bool:
        """Thread: the autoscaler actor's thread."""
        if iid not in owned:
            log.info("autoscaler: %s was not started by the provisioner; not draining it", iid)
            return False
        load = next((x for x in view.instances if x.instance_id == iid), None)
        if load is not None and load.state == "starting":  # nothing to move: stop it now
            self.provisioner.stop(iid)
            self._event("stop", iid, owned[iid].role, f"{why}: not needed before it started")
            metrics().scale_event(owned[iid].role, "in")
            return True
        if iid in self.clock.draining:
            return False
        now = time.monotonic()
        self._record("start_drain", iid, (now, why), self.clock.start_drain(iid, now, why))
        self.scheduler.tell(Envelope(subject=subjects.admin("drain"), message=DrainCommand(instance_id=iid)))
        self._event("drain", iid, owned[iid].role, why)
        metrics().scale_event(owned[iid].role, "in")
        return True

    def _manual(self, command: ScaleCommand, reply: str, view: ClusterView, owned: dict[str, Any]) -> None:
        """Thread: the autoscaler actor's thread."""
        role: InstanceRole = command.role  # type: ignore[assignment]
        if command.auto:
            self.pins.pop(role, None)
            self.state = dataclasses.replace(self.state, history=())
            self._record("scale_history_reset", role, (), None)
            self._event("manual", "", role, "back to automatic limits")
            self.bus.publish(reply, AdminReply(ok=True, message=f"{role}: automatic"))
            return
        self.pins[role] = command.count
        self.state = dataclasses.replace(self.state, history=())  # the pin replaces the scale-in window
        self._record("scale_history_reset", role, (), None)
        live = [x for x in view.instances if x.role == role and x.state != "draining"]
        started: list[str] = []
        drained: list[str] = []
        if command.count > len(live):
            for _ in range(command.count - len(live)):
                iid = self._start(role, f"drover scale {role} {command.count}")
                if iid is not None:
                    started.append(iid)
        elif command.count < len(live):
            order = sorted(
                live, key=lambda x: (x.instance_id not in owned, x.state != "starting", x.num_requests, -x.started_at)
            )
            for load in order:
                if len(live) - len(drained) <= command.count:
                    break
                if self._drain(load.instance_id, view, owned, f"drover scale {role} {command.count}"):
                    drained.append(load.instance_id)
        short = len(live) - len(drained) - command.count if command.count < len(live) else 0
        text = f"{role}: {len(live)} -> {command.count}"
        if short > 0:
            text += f" ({short} not started by the provisioner cannot be removed)"
        self._event("manual", "", role, text)
        self.bus.publish(reply, AdminReply(ok=True, message=text, details={"started": started, "draining": drained}))

    def _event(self, action: str, instance_id: str, role: str, reason: str) -> None:
        """Thread: the autoscaler actor's thread."""
        self.events.append(
            ScaleEventInfo(at=time.time(), action=action, instance_id=instance_id, role=role, reason=reason)
        )

    # ------------------------------------------------------------------------------------------- status
    def status(self) -> AutoscaleStatusReply:
        """Thread: the autoscaler actor's thread."""
        params = self.params()
        view = self.last_view
        loads = view.instances if view is not None else ()
        owned = {p.instance_id for p in self.provisioner.instances()}
        targets = self.last_plan.targets if self.last_plan is not None else PerRole.of(0)
        roles = [
            RoleScaleStatus(
                role=role,
                instances=sum(1 for x in loads if x.role == role and x.state == "active"),
                starting=sum(1 for x in loads if x.role == role and x.state == "starting"),
                draining=sum(1 for x in loads if x.role == role and x.state == "draining"),
                target=targets[role],
                min_instances=params.min_instances[role],
                max_instances=params.max_instances[role],
                pinned=role in self.pins,
            )
            for role in ROLES
        ]
        local = self.last_snapshot.local if self.last_snapshot is not None else {}
        instances = [
            InstanceScaleStatus(
                instance_id=x.instance_id,
                role=x.role,
                state=x.state,
                owned=x.instance_id in owned,
                batch_limit=x.batch_limit,
                capacity=x.capacity,
                backpressure=x.backpressure,
                num_interactive=x.num_interactive,
                num_batch=x.num_batch,
                tokens_per_s=x.tokens_per_s,
                local_reason=local[x.instance_id].reason if x.instance_id in local else "",
            )
            for x in sorted(loads, key=lambda x: x.instance_id)
        ]
        inputs: dict[str, float] = {}
        if view is not None:
            inputs.update(
                interactive_rate=view.interactive_rate,
                interactive_service_s=view.interactive_service_s,
                pending_interactive=float(view.pending_interactive),
                queued_interactive=float(view.queued_interactive),
                batch_requests=float(sum(g.num_requests for g in view.batch)),
                batch_tokens=float(sum(g.tokens for g in view.batch)),
            )
        if self.last_plan is not None:
            est = self.last_plan.estimate
            inputs.update(
                interactive_demand=est.interactive_demand,
                slots_per_instance=est.slots_per_instance,
                batch_tokens_per_s=est.batch_tokens_per_s,
                tokens_per_instance_s=est.tokens_per_instance_s,
            )
        return AutoscaleStatusReply(
            enabled=self.enabled,
            provisioner=self.provisioner.name,
            period_s=params.period_s,
            startup_estimate_s=params.startup_s,
            startup_samples=self.provisioner.startup_samples(),
            roles=roles,
            instances=instances,
            inputs=inputs,
            last_reason=self.last_plan.reason if self.last_plan is not None else "",
            last_decision_at=self.last_plan_at,
            batch_queue=self.last_snapshot.batch_queue if self.last_snapshot is not None else 0,
            events=list(self.events),
        )
