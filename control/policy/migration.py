"""Llumnix migration pairing: which request moves from which instance to which, every period.

``plan_migrations(snapshots, in_flight, params)`` is a pure function of the instances' last snapshots and
the migrations already running; the live SchedulerActor (or MigratorActor) and the simulator call it every
``params.migration_period_s`` (Llumnix: 0.05 s) and start one multi-stage migration per decision.

Rules (SEEDS.md, Llumnix ``migration_filter.py``/``migration_policy.py`` "defrag"):

* freeness is the *migration* freeness (only the head of the queue counts), with the priority headroom of
  instances hosting high-priority requests, and -inf on draining instances (infinite virtual usage);
* sources: F < threshold, or requests preempted since the last report, or draining;
  destinations: F > threshold, nothing preempted, not draining — so no instance is both in one round;
* sources sorted by ascending F, destinations by descending F, within each compatible group (same model
  and block size); the i-th source pairs with the i-th destination;
* the moving request: low priority first, then ``params.migration_pick`` (shortest running decode by
  default); it must be decoding, not already migrating, and fit the destination's free blocks (less its
  watermark, and its headroom if it is or would become a high-priority host);
* priority isolation: an instance that is a source only because of its headroom (its freeness without the
  headroom is above the threshold) moves only normal-priority requests — the point is to leave its
  high-priority requests a lightly loaded instance;
* caps: an instance takes part in at most ``max_migrations_per_instance`` migrations at once (as source or
  destination), the cluster in at most ``max_migrations_total`` (0 = no global cap).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from control.policy.freeness import per_request, priority_headroom_blocks
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot

REASON_DRAIN = "drain"
REASON_PREEMPTION = "preemption"
REASON_LOAD = "load"
REASON_PRIORITY = "priority"


@dataclass(frozen=True, slots=True)
class InFlightMigration:
    """A migration that has started and not yet committed or aborted."""

    source_id: str
    destination_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    """Move ``request_id`` (holding ``num_blocks`` now) from ``source_id`` to ``destination_id``."""

    source_id: str
    destination_id: str
    request_id: str
    num_blocks: int
    priority: int
    reason: str  # drain | preemption | load | priority
    source_freeness: float
    destination_freeness: float


@dataclass(frozen=True, slots=True)
class _Rated:
    snapshot: InstanceSnapshot
    freeness: float  # with headroom (the ranking)
    raw_freeness: float  # without headroom (is it really loaded?)


def plan_migrations(
    snapshots: Sequence[InstanceSnapshot],
    in_flight: Collection[InFlightMigration],
    params: PolicyParams,
) -> list[MigrationDecision]:
    """This round's migrations; see the module docstring for the rules."""
    if not params.migration_enabled:
        return []
    budget = params.max_migrations_total - len(in_flight) if params.max_migrations_total > 0 else math.inf
    if budget <= 0:
        return []
    busy: dict[str, int] = {}
    migrating: set[str] = set()
    for m in in_flight:
        busy[m.source_id] = busy.get(m.source_id, 0) + 1
        busy[m.destination_id] = busy.get(m.destination_id, 0) + 1
        migrating.add(m.request_id)
    cap = params.max_migrations_per_instance
    threshold = params.migrate_threshold

    # Pass 1, sources only: an instance without running requests has nothing to move, so most of a lightly
    # loaded cluster is skipped without computing anything, and a round without sources ends here.
    sources: dict[tuple[str, int], list[_Rated]] = {}
    source_ids: set[str] = set()
    for snapshot in snapshots:
        if snapshot.num_running == 0 or (busy and busy.get(snapshot.instance_id, 0) >= cap):
            continue
        rated = migration_rate(snapshot, params)
        if snapshot.draining or rated.freeness < threshold or snapshot.num_preempted > 0:
            sources.setdefault((snapshot.model, snapshot.block_size), []).append(rated)
            source_ids.add(snapshot.instance_id)
    if not sources:
        return []
    destinations: dict[tuple[str, int], list[_Rated]] = {}
    for snapshot in snapshots:
        if snapshot.draining or snapshot.num_preempted > 0 or snapshot.instance_id in source_ids:
            continue
        if (snapshot.model, snapshot.block_size) not in sources:
            continue
        if busy and busy.get(snapshot.instance_id, 0) >= cap:
            continue
        rated = migration_rate(snapshot, params)
        if rated.freeness > threshold:
            destinations.setdefault((snapshot.model, snapshot.block_size), []).append(rated)

    decisions: list[MigrationDecision] = []
    for group in sorted(sources):
        group_dsts = destinations.get(group)
        if not group_dsts:
            continue
        srcs = sorted(sources[group], key=lambda r: (r.freeness, r.snapshot.instance_id))
        dsts = sorted(group_dsts, key=lambda r: (-r.freeness, r.snapshot.instance_id))
        for src, dst in zip(srcs, dsts, strict=False):
            if len(decisions) >= budget:
                return decisions
            decision = _pair(src, dst, migrating, params)
            if decision is not None:
                decisions.append(decision)
    return decisions


