"""SLO-aware autoscaling: Chiron's hierarchical autoscaler and Llumnix's threshold autoscaler, as pure policies.

No I/O, no clocks, no actors: every function reads frozen snapshots (and, where it must remember something
between calls, a frozen state it returns a successor of) and returns a decision. The live AutoscalerActor and
the cluster simulator (``control/simulator/elastic.py``) call exactly these functions.

Two request classes (Chiron, SEEDS.md): **interactive** requests have SLOs on time to first token (TTFT) and
inter-token latency (ITL), in seconds; **batch** requests have a deadline, minutes to hours away. Three
instance roles: **interactive** (interactive requests only), **mixed** (interactive first; batch requests fill
their spare slots and are evicted back to the global batch queue when interactive requests need the room) and
**batch** (batch requests only, run at the largest batch that still raises throughput).

The two levels (Chiron's hierarchical backpressure):

* **Local** (:func:`local_batch_limit`, one call per instance every ``LocalParams.period_s``): the instance's
  batch size, i.e. how many requests it runs at once (vLLM's ``max_num_seqs``), by additive increase while
  ITL stays below ``grow_below`` x SLO, the batch limit is what holds requests back and the last increase
  still raised throughput, and multiplicative decrease when ITL passes ``shrink_above`` x SLO. It reports
  its SLO-safe *capacity* (the limit, or fewer when KV memory binds first) and its *backpressure*
  (requests there / capacity; >= 1 means it cannot take more within SLO).
* **Global** (:func:`plan_scaling`, every ``AutoscaleParams.period_s``): instances per role. Interactive
  demand, in request slots, is max(arrival rate x mean time a request holds a slot (Little's law), requests
  running now) plus the queued backlog spread over the time new capacity takes to arrive (see
  :func:`interactive_demand`); interactive-capable instances = ceil(demand / (slots per instance x target
  occupancy)), split between the interactive and mixed roles by ``mixed_share``. Batch instances come from
  the batch queue's deadlines with QLM's estimate (see :func:`required_batch_throughput`). Hysteresis: scale out at
  ``target_occupancy``; scale in only down to the largest count that ``scale_in_occupancy`` needed over the
  last ``scale_in_window_s`` (a stabilization window, as Kubernetes' HPA scales down); never below min or
  above max, and not within ``scale_in_cooldown_s`` of a scale-out. Hysteresis applies to two groups,
  interactive-capable (interactive + mixed) and batch, and no group scales in while one of its instances
  drains. Inside the first group the split follows ``mixed_share`` by relabelling instances; when one group
  gives instances up while the other wants more, they change role instead of draining and starting (no
  start-up delay, nothing to move).
* **Dispatch** (Chiron's rules): :func:`route_class` sends an interactive request to an interactive
  instance with room, else to a mixed one (evicting batch requests there if it is full:
  :func:`batch_victims` picks them), else to the least loaded interactive-capable instance; batch requests
  wait in a global queue (earliest deadline first) that :func:`batch_release` drains into batch instances'
  and mixed instances' spare slots.

Baseline: :func:`threshold_scaling`, Llumnix's ``avg_load`` autoscaler (SEEDS.md): every 10 s, scale out
while the cluster's average freeness is < 10 (adding empty instances until it reaches 10), scale in one
instance when the average freeness without it would be > 60.

Clock: ``now``, deadlines and ``started_at`` are seconds on one clock the caller chooses (the simulator's
virtual time, the live actor's ``time.monotonic()``); only differences matter.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar, cast

from control.policy.snapshots import InstanceSnapshot

RequestClass = Literal["interactive", "batch"]
InstanceRole = Literal["interactive", "mixed", "batch"]
InstancePhase = Literal["prefill", "decode", "both"]
"""Prefill/decode disaggregation: which phase of a request an instance serves, beside its Chiron role (the
two are independent: a decode instance may be interactive or batch). Everything serves "both" today."""
InstanceState = Literal["starting", "active", "draining"]

INTERACTIVE: RequestClass = "interactive"
BATCH: RequestClass = "batch"
ROLES: tuple[InstanceRole, ...] = ("interactive", "mixed", "batch")
"""Also the priority order when the cluster cap forces a choice: interactive SLOs are the tightest."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PerRole(Generic[T]):
    """One value per instance role (counts, limits, timestamps)."""

    interactive: T
    mixed: T
    batch: T

    def __getitem__(self, role: InstanceRole) -> T:
        return cast(T, getattr(self, role))

    def with_role(self, role: InstanceRole, value: T) -> PerRole[T]:
        return dataclasses.replace(self, **{role: value})

    def values(self) -> tuple[T, T, T]:
        return (self.interactive, self.mixed, self.batch)

    @staticmethod
    def of(value: T) -> PerRole[T]:
        return PerRole(value, value, value)


def total(counts: PerRole[int]) -> int:
    return counts.interactive + counts.mixed + counts.batch


# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SloParams:
    """Service-level objectives. Chiron gives orders of magnitude only (interactive: seconds; batch: minutes to
    hours; its exact values are unverified in SEEDS.md), so the numbers are Drover's choice."""

    ttft_s: float = 2.0
    """Interactive time to first token: queueing + prefill. 2 s holds a p99 Azure-conversation prompt (4k
    tokens, ~0.3 s of LLaMA-7B prefill on an A100) with room for queueing, and is "seconds" as in Chiron."""
    itl_s: float = 0.1
    """Interactive inter-token latency, per request: (last token - first token) / (tokens - 1). 100 ms is 10
    tokens/s, faster than people read, and leaves room for chunked-prefill steps among decode steps."""
    batch_deadline_s: float = 3600.0
    """Deadline of a batch request submitted without one, from its arrival (Chiron: minutes to hours)."""


