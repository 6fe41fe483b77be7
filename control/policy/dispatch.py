"""Dispatch policies: which instance gets a new request. Pure and incremental, no I/O.

The live SchedulerActor and the cluster simulator drive the same objects:

* ``upsert(snapshot)`` on every heartbeat (it replaces the virtual bumps of earlier dispatches),
* ``choose(demand)`` for each request (``None`` only when no instance can serve it at all: none of its
  model, or all draining; a loaded instance is still chosen, the engine queues the request),
* ``on_dispatched(instance_id, demand)`` after sending it, so the request counts as queued *virtual usage*
  until the next heartbeat (this stops a burst from herding onto one instance between heartbeats).

Policies (Llumnix names in brackets):

* ``round_robin`` [rr]: cycle over eligible instances.
* ``least_loaded``: INFaaS++, the Llumnix paper's strong baseline: lowest KV-memory load
  (used + queued blocks) / total.
* ``freeness`` [load]: highest Llumnix dispatch freeness (virtual usage incl. priority headroom). A
  high-priority request goes to an instance already hosting high-priority requests when one has freeness
  >= ``affinity_min_freeness`` (reckoned with headroom), else to the best instance reckoned with headroom.
* ``queue_size`` [queue]: fewest waiting requests (the engine's queue plus requests dispatched since its last
  snapshot), ties to the first instance id: the "simple load balancing scheduler based on queue sizes" of
  Llumnix's README benchmark. It sees neither memory nor batch size.
* ``prefix_affinity`` [cacheaware]: the instance holding the longest run of the prompt's prefix blocks, if
  its freeness >= ``affinity_min_freeness``; otherwise ``freeness``.

Eligibility: same model as the demand (``demand.model == ""`` matches any) and not draining. Sorted
structures are kept per model (plus one for all models), so ``choose`` reads the head of a sorted list and
an update costs O(log n).
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from heapq import heapify, heappop, heappush, heapreplace
from typing import Any, Protocol

from control.policy.freeness import INF, dispatch_freeness, physical_usage, priority_headroom_blocks
from control.policy.params import DispatchParams
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import InstanceSnapshot, RequestDemand, running_totals

POLICY_NAMES: tuple[str, ...] = ("round_robin", "least_loaded", "freeness", "prefix_affinity", "kv_aware", "predictive")
POLICY_NAMES += ("queue_size",)  # a line of its own: other branches edit the line above

ANY_MODEL = ""


class DispatchIndex(Protocol):
    """What the SchedulerActor and the simulator call; see the module docstring."""

    name: str

    def upsert(self, snapshot: InstanceSnapshot) -> None: ...

    def remove(self, instance_id: str) -> None: ...

    def choose(self, demand: RequestDemand) -> str | None: ...

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None: ...


def make_dispatch_policy(name: str, params: DispatchParams | None = None) -> DispatchIndex:
    """A fresh, empty index for policy ``name`` (one of :data:`POLICY_NAMES`)."""
    params = params or DispatchParams()
    if name == "round_robin":
        return RoundRobinIndex(params)
    if name == "least_loaded":
        return LeastLoadedIndex(params)
    if name == "freeness":
        return FreenessIndex(params)
    if name == "prefix_affinity":
        return PrefixAffinityIndex(params)
    if name == "predictive":
        return PredictiveIndex(params)
    if name == "queue_size":
        return QueueSizeIndex(params)
    if name == "kv_aware":  # its own module (control/policy/kv_aware.py); imported here to avoid a cycle
        from control.policy.kv_aware import KvAwareIndex

        return KvAwareIndex(params)
    raise ValueError(f"unknown dispatch policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def reads_engine_block_hashes(params: DispatchParams, dispatch_policy: str) -> bool:
    """Whether ``dispatch_policy`` with ``params`` scores a request by the vLLM block hashes of its prompt
    (its prefix index is keyed by what engines report): ``kv_aware``, and ``predictive`` with
    ``predict_prefix`` (``drover``). A shell building a :class:`RequestDemand` fills
    ``prefix_block_hashes`` with ``control.policy.block_hash.vllm_block_hashes`` when this is True."""
    return dispatch_policy == "kv_aware" or (dispatch_policy == "predictive" and params.predict_prefix)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks (as vLLM's prefix cache): hash i covers tokens
    [0, (i+1)*block_size), so an instance holding hash i holds the whole prefix up to it. Python hashes
    of int tuples are not randomised, so these are stable across processes."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return tuple(hashes)


class _Entry:
    """An instance's last snapshot plus what was dispatched to it since (virtual usage)."""

    __slots__ = (
        "extra_blocks",
        "extra_high",
        "extra_waiting",
        "has_high",
        "iid",
        "keys",
        "model",
        "pools",
        "room_version",
        "snapshot",
        "terms",
        "version",
    )

    def __init__(self, snapshot: InstanceSnapshot) -> None:
        self.snapshot = snapshot
        # the snapshot's id and model kept beside it: the hot paths read them here rather than from a snapshot
        # object that is no longer in the CPU cache (a dispatch re-keys an instance last heard from a while ago)
        self.iid = snapshot.instance_id
        self.model = snapshot.model
        self.terms: Any = None  # what the policy derives from the snapshot alone (``_IndexBase._terms``)
        self.extra_waiting = 0
        self.extra_blocks = 0
        self.extra_high = False
        self.has_high = snapshot.num_high_priority > 0
        self.keys: tuple[Any, ...] = ()  # per list: a float, a tuple of floats or a heap item (predictive); None
        self.pools: tuple[str, ...] = _pool_names(snapshot)
        self.version = 0  # heap items carrying another version are stale
        self.room_version = 0  # the same for ``PredictiveIndex``'s room list, which a dispatch leaves as it is

    def reset(self, snapshot: InstanceSnapshot) -> None:
        """A fresh heartbeat: it replaces the virtual bumps of earlier dispatches."""
        if snapshot.model != self.model:
            self.pools = _pool_names(snapshot)
            self.model = snapshot.model
        self.snapshot = snapshot
        self.extra_waiting = 0
        self.extra_blocks = 0
        self.extra_high = False
        self.has_high = snapshot.num_high_priority > 0

    @property
    def hosts_high_priority(self) -> bool:
        return self.has_high or self.extra_high


def _pool_names(snapshot: InstanceSnapshot) -> tuple[str, ...]:
    return (ANY_MODEL,) if snapshot.model == ANY_MODEL else (ANY_MODEL, snapshot.model)


# A heap item: (key, instance id, entry version), keys floats or tuples of floats, smaller better; or the parts of
# a tuple key laid out flat, (part, ..., instance id, entry version), which orders the same (``PredictiveIndex``).
# Either way an item ends with the instance id and the version: the shared code reads them as item[-2], item[-1].
_HeapItem = tuple[Any, ...]

_STALE_WALK = 4
"""Stale heap items a read of the best few instances (``_IndexBase._peek``) steps over before it pops them for
good instead."""


