"""Cluster simulator: hundreds of simulated instances in virtual time, driven by the live policy code.

The driver owns an event heap (arrivals, engine step ends, scheduler ticks, migration stages) and one
:class:`engines.sim.core.SimEngineCore` per instance. It calls exactly what the live control plane calls:

* dispatch: the control core's dispatch loop (:class:`control.core.dispatch.Dispatcher`, the one the live
  SchedulerActor runs) over a :class:`control.policy.dispatch.DispatchIndex` from ``make_dispatch_policy``
  (``upsert`` on each tick's fresh snapshots, the heartbeats); an arrival is placed or waits in the core's
  queue, which every tick retries from its head (with ``fair_quantum_tokens``, in the core's fair queue
  between clients, as live with ``[scheduler] fairness``);
* migration: :func:`control.policy.migration.plan_migrations` every ``params.migration_period_s``, each
  decision run with the Llumnix multi-stage protocol of ``engines/migration.py``: the destination reserves
  before every stage; stage copy time = bytes / bandwidth (+ a per-stage overhead) while the request keeps
  decoding at the source; each later stage copies the blocks written meanwhile; when at most
  ``last_stage_max_blocks`` remain the source stops the request after its current step, the rest is
  copied (the downtime) and the destination resumes it with its KV loaded; the migration aborts (the
  request stays at the source) when a reservation fails or the request finishes or is preempted meanwhile.
  When to stop, when to give up after ``max_stages`` and how much to reserve is the control core's stage
  machine (:class:`control.core.migration.MigrationStages`), the one the live MigratorActor runs; what each
  step does to the two engine cores and how long a copy takes is :class:`control.simulator.staged_copy.StagedCopy`,
  which the memory simulator runs too.

Engines fast-forward runs of identical decode steps (see the core), and any external event on an
instance (a dispatch, a reservation, a stop) first cuts its run at the step in progress, so results equal
step-by-step simulation. Same config + same requests = same result, bit for bit.

The fleet can change while it runs (``control/simulator/elastic.py`` builds autoscaling on this):
:meth:`ClusterSimulator.add_instance` starts one that serves after a start-up delay,
:meth:`ClusterSimulator.start_drain` marks one draining, :meth:`ClusterSimulator.stop_instance` removes an
empty one; subclasses hook arrivals (``_admit``), outputs (``_on_outputs``), committed migrations
(``_on_moved``), the end of each tick (``_after_tick``) and timers (:meth:`ClusterSimulator.call_at`).
"""

from __future__ import annotations

import heapq
import time
from bisect import insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from control.core.admission import max_prompt_tokens
from control.core.dispatch import Dispatcher, Place, Waiting
from control.core.migration import MigrationStages, StageStep, request_max_blocks
from control.core.record import DecisionLog
from control.core.requests import takes_no_dispatch
from control.policy.dispatch import DispatchIndex, make_dispatch_policy
from control.policy.migration import InFlightMigration, MigrationDecision, MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.simulator.metrics import RequestMetrics, SimulationResult, summarize
from control.simulator.staged_copy import RESUME_OVERHEAD_S, STAGE_OVERHEAD_S, CopyLink, StagedCopy
from control.simulator.views import ClasslessFleet, instance_view
from control.simulator.workload import RequestSpec
from engines.sim.core import RUNNING, SimEngineConfig, SimEngineCore, SimOutput, SimRequest
from engines.sim.cost_model import LLAMA7B_A100, CostModel

_ARRIVAL, _STEP_END, _TICK, _STAGE_END, _RESUME, _DRAIN, _CALL = range(7)
_FAST_FORWARD = 1 << 30
_WATCH_SLACK_S = 1e-6  # a block change's time is a float sum: look a little early, advance_blocks_to decides