def meets_interactive_slo(ttft_s: float, itl_s: float | None, slo: SloParams) -> bool:
    """Both interactive SLOs hold; ``itl_s`` None (one output token) checks TTFT only."""
    return ttft_s <= slo.ttft_s and (itl_s is None or itl_s <= slo.itl_s)


@dataclass(frozen=True, slots=True)
class LocalParams:
    """The per-instance (local) autoscaler. AIMD with a throughput gate: Chiron sets the batch size from
    backpressure but publishes no formula; the constants are Drover's choice."""

    min_batch: int = 4
    """Never below: an instance always makes progress on a few requests."""
    max_batch: int = 256
    """vLLM's default ``max_num_seqs``: the engine's own ceiling."""
    initial_batch: int = 64
    """Limit of a freshly started instance, and the slots assumed for one whose capacity is not known yet."""
    grow_step: int = 8
    """Additive increase per window (8: CUDA-graph batch sizes are multiples of 8, as Llumnix rounds)."""
    shrink_factor: float = 0.75
    """Multiplicative decrease when ITL is at risk (applied to the requests actually running)."""
    grow_below: float = 0.8
    """Grow only while ITL <= 0.8 x SLO: the slack margin."""
    shrink_above: float = 0.95
    """Shrink when ITL > 0.95 x SLO: the SLO is at risk. Between the two: hold (hysteresis)."""
    min_gain: float = 0.03
    """An increase that raised throughput by less than 3 % is undone and remembered as a ceiling."""
    ceiling_windows: int = 15
    """Windows a ceiling is remembered (load shifts move the throughput curve, so it must expire)."""
    kv_full: float = 0.95
    """KV use at which memory, not the batch limit, holds requests back (growing would only preempt)."""
    period_s: float = 2.0
    """Window of one decision: 2 s holds 30-70 decode steps of a loaded LLaMA-7B instance."""


@dataclass(frozen=True, slots=True)
class AutoscaleParams:
    """The global (cluster) autoscaler. Defaults are Drover's choice unless a source is named."""

    slo: SloParams = SloParams()
    local: LocalParams = LocalParams()
    period_s: float = 10.0
    """Decision period; Llumnix's autoscaler checks every 10 s, so both run at the same cadence."""
    startup_s: float = 23.0
    """Estimated time from asking for an instance to its serving: Drover's measurement of vLLM-CPU, engine
    start 13-21 s plus ~6 s importing vllm (on the project's CPU machines), midpoint. Deadlines use it."""
    min_instances: PerRole[int] = PerRole(1, 0, 0)
    """Keep one interactive instance so that the first interactive request never waits for a start-up."""
    max_instances: PerRole[int] = PerRole(64, 64, 64)
    max_total: int = 64
    """Cluster cap (Chiron's evaluation used up to 50 A100s). Over it, roles are served in ROLES order."""
    target_occupancy: float = 0.8
    """Scale out to keep interactive demand <= 80 % of SLO-safe slots (batch: plan at 80 % of measured
    throughput): the rest absorbs a burst during the start-up delay."""
    scale_in_occupancy: float = 0.6
    """Scale in only down to the count that keeps demand <= 60 % of slots: the 60-80 % band is hysteresis."""
    scale_in_window_s: float = 60.0
    """Scale in only down to the most instances needed at any decision in this window (and not before the
    autoscaler has watched that long): a minute outlasts the noise of 10 s rate samples and a start-up
    delay; Kubernetes' HPA uses 5 min for slower-starting services."""
    scale_in_cooldown_s: float = 60.0
    """No scale-in of a role within this long after a scale-out (or scale-in) of that role."""
    scale_out_cooldown_s: float = 0.0
    """Minimum gap between scale-outs of a role. 0: starting instances already count as capacity, so a
    repeated decision cannot double-count them, and a burst should not wait."""
    mixed_share: float = 0.25
    """Fraction of interactive-capable instances that are mixed (lend idle slots to batch). Chiron publishes
    no split."""
    mixed_reserve: float = 0.1
    """Fraction of a mixed instance's slots batch requests never take, so interactive arrivals rarely evict."""
    deadline_margin_s: float = 30.0
    """Safety margin before each batch deadline (on top of ``startup_s``)."""
    min_slack_s: float = 120.0
    """A batch group due sooner (or overdue) is planned to finish within this long, not instantly: overdue
    work must not ask for the whole cluster."""
    prior_instance_tokens_per_s: float = 4000.0
    """Work tokens (prompt + output) per second of one saturated instance until one is measured: LLaMA-7B on
    an A100 in the simulator's cost model with Azure-conversation lengths (scripts/bench_autoscaling.py's
    pilot measures ~4.1k). Set it for your hardware; measurements replace it after one period."""
    throughput_ewma: float = 0.3
    """Weight of a new measurement in the per-instance throughput estimate."""
    saturated_backpressure: float = 0.9
    """Instances at or above this backpressure measure capacity (below it they measure offered load)."""

    def validate(self) -> None:
        """Raise ValueError with an actionable message when a value is out of range."""
        lp = self.local
        if not 1 <= lp.min_batch <= lp.initial_batch <= lp.max_batch:
            raise ValueError("local batch limits must satisfy 1 <= min_batch <= initial_batch <= max_batch")
        if not 0 < lp.shrink_factor < 1 or lp.grow_step < 1:
            raise ValueError("shrink_factor must be in (0, 1) and grow_step >= 1")
        if not 0 < lp.grow_below <= lp.shrink_above:
            raise ValueError("local grow_below must be > 0 and <= shrink_above")
        if not 0 < self.scale_in_occupancy <= self.target_occupancy <= 1:
            raise ValueError("need 0 < scale_in_occupancy <= target_occupancy <= 1")
        for role in ROLES:
            if not 0 <= self.min_instances[role] <= self.max_instances[role]:
                raise ValueError(f"{role}: need 0 <= min_instances <= max_instances")
        if total(self.min_instances) > self.max_total:
            raise ValueError("the per-role minimums exceed max_total")
        if not 0 <= self.mixed_share <= 1 or not 0 <= self.mixed_reserve < 1:
            raise ValueError("mixed_share must be in [0, 1] and mixed_reserve in [0, 1)")
        if self.period_s <= 0 or lp.period_s <= 0 or self.prior_instance_tokens_per_s <= 0:
            raise ValueError("periods and prior_instance_tokens_per_s must be > 0")