class _IndexBase:
    """Entries plus per-model pools of lazy min-heaps; subclasses define the keys and the choice.

    Why lazy heaps: every heartbeat and every dispatch re-keys one instance. Removing its old key from a
    sorted structure costs a search and a shift per list and pool (the dominant cost at 1,000 instances);
    a heap push is O(log n) with a tiny constant, and an outdated item is only discarded when it reaches
    the top (its version no longer matches the entry's). A heap holding more than four times the live items
    plus 16 is rebuilt from the live keys, so memory stays O(instances) and the rebuild's O(n) cost is paid
    once per ~3n pushes: rarely enough to stay out of the p99 even with six heaps pushed per decision.

    Why pools are built on first read: an instance belongs to its model's pool and to the any-model pool,
    but a cluster's requests usually all name a model (or all name none), so one of the two is never read;
    keeping both halved what a re-key pushes for nothing. A pool is built from the entries' current keys
    the first time ``choose`` asks for it (O(n) once) and kept up to date from then on, so its heaps hold
    exactly the live items an eagerly kept pool would: the choice is the same.
    """

    name = "base"
    num_lists = 1

    def __init__(self, params: DispatchParams) -> None:
        self.params = params
        self._entries: dict[str, _Entry] = {}
        self._pools: dict[str, tuple[list[_HeapItem], ...]] = {}  # only pools some choice has read
        self._pool_sizes: dict[str, int] = {}  # live (linked) members per built pool
        self._pool_members: Counter[str] = Counter()  # entries per pool name, built or not
        self._clock = 0

    # -- Protocol --------------------------------------------------------------------------------------
    def upsert(self, snapshot: InstanceSnapshot) -> None:
        entry = self._entries.get(snapshot.instance_id)
        if entry is None:
            entry = self._entries[snapshot.instance_id] = _Entry(snapshot)
            self._pool_members.update(entry.pools)
        elif entry.keys and not snapshot.draining and snapshot.model == entry.model:
            # the usual heartbeat: a live member stays one, in the same pools, so ``_unlink`` then ``_link``
            # in one step, as a dispatch re-keys (the same versions and heap items, less work)
            entry.reset(snapshot)
            entry.terms = self._terms(snapshot)
            self._rekey(entry)
            return
        else:
            self._unlink(entry)
            if snapshot.model != entry.model:
                self._pool_members.subtract(entry.pools)
                entry.reset(snapshot)
                self._pool_members.update(entry.pools)
            else:
                entry.reset(snapshot)
        entry.terms = self._terms(snapshot)
        self._link(entry)

    def remove(self, instance_id: str) -> None:
        entry = self._entries.pop(instance_id, None)
        if entry is not None:
            self._unlink(entry)
            self._pool_members.subtract(entry.pools)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        self._add_pending(instance_id, demand.num_blocks, demand.priority)

    def _add_pending(self, instance_id: str, num_blocks: int, priority: int) -> None:
        """``on_dispatched`` with the demand's blocks given apart: a subclass that counts fewer (a prefix hit)
        passes its own count instead of building a changed copy of the demand on every decision."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return
        entry.extra_waiting += 1
        entry.extra_blocks += num_blocks
        if priority > 0:
            entry.extra_high = True
        self._rekey(entry)

    def choose(self, demand: RequestDemand) -> str | None:
        raise NotImplementedError

    # -- Introspection (status, tests) -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._entries

    def snapshot(self, instance_id: str) -> InstanceSnapshot | None:
        entry = self._entries.get(instance_id)
        return entry.snapshot if entry else None

    def snapshots(self) -> list[InstanceSnapshot]:
        return [e.snapshot for e in self._entries.values()]

    def pending(self, instance_id: str) -> tuple[int, int]:
        """(requests, blocks) dispatched to the instance since its last snapshot."""
        entry = self._entries.get(instance_id)
        return (entry.extra_waiting, entry.extra_blocks) if entry else (0, 0)

    # -- Internals -------------------------------------------------------------------------------------
    def _terms(self, snapshot: InstanceSnapshot) -> Any:
        """What ``_keys`` needs from the snapshot alone, computed once per heartbeat instead of on every
        dispatch that re-keys the instance (None: nothing worth caching)."""
        return None

    def _keys(self, entry: _Entry) -> tuple[Any, ...]:
        """One sort key per list (None: not in that list); smaller sorts first (best)."""
        raise NotImplementedError

    def _pool(self, model: str) -> tuple[list[_HeapItem], ...] | None:
        """The pool of ``model`` (built on first read), or None while no instance belongs to it."""
        pool = self._pools.get(model)
        if pool is None and self._pool_members[model] > 0:
            pool = self._build_pool(model)
        return pool

    def _build_pool(self, model: str) -> tuple[list[_HeapItem], ...]:
        pool: tuple[list[_HeapItem], ...] = tuple([] for _ in range(self.num_lists))
        live = 0
        for entry in self._entries.values():
            if entry.keys and model in entry.pools:
                live += 1
                for number, (heap, key) in enumerate(zip(pool, entry.keys, strict=False)):
                    if key is not None:
                        heap.append(self._item(number, key, entry))
        for heap in pool:
            heapq.heapify(heap)
        self._pools[model] = pool
        self._pool_sizes[model] = live
        return pool

    def _item(self, number: int, key: Any, entry: _Entry) -> _HeapItem:
        """The entry's heap item in list ``number`` (see ``_HeapItem``)."""
        return (key, entry.iid, entry.version)

    def _link(self, entry: _Entry) -> None:
        self._clock += 1
        entry.version = version = self._clock
        if entry.snapshot.draining:
            entry.keys = ()
            return
        entry.keys = keys = self._keys(entry)
        self._push(entry, keys, version, 1)

    def _push(self, entry: _Entry, keys: tuple[Any, ...], version: int, joined: int) -> None:
        """Push the entry's keys into its built pools; ``joined``: 1 when it becomes a live member, 0 when it
        already was (a re-key)."""
        iid = entry.iid
        pools = self._pools
        sizes = self._pool_sizes
        entries = self._entries
        for pool_name in entry.pools:
            pool = pools.get(pool_name)
            if pool is None:
                continue  # not read yet: built from the entries' keys when it is
            live = sizes[pool_name]
            if joined:
                live = sizes[pool_name] = live + joined
            limit = 4 * live + 16
            for heap, key in zip(pool, keys, strict=False):
                if key is None:
                    continue
                top = heap[0] if heap else None
                if top is None or ((other := entries.get(top[-2])) is not None and other.version == top[-1]):
                    heappush(heap, (key, iid, version))
                    if len(heap) > limit:
                        self._rebuild(heap)
                    continue  # the top is live: the one read above, or the new item
                # A stale top: this instance's item as it was (every item pushed for it before carries an older
                # version), as after a dispatch to the best instance, or another instance's superseded item that
                # surfaced (issue 17: in the slowest 5 % of decisions a push was followed by a pop of one). The
                # new item takes its place: one sift down, not a push and then a pop.
                heapreplace(heap, (key, iid, version))
                # pop up to two more stale items off the top: a policy that rarely reads a heap (prefix affinity
                # answers most requests from its holders) would otherwise pay for thousands of stale tops in
                # one read
                top = heap[0]
                other = entries.get(top[-2])
                if other is None or other.version != top[-1]:
                    heappop(heap)
                    if heap:
                        top = heap[0]
                        other = entries.get(top[-2])
                        if other is None or other.version != top[-1]:
                            heappop(heap)

    def _rekey(self, entry: _Entry) -> None:
        """``_unlink`` then ``_link`` in one step, for a dispatch: same versions and items, less work."""
        if not entry.keys:  # draining (or not linked): nothing to re-key, only the version moves on
            self._unlink(entry)
            self._link(entry)
            return
        self._clock += 2  # the version _unlink would set, then the one _link sets
        entry.version = version = self._clock
        entry.keys = keys = self._keys(entry)
        self._push(entry, keys, version, 0)

    def _unlink(self, entry: _Entry) -> None:
        if not entry.keys:
            return
        sizes = self._pool_sizes
        for pool_name in entry.pools:
            if pool_name in sizes:
                sizes[pool_name] -= 1
        entry.keys = ()
        self._clock += 1
        entry.version = self._clock  # every item pushed for it is stale now

    def _rebuild(self, heap: list[_HeapItem]) -> None:
        """Drop stale items (in place: the pool tuple keeps pointing at this list)."""
        entries = self._entries
        fresh = [item for item in heap if (e := entries.get(item[-2])) is not None and e.version == item[-1]]
        heap[:] = fresh
        heapq.heapify(heap)

    def _best(self, heap: list[_HeapItem], k: int) -> list[_HeapItem]:
        """The ``k`` best live items in order, O(k log n): popped, then pushed back."""
        entries = self._entries
        popped: list[_HeapItem] = []
        while heap and len(popped) < k:
            item = heapq.heappop(heap)
            entry = entries.get(item[-2])
            if entry is not None and entry.version == item[-1]:
                popped.append(item)
        for item in popped:
            heapq.heappush(heap, item)
        return popped

    def _peek(self, heap: list[_HeapItem], k: int) -> Sequence[_HeapItem]:
        """What ``_best`` returns, read without changing the heap: the ``k`` best live items. A best-first walk
        down the heap's tree (a parent sorts before its children), O(k log k) on a small frontier instead of k
        pops and k pushes on the big heap, each of them a dozen comparisons of key tuples. Stale items are
        stepped over; when more than a few are in the way, ``_best`` pops them for good instead, so they cannot
        pile up at the top and slow every later walk (both give the live items in key order)."""
        out: list[_HeapItem] = []  # the heap's own items: no new tuples
        size = len(heap)
        if not size:
            return out
        entries = self._entries
        stale = 0
        frontier = [(heap[0], 0)]  # items are unique (one version per instance), so the index never compares
        while frontier:
            item, i = heappop(frontier)
            entry = entries.get(item[-2])
            if entry is not None and entry.version == item[-1]:
                out.append(item)
                if len(out) == k:
                    break
            else:
                stale += 1
                if stale > _STALE_WALK:
                    return self._best(heap, k)
            child = 2 * i + 1
            if child < size:
                heappush(frontier, (heap[child], child))
                child += 1
                if child < size:
                    heappush(frontier, (heap[child], child))
        return out

    def _top(self, heap: list[_HeapItem]) -> _HeapItem | None:
        """The best live item, popping stale ones off the top."""
        entries = self._entries
        while heap:
            item = heap[0]
            entry = entries.get(item[-2])
            if entry is not None and entry.version == item[-1]:
                return item
            heapq.heappop(heap)
        return None


