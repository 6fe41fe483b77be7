"""Global prefix index: which instance holds which prefix-cache blocks. Pure: no I/O, no clock of its own.

Engines publish what their prefix cache stores and evicts (vLLM's ``BlockStored`` / ``BlockRemoved`` KV
events, or the simulated engine's equivalent) as batches numbered per engine stream; the control plane (or
the simulator) feeds them here with :meth:`PrefixIndex.apply`. Keys are chained block hashes: holding hash
i means holding the whole prefix up to block i, so one lookup per depth tells how far a prompt's prefix is
cached on an instance.

Tolerance of an unreliable feed (NATS core delivery is at most once):

* every batch carries ``(epoch, seq)``: the epoch changes when the engine's stream restarts (a new
  process); ``seq`` counts batches within it. A batch at or below the last applied ``seq`` is a duplicate or
  arrived late and is dropped; a jump over a missing ``seq`` (or a new epoch not starting at 0) is applied
  anyway (what it says is still true) and marks the instance as needing a **resync**;
* a resync is a full listing of the engine's cached hashes at a ``seq`` (:meth:`PrefixIndex.resync`); it
  replaces the instance's entries, and later batches continue from its ``seq``. The engine sends one when
  asked, and on its own after a reconnect;
* a heartbeat that carries the stream's last ``seq`` (:meth:`PrefixIndex.heard`) reveals a lost *last*
  batch, which no later batch would;
* an instance not heard from for ``expiry_s`` is forgotten (:meth:`PrefixIndex.expire`), as is one removed
  from the registry.

Bounded memory: an instance holds at most its KV capacity in blocks (it cannot cache more); entries past
that (left behind by a lost removal) are dropped oldest first. Each entry costs one dict slot per instance
plus one member in the hash → holders map (roughly 150 bytes in CPython).

Holders are kept in insertion order (a dict used as an ordered set), never in a ``set``: a ``set`` of
instance ids iterates in string-hash order, which changes with ``PYTHONHASHSEED``, and ``deep_holders``
keeps only the first ``limit`` holders it meets, so a set made dispatch (and the simulator's results) differ
from one process to the next.

A wrong entry only costs a cache miss or a missed hit, never correctness: dispatch still works when the
index is stale or empty.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, KeysView, Sequence
from dataclasses import dataclass, field
from itertools import islice


@dataclass(frozen=True, slots=True)
class PrefixIndexParams:
    default_capacity_blocks: int = 1 << 17
    """Entries kept per instance until its capacity is known (a heartbeat says its KV size)."""
    expiry_s: float = 30.0
    """Forget an instance not heard from (events or heartbeats) for this long."""


@dataclass(slots=True, eq=False)
class _Holdings:
    epoch: str
    seq: int = -1
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # oldest stored first
    capacity: int = 0
    last_heard: float = 0.0
    needs_resync: bool = False


@dataclass(slots=True, eq=False)
class _Partial:
    """A chunked listing being received."""

    epoch: str
    seq: int
    chunks: int
    next: int = 0
    hashes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PrefixIndexStats:
    batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    resyncs: int = 0
    overflow_dropped: int = 0
    expired: int = 0
    chunk_gaps: int = 0


class PrefixIndex:
    """Which instances hold which chained prefix-block hashes; see the module docstring."""

    def __init__(self, params: PrefixIndexParams | None = None) -> None:
        self.params = params or PrefixIndexParams()
        self.stats = PrefixIndexStats()
        self.changes = 0
        """Counts the calls that may have changed the holdings: a reader caching a lookup checks it is unchanged."""
        self._holders: dict[int, dict[str, None]] = {}  # hash -> holders, oldest first (module docstring)
        self._instances: dict[str, _Holdings] = {}
        self._partial: dict[str, _Partial] = {}  # instance -> the chunked listing being received
        # the last ``deep_holders`` call's prompt, ``changes`` then, and the holders of its first probe: an
        # ``overlap`` of the same prompt right after (the dispatch of the choice) starts with the same probe
        self._first_probe: tuple[Sequence[int], int, dict[str, None] | None] = ((), -1, None)

    # ------------------------------------------------------------------------------------------ feed
    def apply(
        self,
        instance_id: str,
        *,
        epoch: str,
        seq: int,
        stored: Iterable[int] = (),
        removed: Iterable[int] = (),
        cleared: bool = False,
        now: float = 0.0,
    ) -> bool:
        """Apply one numbered batch (``cleared`` first, then ``removed``, then ``stored``). Returns True when
        the instance needs a resync (a gap, or a stream whose start was missed)."""
        self.changes += 1
        if self._partial and self._partial.pop(instance_id, None) is not None:  # its last chunk was lost
            self.stats.chunk_gaps += 1
        holdings = self._instances.get(instance_id)
        if holdings is None or holdings.epoch != epoch:
            capacity = holdings.capacity if holdings is not None else 0
            self._drop_all(instance_id)
            holdings = self._instances[instance_id] = _Holdings(epoch, capacity=capacity)
            holdings.needs_resync = seq != 0
        elif seq <= holdings.seq:
            self.stats.duplicates += 1
            holdings.last_heard = now
            return holdings.needs_resync
        elif seq != holdings.seq + 1:
            self.stats.gaps += 1
            holdings.needs_resync = True
        self.stats.batches += 1
        holdings.seq = seq
        holdings.last_heard = now
        if cleared:
            self._drop_blocks(instance_id, holdings)
        # The loops are inlined (not _discard/_add per hash): a long prompt stores thousands of blocks.
        blocks, all_holders = holdings.blocks, self._holders
        for block_hash in removed:
            if blocks.pop(block_hash, 0) is None:
                holders = all_holders.get(block_hash)
                if holders is not None:
                    holders.pop(instance_id, None)
                    if not holders:
                        del all_holders[block_hash]
        for block_hash in stored:
            if block_hash in blocks:
                blocks.move_to_end(block_hash)
                continue
            blocks[block_hash] = None
            holders = all_holders.get(block_hash)
            if holders is None:
                all_holders[block_hash] = {instance_id: None}
            else:
                holders[instance_id] = None
        if len(blocks) > (holdings.capacity or self.params.default_capacity_blocks):
            self._enforce_capacity(instance_id, holdings)
        return holdings.needs_resync

    def resync(self, instance_id: str, *, epoch: str, seq: int, hashes: Iterable[int], now: float = 0.0) -> bool:
        """Replace the instance's entries with a full listing taken at ``seq``. False (ignored) when it is
        older than what was already applied in the same epoch."""
        self.changes += 1
        holdings = self._instances.get(instance_id)
        if holdings is not None and holdings.epoch == epoch and seq < holdings.seq:
            return False
        capacity = holdings.capacity if holdings is not None else 0
        self._drop_all(instance_id)
        holdings = self._instances[instance_id] = _Holdings(epoch, seq=seq, capacity=capacity, last_heard=now)
        self.stats.resyncs += 1
        for block_hash in hashes:
            self._add(instance_id, holdings, block_hash)
        return True

    def resync_chunk(
        self,
        instance_id: str,
        *,
        epoch: str,
        seq: int,
        chunk: int,
        chunks: int,
        hashes: Sequence[int],
        now: float = 0.0,
    ) -> bool:
        """One chunk of a full listing sent in ``chunks`` pieces (all at ``seq``). The listing replaces the
        instance's entries only once every chunk arrived, in order (so a half-received listing never
        shows); a chunk out of turn drops what was collected and marks the instance for a resync (the
        engine is asked again). Returns True when the listing was applied."""
        if chunks <= 1:
            return self.resync(instance_id, epoch=epoch, seq=seq, hashes=hashes, now=now)
        partial = self._partial.get(instance_id)
        if chunk == 0:
            partial = self._partial[instance_id] = _Partial(epoch, seq, chunks)
        elif partial is None or (partial.epoch, partial.seq, partial.chunks, partial.next) != (
            epoch,
            seq,
            chunks,
            chunk,
        ):
            self._partial.pop(instance_id, None)
            self.stats.chunk_gaps += 1
            self._lost_track(instance_id, epoch, now)
            return False
        partial.hashes.extend(hashes)
        partial.next += 1
        holdings = self._instances.get(instance_id)
        limit = (holdings.capacity if holdings is not None else 0) or self.params.default_capacity_blocks
        if len(partial.hashes) > limit:  # bounded: an instance cannot cache more than its KV size
            self._partial.pop(instance_id, None)
            self._lost_track(instance_id, epoch, now)
            return False
        if holdings is not None:
            holdings.last_heard = now
        if partial.next < chunks:
            return False
        del self._partial[instance_id]
        return self.resync(instance_id, epoch=epoch, seq=seq, hashes=partial.hashes, now=now)

    def heard(self, instance_id: str, *, epoch: str, seq: int, now: float) -> bool:
        """A heartbeat: the engine's stream is at ``(epoch, seq)``. Returns True when a resync is needed (a
        batch was lost, possibly the last one, or the stream restarted unseen)."""
        if self._partial and self._partial.pop(instance_id, None) is not None:
            # a beat without a chunk while a listing was arriving: the engine finished it, and a chunk was lost
            self.stats.chunk_gaps += 1
            self._lost_track(instance_id, epoch, now)
        holdings = self._instances.get(instance_id)
        if holdings is None:
            if seq < 0:
                return False
            self._lost_track(instance_id, epoch, now)  # a stream already under way: ask for a listing
            return True
        holdings.last_heard = now
        if holdings.epoch != epoch or seq > holdings.seq:
            holdings.needs_resync = True
        return holdings.needs_resync

    def set_capacity(self, instance_id: str, num_blocks: int) -> None:
        """The instance's KV size in blocks: the most it can hold (bounds its entries)."""
        holdings = self._instances.get(instance_id)
        if holdings is None:
            holdings = self._instances[instance_id] = _Holdings("", needs_resync=False)
        capacity = num_blocks if num_blocks > 0 else 0
        if capacity != holdings.capacity:  # every heartbeat says it; it rarely changes
            self.changes += 1
            holdings.capacity = capacity
            self._enforce_capacity(instance_id, holdings)

    def remove_instance(self, instance_id: str) -> None:
        self.changes += 1
        self._drop_all(instance_id)

    def expire(self, now: float) -> list[str]:
        """Forget instances not heard from within ``expiry_s``; returns their ids."""
        cutoff = now - self.params.expiry_s
        gone = [iid for iid, h in self._instances.items() if h.last_heard < cutoff and h.blocks]
        for iid in gone:
            self.changes += 1
            self._drop_all(iid)
            self.stats.expired += 1
        return gone

    # ------------------------------------------------------------------------------------------ queries
    def needs_resync(self, instance_id: str) -> bool:
        """True when a listing should be asked for; False while one is arriving in order (asking again would
        restart it, and a listing that takes longer than the resync interval would never finish)."""
        if instance_id in self._partial:
            return False
        holdings = self._instances.get(instance_id)
        return holdings is not None and holdings.needs_resync

    def num_blocks(self, instance_id: str) -> int:
        holdings = self._instances.get(instance_id)
        return len(holdings.blocks) if holdings is not None else 0

    def holds(self, instance_id: str, block_hash: int) -> bool:
        holdings = self._instances.get(instance_id)
        return holdings is not None and block_hash in holdings.blocks

    def holders(self, block_hash: int) -> KeysView[str]:
        """Instances holding ``block_hash``, in the order they came to hold it (a set-like view)."""
        return self._holders.get(block_hash, _EMPTY).keys()

    def deepest(self, hashes: Sequence[int]) -> int:
        """Longest prefix of ``hashes`` (in blocks) that some instance holds. Binary search: chained hashes
        make holdings prefix-closed (vLLM evicts a request's tail blocks first)."""
        holders = self._holders
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in holders:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def deep_holders(self, hashes: Sequence[int], limit: int) -> tuple[int, dict[str, int]]:
        """(deepest, instance id -> cached prefix blocks) for the instances most worth scoring for a prompt:
        up to ``limit`` holders of the deepest block some instance holds and, when fewer than ``limit`` hold
        it, up to ``limit`` holders of the half-depth block too (each with its own depth). The same as
        :meth:`deepest`, :meth:`holders` and :meth:`overlap` combined, in one call with the lookups inlined:
        this runs on every ``kv_aware`` decision, where each probe of a million-entry dict is a cache miss."""
        all_holders = self._holders
        lo, hi = 0, len(hashes)
        deepest_holders: dict[str, None] = _EMPTY
        first = True
        while lo < hi:  # deepest(), inlined
            mid = (lo + hi + 1) // 2
            holders = all_holders.get(hashes[mid - 1])
            if first:
                self._first_probe = (hashes, self.changes, holders)
                first = False
            if holders:  # never an empty set: a hash nobody holds leaves the map
                lo = mid
                deepest_holders = holders  # the last hit is at the final depth: no second lookup of it
            else:
                hi = mid - 1
        deepest = lo
        if not deepest:
            return 0, {}
        # the first ``limit`` holders, in the order they came to hold it (one C-level pass, not a loop here)
        found: dict[str, int] = dict.fromkeys(islice(deepest_holders, limit), deepest)
        half = deepest // 2
        if not half or len(found) >= limit:
            return deepest, found
        instances = self._instances
        taken = 0
        for iid in all_holders.get(hashes[half - 1], _EMPTY):  # absent only if a lost event broke closure
            if taken == limit:
                break
            taken += 1
            if iid in found:
                continue
            holdings = instances.get(iid)
            if holdings is None:
                continue
            blocks = holdings.blocks
            lo, hi = half, deepest
            while lo < hi:  # overlap(), inlined
                mid = (lo + hi + 1) // 2
                if hashes[mid - 1] in blocks:
                    lo = mid
                else:
                    hi = mid - 1
            found[iid] = lo
        return deepest, found

    def overlap(self, instance_id: str, hashes: Sequence[int], upto: int | None = None, at_least: int = 0) -> int:
        """Longest prefix of ``hashes`` (in blocks, at most ``upto``) the instance holds, known to be at least
        ``at_least``; binary search.

        Each probe asks the hash's holders (``block in holdings.blocks`` exactly when the instance is in
        ``_holders[block]``: every change updates both) rather than the instance's own map: a popular prefix's
        entries in the global map are in the CPU cache from the decisions before, one instance's map of a
        thousand instances is not (this runs on nearly every ``drover`` dispatch)."""
        all_holders = self._holders
        lo, hi = at_least, len(hashes) if upto is None else min(upto, len(hashes))
        probed, changes, holders = self._first_probe
        if probed is hashes and changes == self.changes and lo == 0 and hi == len(hashes) and hi:
            # the first probe of ``deep_holders`` on this prompt, with nothing changed since: its holders
            mid = (hi + 1) // 2
            if holders is not None and instance_id in holders:
                lo = mid
            else:
                hi = mid - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if instance_id in all_holders.get(hashes[mid - 1], _EMPTY):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def instances(self) -> list[str]:
        return list(self._instances)

    def total_entries(self) -> int:
        return sum(len(h.blocks) for h in self._instances.values())

    # ------------------------------------------------------------------------------------------ internals
    def _add(self, instance_id: str, holdings: _Holdings, block_hash: int) -> None:
        blocks = holdings.blocks
        if block_hash in blocks:
            blocks.move_to_end(block_hash)
            return
        blocks[block_hash] = None
        holders = self._holders.get(block_hash)
        if holders is None:
            self._holders[block_hash] = {instance_id: None}
        else:
            holders[instance_id] = None
        if len(blocks) > (holdings.capacity or self.params.default_capacity_blocks):
            self._enforce_capacity(instance_id, holdings)

    def _unhold(self, instance_id: str, block_hash: int) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self._holders[block_hash]

    def _enforce_capacity(self, instance_id: str, holdings: _Holdings) -> None:
        cap = holdings.capacity or self.params.default_capacity_blocks
        blocks = holdings.blocks
        while len(blocks) > cap:
            block_hash, _ = blocks.popitem(last=False)
            self._unhold(instance_id, block_hash)
            self.stats.overflow_dropped += 1

    def _drop_blocks(self, instance_id: str, holdings: _Holdings) -> None:
        for block_hash in holdings.blocks:
            self._unhold(instance_id, block_hash)
        holdings.blocks.clear()

    def _lost_track(self, instance_id: str, epoch: str, now: float) -> None:
        """A listing broke off: keep what is known (still mostly true) and ask for a new one."""
        holdings = self._instances.get(instance_id)
        if holdings is None:
            holdings = self._instances[instance_id] = _Holdings(epoch)
        holdings.needs_resync = True
        holdings.last_heard = now

    def _drop_all(self, instance_id: str) -> None:
        self._partial.pop(instance_id, None)
        holdings = self._instances.pop(instance_id, None)
        if holdings is not None:
            self._drop_blocks(instance_id, holdings)


_EMPTY: dict[str, None] = {}
