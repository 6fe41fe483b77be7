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

import heapq
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from control.policy.freeness import per_request, priority_headroom_blocks
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot

REASON_DRAIN = "drain"
REASON_PREEMPTION = "preemption"
REASON_LOAD = "load"
REASON_PRIORITY = "priority"

_EXTRA_DESTINATIONS = 3  # cost-aware pairing: destinations tried per source after the first refuses
_BUDGET_MEMORY_S = 600.0  # how long the per-request budget remembers a request after its last move


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
    *,
    now: float | None = None,
) -> list[MigrationDecision]:
    """This round's migrations from a full list of snapshots, with no memory of earlier rounds (so the
    per-request budget, cooldown and ping-pong rules see nothing); see the module docstring for the rules.
    Callers that plan every period should keep a :class:`MigrationPlanner` instead."""
    planner = MigrationPlanner(params)
    planner.sync(snapshots)
    return planner.plan(in_flight, now=now)


@dataclass(slots=True)
class _Moves:
    """What the planner remembers of one request it moved."""

    count: int
    last_s: float
    left: dict[str, float]  # instance it left -> when


class MigrationPlanner:
    """Incremental migration planning: O(changed instances) per heartbeat, O(sources · log n) per round.

    ``update(snapshot)`` rates an instance when its heartbeat arrives and files it as a source (a set per
    compatible group) or a destination (a lazy max-heap of freeness per group, stale items skipped when
    they reach the top); ``plan(in_flight, now)`` sorts only the sources and pops as many destinations as
    there are sources. A round over 10,000 instances with a handful of sources costs microseconds, where
    rescanning every snapshot costs milliseconds. ``sync(snapshots)`` suits callers that hold a full list:
    only snapshots that are new objects are re-rated.

    The planner remembers its own decisions (per request: how often, when, which instances it left), which
    the per-request budget, cooldown and ping-pong rules read; ``forget(request_id)`` drops a finished
    request early (else entries expire after the longer of the two windows).
    """

    def __init__(self, params: PolicyParams) -> None:
        self.params = params
        self._rated: dict[str, _Rated] = {}
        self._versions: dict[str, int] = {}
        self._group_of: dict[str, tuple[str, int]] = {}
        self._sources: dict[tuple[str, int], set[str]] = {}
        # sources also sit in a lazy min-heap of (freeness, id, version) per group, so a round orders only
        # the few it pairs (O(k log n)) instead of scanning every source (a tenth of 10,000 instances)
        self._src_heaps: dict[tuple[str, int], list[tuple[float, str, int]]] = {}
        self._src_versions: dict[str, int] = {}
        self._dst_heaps: dict[tuple[str, int], list[tuple[float, str, int]]] = {}
        self._dst_count: dict[tuple[str, int], int] = {}
        self._clock = 0
        self._moves: dict[str, _Moves] = {}
        self._last_prune = -math.inf
        self._now = 0.0
        self._deferred: list[InstanceSnapshot] | None = None  # a sync not applied yet (see sync)

    # -- state ---------------------------------------------------------------------------------------------
    def set_params(self, params: PolicyParams) -> None:
        """New parameters (``drover policy set``): every instance is re-rated under them."""
        self._flush()
        self.params = params
        snapshots = [r.snapshot for r in self._rated.values()]
        for snapshot in snapshots:
            self.update(snapshot)

    def __len__(self) -> int:
        self._flush()
        return len(self._rated)

    def update(self, snapshot: InstanceSnapshot) -> None:
        """A fresh heartbeat of one instance."""
        self._flush()
        iid = snapshot.instance_id
        self._drop_roles(iid)
        rated = migration_rate(snapshot, self.params)
        self._rated[iid] = rated
        group = (snapshot.model, snapshot.block_size)
        self._group_of[iid] = group
        threshold = self.params.migrate_threshold
        rule = self.params.migration_sources
        if rule == "freeness":
            source = rated.freeness < threshold or snapshot.num_preempted > 0
        elif rule == "pressure":  # preempting, or about to: some decode will need a block that is not there
            source = snapshot.num_preempted > 0 or (
                snapshot.num_free_blocks - self.params.watermark_blocks < snapshot.num_running
            )
        else:
            source = False
        if snapshot.num_running > 0 and (snapshot.draining or source):
            members = self._sources.setdefault(group, set())
            members.add(iid)
            self._clock += 1
            self._src_versions[iid] = self._clock
            heap = self._src_heaps.setdefault(group, [])
            heapq.heappush(heap, (rated.freeness, iid, self._clock))
            if len(heap) > 2 * len(members) + 64:
                versions = self._src_versions
                heap[:] = [item for item in heap if versions.get(item[1]) == item[2]]
                heapq.heapify(heap)
        elif not snapshot.draining and snapshot.num_preempted == 0 and rated.freeness > threshold:
            self._clock += 1
            self._versions[iid] = self._clock
            heap = self._dst_heaps.setdefault(group, [])
            heapq.heappush(heap, (-rated.freeness, iid, self._clock))
            live = self._dst_count[group] = self._dst_count.get(group, 0) + 1
            if len(heap) > 2 * live + 64:
                heap[:] = [item for item in heap if self._versions.get(item[1]) == item[2]]
                heapq.heapify(heap)

    def remove(self, instance_id: str) -> None:
        self._flush()
        self._drop_roles(instance_id)
        self._rated.pop(instance_id, None)
        self._group_of.pop(instance_id, None)

    def sync(self, snapshots: Sequence[InstanceSnapshot]) -> None:
        """Make the planner's view equal ``snapshots``: re-rate the ones that changed (by identity), drop the
        instances that are gone.

        Under ``migration_sources = drain`` a list with no draining instance that runs requests has no
        source, so the round after it plans nothing whatever the ratings: re-rating is then put off until a
        call that needs it (a later sync with a source, ``update``, ``remove``, ``len``, ``set_params``), which
        rates the same snapshots into the same state. A simulator ticking every 50 ms re-rated every busy
        instance's heartbeat for nothing otherwise."""
        if self.params.migration_sources == "drain" and not any(s.draining and s.num_running > 0 for s in snapshots):
            self._deferred = list(snapshots)
            return
        self._deferred = None
        self._sync(snapshots)

    def _flush(self) -> None:
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            self._sync(deferred)

    def _sync(self, snapshots: Sequence[InstanceSnapshot]) -> None:
        seen = 0
        rated = self._rated
        for snapshot in snapshots:
            current = rated.get(snapshot.instance_id)
            if current is None or current.snapshot is not snapshot:
                self.update(snapshot)
            seen += 1
        if seen != len(rated):
            keep = {s.instance_id for s in snapshots}
            for iid in [i for i in rated if i not in keep]:
                self.remove(iid)

    def forget(self, request_id: str) -> None:
        """Drop what the planner remembers of a request (call it when the request ends)."""
        self._moves.pop(request_id, None)

    def remembered_moves(self) -> int:
        """Requests whose moves the planner still remembers (bounded by ``forget`` and the expiry)."""
        return len(self._moves)

    def _drop_roles(self, iid: str) -> None:
        group = self._group_of.get(iid)
        if group is None:
            return
        sources = self._sources.get(group)
        if sources is not None:
            sources.discard(iid)
        self._src_versions.pop(iid, None)
        if self._versions.pop(iid, None) is not None:
            self._dst_count[group] -= 1

    # -- planning ------------------------------------------------------------------------------------------
    def plan(self, in_flight: Collection[InFlightMigration], *, now: float | None = None) -> list[MigrationDecision]:
        """This round's migrations (see the module docstring); records them for the per-request rules."""
        params = self.params
        if self._deferred is not None:  # the last sync showed no source (see sync)
            return []
        if not params.migration_enabled or not any(self._sources.values()):
            return []
        budget = params.max_migrations_total - len(in_flight) if params.max_migrations_total > 0 else math.inf
        if params.max_migrations_per_round > 0:
            budget = min(budget, params.max_migrations_per_round)
        if budget <= 0:
            return []
        now = time.monotonic() if now is None else now
        self._now = now
        busy: dict[str, int] = {}
        migrating: set[str] = set()
        for m in in_flight:
            busy[m.source_id] = busy.get(m.source_id, 0) + 1
            busy[m.destination_id] = busy.get(m.destination_id, 0) + 1
            migrating.add(m.request_id)
        cap = params.max_migrations_per_instance
        decisions: list[MigrationDecision] = []
        for group in sorted(self._sources):
            members = self._sources[group]
            if not members:
                continue
            # only as many sources as there can be destinations need ordering
            k = min(len(members), self._dst_count.get(group, 0), int(min(budget, 1 << 30)))
            if k == 0:
                continue
            srcs = self._top_sources(group, k, busy, cap)
            if not params.migration_cost_aware:
                # Llumnix: the i-th most pressed source with the i-th freest destination
                for src, dst in zip(srcs, self._top_destinations(group, len(srcs), busy, cap), strict=False):
                    if len(decisions) >= budget:
                        break
                    decision = _pair(src, dst, migrating, params, self._allowed if self._moves else None)
                    if decision is not None:
                        decisions.append(decision)
                        if params.migration_budget_per_request or self._tracks_moves():
                            self._record(decision, now)
                continue
            # cost-aware: a pair the rules refuse does not waste the source's turn; it tries the next freest
            # unused destinations (a few: the freest ones are where a move pays most)
            dsts = self._top_destinations(group, len(srcs) + _EXTRA_DESTINATIONS, busy, cap)
            used = [False] * len(dsts)
            for src in srcs:
                if len(decisions) >= budget:
                    break
                tries = 0
                for j, dst in enumerate(dsts):
                    if used[j]:
                        continue
                    decision = self._pair_cost_aware(src, dst, migrating, now)
                    if decision is not None:
                        used[j] = True
                        decisions.append(decision)
                        self._record(decision, now)
                        break
                    tries += 1
                    if tries > _EXTRA_DESTINATIONS:
                        break
        self._prune(now)
        return decisions

    def _top_sources(self, group: tuple[str, int], k: int, busy: dict[str, int], cap: int) -> list[_Rated]:
        """The ``k`` most pressed sources of the group not at their migration cap, by ascending (freeness,
        id)."""
        return self._best_live(self._src_heaps.get(group), self._src_versions, k, busy, cap)

    def _top_destinations(self, group: tuple[str, int], k: int, busy: dict[str, int], cap: int) -> list[_Rated]:
        """The ``k`` freest destinations of the group not at their migration cap."""
        return self._best_live(self._dst_heaps.get(group), self._versions, k, busy, cap)

    def _best_live(
        self,
        heap: list[tuple[float, str, int]] | None,
        versions: dict[str, int],
        k: int,
        busy: dict[str, int],
        cap: int,
    ) -> list[_Rated]:
        """The first ``k`` live items of a lazy heap whose instance is under its cap, in heap order; the
        live items popped are pushed back (the heap is left intact, less the stale items met)."""
        if not heap or k == 0:
            return []
        popped: list[tuple[float, str, int]] = []
        chosen: list[_Rated] = []
        while heap and len(chosen) < k:
            item = heapq.heappop(heap)
            if versions.get(item[1]) != item[2]:
                continue  # stale
            popped.append(item)
            if busy.get(item[1], 0) < cap:
                chosen.append(self._rated[item[1]])
        for item in popped:
            heapq.heappush(heap, item)
        return chosen

    def _tracks_moves(self) -> bool:
        p = self.params
        return p.migration_cooldown_s > 0 or p.migration_pingpong_window_s > 0

    def _record(self, decision: MigrationDecision, now: float) -> None:
        moves = self._moves.get(decision.request_id)
        if moves is None:
            self._moves[decision.request_id] = _Moves(1, now, {decision.source_id: now})
        else:
            moves.count += 1
            moves.last_s = now
            moves.left[decision.source_id] = now

    def _prune(self, now: float) -> None:
        horizon = max(self.params.migration_cooldown_s, self.params.migration_pingpong_window_s)
        if now - self._last_prune < max(1.0, horizon) or not self._moves:
            return
        self._last_prune = now
        if self.params.migration_budget_per_request:
            # the budget needs the counts of requests still running; nothing knows here when one finished, so
            # a request not moved for _BUDGET_MEMORY_S is forgotten (its budget renews) and memory stays bounded
            horizon = max(horizon, _BUDGET_MEMORY_S)
        stale = [rid for rid, m in self._moves.items() if now - m.last_s > horizon]
        for rid in stale:
            del self._moves[rid]

    def _allowed(self, request_id: str, destination_id: str, exempt: bool) -> bool:
        return self.may_move(request_id, destination_id, self._now, exempt=exempt)

    def may_move(self, request_id: str, destination_id: str, now: float, *, exempt: bool = False) -> bool:
        """Budget, cooldown and ping-pong rules for one request; ``exempt`` (a draining or preempting source)
        skips the budget and cooldown, never the ping-pong rule."""
        moves = self._moves.get(request_id)
        if moves is None:
            return True
        p = self.params
        if not exempt:
            if p.migration_budget_per_request and moves.count >= p.migration_budget_per_request:
                return False
            if p.migration_cooldown_s and now - moves.last_s < p.migration_cooldown_s:
                return False
        left = moves.left.get(destination_id)
        return not (p.migration_pingpong_window_s and left is not None and now - left < p.migration_pingpong_window_s)

    def _pair_cost_aware(self, src: _Rated, dst: _Rated, migrating: set[str], now: float) -> MigrationDecision | None:
        """The request whose move pays most on this pair, or None (see ``PolicyParams.migration_cost_aware``).

        Source relief: the source is back at the threshold when (available + b) / (n - 1) >= threshold
        (b: the moved request's blocks); the smallest request that achieves it moves (least copy and
        downtime for the whole benefit), else the largest that fits (the most relief per copy). Draining
        sources move their requests shortest first (everything goes)."""
        params = self.params
        threshold = params.migrate_threshold
        reason = _reason(src, threshold)
        s = src.snapshot
        d = dst.snapshot
        draining = s.draining
        # Budget and cooldown stop load-balancing churn; a source that drains or is preempting pays more for
        # not moving (recompute of its victims) than any move costs, so they do not bind there.
        exempt = reason in (REASON_DRAIN, REASON_PREEMPTION)
        normal_only = reason == REASON_PRIORITY
        n_src = s.num_running + (1 if s.num_waiting > 0 else 0)
        avail_src = s.num_free_blocks - params.watermark_blocks - (s.head_waiting_blocks if s.num_waiting else 0)
        n_dst = d.num_running + (1 if d.num_waiting > 0 else 0)
        sufficient: RunningSnapshot | None = None
        largest: RunningSnapshot | None = None
        rooms: dict[bool, int] = {}
        for request in candidate_requests(s, migrating, params, normal_only=normal_only):
            if self._moves and not self.may_move(request.request_id, d.instance_id, now, exempt=exempt):
                continue
            high = request.priority > 0
            room = rooms.get(high)
            if room is None:
                room = rooms[high] = destination_room(d, params, high_priority=high)
            b = request.num_blocks
            if b + 1 > room:
                continue
            if draining:
                sufficient = request
                break
            # the destination's future pressure: it must stay a non-source after taking the request (and the
            # block its next tokens need)
            dst_after = per_request(room - b - 1, n_dst + 1)
            src_after = per_request(avail_src + b, n_src - 1) if n_src > 1 else math.inf
            if dst_after < min(threshold, src.freeness):
                continue  # the destination would end up more pressed than the source was: no net relief
            if src_after >= threshold:
                if sufficient is None or (request.priority, b) < (sufficient.priority, sufficient.num_blocks):
                    sufficient = request
            elif largest is None or (request.priority, -b) < (largest.priority, -largest.num_blocks):
                largest = request
        chosen = sufficient or largest
        if chosen is None:
            return None
        migrating.add(chosen.request_id)
        return MigrationDecision(
            source_id=s.instance_id,
            destination_id=d.instance_id,
            request_id=chosen.request_id,
            num_blocks=chosen.num_blocks,
            priority=chosen.priority,
            reason=reason,
            source_freeness=src.freeness,
            destination_freeness=dst.freeness,
        )


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


def _pair(
    src: _Rated,
    dst: _Rated,
    migrating: set[str],
    params: PolicyParams,
    allowed: Callable[[str, str, bool], bool] | None = None,
) -> MigrationDecision | None:
    """Llumnix's choice: the first movable request (in pick order) that fits; ``allowed(request, destination,
    exempt)`` adds the budget, cooldown and ping-pong rules when they are on."""
    reason = _reason(src, params.migrate_threshold)
    normal_only = reason == REASON_PRIORITY
    exempt = reason in (REASON_DRAIN, REASON_PREEMPTION)
    for request in candidate_requests(src.snapshot, migrating, params, normal_only=normal_only):
        if allowed is not None and not allowed(request.request_id, dst.snapshot.instance_id, exempt):
            continue
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