class RoundRobinIndex(_IndexBase):
    """Cycle over eligible instances (per model), in the order they joined.

    The ring is lazy like the heaps: an instance that drains or leaves stays in the ring and is skipped
    when the cursor reaches it; the ring is compacted when more than half of it is skipped members, so a
    draining flag flipping costs O(1) instead of a linear list removal.
    """

    name = "round_robin"

    def __init__(self, params: DispatchParams) -> None:
        super().__init__(params)
        self._rings: dict[str, list[str]] = {}
        self._members: dict[str, set[str]] = {}
        self._cursor: dict[str, int] = {}

    def _link(self, entry: _Entry) -> None:
        if entry.snapshot.draining:
            entry.keys = ()
            return
        entry.keys = (0.0,)
        iid = entry.snapshot.instance_id
        for pool_name in entry.pools:
            members = self._members.setdefault(pool_name, set())
            if iid not in members:
                members.add(iid)
                self._rings.setdefault(pool_name, []).append(iid)

    def _unlink(self, entry: _Entry) -> None:
        entry.keys = ()

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        old = self._entries.get(snapshot.instance_id)
        if old is not None and old.snapshot.draining == snapshot.draining and old.snapshot.model == snapshot.model:
            old.snapshot = snapshot  # keep its place in the ring
            old.extra_waiting = old.extra_blocks = 0
            return
        super().upsert(snapshot)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        entry = self._entries.get(instance_id)
        if entry is not None:
            entry.extra_waiting += 1
            entry.extra_blocks += demand.num_blocks

    def _eligible(self, iid: str, pool_name: str) -> bool:
        entry = self._entries.get(iid)
        return entry is not None and bool(entry.keys) and pool_name in entry.pools

    def choose(self, demand: RequestDemand) -> str | None:
        ring = self._rings.get(demand.model)
        if not ring:
            return None
        cursor = self._cursor.get(demand.model, 0)
        skipped = 0
        while skipped < len(ring):
            iid = ring[cursor % len(ring)]
            cursor += 1
            if self._eligible(iid, demand.model):
                self._cursor[demand.model] = cursor
                if skipped * 2 > len(ring):
                    self._compact(demand.model)
                return iid
            skipped += 1
        self._compact(demand.model)
        return None

    def _compact(self, pool_name: str) -> None:
        ring = self._rings[pool_name]
        cursor = self._cursor.get(pool_name, 0) % max(1, len(ring))
        # keep the rotation: the next instance due stays next
        rotated = ring[cursor:] + ring[:cursor]
        kept = [iid for iid in rotated if self._eligible(iid, pool_name)]
        self._rings[pool_name] = kept
        self._members[pool_name] = set(kept)
        self._cursor[pool_name] = 0


class LeastLoadedIndex(_IndexBase):
    """INFaaS++: lowest KV-memory load, queued and just-dispatched blocks included."""

    name = "least_loaded"

    def _keys(self, entry: _Entry) -> tuple[Any, ...]:
        return (physical_usage(entry.snapshot, extra_blocks=entry.extra_blocks),)

    def choose(self, demand: RequestDemand) -> str | None:
        pool = self._pool(demand.model)
        top = self._top(pool[0]) if pool else None
        return None if top is None else top[1]