# ---------------------------------------------------------------------------------------------------------
# Local autoscaler
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalObservation:
    """One instance over the last local window."""

    role: InstanceRole
    batch_limit: int
    """The limit in force during the window (0: none set yet, i.e. ``initial_batch``)."""
    num_running: int
    num_waiting: int
    itl_s: float = 0.0
    """Mean inter-token latency of its decoding requests over the window (its mean step time); 0: none."""
    tokens_per_s: float = 0.0
    """Output tokens per second over the window (the throughput the batch size buys)."""
    num_total_blocks: int = 0
    num_used_blocks: int = 0
    num_preempted: int = 0
    """KV preemptions (recompute) during the window."""


@dataclass(frozen=True, slots=True)
class LocalState:
    """What the local autoscaler remembers between windows; start with ``LocalState()``."""

    prev_limit: int = 0
    prev_tokens_per_s: float = 0.0
    prev_bound: bool = False
    ceiling: int = 0
    """A growth past this limit did not raise throughput (0: none known)."""
    ceiling_age: int = 0


@dataclass(frozen=True, slots=True)
class LocalDecision:
    batch_limit: int
    """Requests the instance may run at once from now on."""
    capacity: int
    """SLO-safe concurrent requests it reports upward: the limit, or fewer when KV memory binds first."""
    backpressure: float
    """(running + waiting) / capacity, raised to ITL / SLO when that is larger: >= 1 means full at SLO."""
    reason: str
    state: LocalState


def local_batch_limit(obs: LocalObservation, state: LocalState, params: AutoscaleParams) -> LocalDecision:
    """This window's batch-size decision for one instance (see :class:`LocalParams` for the rule)."""
    lp, slo = params.local, params.slo
    limit = min(lp.max_batch, max(lp.min_batch, obs.batch_limit or lp.initial_batch))
    requests = obs.num_running + obs.num_waiting
    kv_bound = obs.num_preempted > 0 or (
        obs.num_total_blocks > 0 and obs.num_used_blocks >= lp.kv_full * obs.num_total_blocks
    )
    bound = obs.num_running >= limit and obs.num_waiting > 0
    slo_applies = obs.role != "batch"
    itl_ratio = obs.itl_s / slo.itl_s if slo_applies and obs.itl_s > 0 else 0.0
    ceiling, age = state.ceiling, state.ceiling_age + 1
    if ceiling and age > lp.ceiling_windows:
        ceiling, age = 0, 0

    grew = state.prev_limit > 0 and limit > state.prev_limit
    if grew and bound and state.prev_bound and obs.tokens_per_s <= state.prev_tokens_per_s * (1 + lp.min_gain):
        new = min(lp.max_batch, max(lp.min_batch, state.prev_limit))
        ceiling, age = new, 0
        reason = (
            f"plateau: {obs.tokens_per_s:.0f} tok/s at {limit} vs {state.prev_tokens_per_s:.0f} at "
            f"{state.prev_limit}; back to {new}"
        )
    elif itl_ratio > lp.shrink_above:
        base = min(limit, obs.num_running) if obs.num_running > 0 else limit
        new = max(lp.min_batch, min(limit, math.floor(base * lp.shrink_factor)))
        ceiling, age = 0, 0
        reason = f"shrink: ITL {obs.itl_s * 1e3:.0f} ms > {lp.shrink_above:g} x SLO {slo.itl_s * 1e3:.0f} ms"
    elif not bound:
        new = limit
        reason = "hold: the limit does not bind" if obs.num_waiting == 0 else "hold: KV memory binds, not the limit"
    elif kv_bound:
        new = limit
        reason = "hold: KV memory full"
    elif slo_applies and itl_ratio > lp.grow_below:
        new = limit
        reason = f"hold: ITL {obs.itl_s * 1e3:.0f} ms inside the {lp.grow_below:g}-{lp.shrink_above:g} x SLO band"
    elif ceiling and limit >= ceiling:
        new = limit
        reason = f"hold: at the throughput ceiling {ceiling}"
    elif limit >= lp.max_batch:
        new = limit
        reason = "hold: at max_batch"
    else:
        new = min(lp.max_batch, limit + lp.grow_step)
        if ceiling:
            new = min(new, ceiling)
        reason = f"grow: ITL {obs.itl_s * 1e3:.0f} ms has slack, {obs.num_waiting} waiting"

    kv_fit = new
    if obs.num_running > 0 and obs.num_used_blocks > 0 and obs.num_total_blocks > 0:
        kv_fit = max(1, obs.num_running * obs.num_total_blocks // obs.num_used_blocks)
    capacity = max(1, min(new, kv_fit))
    backpressure = requests / capacity
    if itl_ratio > 1.0:
        backpressure = max(backpressure, itl_ratio)
    return LocalDecision(
        batch_limit=new,
        capacity=capacity,
        backpressure=backpressure,
        reason=reason,
        state=LocalState(limit, obs.tokens_per_s, bound, ceiling, age),
    )


# ---------------------------------------------------------------------------------------------------------
# Cluster view
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetInstance:
    """One instance as the global autoscaler and the class-aware dispatch see it."""

    instance_id: str
    role: InstanceRole
    state: InstanceState = "active"
    phase: InstancePhase = "both"
    """Which phase of a request it serves (prefill/decode disaggregation); no policy reads it yet."""
    batch_limit: int = 0
    """Its local autoscaler's limit (0: not decided yet)."""
    capacity: int = 0
    """SLO-safe concurrent requests its local autoscaler reported (0: unknown, use the limit)."""
    num_interactive: int = 0
    """Interactive requests on it, running or waiting (include ones dispatched since its last report)."""
    num_batch: int = 0
    backpressure: float = 0.0
    tokens_per_s: float = 0.0
    """Work tokens (prompt + output) per second it processed over the last global window."""
    started_at: float = 0.0
    """When it was asked to start."""

    @property
    def num_requests(self) -> int:
        return self.num_interactive + self.num_batch


def instance_slots(load: FleetInstance, params: AutoscaleParams) -> int:
    """SLO-safe concurrent requests of an instance: reported capacity, else its limit, else the initial one."""
    return max(1, load.capacity or load.batch_limit or params.local.initial_batch)


@dataclass(frozen=True, slots=True)
class BatchGroup:
    """Unfinished batch requests that share a deadline (one batch job, typically)."""

    deadline: float
    num_requests: int
    tokens: int
    """Their prompt + output tokens (the work left, counted whole until a request finishes)."""


def batch_groups(entries: Iterable[tuple[float, int]]) -> tuple[BatchGroup, ...]:
    """Group (deadline, tokens) pairs of unfinished batch requests by deadline, earliest first."""
    acc: dict[float, list[int]] = {}
    for deadline, tokens in entries:
        slot = acc.setdefault(deadline, [0, 0])
        slot[0] += 1
        slot[1] += tokens
    return tuple(BatchGroup(d, n, t) for d, (n, t) in sorted(acc.items()))


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Everything the global autoscaler reads at one decision."""

    now: float
    instances: tuple[FleetInstance, ...]
    """Every instance: starting, active and draining."""
    interactive_rate: float = 0.0
    """Interactive arrivals per second over the last period."""
    interactive_service_s: float = 0.0
    """Mean time recent interactive requests held a slot: engine admission to last token, queueing excluded
    (0: none finished yet)."""
    pending_interactive: int = 0
    """Interactive requests the scheduler holds because no instance could take them."""
    queued_interactive: int = 0
    """Interactive requests counted in instances' ``num_interactive`` that wait in an engine queue (not yet
    admitted); the live actor may estimate it per instance as min(num_waiting, num_interactive)."""
    batch: tuple[BatchGroup, ...] = ()
    """Unfinished batch work (queued or running) by deadline; :func:`batch_groups` builds it."""


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What the global autoscaler remembers between decisions; start with ``ScalingState()``."""

    last_scale_out: PerRole[float] = field(default_factory=lambda: PerRole.of(-math.inf))
    last_scale_in: PerRole[float] = field(default_factory=lambda: PerRole.of(-math.inf))
    history: tuple[tuple[float, PerRole[int]], ...] = ()
    """(time, instances each role needs at ``scale_in_occupancy``) over the stabilization window."""
    first_at: float = math.inf
    """Time of the first decision (scale-in waits until a whole window has been watched)."""
    tokens_per_instance_s: float = 0.0
    """Smoothed work tokens per second of one saturated instance (0: not measured yet)."""