# LLaMA-7B fp16: 2 (K, V) x 32 layers x 4096 hidden x 2 bytes per token.
LLAMA7B_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A simulated cluster. Defaults: LLaMA-7B fp16 instances as in Llumnix's main experiments."""

    num_instances: int = 16
    engine: SimEngineConfig = field(
        default_factory=lambda: SimEngineConfig(
            block_size=16, num_blocks=2560, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=16384
        )
    )
    """Block size 16 (vLLM's default on GPU), 2,560 blocks = 40,960 tokens = 20 GiB of LLaMA-7B KV (what a
    40 GB card leaves after weights), max_num_seqs 256 (vLLM default), chunked prefill with a 2,048-token
    budget (vLLM v1 online-serving default)."""
    cost_model: CostModel = LLAMA7B_A100
    policy: PolicyParams = field(default_factory=PolicyParams)
    model: str = "llama-7b"
    kv_bytes_per_token: int = LLAMA7B_KV_BYTES_PER_TOKEN
    migration_bandwidth: float = 5e9
    """Bytes/s of a KV copy between instances. 5 GB/s makes the 16-block (16 tokens each, 128 MiB) last
    stage take ~27 ms, Llumnix's measured 20-30 ms downtime for LLaMA-7B."""
    migration_stage_overhead_s: float = STAGE_OVERHEAD_S  # control messages of one stage (bus round trip)
    reserve_headroom_blocks: int = 0
    """Extra blocks the destination reserves for tokens decoded during the copy (live:
    ``[migration] reserve_headroom_blocks``); the simulator reserves exactly what the stop needs instead."""
    reserve_decoded_factor: float = 0.0
    """Live: ``[migration] reserve_decoded_factor`` (times the blocks written during the last round, reserved on
    top); the simulator knows each step's exact size and keeps 0 (replays pass the live value)."""
    resume_overhead_s: float = RESUME_OVERHEAD_S
    """Fixed part of the downtime: stop, final handshake, scatter of the staged KV, re-admission. Llumnix
    measured 20-30 ms of downtime for LLaMA-7B, flat in sequence length, so fixed costs dominate it."""
    tick_s: float | None = None
    """Scheduler period: fresh snapshots to dispatch (the heartbeats) and a migration round. None: the
    policy's migration_period_s (Llumnix polls instance info at that same period)."""
    drain: tuple[tuple[float, int], ...] = ()
    """(time, instance index): mark the instance draining then (scale-in); its requests migrate away."""
    fair_quantum_tokens: int | None = None
    """The core's fair queue between clients (``RequestSpec.client``), with this quantum in tokens (live:
    ``[scheduler] fairness`` and ``fairness_quantum_tokens``); None: off, first come first served."""
    fair_max_waiting: int = 1
    """With the fair queue: requests each instance may have waiting in its engine (live:
    ``[scheduler] fairness_max_waiting``)."""


@dataclass(slots=True, eq=False)
class SimInstance:
    index: int
    instance_id: str
    core: SimEngineCore
    version: int = 0  # of its scheduled step-end event
    plan_end: float | None = None
    draining: bool = False  # takes no new request (the core's rule, set with the state: set_state)
    snapshot_core_version: int = -1
    reported_preemptions: int = 0
    role: str = "mixed"
    state: str = "active"  # starting | active | draining | stopped
    requested_at: float = 0.0  # when it was asked to start (cost accrues from here)
    ready_at: float = 0.0
    stopped_at: float = -1.0
    block_watch: int = 0  # the live entry of the simulator's block-change heap (older entries are stale)

    def set_state(self, state: str) -> None:
        """Move to ``state``; ``draining`` (its snapshot's, and no fair-queue room) follows the control core's
        rule, the one the live registry asks (``control.core.requests.takes_no_dispatch``). Kept in the field
        because the snapshot refresh reads it for every busy instance at every tick."""
        self.state = state
        self.draining = takes_no_dispatch(serving=state == "active", draining=state == "draining")


@dataclass(slots=True, eq=False)
class _Migration:
    mid: int
    decision: MigrationDecision
    src: SimInstance
    dst: SimInstance
    move: StagedCopy

    @property
    def request(self) -> SimRequest:
        return self.move.request

    @property
    def stages(self) -> MigrationStages:
        return self.move.stages

    @property
    def reserved(self) -> int:
        return self.move.reserved


@dataclass(slots=True)
class _Counters:
    migrations_started: int = 0
    migrations_committed: int = 0
    migrations_aborted: int = 0
    abort_reasons: dict[str, int] = field(default_factory=dict)
    downtimes: list[float] = field(default_factory=list)
    migration_durations: list[float] = field(default_factory=list)
    dispatch_decisions: int = 0
    rejected: int = 0
    ticks: int = 0
    plan_calls: int = 0