class FreenessIndex(_IndexBase):
    """Llumnix ``load`` dispatch: highest dispatch freeness, with priority headroom.

    Lists per pool: (0) freeness as the instance stands (headroom iff it hosts high priority), used for
    normal requests; (1) freeness as if it hosted high priority, for high-priority requests; (2) instances
    hosting high priority, so a high-priority request can join them (Llumnix packs them together).
    """

    name = "freeness"
    num_lists = 3

    def freeness(self, entry: _Entry, *, as_high_priority: bool = False) -> float:
        snapshot = entry.snapshot
        headroom = priority_headroom_blocks(
            snapshot,
            self.params.high_priority_load_cap_tokens,
            hosts_high_priority=entry.hosts_high_priority or as_high_priority,
        )
        return dispatch_freeness(
            snapshot,
            watermark_blocks=self.params.watermark_blocks,
            headroom_blocks=headroom,
            extra_waiting=entry.extra_waiting,
            extra_waiting_blocks=entry.extra_blocks,
        )

    def instance_freeness(self, instance_id: str) -> float | None:
        entry = self._entries.get(instance_id)
        return None if entry is None else self.freeness(entry)

    def _terms(self, snapshot: InstanceSnapshot) -> Any:
        """The priority headroom the instance has when it hosts high-priority requests."""
        return priority_headroom_blocks(snapshot, self.params.high_priority_load_cap_tokens, hosts_high_priority=True)

    def _keys(self, entry: _Entry) -> tuple[Any, ...]:
        # ``freeness`` (dispatch_freeness with the headroom) inlined: it runs twice on every re-key. All
        # terms are integers, so the sums are exact and the division is the one dispatch_freeness makes.
        snap = entry.snapshot
        n = snap.num_running + snap.num_waiting + entry.extra_waiting
        if n == 0:
            return (-INF, -INF, -INF) if entry.has_high or entry.extra_high else (-INF, -INF, None)
        available = snap.num_free_blocks - self.params.watermark_blocks - snap.waiting_blocks - entry.extra_blocks
        high = available - entry.terms
        as_high = -(high / n if high >= 0 else high * n)
        if entry.has_high or entry.extra_high:
            return (as_high, as_high, as_high)
        return (-(available / n if available >= 0 else available * n), as_high, None)

    def choose(self, demand: RequestDemand) -> str | None:
        pool = self._pool(demand.model)
        if not pool:
            return None
        if demand.priority > 0:
            hosting = self._top(pool[2])
            if hosting is not None and -hosting[0] >= self.params.affinity_min_freeness:
                return hosting[1]
            top = self._top(pool[1])
        else:
            top = self._top(pool[0])
        return None if top is None else top[1]