@dataclass(frozen=True, slots=True)
class ScalingEstimate:
    """The numbers behind a plan (for the reason, status and tests)."""

    interactive_demand: float
    """Interactive request slots to provide now (:func:`interactive_demand`)."""
    slots_per_instance: float
    batch_tokens_per_s: float
    """Batch work rate that meets every deadline (QLM estimate), net of what mixed instances lend."""
    tokens_per_instance_s: float
    need: PerRole[int]
    """Instances per role at ``target_occupancy`` (before min/max)."""
    keep: PerRole[int]
    """Instances per role at ``scale_in_occupancy``: scale in only down to this (before min/max)."""


@dataclass(frozen=True, slots=True)
class RoleChange:
    """Relabel a serving (or starting) instance: its requests stay and finish there; dispatch and the local
    autoscaler treat it by its new role from now on (a mixed instance turned batch takes no new interactive
    request; one turned interactive takes no new batch request)."""

    instance_id: str
    from_role: InstanceRole
    to_role: InstanceRole


@dataclass(frozen=True, slots=True)
class ScalingPlan:
    targets: PerRole[int]
    """Instances per role the cluster should converge to (clamped to min/max and max_total)."""
    start: PerRole[int]
    """Instances to start now, per role."""
    drain: tuple[str, ...]
    """Instances to drain now (stop dispatching to them, move or finish their requests, then stop them)."""
    convert: tuple[RoleChange, ...]
    """Instances that change role now instead of one draining and another starting."""
    reason: str
    state: ScalingState
    estimate: ScalingEstimate

    @property
    def acts(self) -> bool:
        return total(self.start) > 0 or bool(self.drain) or bool(self.convert)


# ---------------------------------------------------------------------------------------------------------
# Global autoscaler
# ---------------------------------------------------------------------------------------------------------