class ClusterSimulator(ClasslessFleet):
    """Run ``requests`` through a simulated cluster under ``config``; ``run()`` returns the metrics."""

    lazy_token_counts = True
    """A tick materialises a decode run only when it added a KV block (``SimEngineCore.advance_blocks_to``):
    the heartbeat is unchanged otherwise, and anything that reads a request's token counts (a dispatch, a
    migration stage, a heartbeat being built) first catches the run up with ``advance_to``. A subclass
    whose tick hooks read running requests' token counts without that sets it False."""

    def __init__(self, config: ClusterConfig, requests: Sequence[RequestSpec]) -> None:
        self.config = config
        self.params = config.policy
        # the control core's dispatch loop (the live scheduler's too): index, waiting queue, class routing
        self.dispatcher = Dispatcher(
            make_dispatch_policy(self.params.dispatch_policy, self.params.dispatch_params()),
            fair_quantum_tokens=config.fair_quantum_tokens,
            fair_max_waiting=config.fair_max_waiting,
        )
        # incremental, and it remembers its own moves (per-request budget, cooldown, no ping-pong)
        self.planner = MigrationPlanner(self.params)
        self.instances = [
            SimInstance(i, f"sim-{i:04d}", SimEngineCore(config.engine, config.cost_model))
            for i in range(config.num_instances)
        ]
        self.requests = sorted(requests, key=lambda r: (r.arrival, r.request_id))
        # every instance has config.engine's context (the elastic simulator adds more of the same)
        self._max_prompt_tokens = max_prompt_tokens(0, [config.engine.max_model_len], config.engine.max_model_len)
        self.block_bytes = config.engine.block_size * config.kv_bytes_per_token
        # what each migration stage costs (the same copy model as the memory simulator's)
        self.copy_link = CopyLink(
            self.block_bytes, config.migration_bandwidth, config.migration_stage_overhead_s, config.resume_overhead_s
        )
        self.tick_s = config.tick_s or self.params.migration_period_s
        self.now = 0.0
        self.counters = _Counters()
        self.decision_log: DecisionLog | None = None  # the control core's decisions, recorded (parity tests)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._waiting: dict[str, SimRequest] = {}  # what the dispatcher's queued ids stand for
        self._records: dict[str, RequestMetrics] = {}
        self._migrations: dict[int, _Migration] = {}
        self._in_flight: dict[int, InFlightMigration] = {}
        self._migrations_dirty = True
        self._finished = 0
        self._next_mid = 0
        # Instances a tick must look at: the ones running a plan (their blocks grow) and the ones touched
        # since the last tick. Indices, iterated sorted, so the run stays deterministic.
        self._busy: set[int] = set()
        self._touched: set[int] = set(range(config.num_instances))
        self._snapshots: list[InstanceSnapshot] = []
        # lazy_token_counts: (about when, index, watch) of each busy instance's next block change, so a tick
        # looks only at instances touched since the last one and those whose decode run added a block
        self._block_changes: list[tuple[float, int, int]] = []
        self._live: list[int] = list(range(config.num_instances))  # serving instances (active or draining)

    @property
    def index(self) -> DispatchIndex:
        """The dispatch index (the dispatcher's)."""
        return self.dispatcher.index

    @index.setter
    def index(self, index: DispatchIndex) -> None:
        self.dispatcher.index = index

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> SimulationResult:
        started = time.perf_counter()
        for spec in self.requests:
            self._push(spec.arrival, _ARRIVAL, spec)
        for at, index in self.config.drain:
            self._push(at, _DRAIN, index)
        self._push(0.0, _TICK, None)
        total = len(self.requests)
        heap = self._heap
        while heap:
            now, _, kind, payload = heapq.heappop(heap)
            self.now = now
            if kind == _STEP_END:
                inst, version = cast(tuple[SimInstance, int], payload)
                if inst.version == version:
                    self._on_step_end(inst)
            elif kind == _ARRIVAL:
                self._on_arrival(cast(RequestSpec, payload))
            elif kind == _TICK:
                self._on_tick()
                done = self._finished + self.counters.rejected >= total
                if not done or self._migrations:
                    self._push(now + self.tick_s, _TICK, None)
            elif kind == _STAGE_END:
                self._on_stage_end(cast(_Migration, payload))
            elif kind == _RESUME:
                self._on_resume(cast(_Migration, payload))
            elif kind == _DRAIN:
                self.start_drain(self.instances[cast(int, payload)])
            elif kind == _CALL:
                cast(Callable[[], None], payload)()
        wall = time.perf_counter() - started
        self.counters.dispatch_decisions = self.dispatcher.attempts
        return summarize(
            list(self._records.values()),
            config=self.config,
            wall_s=wall,
            virtual_s=self.now,
            steps=sum(i.core.num_steps for i in self.instances),
            busy_s=sum(i.core.busy_time for i in self.instances),
            preemptions=sum(i.core.num_preemptions for i in self.instances),
            counters=self.counters,
        )

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def call_at(self, at: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at virtual time ``at`` (after events already queued for that instant)."""
        self._push(at, _CALL, callback)

    @property
    def all_done(self) -> bool:
        return self._finished + self.counters.rejected >= len(self.requests)

    # ------------------------------------------------------------------------------------------ fleet
    def add_instance(self, role: str = "mixed", *, startup_s: float = 0.0) -> SimInstance:
        """Ask for a new instance now; it serves (joins dispatch and migration) after ``startup_s``."""
        index = len(self.instances)
        inst = SimInstance(index, f"sim-{index:04d}", SimEngineCore(self.config.engine, self.config.cost_model))
        inst.role, inst.requested_at = role, self.now
        inst.set_state("starting")
        self.instances.append(inst)
        if self._snapshots:
            self._snapshots.append(self._snapshot(inst))
        self.call_at(self.now + startup_s, lambda: self._on_ready(inst))
        return inst

    def _on_ready(self, inst: SimInstance) -> None:
        if inst.state != "starting":
            return
        inst.set_state("active")
        inst.ready_at = self.now
        insort(self._live, inst.index)
        inst.snapshot_core_version = -1
        self._touched.add(inst.index)
        self._migrations_dirty = True

    def start_drain(self, inst: SimInstance) -> None:
        """No more dispatches to it; migration moves its running requests away (Llumnix's drain). A starting
        instance is stopped at once."""
        if inst.state == "starting":
            self.stop_instance(inst)
            return
        if inst.state != "active":
            return
        inst.set_state("draining")
        inst.snapshot_core_version = -1
        self._touched.add(inst.index)

    def is_empty(self, inst: SimInstance) -> bool:
        """Nothing left on it: no request, reservation, outgoing copy or migration in flight."""
        core = inst.core
        if core.has_work or core.has_plan or core.reserved_blocks or core.outgoing_blocks:
            return False
        return not any(m.src is inst or m.dst is inst for m in self._migrations.values())

    def stop_instance(self, inst: SimInstance) -> None:
        """Take an empty (or starting) instance out of the cluster; it costs nothing from now on."""
        if inst.state == "stopped":
            return
        if inst.state != "starting" and not self.is_empty(inst):
            raise RuntimeError(f"{inst.instance_id} still has work; drain it first")
        if inst.state != "starting":
            self._live.remove(inst.index)
            self.index.remove(inst.instance_id)
        inst.set_state("stopped")
        inst.stopped_at = self.now
        self._busy.discard(inst.index)
        self._touched.discard(inst.index)
        self._migrations_dirty = True

    # ------------------------------------------------------------------------------------------ engines
    def _schedule(self, inst: SimInstance) -> None:
        """Plan the instance's next step (run) if it has none, and queue its end."""
        core = inst.core
        self._touched.add(inst.index)
        if core.has_plan:
            return
        end = core.plan(self.now, _FAST_FORWARD)
        inst.version += 1
        inst.plan_end = end
        if end is not None:
            self._busy.add(inst.index)
            self._push(end, _STEP_END, (inst, inst.version))
        else:
            self._busy.discard(inst.index)

    def _interrupt(self, inst: SimInstance) -> None:
        """Something external touches the instance now: cut its run at the step in progress."""
        core = inst.core
        self._touched.add(inst.index)
        if not core.has_plan:
            return
        core.advance_to(self.now)
        end = core.truncate(self.now)
        if end is not None and end != inst.plan_end:
            inst.version += 1
            inst.plan_end = end
            self._push(end, _STEP_END, (inst, inst.version))

    def _on_step_end(self, inst: SimInstance) -> None:
        outputs = inst.core.finish_plan()
        for out in outputs:
            if out.finished:
                self._finished += 1
                self.planner.forget(out.request.request_id)  # its move record (budget, no-return) is moot now
        inst.plan_end = None
        self._on_outputs(inst, outputs)
        self._schedule(inst)

    def _on_outputs(self, inst: SimInstance, outputs: list[SimOutput]) -> None:
        """Hook: a plan of ``inst`` finished with these outputs (finished requests already counted)."""

    # ------------------------------------------------------------------------------------------ dispatch
    def _on_arrival(self, spec: RequestSpec) -> None:
        record = RequestMetrics(spec)
        self._records[spec.request_id] = record
        request = SimRequest(
            request_id=spec.request_id,
            prompt_len=spec.prompt_len,
            max_tokens=spec.output_len,
            priority=spec.priority,
            arrival_time=spec.arrival,
            block_hashes=spec.prefix_hashes,
            hash_block_tokens=spec.prefix_block_tokens,
        )
        record.sim = request
        # the live scheduler's length rule (control/core/admission.py), then whether its blocks ever fit
        too_long = spec.prompt_len > self._max_prompt_tokens
        if too_long or self.instances[0].core.can_ever_fit(spec.prompt_len, spec.output_len) is not None:
            record.rejected = True
            self.counters.rejected += 1
            return
        self._admit(request, spec)

    def _admit(self, request: SimRequest, spec: RequestSpec) -> None:
        """Hook: a new request that can run somewhere; the core places it now or it waits."""
        self._waiting[request.request_id] = request
        self._run_placements(self.dispatcher.submit(request.request_id, self, self.now))

    def _demand(self, request: SimRequest) -> RequestDemand:
        return RequestDemand(
            request_id=request.request_id,
            num_prompt_tokens=request.prompt_len,
            num_blocks=-(-request.prompt_len // self.config.engine.block_size),
            priority=request.priority,
            model=self.config.model,
            prefix_block_hashes=request.block_hashes,
        )

    # The control core reads the simulated cluster through these (control.core.dispatch.FleetView).
    def waiting(self, request_id: str) -> Waiting | None:
        request = self._waiting.get(request_id)
        if request is None:
            return None
        return Waiting(
            self._demand(request),
            self._class_of(request),
            client=self._records[request_id].spec.client,
            cost=request.prompt_len + request.max_tokens,
            deadline=self._deadline_of(request),
        )

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        # the fair queue's room (ClasslessFleet counts none). As live: the requests waiting in each serving
        # instance's engine at its last snapshot (the heartbeat); the dispatcher adds what the index counts as
        # dispatched there since
        instances, snapshots = self.instances, self._snapshots
        return [
            (instances[i].instance_id, snapshots[i].num_waiting if snapshots else len(instances[i].core.waiting))
            for i in self._live
            if not instances[i].draining
        ]

    def _class_of(self, request: SimRequest) -> str:
        return "interactive"

    def _deadline_of(self, request: SimRequest) -> float:
        return 0.0

    def _run_placements(self, places: Iterable[Place]) -> None:
        """Carry out the core's placements one by one (it reads the cluster again between them)."""
        for place in places:
            self._run_placement(place)

    def _run_placement(self, place: Place) -> None:
        inst = self.instances[int(place.instance_id.rsplit("-", 1)[1])]
        request = self._waiting.pop(place.request_id)
        if place.evict:
            self._evict(inst, place.evict)
        self._place(inst, request)

    def _evict(self, inst: SimInstance, victims: Sequence[str]) -> None:
        """Hook: stop ``victims`` on ``inst`` for a placement (request classes only)."""
        raise NotImplementedError("this cluster has no request classes to evict")

    def _place(self, inst: SimInstance, request: SimRequest) -> None:
        """Add the request to the instance's engine now."""
        self._interrupt(inst)
        inst.core.add(request)  # the dispatcher has counted it in the index
        record = self._records[request.request_id]
        if record.dispatch_time < 0:
            record.dispatch_time = self.now
        record.instances.append(inst.index)
        self._on_placed(inst, request)
        self._schedule(inst)

    def _on_placed(self, inst: SimInstance, request: SimRequest) -> None:
        """Hook: ``request`` was just added to ``inst`` (dispatch or re-dispatch)."""

    # ------------------------------------------------------------------------------------------ ticks
    def _on_tick(self) -> None:
        self.counters.ticks += 1
        changed = self._refresh_snapshots()
        self._run_placements(self.dispatcher.retry(self, self.now))
        if self.params.migration_enabled and (changed or self._migrations_dirty):
            self._migrations_dirty = False
            self.counters.plan_calls += 1
            for decision in self._plan_migrations():
                self._start_migration(decision)
        self._after_tick()

    def _after_tick(self) -> None:
        """Hook: the end of every scheduler tick."""

    def _plan_migrations(self) -> list[MigrationDecision]:
        """This round's migrations over the serving instances (subclasses may group them)."""
        snapshots = self._snapshots
        live = snapshots if len(self._live) == len(snapshots) else [snapshots[i] for i in self._live]
        self.planner.sync(live)
        return self.planner.plan(list(self._in_flight.values()), now=self.now)

    def _refresh_snapshots(self) -> bool:
        """Fresh snapshots (the heartbeats) of instances whose state changed; True if any did."""
        changed = False
        if not self._snapshots:
            self._snapshots = [self._snapshot(inst) for inst in self.instances]
        lazy = self.lazy_token_counts
        if lazy:
            # A busy instance nothing touched since the last tick changes only when its decode run adds a
            # block (every other change goes through _schedule/_interrupt, which mark it touched), so only
            # those whose next block change is due are looked at; the rest would be visited for nothing.
            candidates = set(self._touched)
            heap = self._block_changes
            due = self.now + _WATCH_SLACK_S
            instances = self.instances
            while heap and heap[0][0] <= due:
                _, index, watch = heapq.heappop(heap)
                if instances[index].block_watch == watch:
                    candidates.add(index)
        else:
            candidates = self._busy | self._touched
        refresh_next: set[int] = set()
        for index in sorted(candidates):
            inst = self.instances[index]
            if inst.state in ("starting", "stopped"):
                continue
            core = inst.core
            exact = True
            if core.has_plan:
                # block-level state only: the token counts are caught up below when a heartbeat is built
                if lazy:
                    exact = core.advance_blocks_to(self.now)
                else:
                    core.advance_to(self.now)
            previous = self._snapshots[index]
            if (
                inst.snapshot_core_version != core.version
                or previous.num_preempted
                or previous.draining != inst.draining
            ):
                if not exact:
                    core.advance_to(self.now)
                snapshot = self._snapshot(inst)
                inst.snapshot_core_version = core.version
                self._snapshots[index] = snapshot
                self.index.upsert(snapshot)
                changed = True
                if snapshot.num_preempted:
                    refresh_next.add(index)  # report "no new preemption" next time
            if lazy:
                at = core.next_block_time()
                if at is not None:
                    inst.block_watch += 1
                    heapq.heappush(self._block_changes, (at, index, inst.block_watch))
        self._touched = refresh_next
        return changed

    def _movable(self, inst: SimInstance) -> list[SimRequest]:
        """Running requests migration may move (all of them here; subclasses may keep some in place)."""
        return inst.core.running

    def _snapshot(self, inst: SimInstance) -> InstanceSnapshot:
        core = inst.core
        preempted = core.num_preemptions - inst.reported_preemptions
        inst.reported_preemptions = core.num_preemptions
        return instance_view(
            inst.instance_id,
            core,
            model=self.config.model,
            draining=inst.draining,
            num_preempted=preempted,
            running=self._movable(inst),
        )

    # ------------------------------------------------------------------------------------------ migration
    def stage_machine(self, request_id: str) -> MigrationStages:
        """The control core's stage machine for one migration of ``request_id``, as this shell drives it."""
        return MigrationStages(
            self.params,
            self.config.reserve_headroom_blocks,
            log=self.decision_log,
            key=request_id,
            decoded_factor=self.config.reserve_decoded_factor,
        )

    def _start_migration(self, decision: MigrationDecision) -> None:
        src = self.instances[int(decision.source_id.rsplit("-", 1)[1])]
        dst = self.instances[int(decision.destination_id.rsplit("-", 1)[1])]
        request = src.core.requests.get(decision.request_id)
        if request is None or request.state != RUNNING:
            return
        self.counters.migrations_started += 1
        machine = self.stage_machine(decision.request_id)
        machine.max_blocks = _max_blocks(request, src.core)  # as the live scheduler passes it
        move = StagedCopy(
            request,
            src.core,
            dst.core,
            machine,
            self.copy_link,
            self.now,
            request.num_preemptions,
        )
        migration = _Migration(self._next_mid, decision, src, dst, move)
        self._next_mid += 1
        self._interrupt(dst)
        first_s = move.begin()
        if first_s is None:
            self._abort(migration, "reserve", registered=False)
            return
        self._migrations[migration.mid] = migration
        self._in_flight[migration.mid] = InFlightMigration(src.instance_id, dst.instance_id, request.request_id)
        self._migrations_dirty = True
        self._push(self.now + first_s, _STAGE_END, migration)

    def _abort(self, migration: _Migration, reason: str, *, registered: bool = True) -> None:
        if migration.reserved:
            self._interrupt(migration.dst)
            migration.move.release()
        self.counters.migrations_aborted += 1
        self.counters.abort_reasons[reason] = self.counters.abort_reasons.get(reason, 0) + 1
        self._on_aborted(migration.request, reason)
        if registered:
            self._migrations.pop(migration.mid, None)
            self._in_flight.pop(migration.mid, None)
            self._migrations_dirty = True
        self._schedule(migration.dst)

    def _on_stage_end(self, migration: _Migration) -> None:
        move, src, dst = migration.move, migration.src, migration.dst
        broken = move.broken()
        if broken is not None:
            self._abort(migration, broken)
            return
        step = move.after_stage(self.now)
        if step is StageStep.ABORT:
            self._abort(migration, "stages")
            return
        if step is StageStep.STOP_AND_COPY:
            # the request stops after the step in progress; reserve what it will need then
            self._interrupt(src)
            stop_at = src.plan_end if src.core.has_plan and src.plan_end is not None else self.now
            self._interrupt(dst)
            resume_at = move.stop(stop_at)
            if resume_at is None:
                self._abort(migration, "reserve")
                return
            self._push(resume_at, _RESUME, migration)
            return
        self._interrupt(dst)
        copy_s = move.copy_again()
        if copy_s is None:
            self._abort(migration, "reserve")
            return
        self._push(self.now + copy_s, _STAGE_END, migration)

    def _on_resume(self, migration: _Migration) -> None:
        move, request, src, dst = migration.move, migration.request, migration.src, migration.dst
        self._migrations.pop(migration.mid, None)
        self._in_flight.pop(migration.mid, None)
        self._migrations_dirty = True
        if not move.leave_source():  # it finished at the source in its last step there
            self._abort(migration, "finished", registered=False)
            return
        self._schedule(src)
        self._interrupt(dst)
        move.arrive(self.now)
        self._schedule(dst)
        self.counters.migrations_committed += 1
        self.counters.downtimes.append(self.now - move.stopped_at)
        self.counters.migration_durations.append(self.now - move.started)
        record = self._records[request.request_id]
        record.migrations += 1
        record.migration_downtime += self.now - move.stopped_at
        record.instances.append(dst.index)
        self._on_moved(request, src, dst)

    def _on_moved(self, request: SimRequest, src: SimInstance, dst: SimInstance) -> None:
        """Hook: a migration of ``request`` from ``src`` to ``dst`` committed."""

    def _on_aborted(self, request: SimRequest, reason: str) -> None:
        """Hook: a migration of ``request`` aborted (it stays at its source)."""


def simulate(config: ClusterConfig, requests: Sequence[RequestSpec]) -> SimulationResult:
    """Convenience: one run."""
    return ClusterSimulator(config, requests).run()


def _max_blocks(request: SimRequest, core: SimEngineCore) -> int:
    """The reservation's cap for a move of ``request`` (the live scheduler's input: its prompt and every token
    it may generate, within the instance's context)."""
    config = core.config
    return request_max_blocks(request.prompt_len, request.max_tokens, config.max_model_len, config.block_size)