class PredictiveIndex(_IndexBase):
    """Drover's dispatch: the instance where the request's first token comes soonest *without* pushing the
    instance into memory pressure later.

    Two tiers. Memory first: the instance's predicted KV demand is what it holds, what is queued for it,
    and a growth reserve of ``predict_growth_blocks`` per request it hosts (running requests keep writing
    KV; INFaaS++ counts only what is allocated now, so it fills an instance whose requests are about to
    grow). Instances whose predicted demand stays under ``predict_high_watermark`` of their blocks form the
    safe tier. Within it, the key is the prefill work ahead of a new request (queued prompt tokens,
    dispatched-but-unreported prompt tokens, and the unprefilled rest of running prompts) plus
    ``predict_decode_weight`` token-equivalents per running request (each decode shares the step with the
    new prefill), then the predicted memory load. Outside it, the lowest predicted memory load wins
    (INFaaS++ with the reserve). Neither INFaaS++ nor freeness sees the prefill queue of chunked prefill:
    a long prompt being prefilled holds only the blocks it has computed so far, so both rank its instance
    as nearly free while every request sent there waits behind the rest of the prompt.

    With ``predict_hold`` (late binding, ``drover``'s setting) a request goes only where its prompt fits now,
    else it is held by the scheduler with one reservation (:meth:`_choose_late`; docs/policies.md).
    """

    name = "predictive"
    num_lists = 2
    _PROBE = 4  # safe-tier candidates checked for room before the roomiest instance is taken

    def _terms(self, snapshot: InstanceSnapshot) -> Any:
        """(total blocks, used + queued blocks, hosted requests, running requests, queued blocks, block
        size, unprefilled prompt tokens of running requests, decoding requests, no request running or
        waiting): a dispatch re-keys the instance without walking its running requests again, and a decision
        reads whether an instance is idle (``_idle``) here, beside the keys it reads anyway, not from a snapshot
        object that is out of the CPU cache by then."""
        bs = snapshot.block_size
        totals = snapshot.running_totals  # summed by the snapshot's builder, or here
        prefilling, to_allocate, decoding = running_totals(snapshot.running, bs) if totals is None else totals
        total = snapshot.num_total_blocks
        waiting_blocks = snapshot.waiting_blocks
        running = snapshot.num_running
        used_queued = total - snapshot.num_free_blocks + waiting_blocks  # num_used_blocks (a property) + queued
        if self.params.predict_prefill_blocks:
            # the blocks the running prompts' later chunks will still take (under chunked prefill a prompt
            # holds only its computed chunks' blocks, so one just started looks like free room)
            used_queued += to_allocate
        return (
            total if total > 1 else 1,
            used_queued,
            running + snapshot.num_waiting,
            running,
            waiting_blocks,
            bs,
            prefilling,
            decoding,
            running == 0 and snapshot.num_waiting == 0,  # InstanceSnapshot.is_empty
        )

    def _keys(self, entry: _Entry) -> tuple[Any, ...]:
        total, used_queued, hosted, running, waiting_blocks, bs, prefilling, _, _ = entry.terms
        params = self.params
        extra_blocks = entry.extra_blocks
        reserve = params.predict_growth_blocks * (hosted + entry.extra_waiting)
        demand = used_queued + extra_blocks + reserve
        # list 1: the blocks a new request could take now (free, less queued, less the hold's growth reserve:
        # ``predict_hold_growth_blocks`` per hosted request, 0 with ``predict_hold_physical``; the full reserve
        # weighs in the load key below)
        if params.predict_hold:
            room = _hold_room(
                total - used_queued - extra_blocks, self._hold_growth * (hosted + entry.extra_waiting), self._hold_share
            )
        else:
            room = None
        load = demand / total
        if load >= params.predict_high_watermark:
            return ((1.0, load, 0.0), room)
        ahead: float = (waiting_blocks + extra_blocks) * bs + prefilling
        ahead += params.predict_decode_weight * (running + entry.extra_waiting)
        return ((0.0, float(ahead), load), room)

    def __init__(self, params: DispatchParams) -> None:
        # the hold test's growth reserve per hosted request (the params are fixed for the index's life)
        self._hold_growth = _hold_growth(params)
        # and the share of an instance's free room that reserve may take at most (0: no bound)
        self._hold_share = params.predict_hold_growth_share
        super().__init__(params)
        # late binding: per model pool, the held request that reserved an instance, the instance, and how
        # many other decisions have passed since that request was last asked about
        self._reservations: dict[str, list[Any]] = {}
        # predict_prefix: which instance caches which prompt blocks, fed from engines' cache reports by the
        # scheduler and the simulator (they look for a ``prefix_index`` attribute, as for ``kv_aware``);
        # None without predict_prefix, so nothing feeds or bounds an index no decision reads
        self.prefix_index: PrefixIndex | None = PrefixIndex() if params.predict_prefix else None
        self._last_hit: tuple[str, str, int] = ("", "", 0)  # (request, instance, cached blocks) of the last choice
        self._no_prefix_at = -1  # the prefix index's ``changes`` when the last choice found no holder at all

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        entry = self._entries.get(snapshot.instance_id)
        if entry is not None and entry.keys and not snapshot.draining and snapshot.model == entry.model:
            # the usual heartbeat: ``_IndexBase.upsert``'s first branch in one frame (``_Entry.reset`` with the
            # model unchanged, then the re-key); a busy cluster sends about one per dispatch
            entry.snapshot = snapshot
            entry.extra_waiting = 0
            entry.extra_blocks = 0
            entry.extra_high = False
            count = snapshot.high_priority_count
            entry.has_high = count > 0 if count >= 0 else snapshot.num_high_priority > 0
            entry.terms = self._terms(snapshot)
            self._rekey(entry)
        else:
            super().upsert(snapshot)
        if self.prefix_index is not None:
            self.prefix_index.set_capacity(snapshot.instance_id, snapshot.num_total_blocks)

    def remove(self, instance_id: str) -> None:
        super().remove(instance_id)
        if self.prefix_index is not None:
            self.prefix_index.remove_instance(instance_id)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        num_blocks = demand.num_blocks
        index = self.prefix_index
        if index is not None and demand.prefix_block_hashes:
            rid, iid, cached = self._last_hit
            if iid is _ANY_INSTANCE and self._no_prefix_at == index.changes:
                iid = instance_id  # nobody held the prefix when it was chosen, and the holdings are the same
            if rid != demand.request_id or iid != instance_id:  # not the choice just made: look it up
                cached = index.overlap(instance_id, demand.prefix_block_hashes)
            if cached:  # a hit is neither prefilled nor allocated again: only the rest is pending there
                num_blocks = num_blocks - cached if num_blocks > cached else 0
        # ``_add_pending``, inlined
        entry = self._entries.get(instance_id)
        if entry is None:
            return
        entry.extra_waiting += 1
        entry.extra_blocks += num_blocks
        if demand.priority > 0:
            entry.extra_high = True
        self._rekey(entry, dispatched=True)

    def choose(self, demand: RequestDemand) -> str | None:
        model = demand.model
        pool = self._pools.get(model)
        if pool is None:
            pool = self._pool(model)  # built on its first read
            if not pool:
                return None
        if self.prefix_index is not None and demand.prefix_block_hashes:
            holder = self._choose_holder(demand, pool)
            if holder is not None:
                return holder
        if not self.params.predict_hold:
            top = self._top(pool[0])
            return None if top is None else top[-2]
        return self._choose_late(demand, pool)

    def _rekey(self, entry: _Entry, dispatched: bool = False) -> None:
        """``_IndexBase._rekey`` with ``_keys`` inlined (every decision re-keys two instances: the one it chose,
        and the one whose heartbeat follows). The formulas are ``_keys``'s in the same order of operations, so
        the floats are the same; test_drover_equivalence checks both paths against a full scan.

        ``dispatched``: a dispatch re-keys it, which only takes room (more blocks and one more request
        pending), so its item in the room list is left as it is (``_room_top``)."""
        if not entry.keys:  # draining (or not linked): nothing to re-key, only the version moves on
            self._unlink(entry)
            self._link(entry)
            return
        self._clock += 2  # the version _unlink would set, then the one _link sets
        entry.version = version = self._clock
        total, used_queued, hosted, running, waiting_blocks, bs, prefilling, _, _ = entry.terms
        params = self.params
        extra_blocks = entry.extra_blocks
        extra_waiting = entry.extra_waiting
        demand = used_queued + extra_blocks + params.predict_growth_blocks * (hosted + extra_waiting)
        if params.predict_hold:
            room = _hold_room(
                total - used_queued - extra_blocks, self._hold_growth * (hosted + extra_waiting), self._hold_share
            )
        else:
            room = None
        load = demand / total
        iid = entry.iid
        item: _HeapItem
        if load >= params.predict_high_watermark:
            item = (1.0, load, 0.0, iid, version)
        else:
            ahead: float = (waiting_blocks + extra_blocks) * bs + prefilling
            ahead += params.predict_decode_weight * (running + extra_waiting)
            item = (0.0, float(ahead), load, iid, version)
        entry.keys = (item, room)  # list 0's key is its heap item (``_link``)
        self._push_items(entry, item, None if dispatched else room, version, 0)

    def _link(self, entry: _Entry) -> None:
        """``_IndexBase._link``, keeping list 0's heap item as the entry's key: the item starts with the key's
        three parts (``_item``), so the readers of ``keys[0][0]`` and ``keys[0][1]`` read the same, and a re-key
        builds one tuple, not a key and then an item holding its parts (two per decision)."""
        self._clock += 1
        entry.version = version = self._clock
        if entry.snapshot.draining:
            entry.keys = ()
            return
        key, room = self._keys(entry)
        item = (*key, entry.iid, version)
        entry.keys = (item, room)
        self._push_items(entry, item, room, version, 1)

    def _item(self, number: int, key: Any, entry: _Entry) -> _HeapItem:
        """List 0's key laid out flat, (tier, work ahead or load, load, instance id, version): it orders as
        ((tier, ...), instance id, version) does, but a comparison reads the floats without stepping into a
        nested tuple (twice: once for equality, once for order), which halved a sift's cost. The entry keeps that
        item as its list-0 key (``_link``), with the entry's version. List 1's items carry the room version
        (``_room_top``)."""
        return key if number == 0 else (key, entry.iid, entry.room_version)

    def _push(self, entry: _Entry, keys: tuple[Any, ...], version: int, joined: int) -> None:
        """``_IndexBase._push`` for the two lists, ``keys`` as ``_link`` keeps them (list 0's, its heap item)."""
        self._push_items(entry, keys[0], keys[1], version, joined)

    def _push_items(self, entry: _Entry, item: _HeapItem, room: float | None, version: int, joined: int) -> None:
        """``_push`` with list 0's item built (``_rekey`` has its parts at hand) and list 1's key (None: the room
        list is left as it is, see ``_room_top``)."""
        if room is not None:
            entry.room_version = version  # the room item pushed below supersedes the entry's earlier ones
        iid = entry.iid
        pools = self._pools
        sizes = self._pool_sizes
        entries = self._entries
        for pool_name in entry.pools:
            pool = pools.get(pool_name)
            if pool is None:
                continue  # not read yet: built from the entries' keys when it is
            live = sizes[pool_name]
            if joined:
                live = sizes[pool_name] = live + joined
            limit = 4 * live + 16
            heap = pool[0]
            top = heap[0] if heap else None
            if top is None or ((other := entries.get(top[-2])) is not None and other.version == top[-1]):
                heappush(heap, item)  # the top stays live: the one read here, or the new item
                if len(heap) > limit:
                    self._rebuild(heap)
            else:  # a stale top (``_IndexBase._push``): the new item takes its place, one sift; two more popped
                heapreplace(heap, item)
                top = heap[0]
                other = entries.get(top[-2])
                if other is None or other.version != top[-1]:
                    heappop(heap)
                    if heap:
                        top = heap[0]
                        other = entries.get(top[-2])
                        if other is None or other.version != top[-1]:
                            heappop(heap)
            if room is None:
                continue  # a dispatch (or no room list without late binding)
            heap = pool[1]
            top = heap[0] if heap else None
            if top is None or (
                (other := entries.get(top[1])) is not None and other.room_version == top[2] and other.keys
            ):  # the top is live (``_room_live``, inlined): it stays live, or the new item takes its place
                heappush(heap, (room, iid, version))
                if len(heap) > limit:
                    heap[:] = [item for item in heap if self._room_live(item)]
                    heapify(heap)
                continue
            heapreplace(heap, (room, iid, version))  # a stale top, its own superseded item or another's: replaced
            for _ in range(2):  # up to two more stale tops popped, as above (``_room_live``, inlined)
                if not heap:
                    break
                top = heap[0]
                other = entries.get(top[1])
                if other is not None and other.room_version == top[2] and other.keys:
                    break
                heappop(heap)

    def _room_live(self, item: _HeapItem) -> bool:
        """Whether a room-list item is its instance's current one (its key may be above the instance's room now:
        ``_room_top``)."""
        entry = self._entries.get(item[1])
        return entry is not None and entry.room_version == item[2] and bool(entry.keys)

    def _room_top(self, heap: list[_HeapItem]) -> _HeapItem | None:
        """The roomiest instance's item, its key the instance's room now.

        A dispatch only takes room from its instance, so it leaves the instance's room item as it was (one
        heap push less per decision): that item's key is then more room than the instance has, never less.
        When such an item reaches the top it gets the room the instance has now, in place, and sinks to where
        it belongs. Every other live instance's item has at least its real room, so a top that is exact is the
        roomiest instance, as in an eagerly kept list, ties broken by instance id as there."""
        entries = self._entries
        while heap:
            item = heap[0]
            entry = entries.get(item[1])
            if entry is None or entry.room_version != item[2] or not entry.keys:
                heappop(heap)  # stale: superseded, unlinked or removed
                continue
            room = entry.keys[1]
            if item[0] == room:
                return item
            heapreplace(heap, (room, item[1], item[2]))
        return None

    def _roomiest_but(self, heap: list[_HeapItem], reserved: str) -> _HeapItem | None:
        """The roomiest instance other than ``reserved`` (the first of the best two that is not it)."""
        top = self._room_top(heap)
        if top is None or top[1] != reserved:
            return top
        heappop(heap)  # set aside while the next one is read
        other = self._room_top(heap)
        heappush(heap, top)
        return other

    _HOLDERS = 4  # holders of one depth scored (a prefix cached everywhere costs no more)

    def _choose_holder(self, demand: RequestDemand, pool: tuple[list[_HeapItem], ...]) -> str | None:
        """The instance holding part of the prompt's prefix where the first token comes soonest, if that is
        sooner than at the best load-only choice; None: decide by load alone.

        Predicted time to first token in prefill-token units, the safe tier's own key: the work ahead of the
        request there (``_keys``) plus the prompt tokens it would still compute there. A holder must be in
        the safe tier and, with late binding, have room now for the blocks it does not hold (a cache hit
        takes no new blocks). Candidates are the holders of the deepest cached block and, when few hold
        it, of the half-depth block (as ``kv_aware``), so a decision costs a few binary searches over the
        chained hashes, not a scan of the instances."""
        index = self.prefix_index
        assert index is not None
        hashes = demand.prefix_block_hashes
        # deepest(), holders() and overlap() in one call with the lookups inlined (as kv_aware reads them)
        deepest, found = index.deep_holders(hashes, self._HOLDERS)
        if not deepest:
            # nobody holds the prompt's prefix: every instance's overlap is 0 too (holdings are a subset of
            # the global map, so an instance's binary search misses wherever the global one did), which
            # spares on_dispatched its lookup while the holdings stay as they are
            self._last_hit = (demand.request_id, _ANY_INSTANCE, 0)
            self._no_prefix_at = index.changes
            return None
        self._last_hit = ("", "", 0)
        model = demand.model
        reservation = self._reservations.get(model)
        reserved = reservation[1] if reservation is not None and reservation[0] != demand.request_id else None
        prompt = demand.num_prompt_tokens
        blocks = demand.num_blocks
        growth = self._hold_growth
        best: tuple[float, str, int] | None = None
        entries = self._entries
        top = self._top(pool[0])
        spare_busy = self.params.predict_prefix_idle_first and top is not None and _idle(entries[top[-2]])
        for iid, cached in found.items():
            entry = entries.get(iid)
            if entry is None or iid == reserved or model not in entry.pools:
                continue
            keys = entry.keys
            if not keys:  # draining
                continue
            key: Any = keys[0]  # (tier, work ahead, load, ...): its list-0 heap item; see _keys, _link
            if key[0] != 0.0:  # outside the safe tier: memory pressure to come
                continue
            # no prefill-backlog hold here (predict_hold_prefill_tokens): the holder is this request's soonest
            # first token counting its queue, and anywhere else (or later) the cached prefix is computed again
            # (Mooncake 4.18x seed 0 with the hold on holders too: attainment 0.599 against 0.966 without)
            room: Any = keys[1]  # minus the blocks it could take now (None without late binding)
            uncached = blocks - cached
            if room is not None and -room < (uncached if uncached > 0 else 0) + growth:
                continue
            uncomputed = prompt - cached * entry.terms[5]  # the block size (the snapshot may be out of cache)
            if spare_busy and uncomputed > 0 and not _idle(entry):
                continue  # its prefill would stall the holder's decodes; on the idle instance it stalls nobody
            cost = key[1] + uncomputed if uncomputed > 0 else key[1]
            if best is None or cost < best[0]:
                best = (cost, iid, cached)
        if best is None:
            return None
        # list 0's items are flat (``_item``): tier, work ahead, load, instance id, version
        if top is not None and top[-2] != best[1] and top[0] == 0.0 and top[1] + prompt <= best[0]:
            return None  # the load-only choice is as soon without the hit
        if reservation is not None and reservation[0] == demand.request_id:
            del self._reservations[demand.model]  # the held request starts on a holder
        self._last_hit = (demand.request_id, best[1], best[2])
        return best[1]

    def release_reservations(self) -> None:
        """Drop every late-binding reservation: the dispatch loop calls it before it tries its held requests
        in queue order (``queue_hold_all``), so the first one asked, the queue's head, reserves, not whichever
        request happened to fail first (with aging a later, shorter request may be the head now)."""
        self._reservations.clear()

    def _choose_late(self, demand: RequestDemand, pool: tuple[list[_HeapItem], ...]) -> str | None:
        """Late binding with a reservation (EASY backfilling, from batch-job schedulers): the first request
        that finds no room reserves the roomiest instance; later requests may start elsewhere (backfill) but
        not there, so the held one starts as soon as that instance frees enough, however small the others."""
        reservation = self._reservations.get(demand.model)
        reserved = None
        if reservation is not None:
            if reservation[0] == demand.request_id:
                del self._reservations[demand.model]  # asked again: decide afresh
                reservation = None
            else:
                reservation[2] += 1
                if reservation[2] > RESERVATION_EXPIRY_DECISIONS:  # never asked again: cancelled or gone
                    del self._reservations[demand.model]
                    reservation = None
                else:
                    reserved = reservation[1]
        need = demand.num_blocks + self._hold_growth
        limit = self.params.predict_hold_prefill_tokens  # 0: off
        # The best live item of a heap is its top once stale tops are popped (``_top``, cheap): the walk over
        # the best few (``_peek``) is paid only when the top is ruled out (reserved, or no room).
        if self.params.predict_interference > 0:
            quiet = self._least_interference(demand, pool, reserved, need)
            if quiet is not None:
                return quiet
        heap = pool[0]
        entries = self._entries
        while heap:  # ``_top``, inlined
            soonest = heap[0]
            entry = entries.get(soonest[-2])
            if entry is not None and entry.version == soonest[-1]:
                if soonest[-2] != reserved and -entry.keys[1] >= need and (not limit or _prefill_ahead(entry) <= limit):
                    # the first candidate of the loop below: the roomiest instance other than the reserved one
                    # has at least this room, so the steps before the loop would let it through
                    if entry.terms[7] and self.params.predict_decode_stall > 0:
                        # starting here stalls the decodes running there (terms[7]): weigh that against
                        # the next few; with none decoding here it is the least cost anyway
                        quiet = self._least_interference(demand, pool, reserved, need)
                        if quiet is not None:
                            return quiet
                    return soonest[-2]
                break
            heappop(heap)
        roomiest = self._room_top(pool[1]) if reserved is None else self._roomiest_but(pool[1], reserved)
        if roomiest is None:
            return None
        if -roomiest[0] < need:
            entry = self._entries[roomiest[1]]
            if _idle(entry):
                return roomiest[1]  # an idle instance always takes it (it may never fit with the reserve)
            if reservation is not None:
                # one request is held already: hold this one too (queue_hold_all), else queue it at the
                # roomiest other instance
                return None if self.params.queue_hold_all else roomiest[1]
            self._reservations[demand.model] = [demand.request_id, roomiest[1], 0]
            return None  # no instance can start it now: the scheduler holds it
        if self.params.predict_decode_stall > 0:
            quiet = self._least_interference(demand, pool, reserved, need)
            if quiet is not None:
                return quiet
        for item in self._peek(pool[0], self._PROBE + 1):
            iid = item[-2]
            entry = self._entries[iid]
            if iid != reserved and -entry.keys[1] >= need and (not limit or _prefill_ahead(entry) <= limit):
                return iid  # -keys[1] is a float (late binding)
        if limit and _prefill_ahead(self._entries[roomiest[1]]) > limit:
            # room, but a prefill queue past the limit everywhere it was looked for: the scheduler holds it
            # (no reservation: it starts wherever the queue falls under the limit first)
            return None
        return roomiest[1]

    def _least_interference(
        self, demand: RequestDemand, pool: tuple[list[_HeapItem], ...], reserved: str | None, need: int
    ) -> str | None:
        """``predict_interference``: of the few best safe-tier instances with room now, the one where the work
        ahead plus the slowdown the prompt's chunks impose on the decodes there is least (weight x running
        requests x prompt tokens: each running request shares every step of the prefill with a chunk).
        ``predict_decode_stall`` adds its weight x decoding requests x prompt tokens: a request still
        prefilling has no token whose gap the chunks stretch. None: no such instance (late binding decides as
        without the rules)."""
        weight = self.params.predict_interference * demand.num_prompt_tokens
        stall = self.params.predict_decode_stall * demand.num_prompt_tokens
        limit = self.params.predict_hold_prefill_tokens
        entries = self._entries
        best: tuple[float, str] | None = None
        for item in self._peek(pool[0], self._PROBE + 1):
            iid = item[-2]  # list 0's items end (instance id, version)
            entry = entries[iid]
            key: Any = entry.keys[0]  # (tier, work ahead, load, ...): its list-0 heap item; see _keys, _link
            room: Any = entry.keys[1]  # minus the blocks it could take now (a float with late binding)
            if key[0] != 0.0:  # outside the safe tier: the rest is worse still
                break
            if iid == reserved or -room < need:
                continue
            if limit and _prefill_ahead(entry) > limit:
                continue
            terms = entry.terms  # [3]: running requests, [7]: decoding ones
            score = key[1] + weight * (terms[3] + entry.extra_waiting) + stall * terms[7]
            if best is None or score < best[0]:
                best = (score, iid)
        return None if best is None else best[1]