def required_batch_throughput(groups: Sequence[BatchGroup], now: float, params: AutoscaleParams) -> float:
    """Work tokens per second that finish every batch group by its deadline (QLM-style, earliest deadline first).

    QLM estimates a queued request's waiting time as (tokens queued ahead of it) / (token throughput). Served
    earliest deadline first, group k finishes after C_k / R seconds, C_k = tokens of groups 1..k, so every
    deadline holds iff R >= C_k / slack_k for all k, slack_k = deadline_k - now - startup_s - margin (at
    least ``min_slack_s``). Tokens are prompt + output: the same unit as the measured throughput.
    """
    cumulative = 0
    required = 0.0
    for group in sorted(groups, key=lambda g: g.deadline):
        cumulative += group.tokens
        slack = max(params.min_slack_s, group.deadline - now - params.startup_s - params.deadline_margin_s)
        required = max(required, cumulative / slack)
    return required


def estimated_completions(groups: Sequence[BatchGroup], now: float, tokens_per_s: float) -> tuple[float, ...]:
    """When each group (earliest deadline first) would finish at ``tokens_per_s``: now + C_k / throughput."""
    if tokens_per_s <= 0:
        return tuple(math.inf for _ in groups)
    cumulative = 0
    out = []
    for group in sorted(groups, key=lambda g: g.deadline):
        cumulative += group.tokens
        out.append(now + cumulative / tokens_per_s)
    return tuple(out)


def interactive_demand(view: ClusterView, params: AutoscaleParams) -> float:
    """Interactive request slots needed now: max(rate x slot time, running) + queued x min(1, S / T).

    Little's law gives the slots the arrival stream occupies (rate x S, S = the time a request holds a slot);
    the requests running now are a floor when the rate just fell. The queue (held by the scheduler or waiting
    in engine queues) is a backlog: clearing it within T = startup_s + period_s, the earliest new capacity
    can help, takes queued x S / T more slots. Counting each queued request as a slot of its own would ask
    for capacity that arrives after a short burst has gone. Without a measured S, each queued request counts
    as one slot.
    """
    in_system = sum(i.num_interactive for i in view.instances if i.state != "starting") + view.pending_interactive
    queued = min(in_system, view.queued_interactive + view.pending_interactive)
    running = in_system - queued
    service = view.interactive_service_s
    backlog = queued * min(1.0, service / (params.startup_s + params.period_s)) if service > 0 else float(queued)
    return max(float(running), view.interactive_rate * service) + backlog


def _measured_throughput(view: ClusterView, state: ScalingState, params: AutoscaleParams) -> float:
    saturated = [
        i.tokens_per_s
        for i in view.instances
        if i.state == "active" and i.tokens_per_s > 0 and i.backpressure >= params.saturated_backpressure
    ]
    if not saturated:
        return state.tokens_per_instance_s
    sample = sum(saturated) / len(saturated)
    if state.tokens_per_instance_s <= 0:
        return sample
    a = params.throughput_ewma
    return (1 - a) * state.tokens_per_instance_s + a * sample


def _estimate(view: ClusterView, state: ScalingState, params: AutoscaleParams) -> ScalingEstimate:
    serving = [i for i in view.instances if i.state != "starting"]
    demand = interactive_demand(view, params)
    capable = [i for i in serving if i.state == "active" and i.role != "batch"]
    slots = (
        sum(instance_slots(i, params) for i in capable) / len(capable) if capable else float(params.local.initial_batch)
    )
    need_ic = math.ceil(demand / (slots * params.target_occupancy))
    keep_ic = math.ceil(demand / (slots * params.scale_in_occupancy))

    measured = _measured_throughput(view, state, params)
    per_instance = measured if measured >= 1.0 else params.prior_instance_tokens_per_s  # < 1 tok/s: noise
    required = required_batch_throughput(view.batch, view.now, params)
    lent = 0.0  # what mixed instances' idle slots add to batch progress
    for i in capable:
        if i.role == "mixed":
            idle = 1.0 - params.mixed_reserve - i.num_interactive / instance_slots(i, params)
            lent += per_instance * max(0.0, idle)
    net = max(0.0, required - lent) if required > 0 else 0.0
    need_b = math.ceil(net / (per_instance * params.target_occupancy)) if net > 0 else 0
    keep_b = math.ceil(net / (per_instance * params.scale_in_occupancy)) if net > 0 else 0
    if required > 0 and need_b == 0 and not any(i.role != "interactive" for i in view.instances):
        need_b = keep_b = 1  # batch work but nowhere to run it: one batch instance

    def split(n: int) -> tuple[int, int]:
        mixed = math.floor(n * params.mixed_share + 0.5)
        return n - mixed, mixed

    need_i, need_m = split(need_ic)
    keep_i, keep_m = split(keep_ic)
    return ScalingEstimate(
        interactive_demand=demand,
        slots_per_instance=slots,
        batch_tokens_per_s=net,
        tokens_per_instance_s=per_instance,
        need=PerRole(need_i, need_m, need_b),
        keep=PerRole(keep_i, keep_m, keep_b),
    )


def _clamp(counts: PerRole[int], params: AutoscaleParams) -> PerRole[int]:
    """Per-role min/max, then the cluster cap, served in ROLES order (never below a role's minimum)."""
    clamped = {r: min(params.max_instances[r], max(params.min_instances[r], counts[r])) for r in ROLES}
    budget = params.max_total - sum(params.min_instances[r] for r in ROLES)
    for role in ROLES:
        extra = min(clamped[role] - params.min_instances[role], max(0, budget))
        clamped[role] = params.min_instances[role] + extra
        budget -= extra
    return PerRole(clamped["interactive"], clamped["mixed"], clamped["batch"])


def _drain_order(candidates: Sequence[FleetInstance]) -> list[FleetInstance]:
    """Cheapest to remove first: starting ones (nothing to move), then fewest requests, then newest."""
    return sorted(
        candidates,
        key=lambda i: (i.state != "starting", i.num_requests, -i.started_at, i.instance_id),
    )