def migration_rate(snapshot: InstanceSnapshot, params: PolicyParams) -> _Rated:
    """Migration freeness with and without headroom: ``freeness.migration_freeness`` inlined, since this
    runs for every instance every 50 ms (tests check the two agree)."""
    if snapshot.draining:
        return _Rated(snapshot, -math.inf, -math.inf)
    waiting = snapshot.num_waiting > 0
    num_requests = snapshot.num_running + waiting
    if num_requests == 0:
        return _Rated(snapshot, math.inf, math.inf)
    available = snapshot.num_free_blocks - params.watermark_blocks
    if waiting:
        available -= snapshot.head_waiting_blocks
    raw = available / num_requests if available >= 0 else available * num_requests
    if params.priority_isolation and snapshot.num_high_priority:
        headroom = priority_headroom_blocks(snapshot, params.high_priority_load_cap_tokens, hosts_high_priority=True)
        return _Rated(snapshot, per_request(available - headroom, num_requests), raw)
    return _Rated(snapshot, raw, raw)


def _reason(src: _Rated, threshold: float) -> str:
    if src.snapshot.draining:
        return REASON_DRAIN
    if src.snapshot.num_preempted > 0:
        return REASON_PREEMPTION
    if src.raw_freeness < threshold:
        return REASON_LOAD
    return REASON_PRIORITY


def candidate_requests(
    snapshot: InstanceSnapshot, migrating: Collection[str], params: PolicyParams, *, normal_only: bool = False
) -> list[RunningSnapshot]:
    """The source's movable requests in the order they should move: low priority first, then the pick."""
    movable = [
        r
        for r in snapshot.running
        if r.decoding and r.request_id not in migrating and not (normal_only and r.priority > 0)
    ]
    order = {r.request_id: i for i, r in enumerate(snapshot.running)}  # admission order
    pick = params.migration_pick
    if pick == "shortest":
        movable.sort(key=lambda r: (r.priority, r.num_tokens, order[r.request_id]))
    elif pick == "longest":
        movable.sort(key=lambda r: (r.priority, -r.num_tokens, order[r.request_id]))
    elif pick == "last_come":
        movable.sort(key=lambda r: (r.priority, -order[r.request_id]))
    else:  # first_come
        movable.sort(key=lambda r: (r.priority, order[r.request_id]))
    return movable


def destination_room(snapshot: InstanceSnapshot, params: PolicyParams, *, high_priority: bool) -> int:
    """Blocks a migrated request may take on the destination (free less watermark, and headroom when the
    destination is, or would become, a high-priority host)."""
    hosts = high_priority or snapshot.num_high_priority > 0
    headroom = (
        priority_headroom_blocks(snapshot, params.high_priority_load_cap_tokens, hosts_high_priority=hosts)
        if params.priority_isolation
        else 0
    )
    return snapshot.num_free_blocks - params.watermark_blocks - headroom


def _pair(src: _Rated, dst: _Rated, migrating: set[str], params: PolicyParams) -> MigrationDecision | None:
    reason = _reason(src, params.migrate_threshold)
    normal_only = reason == REASON_PRIORITY
    for request in candidate_requests(src.snapshot, migrating, params, normal_only=normal_only):
        room = destination_room(dst.snapshot, params, high_priority=request.priority > 0)
        if request.num_blocks + 1 > room:  # +1: the block its next tokens need
            continue
        migrating.add(request.request_id)
        return MigrationDecision(
            source_id=src.snapshot.instance_id,
            destination_id=dst.snapshot.instance_id,
            request_id=request.request_id,
            num_blocks=request.num_blocks,
            priority=request.priority,
            reason=reason,
            source_freeness=src.freeness,
            destination_freeness=dst.freeness,
        )
    return None
