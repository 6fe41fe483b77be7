"""Discrete-event memory simulator: instances whose KV pool and weights share one budget, under four
ways of handling memory overload.

* ``vllm``: no special handling; a request that cannot get blocks preempts the newest (recompute).
* ``llumnix``: as vllm, plus every 50 ms the least free instance migrates its shortest running request's
  KV to the freest (Llumnix freeness, threshold 3 blocks/request, one migration per instance at a time).
  Each migration follows the control core's stage machine (:class:`control.core.migration.MigrationStages`,
  the one the live MigratorActor and the cluster simulator run, with the live stage knobs of
  :class:`PolicyParams`), carried out by the cluster simulator's helper
  (:class:`control.simulator.staged_copy.StagedCopy`): the destination reserves, the first stage copies the
  request's KV while it keeps decoding at the source, each later stage the blocks written meanwhile; stop
  and copy once at most ``last_stage_max_blocks`` remain (or after ``max_stages``, or abort, as
  ``after_max_stages`` says). A stage takes its bytes over the hardware's interconnect plus
  ``migration_stage_overhead_s``; the downtime is the last copy plus ``resume_overhead_s`` (Llumnix measured
  20-30 ms). At 50 GB/s a first stage ends before the request fills another block, so migrations here take
  one stage; over slower links they take more (``tests/parity/test_divergences.py``).
* ``swap``: as vllm, but a preempted request that was decoding has its KV swapped to host memory over PCIe
  and back when blocks free up (InferCept's swap; mid-prefill victims still recompute).
* ``kunserve``: every 0.1 s the memory policy (:mod:`control.policy.memory`) may group instances; a group
  holds one copy of the weights, pools the freed memory as KV and runs as a pipeline
  (:meth:`Hardware.pipelined_cost`). Running requests' KV is exchanged to the new layout (``exchange``) or
  recomputed (``recompute``); restore reloads the dropped weights over PCIe and splits the group again.

Each instance, or group, is one :class:`engines.sim.core.SimEngineCore` (paged blocks, vLLM batching,
chunked prefill, recompute preemption, multi-step fast-forward) in virtual time. There is no randomness:
the same workload gives the same result. Deviations from the systems, kept conservative for the new
modes: KunServe's KV exchange pauses the whole group for its transfer (the paper overlaps it with
execution); restore moves KV back the same way.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from control.core.dispatch import Dispatcher, Place, Waiting
from control.core.memory import GroupHysteresis, restore_snapshot
from control.core.migration import MigrationStages, StageStep, request_max_blocks
from control.core.record import DecisionLog
from control.core.requests import takes_no_dispatch
from control.policy.dispatch import make_dispatch_policy
from control.policy.memory import MemoryParams, MemorySnapshot, should_drop
from control.policy.migration import MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.snapshots import RequestDemand
from control.simulator.hardware import DEFAULT_HARDWARE, Hardware
from control.simulator.staged_copy import RESUME_OVERHEAD_S, STAGE_OVERHEAD_S, CopyLink, StagedCopy
from control.simulator.views import ClasslessFleet, instance_view
from control.simulator.workload import RequestSpec
from engines.sim.core import RUNNING, WAITING, SimEngineConfig, SimEngineCore, SimRequest

Mode = Literal["vllm", "llumnix", "swap", "kunserve"]
MODES: tuple[Mode, ...] = ("vllm", "llumnix", "swap", "kunserve")


@dataclass(frozen=True, slots=True)
class MemSimConfig:
    """A cluster of identical instances and how it handles memory overload."""

    mode: Mode = "vllm"
    num_instances: int = 4
    hardware: Hardware = DEFAULT_HARDWARE
    memory: MemoryParams = field(default_factory=MemoryParams)
    kv_on_drop: Literal["exchange", "recompute"] = "exchange"
    max_num_seqs: int = 256  # vLLM default
    max_num_batched_tokens: int = 2048  # vLLM v1 chunked-prefill budget
    max_model_len: int = 4096  # LLaMA-2-7B context
    migration_period_s: float = 0.05  # Llumnix
    migrate_threshold: float = 3.0  # Llumnix freeness threshold, blocks per request
    migration_stage_overhead_s: float = STAGE_OVERHEAD_S  # control messages of one copy stage
    resume_overhead_s: float = RESUME_OVERHEAD_S  # fixed part of a migration's downtime
    max_run_steps: int = 32  # decode steps fast-forwarded at once (exact: truncated on any event)
    time_limit_s: float = 3600.0  # virtual seconds after the last arrival before giving up


@dataclass(slots=True)
class MemSimResult:
    """Per-run metrics. Times in seconds."""

    mode: str
    completed: int
    unfinished: int
    rejected: int
    ttft: list[float]
    tbt_gaps: np.ndarray  # per-token gaps (seconds), one entry per output token after the first
    output_tokens: int
    makespan_s: float
    preemptions: int
    recomputed_tokens: int
    swaps: int = 0
    migrations: int = 0
    drops: int = 0
    restores: int = 0
    exchange_bytes: int = 0
    peak_group_size: int = 0
    peak_memory_use: float = 0.0  # highest KV-pool occupancy of an ungrouped instance at a poll
    overloaded_s: float = 0.0  # poll time during which some ungrouped instance met the drop trigger
    migration_aborts: int = 0  # migrations given up (refused reservation, request finished or preempted, stages)
    migration_stages: int = 0  # copy stages of the committed migrations, all together
    migration_downtime_s: float = 0.0  # stop to resume, summed over the committed migrations

    def ttft_p(self, q: float) -> float:
        return float(np.percentile(self.ttft, q)) if self.ttft else math.nan

    def tbt_p(self, q: float) -> float:
        return float(np.percentile(self.tbt_gaps, q)) if self.tbt_gaps.size else math.nan

    @property
    def throughput(self) -> float:
        """Output tokens per second of virtual time, first arrival to last finish."""
        return self.output_tokens / self.makespan_s if self.makespan_s > 0 else 0.0


@dataclass(slots=True, eq=False)
class Unit:
    """What the dispatcher sees as one server: an instance, or a group of them running as a pipeline."""

    unit_id: int
    members: tuple[int, ...]
    core: SimEngineCore
    token: int = 0  # bumps on every (re)scheduled step end: older step-end events are stale
    paused_until: float = 0.0
    hold: bool = False  # waiting for a step boundary to change layout: plan nothing
    host_queue: deque[SimRequest] = field(default_factory=deque)  # swapped-out requests, FIFO
    link_free_at: float = 0.0  # PCIe link (swap)
    reloading: bool = False
    migrating: bool = False

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(slots=True, eq=False)
class UnitMigration:
    """One live migration in flight between two units; ``move`` carries it out as the stage machine says."""

    source: Unit
    dest: Unit
    move: StagedCopy


_ARRIVAL, _STEP, _TICK, _RESUME, _KICK, _STAGE_END, _RELOADED, _MOVED = range(8)


class MemorySimulator(ClasslessFleet):
    """One run over one workload. Call :meth:`run` once.

    Dispatch and Llumnix pairing are the live control plane's: the control core's dispatch loop
    (:class:`Dispatcher`, which ``ClusterSimulator`` and the SchedulerActor drive) over the ``freeness``
    dispatch index, and a kept :class:`MigrationPlanner`; each migration runs through the core's
    :class:`MigrationStages` (its decisions are logged too). Both see one instance view per unit
    (:func:`instance_view`): a group counts once, with its pooled blocks. ``decision_log`` records their calls
    as the live scheduler records its own (``tests/parity/replays.py`` replays them)."""

    def __init__(
        self, config: MemSimConfig, workload: Sequence[RequestSpec], *, decision_log: DecisionLog | None = None
    ) -> None:
        config.memory.validate()
        self.config = config
        self.hw = config.hardware
        self.workload = sorted(workload, key=lambda s: (s.arrival, s.request_id))
        self.units: dict[int, Unit] = {}
        self._ids = itertools.count()
        # When groups may form and restore (min group time, idle restore, cooldown): the control core's, the one
        # the live MemoryManager runs.
        self.hysteresis = GroupHysteresis(config.memory)
        # The live policy's parameters: freeness dispatch (Llumnix's, Drover's default) and, in llumnix mode,
        # Llumnix pairing at its threshold, one migration per unit at a time.
        self.params = PolicyParams(
            dispatch_policy="freeness", migrate_threshold=config.migrate_threshold, max_migrations_per_instance=1
        )
        self.decision_log = decision_log
        self.dispatcher = Dispatcher(
            make_dispatch_policy(self.params.dispatch_policy, self.params.dispatch_params()), log=decision_log
        )
        self.planner = MigrationPlanner(self.params)  # kept across rounds, as live (it remembers its moves)
        self._indexed: dict[str, Unit] = {}  # the units the dispatch index holds, by view id
        self._shown: dict[str, tuple[int, int, bool]] = {}  # view id -> (core version, held requests, closed) shown
        self._waiting: dict[str, SimRequest] = {}  # requests the dispatcher has not placed yet
        self._seq = itertools.count()
        self._events: list[tuple[float, int, int, Any]] = []  # (time, tie-break, kind, payload)
        self.requests: dict[str, SimRequest] = {}
        self.rejected = 0
        self.swaps = self.migrations = self.drops = self.restores = self.exchange_bytes = 0
        self.peak_group_size = 1
        self.peak_memory_use = 0.0
        self.overloaded_polls = 0
        self._swap_recompute_credit = 0
        self._pending_forms: list[tuple[list[int], tuple[int, ...]]] = []  # (unit ids, member instances)
        self.migration_aborts = self.migration_stages = 0
        self.migration_downtime_s = 0.0
        # a migration stage's copy time: the hardware model's GPU-to-GPU link (the cluster simulator's model)
        self.copy_link = CopyLink(
            self.hw.kv_block_bytes,
            self.hw.interconnect_bytes_per_s,
            config.migration_stage_overhead_s,
            config.resume_overhead_s,
        )
        self._gaps: list[float] = []
        self._gap_counts: list[int] = []
        self._last_emit: dict[str, tuple[float, int]] = {}  # request -> (time, num_output) of its last output
        for i in range(config.num_instances):
            self._new_unit((i,))

    # ------------------------------------------------------------------------------------------ set-up
    def _engine_config(self, group_size: int) -> SimEngineConfig:
        return SimEngineConfig(
            block_size=self.hw.block_size,
            num_blocks=self.hw.group_blocks(group_size),
            max_num_seqs=self.config.max_num_seqs * group_size,
            max_num_batched_tokens=self.config.max_num_batched_tokens * group_size,
            max_model_len=self.config.max_model_len,
        )

    def _new_unit(self, members: tuple[int, ...]) -> Unit:
        g = len(members)
        if g == 1:
            cost = self.hw.cost
        else:
            cost = self.hw.pipelined_cost(g, (g - 1) * self.config.memory.pipeline_overhead_per_stage)
        unit = Unit(next(self._ids), members, SimEngineCore(self._engine_config(g), cost))
        self.units[unit.unit_id] = unit
        return unit

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    # ------------------------------------------------------------------------------------------ main loop
    def run(self) -> MemSimResult:
        for spec in self.workload:
            self._push(spec.arrival, _ARRIVAL, spec)
        first = self.workload[0].arrival if self.workload else 0.0
        last_arrival = self.workload[-1].arrival if self.workload else 0.0
        if self.config.mode == "llumnix":
            self._push(first, _TICK, "migrate")
        # Every mode samples memory at KunServe's poll period (the overload measure); kunserve also acts.
        self._push(first, _TICK, "memory")
        deadline = last_arrival + self.config.time_limit_s
        now = first
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if t > deadline:
                break
            now = t
            if kind == _ARRIVAL:
                assert isinstance(payload, RequestSpec)
                self._arrive(payload, now)
            elif kind == _STEP:
                unit_id, token = payload
                unit = self.units.get(unit_id)
                if unit is not None and unit.token == token:
                    self._step_end(unit, now)
            elif kind == _TICK:
                if self._has_work() or now < last_arrival:
                    self._tick(str(payload), now)
            elif kind == _RESUME:
                unit_id, request, reserved = payload
                self._resume(self.units[unit_id], request, reserved, now)
            elif kind == _KICK:
                unit = self.units.get(int(payload))
                if unit is not None:
                    self._kick(unit, now)
            elif kind == _STAGE_END:
                self._stage_end(payload, now)
            elif kind == _MOVED:
                self._moved(payload, now)
            elif kind == _RELOADED:
                unit = self.units.get(int(payload))
                if unit is not None:
                    unit.reloading = False
                    unit.hold = True
                    if unit.core.has_plan:
                        self._interrupt(unit, now)  # split at the step boundary
                    else:
                        self._split(unit, now)
        return self._result(now, first)

    def _has_work(self) -> bool:
        return bool(self.dispatcher.num_queued) or any(u.core.has_work or u.host_queue for u in self.units.values())

    # ------------------------------------------------------------------------------------------ requests
    def _arrive(self, spec: RequestSpec, now: float) -> None:
        for other in self.units.values():
            other.core.advance_to(now)  # dispatch reads exact loads, not those at a fast-forward's start
        request = SimRequest(spec.request_id, spec.prompt_len, spec.output_len, arrival_time=spec.arrival)
        self.requests[request.request_id] = request
        self._waiting[request.request_id] = request
        self._show_units()
        for place in self.dispatcher.submit(request.request_id, self, now):
            self._carry_out(place, now)

    def _carry_out(self, place: Place, now: float) -> None:
        """Start a placed request on its unit; one its unit can never fit is rejected."""
        unit = self._indexed[place.instance_id]
        request = self._waiting.pop(place.request_id)
        if unit.core.can_ever_fit(request.prompt_len, request.max_tokens) is not None:
            del self.requests[request.request_id]
            self.rejected += 1
            self._shown.pop(place.instance_id, None)  # the index counted it there: show the unit afresh
            return
        unit.core.add(request)
        self._interrupt(unit, now)

    @staticmethod
    def _view_id(unit: Unit) -> str:
        """A unit's instance id in the policies' views: zero-padded, so that ids sort as the units were made
        (the index breaks a tie by id: the oldest unit wins it)."""
        return f"{unit.unit_id:06d}"

    def _show_units(self) -> None:
        """Every unit's view into the dispatch index, as a heartbeat at this instant would report it; units
        gone since (formed into a group, split) leave it. A fresh view before every decision, so the index
        holds exact loads (a view includes what was dispatched since the last). A unit whose core has not
        changed since it was last shown (``SimEngineCore.version``, the cluster simulator's snapshot key too;
        a swap moves blocks, so the held queue never changes without it) keeps its view."""
        index = self.dispatcher.index
        shown = self._shown
        current = {self._view_id(u): u for u in self.units.values()}
        for gone in self._indexed.keys() - current.keys():
            index.remove(gone)
            shown.pop(gone, None)
            self._record("remove", gone, (), None)
        for view_id, unit in current.items():
            # a unit changing layout takes no new request, as live the MemoryManager blocks a group's leader
            # while the group forms or restores (its members are inside the unit): the core's one rule
            closed = takes_no_dispatch(serving=True, blocked=unit.hold or unit.reloading)
            key = (unit.core.version, len(unit.host_queue), closed)
            if shown.get(view_id) == key:
                continue
            shown[view_id] = key
            view = instance_view(view_id, unit.core, draining=closed, held=unit.host_queue)
            index.upsert(view)
            self._record("upsert", view_id, (view,), None)
        self._indexed = current

    def _record(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        if self.decision_log is not None:
            self.decision_log.add(what, key, inputs, output)

    # The control core reads the simulated cluster through these (control.core.dispatch.FleetView).
    def waiting(self, request_id: str) -> Waiting | None:
        request = self._waiting.get(request_id)
        if request is None:
            return None
        # a recomputed request needs blocks for what it has output too
        tokens = request.context_len
        demand = RequestDemand(request_id, tokens, -(-tokens // self.hw.block_size))
        return Waiting(demand, cost=request.prompt_len + request.max_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    # ------------------------------------------------------------------------------------------ stepping
    def _interrupt(self, unit: Unit, now: float) -> None:
        """Something changed: end a fast-forwarded run at the next step boundary, or start a step."""
        if unit.core.has_plan:
            self._cut(unit, now)
        else:
            self._kick(unit, now)

    def _cut(self, unit: Unit, now: float) -> None:
        """End a fast-forwarded run at the step in progress (a migration is about to take or give blocks: the
        run's block growth was planned without that); an idle unit stays idle."""
        end = unit.core.truncate(now)
        if end is not None:
            unit.token += 1
            self._push(end, _STEP, (unit.unit_id, unit.token))

    def _kick(self, unit: Unit, now: float) -> None:
        core = unit.core
        if core.has_plan or unit.hold:
            return
        if unit.paused_until > now:
            self._push(unit.paused_until, _KICK, unit.unit_id)
            return
        if self.config.mode == "swap":
            self._swap_in(unit, now)
        before = core.num_preemptions
        end = core.plan(now, max_steps=self.config.max_run_steps)
        if self.config.mode == "swap" and core.num_preemptions > before:
            self._swap_out(unit, core.num_preemptions - before, now)
        if end is not None:
            unit.token += 1
            self._push(end, _STEP, (unit.unit_id, unit.token))

    def _step_end(self, unit: Unit, now: float) -> None:
        for out in unit.core.finish_plan():
            # Count tokens from num_output: steps materialised by advance_to() are not in new_tokens.
            request = out.request
            last = self._last_emit.get(request.request_id)
            if last is not None:
                last_t, last_n = last
                tokens = request.num_output - last_n
                if tokens > 0:
                    self._gaps.append((now - last_t) / tokens)
                    self._gap_counts.append(tokens)
            elif request.num_output > 1:
                self._gaps.append((now - request.first_token_time) / (request.num_output - 1))
                self._gap_counts.append(request.num_output - 1)
            self._last_emit[request.request_id] = (now, request.num_output)
            if out.finished:
                self._last_emit.pop(request.request_id, None)
        if unit.hold:
            self._at_boundary(unit, now)
            return
        self._kick(unit, now)

    # ------------------------------------------------------------------------------------------ swap
    def _swap_out(self, unit: Unit, count: int, now: float) -> None:
        """The core just preempted ``count`` requests (front of its queue): swap decoding ones to host."""
        core = unit.core
        victims = list(itertools.islice(core.waiting, count))
        for request in victims:
            if request.num_output == 0:
                continue  # mid-prefill: recompute is cheaper than a swap of a partial prompt
            core.remove(request.request_id)
            request.recomputed_tokens -= max(0, request.context_len - 1)  # swapped, not recomputed
            blocks = core.blocks_for(request.context_len)
            unit.link_free_at = max(now, unit.link_free_at) + self.hw.kv_seconds(blocks, self.hw.pcie_bytes_per_s)
            unit.host_queue.append(request)
            self.swaps += 1

    def _swap_in(self, unit: Unit, now: float) -> None:
        """Bring swapped requests back, oldest first, while their blocks are free (vLLM: swapped before new)."""
        core = unit.core
        while unit.host_queue:
            request = unit.host_queue[0]
            blocks = core.blocks_for(request.context_len)
            if not core.reserve(blocks):
                return
            unit.host_queue.popleft()
            done = max(now, unit.link_free_at) + self.hw.kv_seconds(blocks, self.hw.pcie_bytes_per_s)
            unit.link_free_at = done
            self._push(done, _RESUME, (unit.unit_id, request, blocks))

    def _resume(self, unit: Unit, request: SimRequest, reserved: int, now: float) -> None:
        core = unit.core
        if not core.add_resumed(request, now, reservation_blocks=reserved):
            core.release_reservation(reserved)
            core.add(request)
        self._interrupt(unit, now)

    # ------------------------------------------------------------------------------------------ llumnix
    def _tick(self, kind: str, now: float) -> None:
        for unit in self.units.values():
            unit.core.advance_to(now)
        if self.dispatcher.num_queued:  # a request no unit would take yet (the index answered None)
            self._show_units()
            for place in self.dispatcher.retry(self, now):
                self._carry_out(place, now)
        if kind == "migrate":
            self._plan_migrations(now)
            self._push(now + self.config.migration_period_s, _TICK, kind)
        else:
            self._sample_memory()
            if self.config.mode == "kunserve":
                self._memory_poll(now)
            self._push(now + self.config.memory.poll_period_s, _TICK, kind)

    def _sample_memory(self) -> None:
        """Count polls where some instance meets KunServe's drop trigger: the run's memory overload."""
        snaps = [self._memory_snapshot(u) for u in self.units.values() if u.size == 1]
        self.peak_memory_use = max([self.peak_memory_use, *(s.memory_use for s in snaps)])
        if any(should_drop(s, self.config.memory) for s in snaps):
            self.overloaded_polls += 1

    def _plan_migrations(self, now: float) -> None:
        """Llumnix pairing by the live policy's planner (:class:`MigrationPlanner`) over the units not migrating
        now."""
        free = [u for u in self.units.values() if not u.migrating]
        views = [
            instance_view(
                self._view_id(u), u.core, held=u.host_queue, running=[r for r in u.core.running if not r.finished]
            )
            for u in free
        ]
        self.planner.sync(views)
        decisions = self.planner.plan((), now=now)
        self._record("migration_plan", "", (tuple(views), (), now), tuple(decisions))
        for decision in decisions:
            source, dest = self.units[int(decision.source_id)], self.units[int(decision.destination_id)]
            if source.migrating or dest.migrating:
                continue
            request = source.core.requests.get(decision.request_id)
            if request is None or request.state != RUNNING:
                continue
            cap = request_max_blocks(
                request.prompt_len, request.max_tokens, source.core.config.max_model_len, source.core.config.block_size
            )
            stages = MigrationStages(self.params, log=self.decision_log, key=request.request_id, max_blocks=cap)
            move = StagedCopy(request, source.core, dest.core, stages, self.copy_link, now, request.num_preemptions)
            self._cut(dest, now)
            first_s = move.begin()
            if first_s is None:
                self.migration_aborts += 1  # the destination refused the first reservation
                continue
            source.migrating = dest.migrating = True
            self._push(now + first_s, _STAGE_END, UnitMigration(source, dest, move))

    def _stage_end(self, migration: UnitMigration, now: float) -> None:
        """A copy stage finished: the stage machine says whether to copy again, stop and copy, or give up."""
        source, dest, move = migration.source, migration.dest, migration.move
        if source.unit_id not in self.units or dest.unit_id not in self.units:
            self._abort_migration(migration, now)  # a unit went into a group meanwhile
            return
        if move.broken() is not None:
            self._abort_migration(migration, now)
            return
        step = move.after_stage(now)
        if step is StageStep.ABORT:
            self._abort_migration(migration, now)
            return
        if step is StageStep.STOP_AND_COPY:
            # the request stops after the source's step in progress; the downtime runs from there
            self._cut(source, now)
            stop_at = source.core.plan_end
            self._cut(dest, now)
            resume_at = move.stop(now if stop_at is None else stop_at)
            if resume_at is None:
                self._abort_migration(migration, now)
                return
            self._push(resume_at, _MOVED, migration)
            return
        self._cut(dest, now)
        copy_s = move.copy_again()
        if copy_s is None:
            self._abort_migration(migration, now)
            return
        self._push(now + copy_s, _STAGE_END, migration)

    def _moved(self, migration: UnitMigration, now: float) -> None:
        """The last copy is done: the destination resumes the request with its KV, the source frees its blocks."""
        source, dest, move = migration.source, migration.dest, migration.move
        stop_step_end = source.core.plan_end
        if move.request.state == RUNNING and stop_step_end is not None and stop_step_end <= now:
            # The step after which the source stops the request ends now too, and its event comes after this one
            # (a cut re-queued it): with nothing left to copy and no overheads the copy ends at that very instant.
            self._push(now, _MOVED, migration)
            return
        if source.unit_id not in self.units or dest.unit_id not in self.units or not move.leave_source():
            self._abort_migration(migration, now)  # it finished at the source in its last step there
            return
        source.migrating = dest.migrating = False
        self._interrupt(source, now)  # its freed blocks may admit a waiting request
        self._cut(dest, now)
        move.arrive(now)
        self._kick(dest, now)
        self.migrations += 1
        self.migration_stages += move.stages.stages
        self.migration_downtime_s += now - move.stopped_at

    def _abort_migration(self, migration: UnitMigration, now: float) -> None:
        """Give up: the request stays at its source (or finished there); the destination's reservation is freed."""
        migration.source.migrating = migration.dest.migrating = False
        self.migration_aborts += 1
        if migration.dest.unit_id in self.units:
            self._cut(migration.dest, now)
            migration.move.release()
            self._kick(migration.dest, now)

    # ------------------------------------------------------------------------------------------ kunserve
    def _memory_snapshot(self, unit: Unit, instance_id: str = "") -> MemorySnapshot:
        core = unit.core
        return MemorySnapshot(
            instance_id=instance_id or str(unit.unit_id),
            num_layers=self.hw.num_layers,
            weight_bytes=self.hw.weight_bytes,
            kv_block_bytes=self.hw.kv_block_bytes,
            num_total_blocks=core.config.num_blocks,
            num_free_blocks=core.num_free_blocks,
            pending_blocks=core.waiting_blocks,
            num_waiting=len(core.waiting),
            grouped=unit.size > 1 or unit.hold,
            compat_key=self.hw.name,
        )

    def _memory_poll(self, now: float) -> None:
        """KunServe's coordinator: the control core's poll (``GroupHysteresis.poll``, the live MemoryManager's)
        decides; this forms the groups it plans and restores the groups it names. A single instance is named
        by its instance index, as live by its instance id (cooldowns follow the instance, whatever unit it
        serves in next); a group by its unit id."""
        singles = {str(u.members[0]): u for u in self.units.values() if u.size == 1}
        groups = [
            restore_snapshot(
                str(unit.unit_id),
                unit.core.config.num_blocks,
                unit.core.num_free_blocks,
                len(unit.core.waiting),
                self.hw.instance_blocks,
            )
            for unit in self.units.values()
            if unit.size > 1 and not unit.hold and not unit.reloading
        ]
        snapshots = [self._memory_snapshot(u, instance_id=iid) for iid, u in singles.items()]
        commands = self.hysteresis.poll(snapshots, groups, now)
        for group in commands.drops:
            unit_ids = [singles[m].unit_id for m in group.members]
            members = tuple(i for uid in unit_ids for i in self.units[uid].members)
            self._pending_forms.append((unit_ids, members))
            for uid in unit_ids:
                self.units[uid].hold = True
                self._interrupt(self.units[uid], now)
        self._try_forms(now)
        for group_id in commands.restores:
            unit = self.units[int(group_id)]
            unit.reloading = True
            g = unit.size
            reload_s = self.hw.weight_bytes * (g - 1) / g / self.hw.pcie_bytes_per_s
            self._push(now + reload_s, _RELOADED, unit.unit_id)

    def _at_boundary(self, unit: Unit, now: float) -> None:
        """A held unit finished its step: form a pending group when all its members are idle, or split."""
        if unit.size > 1 and not any(unit.unit_id in ids for ids, _ in self._pending_forms):
            self._split(unit, now)
            return
        self._try_forms(now)

    def _try_forms(self, now: float) -> None:
        """Form every pending group whose members have all finished their last step."""
        for entry in list(self._pending_forms):
            ids, members = entry
            if all(not self.units[i].core.has_plan for i in ids):
                self._pending_forms.remove(entry)
                self._form(ids, members, now)

    def _drain(self, core: SimEngineCore) -> tuple[list[SimRequest], list[SimRequest]]:
        """Take every request out of an idle core: (running, waiting), each in admission/queue order."""
        assert not core.has_plan
        running = list(core.running)
        waiting = list(core.waiting)
        for request in running + waiting:
            core.remove(request.request_id)
        return running, waiting

    def _move(self, running: list[SimRequest], waiting: list[SimRequest], target: Unit, now: float, frac: float) -> int:
        """Place requests on ``target``; running ones keep their KV (exchanged) unless the mode recomputes.

        Returns the blocks whose KV crossed the interconnect.
        """
        moved_blocks = 0
        core = target.core
        for request in sorted(running, key=lambda r: (r.admitted_time, r.request_id)):
            blocks = core.blocks_for(request.context_len)
            keep_kv = self.config.kv_on_drop == "exchange" and request.num_output > 0
            if keep_kv and core.add_resumed(request, now):
                moved_blocks += blocks
            else:
                request.recomputed_tokens += request.num_computed
                core.add(request)
        for request in waiting:
            core.add(request)
        self.exchange_bytes += int(moved_blocks * self.hw.kv_block_bytes * frac)
        return moved_blocks

    def _form(self, unit_ids: list[int], members: tuple[int, ...], now: float) -> None:
        """Form a group: the leader's (``unit_ids[0]``) and every member's requests move in, running ones with
        their KV (``kv_on_drop = exchange``), as in the KunServe paper and as the live engines do (a member
        parks its requests' KV at ``join``, the leader takes it in at ``lead``: ``actors/engine_groups.py``).
        Evicting the members' requests instead (resumed by dispatch, recomputed), what the live engines did
        before, gave TTFT p50 / p99 2.03 / 3.55 s against 0.78 / 2.33 s on bench_kunserve's Azure x3 point
        (measured before a unit changing layout took no dispatch; 0.66 / 2.14 s since: docs/core.md)."""
        running, waiting = self._drain(self.units.pop(unit_ids[0]).core)
        for uid in unit_ids[1:]:
            r, w = self._drain(self.units.pop(uid).core)
            running, waiting = running + r, waiting + w
        group = self._new_unit(members)
        self.hysteresis.formed(str(group.unit_id), now)
        g = group.size
        moved = self._move(running, waiting, group, now, (g - 1) / g)
        group.paused_until = now + self.hw.kv_seconds(moved, self.hw.interconnect_bytes_per_s, (g - 1) / g)
        self.drops += 1
        self.peak_group_size = max(self.peak_group_size, g)
        self._kick(group, now)

    def _split(self, group: Unit, now: float) -> None:
        """Restore as the live leader's ``dissolve`` does: it takes the KV back and serves every request of the
        group alone (the restore decision counted them against its own pool: ``control/core/memory.py``);
        the members, reloaded, serve alone again with nothing to run."""
        del self.units[group.unit_id]
        self.hysteresis.ended(str(group.unit_id), (str(m) for m in group.members), now)
        running, waiting = self._drain(group.core)
        singles = [self._new_unit((m,)) for m in group.members]
        g = group.size
        leader = singles[0]
        moved = self._move(running, waiting, leader, now, (g - 1) / g)
        leader.paused_until = now + self.hw.kv_seconds(moved, self.hw.interconnect_bytes_per_s, (g - 1) / g)
        self.restores += 1
        for unit in singles:
            self._kick(unit, now)

    # ------------------------------------------------------------------------------------------ results
    def _result(self, now: float, first: float) -> MemSimResult:
        done = [r for r in self.requests.values() if r.finish_time >= 0]
        last_finish = max((r.finish_time for r in done), default=first)
        gaps = np.repeat(np.asarray(self._gaps, dtype=np.float64), np.asarray(self._gap_counts, dtype=np.int64))
        return MemSimResult(
            mode=self.config.mode if self.config.mode != "kunserve" else f"kunserve-{self.config.kv_on_drop}",
            completed=len(done),
            unfinished=len(self.requests) - len(done),
            rejected=self.rejected,
            ttft=[r.first_token_time - r.arrival_time for r in done],
            tbt_gaps=gaps,
            output_tokens=sum(r.num_output for r in done),
            makespan_s=last_finish - first,
            preemptions=sum(r.num_preemptions for r in self.requests.values()),
            recomputed_tokens=sum(r.recomputed_tokens for r in self.requests.values()),
            swaps=self.swaps,
            migrations=self.migrations,
            drops=self.drops,
            restores=self.restores,
            exchange_bytes=self.exchange_bytes,
            peak_group_size=self.peak_group_size,
            peak_memory_use=self.peak_memory_use,
            overloaded_s=self.overloaded_polls * self.config.memory.poll_period_s,
            migration_aborts=self.migration_aborts,
            migration_stages=self.migration_stages,
            migration_downtime_s=self.migration_downtime_s,
        )

    # ------------------------------------------------------------------------------------------ checks
    def check_blocks(self) -> None:
        """Assert block conservation on every unit (tests call it between events)."""
        for unit in self.units.values():
            core = unit.core
            held = sum(r.num_blocks for r in core.running)
            assert core.allocated_blocks == held, (unit.unit_id, core.allocated_blocks, held)
            assert core.num_free_blocks >= 0
            assert core.config.num_blocks == self.hw.group_blocks(unit.size)
            assert all(r.state in (RUNNING, WAITING) for r in core.requests.values())


def simulate(config: MemSimConfig, workload: Sequence[RequestSpec]) -> MemSimResult:
    """Run one simulation (convenience wrapper)."""
    return MemorySimulator(config, workload).run()


def with_mode(config: MemSimConfig, mode: Mode, **changes: object) -> MemSimConfig:
    """``config`` with another overload-handling mode (the benchmark's side-by-side runs)."""
    return replace(config, mode=mode, **changes)  # type: ignore[arg-type]