def plan_scaling(view: ClusterView, state: ScalingState, params: AutoscaleParams) -> ScalingPlan:
    """This period's scaling decision; see the module docstring. Call every ``params.period_s``.

    Hysteresis and cooldowns apply per *group*: the interactive-capable instances (interactive + mixed roles,
    which both serve interactive requests first) and the batch instances. Within the interactive-capable
    group the split follows ``mixed_share`` by relabelling instances (it changes no interactive capacity);
    between groups, instances one group gives up are relabelled for the other before any starts.
    """
    now = view.now
    estimate = _estimate(view, state, params)
    targets = _clamp(estimate.need, params)
    both = zip(estimate.need.values(), estimate.keep.values(), strict=True)
    band = _clamp(PerRole(*(max(n, k) for n, k in both)), params)
    history = (*(h for h in state.history if now - h[0] < params.scale_in_window_s), (now, band))
    first_at = min(state.first_at, now)
    live = {r: [i for i in view.instances if i.role == r and i.state != "draining"] for r in ROLES}
    draining = {i.role for i in view.instances if i.state == "draining"}
    last_out, last_in = state.last_scale_out, state.last_scale_in

    groups: tuple[tuple[InstanceRole, ...], ...] = (("interactive", "mixed"), ("batch",))
    delta: dict[tuple[InstanceRole, ...], int] = {}
    notes: list[str] = []
    for group in groups:
        have = sum(len(live[r]) for r in group)
        target = sum(targets[r] for r in group)
        keep = max(sum(k[r] for r in group) for _, k in history)
        name = "+".join(group)
        basis = f"{name}: {_role_basis(group[-1], estimate, view)} -> {target} (have {have})"
        delta[group] = 0
        if target > have:
            if now - max(last_out[r] for r in group) < params.scale_out_cooldown_s:
                notes.append(f"{basis}; scale-out cooling down")
            else:
                delta[group] = target - have
                notes.append(f"{basis}; scale out to {target}")
        elif have > keep:
            blocked = ""
            if draining & set(group):
                blocked = "a drain is in progress"
            elif now - first_at < params.scale_in_window_s:
                blocked = f"watched {now - first_at:.0f}/{params.scale_in_window_s:.0f} s"
            elif now - max(max(last_out[r], last_in[r]) for r in group) < params.scale_in_cooldown_s:
                blocked = "cooling down"
            if blocked:
                notes.append(f"{basis}; scale-in to {keep} waits: {blocked}")
            else:
                delta[group] = keep - have
                notes.append(f"{basis}; scale in to {keep}")
        elif target < have:
            notes.append(f"{basis}; the last {params.scale_in_window_s:.0f} s needed {keep}")

    # Per-role changes: the batch group as decided; the interactive-capable group split by mixed_share.
    change = {r: 0 for r in ROLES}
    change["batch"] = delta[("batch",)]
    n_ic = len(live["interactive"]) + len(live["mixed"]) + delta[("interactive", "mixed")]
    want_m = min(
        params.max_instances.mixed, max(params.min_instances.mixed, math.floor(n_ic * params.mixed_share + 0.5))
    )
    want_i = min(params.max_instances.interactive, max(params.min_instances.interactive, n_ic - want_m))
    want_m = max(params.min_instances.mixed, min(params.max_instances.mixed, n_ic - want_i))
    change["interactive"] = want_i - len(live["interactive"])
    change["mixed"] = want_m - len(live["mixed"])

    victims = {r: _drain_order(live[r])[: max(0, -change[r])] for r in ROLES}
    wanted = {r: max(0, change[r]) for r in ROLES}
    convert: list[RoleChange] = []
    # Sources in order of preference: relabels inside the interactive-capable group first (they lose no
    # interactive capacity), then across groups, mixed before interactive (it already runs batch requests).
    preference: dict[InstanceRole, tuple[InstanceRole, ...]] = {
        "interactive": ("mixed", "batch"),
        "mixed": ("interactive", "batch"),
        "batch": ("mixed", "interactive"),
    }
    for role in ROLES:
        for source in preference[role]:
            while wanted[role] > 0 and victims[source]:
                moved = victims[source].pop(0)
                convert.append(RoleChange(moved.instance_id, source, role))
                wanted[role] -= 1

    room = params.max_total - sum(len(v) for v in live.values())
    start = {r: 0 for r in ROLES}
    for role in ROLES:
        start[role] = min(wanted[role], max(0, room))
        room -= start[role]
        if start[role] < wanted[role]:
            notes.append(f"{role}: {wanted[role] - start[role]} more wanted, max_total {params.max_total} reached")
    drain = [v.instance_id for r in ROLES for v in victims[r]]
    for group in groups:  # cooldowns follow a group's net change; relabels inside a group are neither
        inside = set(group)
        crossing = [c for c in convert if (c.to_role in inside) != (c.from_role in inside)]
        gained = sum(start[r] for r in group) + sum(1 for c in crossing if c.to_role in inside)
        lost = sum(len(victims[r]) for r in group) + sum(1 for c in crossing if c.from_role in inside)
        for role in group:
            if gained > lost:
                last_out = last_out.with_role(role, now)
            elif lost > gained:
                last_in = last_in.with_role(role, now)
    actions = [f"start {n} {r}" for r, n in start.items() if n]
    actions += [f"relabel {c.instance_id} {c.from_role}->{c.to_role}" for c in convert]
    actions += [f"drain {iid}" for iid in drain]
    reason = "; ".join(notes) if notes else "steady"
    if actions:
        reason += ": " + ", ".join(actions)
    return ScalingPlan(
        targets=targets,
        start=PerRole(start["interactive"], start["mixed"], start["batch"]),
        drain=tuple(drain),
        convert=tuple(convert),
        reason=reason,
        state=ScalingState(last_out, last_in, history, first_at, estimate.tokens_per_instance_s),
        estimate=estimate,
    )