def _hold_growth(params: DispatchParams) -> int:
    """Late binding's growth reserve per hosted request in the hold test (does the prompt fit now?):
    ``predict_hold_growth_blocks``, ``predict_growth_blocks`` when that is -1, 0 with ``predict_hold_physical``."""
    if params.predict_hold_physical:
        return 0
    hold = params.predict_hold_growth_blocks
    return params.predict_growth_blocks if hold < 0 else hold


def _hold_room(free: int, reserve: int, share: float) -> float:
    """The hold test's key (minus the room a new prompt may take): the free room less the hosted requests'
    growth reserve, which takes at most ``share`` of the free room (``predict_hold_growth_share``; 0: all of
    it)."""
    if share and reserve > share * free:
        return -(free - share * free) if free > 0 else -float(free)
    return -float(free - reserve)


def _prefill_ahead(entry: _Entry) -> int:
    """Prompt tokens queued on a ``PredictiveIndex`` instance: waiting prompts' blocks (reported and
    dispatched since) and the unprefilled rest of running prompts (``predict_hold_prefill_tokens``)."""
    terms = entry.terms  # [4]: waiting blocks, [5]: block size, [6]: unprefilled prompt tokens of running ones
    return int((terms[4] + entry.extra_blocks) * terms[5] + terms[6])


