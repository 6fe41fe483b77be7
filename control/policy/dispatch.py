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
* ``prefix_affinity`` [cacheaware]: the instance holding the longest run of the prompt's prefix blocks, if
  its freeness >= ``affinity_min_freeness``; otherwise ``freeness``.

Eligibility: same model as the demand (``demand.model == ""`` matches any) and not draining. Sorted
structures are kept per model (plus one for all models), so ``choose`` reads the head of a sorted list and
an update costs O(log n).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from sortedcontainers import SortedList

from control.policy.freeness import dispatch_freeness, physical_usage, priority_headroom_blocks
from control.policy.params import DispatchParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand

POLICY_NAMES: tuple[str, ...] = ("round_robin", "least_loaded", "freeness", "prefix_affinity", "kv_aware")

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
    if name == "kv_aware":  # its own module (control/policy/kv_aware.py); imported here to avoid a cycle
        from control.policy.kv_aware import KvAwareIndex

        return KvAwareIndex(params)
    raise ValueError(f"unknown dispatch policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


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

    __slots__ = ("extra_blocks", "extra_high", "extra_waiting", "has_high", "keys", "snapshot")

    def __init__(self, snapshot: InstanceSnapshot) -> None:
        self.snapshot = snapshot
        self.extra_waiting = 0
        self.extra_blocks = 0
        self.extra_high = False
        self.has_high = snapshot.num_high_priority > 0
        self.keys: tuple[tuple[float, str] | None, ...] = ()

    @property
    def hosts_high_priority(self) -> bool:
        return self.has_high or self.extra_high


def _pool_names(snapshot: InstanceSnapshot) -> tuple[str, ...]:
    return (ANY_MODEL,) if snapshot.model == ANY_MODEL else (ANY_MODEL, snapshot.model)


class _IndexBase:
    """Entries plus per-model pools of sorted lists; subclasses define the keys and the choice."""

    name = "base"
    num_lists = 1

    def __init__(self, params: DispatchParams) -> None:
        self.params = params
        self._entries: dict[str, _Entry] = {}
        self._pools: dict[str, tuple[SortedList, ...]] = {}

    # -- Protocol --------------------------------------------------------------------------------------
    def upsert(self, snapshot: InstanceSnapshot) -> None:
        old = self._entries.get(snapshot.instance_id)
        if old is not None:
            self._unlink(old)
        entry = _Entry(snapshot)
        self._entries[snapshot.instance_id] = entry
        self._link(entry)

    def remove(self, instance_id: str) -> None:
        entry = self._entries.pop(instance_id, None)
        if entry is not None:
            self._unlink(entry)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        entry = self._entries.get(instance_id)
        if entry is None:
            return
        self._unlink(entry)
        entry.extra_waiting += 1
        entry.extra_blocks += demand.num_blocks
        if demand.priority > 0:
            entry.extra_high = True
        self._link(entry)

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
    def _keys(self, entry: _Entry) -> tuple[tuple[float, str] | None, ...]:
        """One sort key per list (None: not in that list); smaller sorts first (best)."""
        raise NotImplementedError

    def _pool(self, model: str) -> tuple[SortedList, ...] | None:
        return self._pools.get(model)

    def _link(self, entry: _Entry) -> None:
        if entry.snapshot.draining:
            entry.keys = ()
            return
        entry.keys = self._keys(entry)
        for pool_name in _pool_names(entry.snapshot):
            pool = self._pools.get(pool_name)
            if pool is None:
                pool = self._pools[pool_name] = tuple(SortedList() for _ in range(self.num_lists))
            for sorted_list, key in zip(pool, entry.keys, strict=False):
                if key is not None:
                    sorted_list.add(key)

    def _unlink(self, entry: _Entry) -> None:
        if not entry.keys:
            return
        for pool_name in _pool_names(entry.snapshot):
            pool = self._pools[pool_name]
            for sorted_list, key in zip(pool, entry.keys, strict=False):
                if key is not None:
                    sorted_list.discard(key)
        entry.keys = ()


class RoundRobinIndex(_IndexBase):
    """Cycle over eligible instances (per model), in the order they joined."""

    name = "round_robin"

    def __init__(self, params: DispatchParams) -> None:
        super().__init__(params)
        self._rings: dict[str, list[str]] = {}
        self._cursor: dict[str, int] = {}

    def _link(self, entry: _Entry) -> None:
        entry.keys = () if entry.snapshot.draining else ((0.0, entry.snapshot.instance_id),)
        if entry.keys:
            for pool_name in _pool_names(entry.snapshot):
                ring = self._rings.setdefault(pool_name, [])
                if entry.snapshot.instance_id not in ring:
                    ring.append(entry.snapshot.instance_id)

    def _unlink(self, entry: _Entry) -> None:
        if entry.keys:
            for pool_name in _pool_names(entry.snapshot):
                self._rings[pool_name].remove(entry.snapshot.instance_id)
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

    def choose(self, demand: RequestDemand) -> str | None:
        ring = self._rings.get(demand.model)
        if not ring:
            return None
        cursor = self._cursor.get(demand.model, 0) % len(ring)
        self._cursor[demand.model] = cursor + 1
        return ring[cursor]


class LeastLoadedIndex(_IndexBase):
    """INFaaS++: lowest KV-memory load, queued and just-dispatched blocks included."""

    name = "least_loaded"

    def _keys(self, entry: _Entry) -> tuple[tuple[float, str] | None, ...]:
        return ((physical_usage(entry.snapshot, extra_blocks=entry.extra_blocks), entry.snapshot.instance_id),)

    def choose(self, demand: RequestDemand) -> str | None:
        pool = self._pool(demand.model)
        if not pool or not pool[0]:
            return None
        return str(pool[0][0][1])


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

    def _keys(self, entry: _Entry) -> tuple[tuple[float, str] | None, ...]:
        iid = entry.snapshot.instance_id
        own = (-self.freeness(entry), iid)
        if entry.hosts_high_priority:
            return (own, own, own)
        as_high = (-self.freeness(entry, as_high_priority=True), iid)
        return (own, as_high, None)

    def choose(self, demand: RequestDemand) -> str | None:
        pool = self._pool(demand.model)
        if not pool or not pool[0]:
            return None
        if demand.priority > 0:
            hosting = pool[2]
            if hosting and -hosting[0][0] >= self.params.affinity_min_freeness:
                return str(hosting[0][1])
            return str(pool[1][0][1])
        return str(pool[0][0][1])


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
        self._holders: dict[int, OrderedDict[str, None]] = {}  # most recent holder last
        self._history: dict[str, OrderedDict[int, None]] = {}

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
        if demand.prefix_block_hashes and instance_id in self._entries:
            self._remember(instance_id, demand.prefix_block_hashes)

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
        high = demand.priority > 0
        floor = self.params.affinity_min_freeness
        entries = self._entries
        for depth in range(len(hashes), self.params.prefix_min_match_blocks - 1, -1):
            holders = self._holders.get(hashes[depth - 1])
            if not holders:
                continue
            best: tuple[float, str] | None = None
            for iid in holders:
                entry = entries.get(iid)
                if entry is None or entry.snapshot.draining:
                    continue
                if demand.model and entry.snapshot.model != demand.model:
                    continue
                freeness = self.freeness(entry, as_high_priority=high)
                if freeness >= floor and (best is None or (-freeness, iid) < best):
                    best = (-freeness, iid)
            if best is not None:
                return best[1]
        return None

    def _remember(self, instance_id: str, hashes: Iterable[int]) -> None:
        history = self._history.get(instance_id)
        if history is None:
            history = self._history[instance_id] = OrderedDict()
        holders_of = self._holders
        cap = self.params.prefix_holders_per_block
        for prefix_hash in hashes:
            if prefix_hash in history:
                history.move_to_end(prefix_hash)
            else:
                history[prefix_hash] = None
            holders = holders_of.get(prefix_hash)
            if holders is None:
                holders_of[prefix_hash] = OrderedDict({instance_id: None})
            elif instance_id in holders:
                holders.move_to_end(instance_id)
            else:
                holders[instance_id] = None
                if len(holders) > cap:
                    holders.popitem(last=False)  # its history entry stays; dropping it later is a no-op
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
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self._holders[prefix_hash]