def _role_basis(role: InstanceRole, est: ScalingEstimate, view: ClusterView) -> str:
    """The numbers behind a role's count, for the reason string."""
    if role == "batch":
        work = sum(g.tokens for g in view.batch)
        return (
            f"{work} batch tokens in {len(view.batch)} deadline groups need {est.batch_tokens_per_s:.0f} tok/s "
            f"at {est.tokens_per_instance_s:.0f} tok/s/instance"
        )
    return (
        f"interactive demand {est.interactive_demand:.1f} slots (rate {view.interactive_rate:.2f}/s x "
        f"{view.interactive_service_s:.1f} s, {view.queued_interactive + view.pending_interactive} queued), "
        f"{est.slots_per_instance:.0f} slots/instance"
    )


# ---------------------------------------------------------------------------------------------------------
# Class-aware dispatch (Chiron)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteDecision:
    instance_id: str | None
    """Where the request goes; None: hold it (batch: the global batch queue; interactive: no instance)."""
    preempt_batch: int
    """Batch requests to evict from that instance first (back to the global queue); see batch_victims."""
    overflow: bool
    """It went past its own role (to a mixed instance, or to a full one)."""
    reason: str


def route_class(request_class: str, instances: Sequence[FleetInstance], params: AutoscaleParams) -> RouteDecision:
    """Chiron's dispatch rule: own role first, overflow to mixed; interactive requests evict batch ones.

    Interactive: the active interactive instance with the most free slots; else the mixed instance with the
    most slots not held by interactive requests (evicting batch requests when it is full); else, all full,
    the least loaded interactive-capable instance (it queues there, which raises its backpressure); with no
    interactive-capable instance, a batch instance under the same rules as a mixed one. Batch: always the
    global queue (:func:`batch_release` places it). Ties go to the smaller instance id.
    """
    if request_class == BATCH:
        return RouteDecision(None, 0, False, "batch: global batch queue")
    active = [i for i in instances if i.state == "active"]
    own = [(instance_slots(i, params) - i.num_requests, i) for i in active if i.role == "interactive"]
    free_own = [(s, i) for s, i in own if s > 0]
    if free_own:
        _, best = min(free_own, key=lambda x: (-x[0], x[1].instance_id))
        return RouteDecision(best.instance_id, 0, False, "interactive instance with room")
    for role, label in (("mixed", "mixed"), ("batch", "batch (no interactive-capable instance)")):
        if role == "batch" and any(i.role != "batch" for i in active):
            break
        shared = [i for i in active if i.role == role and i.num_interactive < instance_slots(i, params)]
        if shared:
            best = min(
                shared,
                key=lambda i: (
                    i.num_requests >= instance_slots(i, params),
                    -(instance_slots(i, params) - i.num_requests),
                    -(instance_slots(i, params) - i.num_interactive),
                    i.instance_id,
                ),
            )
            evict = min(best.num_batch, max(0, best.num_requests + 1 - instance_slots(best, params)))
            why = f"overflow to {label}" + (f", evicting {evict} batch" if evict else "")
            return RouteDecision(best.instance_id, evict, True, why)
    capable = [i for i in active if i.role != "batch"] or active
    if not capable:
        return RouteDecision(None, 0, False, "hold: no active instance")
    best = min(capable, key=lambda i: (i.num_interactive / instance_slots(i, params), i.instance_id))
    evict = best.num_batch if best.role != "interactive" else 0
    return RouteDecision(best.instance_id, evict, True, "all interactive-capable instances full: queue")


@dataclass(frozen=True, slots=True)
class RunningBatch:
    """A batch request on an instance (for choosing whom to evict)."""

    request_id: str
    num_output_tokens: int
    admitted_at: float


def batch_victims(running: Sequence[RunningBatch], n: int) -> tuple[str, ...]:
    """The ``n`` batch requests to evict: least progress first (least recompute lost), then the newest."""
    order = sorted(running, key=lambda r: (r.num_output_tokens, -r.admitted_at, r.request_id))
    return tuple(r.request_id for r in order[: max(0, n)])


@dataclass(frozen=True, slots=True)
class QueuedBatch:
    """A request in the global batch queue. Keep the queue in :func:`batch_queue_key` order."""

    request_id: str
    deadline: float
    num_tokens: int = 0


def batch_queue_key(deadline: float, arrival: float, request_id: str) -> tuple[float, float, str]:
    """Release order of the global batch queue: earliest deadline first, then first come."""
    return (deadline, arrival, request_id)


@dataclass(frozen=True, slots=True)
class BatchAssignment:
    request_id: str
    instance_id: str


def batch_spare(load: FleetInstance, params: AutoscaleParams) -> int:
    """Slots an instance offers batch requests now: all free ones on a batch instance, those above the
    interactive reserve on a mixed one, none on an interactive, starting or draining one."""
    if load.state != "active" or load.role == "interactive":
        return 0
    slots = instance_slots(load, params)
    reserve = math.ceil(params.mixed_reserve * slots) if load.role == "mixed" else 0
    return max(0, slots - reserve - load.num_requests)