def _idle(entry: _Entry) -> bool:
    """No request runs or waits on the instance, and none was dispatched to it since its snapshot (a
    ``PredictiveIndex`` entry: its terms say whether the snapshot is empty)."""
    return entry.terms[8] and entry.extra_waiting == 0


_ANY_INSTANCE = "\x00any instance"
"""``PredictiveIndex._last_hit``'s instance when the last choice found no instance holding the prompt's prefix."""

RESERVATION_EXPIRY_DECISIONS = 1024
"""Late binding: a reservation whose request is not asked about again within this many other decisions is
dropped (the request was cancelled or rejected while held); until then it only keeps one instance for it."""


class QueueSizeIndex(_IndexBase):
    """Llumnix's ``queue`` dispatch: the instance with the fewest waiting requests. Like Llumnix's (a sort on
    ``num_waiting_requests``, first of equals), ties go to the first instance in id order, so a lightly
    loaded cluster fills one instance's batch until a request waits there; just-dispatched requests count
    as waiting until the next snapshot, which keeps a burst from landing on one instance."""

    name = "queue_size"

    def _keys(self, entry: _Entry) -> tuple[Any, ...]:
        return (entry.snapshot.num_waiting + entry.extra_waiting,)

    def choose(self, demand: RequestDemand) -> str | None:
        pool = self._pool(demand.model)
        top = self._top(pool[0]) if pool else None
        return None if top is None else top[1]


