"""Autoscaling in the cluster simulator: the same engines and requests under Drover's hierarchical autoscaler
(Chiron), Llumnix's threshold autoscaler, or a fixed fleet.

:class:`ElasticSimulator` extends :class:`control.simulator.cluster.ClusterSimulator` and calls the pure
policies of ``control/policy/autoscaling.py`` exactly as the live AutoscalerActor does:

* ``dispatch="class_aware"`` (Drover): the control core's dispatch loop
  (:class:`control.core.dispatch.Dispatcher`, the live scheduler's) with class routing on: an interactive
  request goes where :func:`control.core.classes.place_by_class` says (evicting the batch requests it names
  back to the global batch queue, where they later resume by recompute; held back when it would overflow onto
  a full instance with nothing to evict); batch requests wait in the core's global batch queue, earliest
  deadline first, and every scheduler tick releases its head into spare slots. Llumnix migration runs among the
  interactive and mixed instances and moves interactive requests only; batch requests stay where they run.
* ``dispatch="llumnix"``: every request is dispatched on arrival by the cluster's dispatch policy (freeness
  by default), whatever its class, with Llumnix migration: Llumnix has no request classes.
* local autoscaler (class-aware dispatch only): every ``LocalParams.period_s`` each serving instance's
  :class:`~control.core.scaling.LocalSizer` (the live engine hosts' too: :func:`local_batch_limit` under the
  policy's limits clamped to the engine's own ``max_num_seqs``) sets its engine's ``max_num_seqs``; the
  observation is the mean engine step time over the window (the inter-token latency of its decoding
  requests), its output tokens per second, its running/waiting counts and KV use.
* ``scaling="hierarchical"``: :func:`plan_scaling` every ``AutoscaleParams.period_s``; ``"threshold"``:
  :func:`threshold_scaling` every ``ThresholdParams.period_s``; ``"none"``: a fixed fleet.

Instances: a new one costs from the moment it is asked for and serves ``startup_delay_s`` later (default
23 s: vLLM-CPU engine start 13-21 s plus ~6 s importing vllm, Drover's measurement on its CPU
machines, midpoint); a draining one takes no new requests, its interactive (Llumnix: all) running
requests migrate away, its waiting batch requests go back to the queue and its running batch requests finish
in place; it stops, and stops costing, once empty. Cost is instance-seconds up to the last completion.
Same config + same requests = same result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from control.core.scaling import LocalSizer, ScalingClock
from control.policy.autoscaling import (
    BATCH,
    ROLES,
    AutoscaleParams,
    BatchGroup,
    ClusterView,
    FleetInstance,
    InstanceRole,
    LocalObservation,
    PerRole,
    RunningBatch,
    ScalingPlan,
    ScalingState,
    ThresholdParams,
    plan_scaling,
    threshold_scaling,
    total,
)
from control.policy.migration import MigrationDecision, plan_migrations
from control.policy.snapshots import InstanceSnapshot
from control.simulator.cluster import ClusterConfig, ClusterSimulator, SimInstance
from control.simulator.metrics import ClassAttainment, SimulationResult, Stat, slo_attainment
from control.simulator.views import instance_view
from control.simulator.workload import RequestSpec
from engines.sim.core import FINISHED, REMOVED, WAITING, SimOutput, SimRequest

Dispatch = Literal["class_aware", "llumnix"]
Scaling = Literal["hierarchical", "threshold", "none"]

STARTUP_DELAY_S = 23.0
"""Instance start-up delay: vLLM-CPU engine start 13-21 s + ~6 s import (NOTES.md), midpoint."""


@dataclass(frozen=True, slots=True)
class ElasticConfig:
    """One autoscaling run. ``cluster`` gives the engines, cost model and migration/dispatch policy (its
    ``num_instances`` is ignored: ``initial`` is the fleet at time 0, warm)."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dispatch: Dispatch = "class_aware"
    scaling: Scaling = "hierarchical"
    initial: PerRole[int] = field(default_factory=lambda: PerRole(3, 1, 0))
    """Instances serving at time 0, per role (Llumnix dispatch ignores roles: their total)."""
    autoscale: AutoscaleParams = field(default_factory=AutoscaleParams)
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    startup_delay_s: float = STARTUP_DELAY_S
    local_autoscaler: bool = True
    """Class-aware dispatch only: run the local autoscaler (else engines keep the configured max_num_seqs)."""
    drain_timeout_s: float = math.inf
    """A draining instance still busy this long after its drain began is stopped anyway (``[autoscaler]
    drain_timeout_s`` live); a simulated drain always empties, so by default there is none."""

    def validate(self) -> None:
        if self.scaling == "hierarchical" and self.dispatch != "class_aware":
            raise ValueError("the hierarchical autoscaler needs class-aware dispatch (roles, batch queue)")
        if total(self.initial) < 1:
            raise ValueError("start with at least one instance")
        if self.startup_delay_s < 0:
            raise ValueError("startup_delay_s must be >= 0")
        self.autoscale.validate()


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """Something the fleet did: ``decision`` (a scaling decision that acted, with its reason), ``start``,
    ``ready``, ``convert`` (role change), ``drain`` or ``stop`` of one instance."""

    time: float
    action: str
    instance_id: str
    role: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ElasticResult:
    sim: SimulationResult
    """Latency statistics as in the fixed-cluster simulator (its utilisation field assumes a fixed fleet)."""
    attainment: dict[str, ClassAttainment]
    interactive_ttft: Stat
    """TTFT of completed interactive requests, seconds (``sim.prefill`` mixes in batch requests)."""
    interactive_itl: Stat
    """Mean inter-token latency per completed interactive request, seconds."""
    instance_seconds: float
    """Cost: the sum over instances of (stopped or horizon) - asked for, start-up included."""
    horizon_s: float
    """Up to the last completion (or the last arrival when nothing completed)."""
    peak_instances: int
    scale_decisions: int
    """Scaling decisions that started or drained at least one instance."""
    instances_started: int
    instances_drained: int
    evictions: int
    """Batch requests evicted from mixed instances by interactive ones (they resume by recompute)."""
    busy_s: float
    events: list[ScaleEvent]
    timeline: list[tuple[float, int]]
    """(time, instances costing money: starting or serving) after every change."""

    @property
    def mean_instances(self) -> float:
        return self.instance_seconds / self.horizon_s if self.horizon_s > 0 else 0.0

    @property
    def requests_per_instance_s(self) -> float:
        return self.sim.completed / self.instance_seconds if self.instance_seconds > 0 else 0.0

    @property
    def utilisation(self) -> float:
        """Busy engine time / instance-seconds (start-up counts as idle)."""
        return self.busy_s / self.instance_seconds if self.instance_seconds > 0 else 0.0

    def class_attainment(self, request_class: str) -> float:
        got = self.attainment.get(request_class)
        return got.attainment if got else float("nan")