def batch_release(
    queue_head: Sequence[QueuedBatch], instances: Sequence[FleetInstance], params: AutoscaleParams
) -> tuple[BatchAssignment, ...]:
    """Place the head of the global batch queue into spare slots: batch instances first, then mixed, the one
    with most spare first. ``queue_head`` is in release order; it never looks past the total spare slots, so
    pass ``sum(batch_spare(...))`` entries at most."""
    heap = [
        (0 if i.role == "batch" else 1, -spare, i.instance_id)
        for i in instances
        if (spare := batch_spare(i, params)) > 0
    ]
    heapq.heapify(heap)
    out: list[BatchAssignment] = []
    for queued in queue_head:
        if not heap:
            break
        group, neg_spare, iid = heapq.heappop(heap)
        out.append(BatchAssignment(queued.request_id, iid))
        if neg_spare + 1 < 0:
            heapq.heappush(heap, (group, neg_spare + 1, iid))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Llumnix's threshold autoscaler (baseline)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThresholdParams:
    """Llumnix ``avg_load`` scaling (SEEDS.md; ``llumnix/global_scheduler/scaling_scheduler.py``)."""

    scale_out_freeness: float = 10.0
    """Scale out when the average freeness (blocks per request) is below this (Llumnix: 10)."""
    scale_in_freeness: float = 60.0
    """Scale in one instance when the average freeness without it is above this (Llumnix: 60)."""
    period_s: float = 10.0
    """Llumnix checks every 10 s."""
    min_instances: int = 1
    max_instances: int = 64
    watermark_blocks: int = 0


@dataclass(frozen=True, slots=True)
class ThresholdDecision:
    add: int
    drain: tuple[str, ...]
    freeness: float
    """The cluster's average freeness at this decision."""
    reason: str


def average_freeness(
    snapshots: Sequence[InstanceSnapshot],
    *,
    watermark_blocks: int = 0,
    extra_instances: int = 0,
    blocks_per_extra: int = 0,
    without: InstanceSnapshot | None = None,
) -> float:
    """Llumnix's average load as freeness: the cluster taken as one instance (its ``compute_load_metric_avg``):
    (sum free - watermarks - all waiting blocks) / (sum running + waiting); +inf with no requests.

    ``extra_instances`` empty instances of ``blocks_per_extra`` blocks are added (the scale-out loop);
    ``without`` removes one instance's capacity but keeps its requests (the scale-in test: they move)."""
    free = requests = waiting_blocks = watermark = 0
    for s in snapshots:
        requests += s.num_running + s.num_waiting
        waiting_blocks += s.waiting_blocks
        if s is without:
            free -= s.num_total_blocks - s.num_free_blocks  # its used blocks land on the others
            continue
        free += s.num_free_blocks
        watermark += watermark_blocks
    free = max(0, free) + extra_instances * blocks_per_extra
    watermark += extra_instances * watermark_blocks
    if requests == 0:
        return math.inf
    available = free - watermark - waiting_blocks
    return available / requests if available >= 0 else available * requests


def threshold_scaling(
    snapshots: Sequence[InstanceSnapshot], *, starting: int, params: ThresholdParams
) -> ThresholdDecision:
    """One Llumnix scaling check over the serving instances' snapshots (draining ones are ignored).

    As Llumnix, no decision while instances are starting (its check waits until every instance reports).
    Scale-out adds empty instances (the average instance's size) until the average freeness reaches the
    threshold; scale-in drains the instance with the fewest requests. Drover adds: no scale-in while a
    drain is in progress, and min/max instances.
    """
    serving = [s for s in snapshots if not s.draining]
    draining = len(serving) < len(snapshots)
    freeness = average_freeness(serving, watermark_blocks=params.watermark_blocks)
    if starting > 0:
        return ThresholdDecision(0, (), freeness, f"wait: {starting} instance(s) starting")
    n = len(serving)
    if n and freeness < params.scale_out_freeness:
        size = sum(s.num_total_blocks for s in serving) // n
        add = 0
        while n + add < params.max_instances:
            add += 1
            after = average_freeness(
                serving, watermark_blocks=params.watermark_blocks, extra_instances=add, blocks_per_extra=size
            )
            if after >= params.scale_out_freeness:
                break
        if add == 0:
            why = f"freeness {freeness:.1f} < {params.scale_out_freeness:g} but at max_instances"
            return ThresholdDecision(0, (), freeness, why)
        return ThresholdDecision(
            add, (), freeness, f"freeness {freeness:.1f} < {params.scale_out_freeness:g}: add {add}"
        )
    if n < params.min_instances:
        return ThresholdDecision(params.min_instances - n, (), freeness, f"{n} serving: start up to min_instances")
    if n > params.min_instances and not draining:
        victim = min(serving, key=lambda s: (s.num_running + s.num_waiting, s.num_used_blocks, s.instance_id))
        after = average_freeness(serving, watermark_blocks=params.watermark_blocks, without=victim)
        if after > params.scale_in_freeness:
            return ThresholdDecision(
                0,
                (victim.instance_id,),
                freeness,
                f"freeness without {victim.instance_id} {after:.1f} > {params.scale_in_freeness:g}: drain it",
            )
    return ThresholdDecision(0, (), freeness, f"freeness {freeness:.1f}: steady")


__all__ = [
    "BATCH",
    "INTERACTIVE",
    "ROLES",
    "AutoscaleParams",
    "BatchAssignment",
    "BatchGroup",
    "ClusterView",
    "FleetInstance",
    "InstanceRole",
    "InstanceState",
    "LocalDecision",
    "LocalObservation",
    "LocalParams",
    "LocalState",
    "PerRole",
    "QueuedBatch",
    "RequestClass",
    "RoleChange",
    "RouteDecision",
    "RunningBatch",
    "ScalingEstimate",
    "ScalingPlan",
    "ScalingState",
    "SloParams",
    "ThresholdDecision",
    "ThresholdParams",
    "average_freeness",
    "batch_groups",
    "batch_queue_key",
    "batch_release",
    "batch_spare",
    "batch_victims",
    "estimated_completions",
    "instance_slots",
    "interactive_demand",
    "local_batch_limit",
    "meets_interactive_slo",
    "plan_scaling",
    "required_batch_throughput",
    "route_class",
    "threshold_scaling",
    "total",
]