@functools.lru_cache(maxsize=4096)
def _checkpoints(num_blocks: int) -> tuple[int, ...]:
    """Prefix depths (1-based) that dispatch history records and lookups probe, deepest first: the first 4,
    every 4th, and the whole prompt. Recording every block cost ~1 µs per block on each dispatch (the
    decision's p99 was over 50 µs); a match found at a checkpoint is at most 3 blocks short of the true one.
    Cached per prompt length: each decision asks twice (choose, then on_dispatched)."""
    depths = [d for d in range(min(4, num_blocks), 0, -1)]
    depths[:0] = range(num_blocks - num_blocks % 4, 4, -4)
    if num_blocks > 4 and num_blocks % 4:
        depths.insert(0, num_blocks)
    return tuple(depths)


class PrefixAffinityIndex(FreenessIndex):
    """Prefer the instance that holds the longest run of the prompt's prefix blocks; else freeness.

    Holders come from snapshots' ``cached_prefix_hashes`` when engines report them (authoritative), and
    otherwise from dispatch history: each dispatch records its prefix hashes on the chosen instance, in an
    LRU bounded by the instance's KV size (a cache cannot hold more blocks than that). Each block remembers
    only its ``prefix_holders_per_block`` most recent holders, which bounds a decision's cost.
    """

    name = "prefix_affinity"

    def __init__(self, params: DispatchParams) -> None:
        super().__init__(params)
        # most recent holder last; a list, as it holds at most prefix_holders_per_block (default 4) ids, where
        # an OrderedDict cost more to create and update on every dispatch
        self._holders: dict[int, list[str]] = {}
        self._history: dict[str, OrderedDict[int, None]] = {}
        # the last choice's prompt hashes and its checkpoint hashes: on_dispatched of that choice records the
        # same ones (a decision is choose + on_dispatched; this saves computing them twice)
        self._probed: tuple[Sequence[int], list[int]] = ((), [])

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        super().upsert(snapshot)
        if snapshot.cached_prefix_hashes:
            self._forget(snapshot.instance_id)
            self._remember(snapshot.instance_id, snapshot.cached_prefix_hashes)

    def remove(self, instance_id: str) -> None:
        super().remove(instance_id)
        self._forget(instance_id)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        super().on_dispatched(instance_id, demand)
        hashes = demand.prefix_block_hashes
        if hashes and instance_id in self._entries:
            probed_hashes, at_checkpoints = self._probed
            if probed_hashes is not hashes:
                at_checkpoints = [hashes[d - 1] for d in _checkpoints(len(hashes))]
            self._remember(instance_id, at_checkpoints)

    def choose(self, demand: RequestDemand) -> str | None:
        hashes = demand.prefix_block_hashes
        if len(hashes) >= self.params.prefix_min_match_blocks:
            best = self._best_holder(demand, hashes)
            if best is not None:
                return best
        return super().choose(demand)

    def holders(self, prefix_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(prefix_hash, ()))

    def _best_holder(self, demand: RequestDemand, hashes: Sequence[int]) -> str | None:
        """The eligible holder of the deepest prefix block that has enough freeness (best freeness wins).

        Walks from the deepest block up: hashes are chained, so holding block i means holding the whole
        prefix up to it; a prompt's unique tail costs one dictionary miss per block.
        """
        # A linked entry's keys hold its freeness negated, as ``freeness`` computes it (list 0: as it stands,
        # list 1: as if it hosted a high-priority request; see FreenessIndex._keys), so a holder costs a
        # tuple read instead of two function calls; an entry without keys (draining) is skipped anyway.
        key = 1 if demand.priority > 0 else 0
        ceiling = -self.params.affinity_min_freeness  # freeness >= floor  <=>  -freeness <= -floor
        entries = self._entries
        holders_of = self._holders
        min_match = self.params.prefix_min_match_blocks
        model = demand.model
        depths = _checkpoints(len(hashes))
        probe = [hashes[d - 1] for d in depths]
        self._probed = (hashes, probe)
        # Whether a holder is eligible does not depend on the depth, so one ruled out at a deeper checkpoint
        # is skipped at the shallower ones (where the same holders usually reappear: a dispatch records all
        # of a prompt's checkpoints on one instance).
        ruled_out: set[str] = set()
        for depth, prefix_hash in zip(depths, probe, strict=True):
            if depth < min_match:
                break
            holders = holders_of.get(prefix_hash)
            if not holders:
                continue
            best: tuple[float, str] | None = None
            for iid in holders:
                if iid in ruled_out:
                    continue
                entry = entries.get(iid)
                if (
                    entry is None
                    or not entry.keys
                    or entry.snapshot.draining
                    or (model and entry.snapshot.model != model)
                ):
                    ruled_out.add(iid)
                    continue
                negated = entry.keys[key]
                if negated > ceiling:
                    ruled_out.add(iid)
                elif best is None or (negated, iid) < best:
                    best = (negated, iid)
            if best is not None:
                return best[1]
        return None

    def _remember(self, instance_id: str, hashes: Iterable[int]) -> None:
        history = self._history.get(instance_id)
        if history is None:
            history = self._history[instance_id] = OrderedDict()
        holders_of = self._holders
        cap = self.params.prefix_holders_per_block
        move_to_end = history.move_to_end
        for prefix_hash in hashes:
            if prefix_hash in history:
                move_to_end(prefix_hash)
            else:
                history[prefix_hash] = None
            holders = holders_of.get(prefix_hash)
            if holders is None:
                holders_of[prefix_hash] = [instance_id]
            elif holders[-1] == instance_id:
                pass  # already the most recent holder
            elif instance_id in holders:
                holders.remove(instance_id)
                holders.append(instance_id)
            else:
                holders.append(instance_id)
                if len(holders) > cap:
                    del holders[0]  # its history entry stays; dropping it later is a no-op
        entry = self._entries.get(instance_id)
        capacity = max(1, self.params.prefix_history_blocks or (entry.snapshot.num_total_blocks if entry else 0))
        while len(history) > capacity:
            evicted, _ = history.popitem(last=False)
            self._drop_holder(evicted, instance_id)

    def _forget(self, instance_id: str) -> None:
        for prefix_hash in self._history.pop(instance_id, OrderedDict()):
            self._drop_holder(prefix_hash, instance_id)

    def _drop_holder(self, prefix_hash: int, instance_id: str) -> None:
        holders = self._holders.get(prefix_hash)
        if holders is not None and instance_id in holders:
            holders.remove(instance_id)
            if not holders:
                del self._holders[prefix_hash]