@dataclass(slots=True, eq=False)
class _Extra:
    """Per-instance autoscaling state the engine core does not hold."""

    batch_limit: int
    capacity: int = 0
    backpressure: float = 0.0
    sizer: LocalSizer | None = None  # its local autoscaler (the control core's), when that runs
    num_interactive: int = 0
    num_batch: int = 0
    entries: dict[str, tuple[SimRequest, int]] = field(default_factory=dict)  # id -> (request, output at entry)
    batch_ids: dict[str, None] = field(default_factory=dict)  # batch requests here, oldest first
    out_base: int = 0  # output tokens produced here by requests that have left
    prompt_tokens: int = 0  # prompt tokens prefilled here (counted at each request's first token)
    l_time: float = 0.0
    l_busy: float = 0.0
    l_steps: int = 0
    l_out: int = 0
    l_preempt: int = 0
    g_time: float = 0.0
    g_work: int = 0
    tokens_per_s: float = 0.0


class ElasticSimulator(ClusterSimulator):
    """Run ``requests`` under ``config``; ``run_elastic()`` returns an :class:`ElasticResult`."""

    lazy_token_counts = False  # eviction ranks running batch requests by their output so far (_evictable)

    def __init__(self, config: ElasticConfig, requests: Sequence[RequestSpec]) -> None:
        config.validate()
        self.elastic = config
        self.as_params = config.autoscale
        cluster = dataclasses.replace(config.cluster, num_instances=total(config.initial), drain=())
        super().__init__(cluster, requests)
        self.class_aware = config.dispatch == "class_aware"
        if self.class_aware:  # the core routes by class and keeps the global batch queue
            self.dispatcher.classes = self.as_params
        roles: list[InstanceRole] = [r for r in ROLES for _ in range(config.initial[r])]
        self._extra: dict[int, _Extra] = {}
        for inst, role in zip(self.instances, roles, strict=True):
            inst.role = role if self.class_aware else "mixed"
            self._init_extra(inst)
        self._groups: dict[float, list[int]] = {}  # deadline -> [requests, tokens] of unfinished batch work
        self._evicting: set[str] = set()
        self._evictions = 0
        self._arrivals_window = 0
        self._service_samples: list[float] = []
        self._service_s = 0.0
        self._scaling_state = ScalingState()
        self._events: list[ScaleEvent] = []
        self._decisions = 0
        self._timeline: list[tuple[float, int]] = [(0.0, len(self.instances))]
        # When to plan and when a draining instance stops: the control core's, the AutoscalerActor's object,
        # fed the virtual clock. No drain timeout: a simulated drain always empties (interactive requests
        # migrate away, batch ones finish in place).
        self.scaling_clock = ScalingClock(config.autoscale.period_s, config.drain_timeout_s, started_at=self.now)

    # ------------------------------------------------------------------------------------------ running
    def run_elastic(self) -> ElasticResult:
        started = time.perf_counter()
        if self.class_aware and self.elastic.local_autoscaler:
            self.call_at(self.as_params.local.period_s, self._local_tick)
        if self.elastic.scaling == "hierarchical":
            self.call_at(self.scaling_clock.next_plan_at, self._global_tick)
        elif self.elastic.scaling == "threshold":
            self.call_at(self.elastic.threshold.period_s, self._threshold_tick)
        base = self.run()
        records = base.requests
        finishes = [r.sim.finish_time for r in records if r.done and r.sim is not None]
        horizon = max(finishes) if finishes else max((s.arrival for s in self.requests), default=0.0)
        cost = 0.0
        for inst in self.instances:
            end = inst.stopped_at if inst.stopped_at >= 0 else horizon
            cost += max(0.0, min(end, horizon) - inst.requested_at)
        busy = sum(i.core.busy_time for i in self.instances)
        base = dataclasses.replace(base, wall_s=time.perf_counter() - started)
        interactive = [r for r in records if r.done and r.spec.request_class != BATCH]
        return ElasticResult(
            sim=base,
            attainment=slo_attainment(records, self.as_params.slo),
            interactive_ttft=Stat.of([r.prefill for r in interactive]),
            interactive_itl=Stat.of([d for r in interactive if (d := r.decode_per_token) is not None]),
            instance_seconds=cost,
            horizon_s=horizon,
            peak_instances=max(n for _, n in self._timeline),
            scale_decisions=self._decisions,
            instances_started=sum(1 for e in self._events if e.action == "start"),
            instances_drained=sum(1 for e in self._events if e.action == "drain"),
            evictions=self._evictions,
            busy_s=busy,
            events=self._events,
            timeline=self._timeline,
        )

    def local_sizer(self, instance_id: str = "") -> LocalSizer:
        """The local autoscaler of one of this simulator's instances: the control core's :class:`LocalSizer`
        under the autoscaling parameters and the engine's ``max_num_seqs`` (as a live engine host builds it)."""
        return LocalSizer(self.as_params, self.config.engine.max_num_seqs, key=instance_id)

    def _init_extra(self, inst: SimInstance) -> None:
        sizer = self.local_sizer(inst.instance_id) if self._local_on else None
        limit = sizer.limit if sizer is not None else inst.core.config.max_num_seqs
        self._extra[inst.index] = _Extra(batch_limit=limit, l_time=self.now, g_time=self.now, sizer=sizer)
        if self._local_on:
            inst.core.config = dataclasses.replace(inst.core.config, max_num_seqs=limit)

    @property
    def _local_on(self) -> bool:
        return self.elastic.dispatch == "class_aware" and self.elastic.local_autoscaler

    # ------------------------------------------------------------------------------------------ fleet
    def _start(self, role: InstanceRole, reason: str) -> None:
        inst = self.add_instance(role if self.class_aware else "mixed", startup_s=self.elastic.startup_delay_s)
        self._init_extra(inst)
        self._event("start", inst, reason)

    def _on_ready(self, inst: SimInstance) -> None:
        was_starting = inst.state == "starting"
        super()._on_ready(inst)
        if was_starting:
            extra = self._extra[inst.index]
            extra.l_time = extra.g_time = self.now
            self._event("ready", inst)

    def _drain(self, instance_id: str, reason: str) -> None:
        inst = self.instances[int(instance_id.rsplit("-", 1)[1])]
        if inst.state not in ("starting", "active"):
            return
        self._event("drain", inst, reason)
        self.start_drain(inst)
        if inst.state == "stopped":
            self._event("stop", inst)
            return
        self.scaling_clock.start_drain(inst.instance_id, self.now, reason)
        if self.class_aware:  # batch requests that have not started go back to the queue
            extra = self._extra[inst.index]
            for rid in list(extra.batch_ids):
                request = extra.entries[rid][0]
                if request.state == WAITING and rid not in self._evicting:
                    inst.core.remove(rid)
                    self._requeue(inst, request, evicted=False)

    def _event(self, action: str, inst: SimInstance, reason: str = "") -> None:
        self._events.append(ScaleEvent(self.now, action, inst.instance_id, inst.role, reason))
        if action in ("start", "stop"):
            costing = sum(1 for i in self.instances if i.state != "stopped")
            self._timeline.append((self.now, costing))

    def _after_tick(self) -> None:
        for index in list(self._live):
            inst = self.instances[index]
            if inst.state != "draining":
                continue
            why = self.scaling_clock.stop_reason(inst.instance_id, self.is_empty(inst), self.now)
            if why is not None or (inst.instance_id not in self.scaling_clock.draining and self.is_empty(inst)):
                self.stop_instance(inst)
                self._event("stop", inst, why or "drained")
        if self.class_aware:
            self._run_placements(self.dispatcher.release_batch(self))

    # ------------------------------------------------------------------------------------------ requests
    def _admit(self, request: SimRequest, spec: RequestSpec) -> None:
        request.tag = spec
        if spec.request_class == BATCH:
            group = self._groups.setdefault(spec.deadline, [0, 0])
            group[0] += 1
            group[1] += spec.prompt_len + spec.output_len
        else:
            self._arrivals_window += 1
        super()._admit(request, spec)  # the core: a batch request joins the batch queue (class-aware)

    def _class_of(self, request: SimRequest) -> str:
        return _class_of(request)

    def _deadline_of(self, request: SimRequest) -> float:
        spec = request.tag
        return spec.deadline if isinstance(spec, RequestSpec) else 0.0

    def class_loads(self) -> Sequence[FleetInstance]:
        return self._loads()

    def _on_placed(self, inst: SimInstance, request: SimRequest) -> None:
        extra = self._extra[inst.index]
        extra.entries[request.request_id] = (request, request.num_output)
        if _class_of(request) == BATCH:
            extra.num_batch += 1
            extra.batch_ids[request.request_id] = None
        else:
            extra.num_interactive += 1

    def _leave(self, inst: SimInstance, request: SimRequest) -> None:
        extra = self._extra[inst.index]
        entry = extra.entries.pop(request.request_id, None)
        if entry is None:
            return
        extra.out_base += request.num_output - entry[1]
        if _class_of(request) == BATCH:
            extra.num_batch -= 1
            extra.batch_ids.pop(request.request_id, None)
        else:
            extra.num_interactive -= 1

    def _on_outputs(self, inst: SimInstance, outputs: list[SimOutput]) -> None:
        extra = self._extra[inst.index]
        for out in outputs:
            request = out.request
            if out.first:
                extra.prompt_tokens += request.prompt_len
            if not out.finished:
                continue
            self._leave(inst, request)
            spec = request.tag
            assert isinstance(spec, RequestSpec)
            if spec.request_class == BATCH:
                self.dispatcher.forget(request.request_id)
                group = self._groups[spec.deadline]
                group[0] -= 1
                group[1] -= spec.prompt_len + spec.output_len
                if group[0] == 0:
                    del self._groups[spec.deadline]
            else:
                self._service_samples.append(request.finish_time - request.admitted_time)

    def _on_moved(self, request: SimRequest, src: SimInstance, dst: SimInstance) -> None:
        self._leave(src, request)
        self._on_placed(dst, request)

    def _movable(self, inst: SimInstance) -> list[SimRequest]:
        if not self.class_aware:
            return inst.core.running
        return [r for r in inst.core.running if _class_of(r) != BATCH]

    def _plan_migrations(self) -> list[MigrationDecision]:
        if not self.class_aware:
            return super()._plan_migrations()
        group = [self._snapshots[i] for i in self._live if self.instances[i].role != "batch"]
        return plan_migrations(group, list(self._in_flight.values()), self.params)

    # ------------------------------------------------------------------------------------------ batch queue
    def _push_batch(self, request: SimRequest) -> None:
        self._waiting[request.request_id] = request
        waiting = self.waiting(request.request_id)
        assert waiting is not None
        self.dispatcher.queue_batch(waiting, self.now)

    def evictable(self, instance_id: str) -> list[RunningBatch]:
        """Batch requests running on the instance that eviction may send back to the queue."""
        extra = self._extra[int(instance_id.rsplit("-", 1)[1])]
        return [
            RunningBatch(rid, extra.entries[rid][0].num_output, extra.entries[rid][0].admitted_time)
            for rid in extra.batch_ids
            if rid not in self._evicting
        ]

    def _evict(self, inst: SimInstance, victims: Sequence[str]) -> None:
        """Evict ``victims`` (batch requests on ``inst``) back to the global queue (they resume by recompute)."""
        extra = self._extra[inst.index]
        self._interrupt(inst)
        for rid in victims:
            request = extra.entries[rid][0]
            self._evicting.add(rid)
            inst.core.remove(rid)
            if request.state == REMOVED:
                self._requeue(inst, request)
            else:  # running in the step in progress: it leaves when that step ends
                at = inst.plan_end if inst.plan_end is not None else self.now
                self.call_at(at, self._requeue_later(inst, request))

    def _requeue_later(self, inst: SimInstance, request: SimRequest) -> Callable[[], None]:
        def requeue() -> None:
            if request.state == FINISHED:
                self._evicting.discard(request.request_id)
            elif request.state == REMOVED:
                self._requeue(inst, request)

        return requeue

    def _requeue(self, inst: SimInstance, request: SimRequest, *, evicted: bool = True) -> None:
        self._evicting.discard(request.request_id)
        self._leave(inst, request)
        self._evictions += evicted
        self._push_batch(request)
        self._schedule(inst)

    # ------------------------------------------------------------------------------------------ observations
    def _out_tokens(self, inst: SimInstance) -> int:
        if inst.core.has_plan:
            inst.core.advance_to(self.now)
        extra = self._extra[inst.index]
        return extra.out_base + sum(r.num_output - n0 for r, n0 in extra.entries.values())

    def _loads(self) -> tuple[FleetInstance, ...]:
        loads = []
        for inst in self.instances:
            if inst.state == "stopped":
                continue
            extra = self._extra[inst.index]
            loads.append(
                FleetInstance(
                    instance_id=inst.instance_id,
                    role=inst.role,  # type: ignore[arg-type]
                    state=inst.state,  # type: ignore[arg-type]
                    batch_limit=extra.batch_limit,
                    capacity=extra.capacity,
                    num_interactive=extra.num_interactive,
                    num_batch=extra.num_batch,
                    backpressure=extra.backpressure,
                    tokens_per_s=extra.tokens_per_s,
                    started_at=inst.requested_at,
                )
            )
        return tuple(loads)

    def _local_tick(self) -> None:
        params = self.as_params
        for index in self._live:
            inst = self.instances[index]
            if inst.state != "active":
                continue
            extra, core = self._extra[index], inst.core
            out = self._out_tokens(inst)
            window = self.now - extra.l_time
            if window <= 0:
                continue
            steps = core.num_steps - extra.l_steps
            obs = LocalObservation(
                role=inst.role,  # type: ignore[arg-type]
                batch_limit=extra.batch_limit,
                num_running=len(core.running),
                num_waiting=len(core.waiting),
                itl_s=(core.busy_time - extra.l_busy) / steps if steps else 0.0,
                tokens_per_s=(out - extra.l_out) / window,
                num_total_blocks=core.config.num_blocks,
                num_used_blocks=core.allocated_blocks,
                num_preempted=core.num_preemptions - extra.l_preempt,
            )
            assert extra.sizer is not None
            decision = extra.sizer.decide(obs)
            if decision.batch_limit != extra.batch_limit:
                self._interrupt(inst)
                core.config = dataclasses.replace(core.config, max_num_seqs=decision.batch_limit)
                extra.batch_limit = decision.batch_limit
                self._schedule(inst)
            extra.capacity, extra.backpressure = decision.capacity, decision.backpressure
            extra.l_time, extra.l_busy, extra.l_steps = self.now, core.busy_time, core.num_steps
            extra.l_out, extra.l_preempt = out, core.num_preemptions
        if not self.all_done:
            self.call_at(self.now + params.local.period_s, self._local_tick)

    def _measure_throughput(self) -> None:
        for index in self._live:
            inst = self.instances[index]
            extra = self._extra[index]
            work = self._out_tokens(inst) + extra.prompt_tokens
            window = self.now - extra.g_time
            if window > 0:
                extra.tokens_per_s = (work - extra.g_work) / window
            extra.g_time, extra.g_work = self.now, work
            if not self._local_on:  # no local autoscaler: backpressure from occupancy of the engine's seats
                extra.capacity = extra.batch_limit
                extra.backpressure = (extra.num_interactive + extra.num_batch) / max(1, extra.batch_limit)

    def _queued_interactive(self) -> int:
        return sum(1 for index in self._live for r in self.instances[index].core.waiting if _class_of(r) != BATCH)

    def _global_tick(self) -> None:
        params = self.as_params
        if not self.scaling_clock.plan_due(self.now):  # not reached: this tick runs every period_s
            self.call_at(self.scaling_clock.next_plan_at, self._global_tick)
            return
        self._measure_throughput()
        if self._service_samples:
            self._service_s = sum(self._service_samples) / len(self._service_samples)
            self._service_samples.clear()
        view = ClusterView(
            now=self.now,
            instances=self._loads(),
            interactive_rate=self._arrivals_window / params.period_s,
            interactive_service_s=self._service_s,
            pending_interactive=len(self.dispatcher.pending),
            queued_interactive=self._queued_interactive(),
            batch=tuple(BatchGroup(d, n, t) for d, (n, t) in sorted(self._groups.items())),
        )
        self._arrivals_window = 0
        plan = self.scale_plan(view, params)
        if plan.acts:
            self._decisions += 1
            self._events.append(ScaleEvent(self.now, "decision", "", "", plan.reason))
        for change in plan.convert:
            inst = self.instances[int(change.instance_id.rsplit("-", 1)[1])]
            inst.role = change.to_role
            self._event("convert", inst, f"{change.from_role} -> {change.to_role}")
        for iid in plan.drain:
            self._drain(iid, plan.reason)
        for role in ROLES:
            for _ in range(plan.start[role]):
                self._start(role, plan.reason)
        if not self.all_done:
            self.call_at(self.now + params.period_s, self._global_tick)

    def scale_plan(self, view: ClusterView, params: AutoscaleParams) -> ScalingPlan:
        """The global autoscaler's plan for ``view``, carrying its state (the scale-in window) from one plan to
        the next as the AutoscalerActor does; the replay parity test feeds it a live run's views."""
        plan = plan_scaling(view, self._scaling_state, params)
        self._scaling_state = plan.state
        return plan

    def _threshold_tick(self) -> None:
        params = self.elastic.threshold
        snapshots = [
            self._scaling_snapshot(self.instances[i])
            for i in self._live
            if self.instances[i].state in ("active", "draining")
        ]
        starting = sum(1 for i in self.instances if i.state == "starting")
        decision = threshold_scaling(snapshots, starting=starting, params=params)
        if decision.add or decision.drain:
            self._decisions += 1
            self._events.append(ScaleEvent(self.now, "decision", "", "", decision.reason))
        for iid in decision.drain:
            self._drain(iid, decision.reason)
        for _ in range(decision.add):
            self._start("mixed", decision.reason)
        if not self.all_done:
            self.call_at(self.now + params.period_s, self._threshold_tick)

    def _scaling_snapshot(self, inst: SimInstance) -> InstanceSnapshot:
        """Counts only, without consuming the preemption report the migration snapshots carry."""
        core = inst.core
        if core.has_plan:
            core.advance_to(self.now)
        return instance_view(inst.instance_id, core, model=self.config.model, draining=inst.draining)


def _class_of(request: SimRequest) -> str:
    spec = request.tag
    return spec.request_class if isinstance(spec, RequestSpec) else "interactive"


def simulate_elastic(config: ElasticConfig, requests: Sequence[RequestSpec]) -> ElasticResult:
    """Convenience: one autoscaling run."""
    return ElasticSimulator(config, requests).run_elastic()


__all__ = [
    "STARTUP_DELAY_S",
    "ElasticConfig",
    "ElasticResult",
    "ElasticSimulator",
    "ScaleEvent",
    "simulate_elastic",
]
