"""vLLM's automatic prefix caching, modelled for the simulated engine.

What is modelled (read from vLLM v1: ``vllm/v1/core/kv_cache_manager.py``, ``block_pool.py`` and
``kv_cache_utils.py``):

* every *full* block of a prompt has a hash chained to its parent's, so equal hash = equal prefix;
* at admission the longest run of leading blocks already cached is reused and its tokens are not computed
  again (``get_computed_blocks``); at least the prompt's last token is always computed (vLLM caps the hit
  at ``num_tokens - 1``), so a hit is whole blocks of at most ``prompt_len - 1`` tokens;
* a block is cached as soon as it is *scheduled* (``allocate_slots`` → ``cache_blocks``), chunk by chunk;
* a freed block keeps its content (and hash) and sits in the free queue; freed blocks are queued tail-first
  so a request's last blocks are evicted first; allocation takes from the head, so cached free blocks are
  evicted least recently freed first (LRU); reusing one takes it out of the free queue;
* the cost model then charges only the uncached tokens (the core computes from ``num_computed`` on).

Deliberate simplifications: uncached free blocks are used before cached ones (vLLM's queue mixes them; in a
busy engine nearly all free blocks are cached, so this differs little); two running requests that share a
cached block each count it in the core's block accounting (vLLM shares one physical block), so memory is
slightly over-counted when identical prefixes run at once; blocks produced by decoding are not cached
(their hashes depend on generated tokens the trace does not have); a request resumed by migration does not
register its blocks.

The core calls :meth:`PrefixCache.lookup` (admission), :meth:`PrefixCache.schedule` (tokens scheduled),
:meth:`PrefixCache.release` (blocks freed) and :meth:`PrefixCache.trim` (free blocks shrank); everything
else is here. Events (``stored`` / ``removed`` hashes) are recorded like vLLM's ``BlockStored`` /
``BlockRemoved`` KV events, for the simulator to feed a global prefix index.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from engines.prefix_listing import DEFAULT_MAX_BLOCKS, ChunkedListing, take_pending
from transport.messages import PrefixCacheReport

if TYPE_CHECKING:
    from engines.sim.core import SimRequest

TRACE_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake traces (``hash_ids``)."""


@lru_cache(maxsize=1 << 15)  # a trace is replayed once per policy and load: hash each request once
def engine_block_hashes(
    trace_hash_ids: Sequence[int], prompt_len: int, block_size: int, trace_block_tokens: int = TRACE_BLOCK_TOKENS
) -> tuple[int, ...]:
    """Chained hashes of the prompt's full engine blocks from a trace's coarser prefix-block ids.

    Engine block k covers tokens [k*bs, (k+1)*bs); its identity is the prefix up to its last token, i.e. the
    trace ids up to the trace block holding that token, plus the offset inside it. Chaining over the parent
    keeps "equal hash = equal prefix" even where the trace ids are not themselves chained. Python hashes of
    int tuples are not randomised, so the same trace gives the same hashes in every process.
    """
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    full = prompt_len // block_size
    hashes: list[int] = []
    parent = 0
    for k in range(full):
        last_token = (k + 1) * block_size - 1
        trace_block = last_token // trace_block_tokens
        if trace_block >= len(trace_hash_ids):
            break  # the trace has no id for these tokens: leave them uncacheable
        parent = hash((parent, trace_hash_ids[trace_block], k))
        hashes.append(parent)
    return tuple(hashes)


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counters over first admissions (vLLM's PrefixCacheStats: queries = prompt tokens looked
    up, hits = reused); a request re-admitted after a preemption counts only in ``recompute_hit_tokens``."""

    admissions: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    recompute_hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass(slots=True)
class PrefixCache:
    """The prefix-cache state of one simulated instance (hashes only; the core owns the block counts)."""

    block_size: int
    record_events: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _refs: dict[int, int] = field(default_factory=dict)  # hash -> running requests holding it (>= 1)
    _free: OrderedDict[int, None] = field(default_factory=OrderedDict)  # cached, unreferenced; LRU first
    _held: dict[str, list[int]] = field(default_factory=dict)  # request id -> hashes it holds, in order
    _events: dict[int, bool] = field(default_factory=dict)  # since the last drain: hash -> stored (else removed)
    _converted: dict[str, tuple[int, ...]] = field(default_factory=dict)  # request id -> its engine-block hashes

    # ------------------------------------------------------------------------------------------ queries
    @property
    def num_cached_blocks(self) -> int:
        """Distinct blocks whose content is cached (held by a request or free but not yet evicted)."""
        return len(self._refs) + len(self._free)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._refs or block_hash in self._free

    def cached_hashes(self) -> list[int]:
        """Every cached hash (a full resync of a global index)."""
        return [*self._refs, *self._free]

    # ------------------------------------------------------------------------------------------ core hooks
    def hashes_of(self, request: SimRequest) -> tuple[int, ...]:
        """The request's engine-block hashes: ``block_hashes`` as they are when ``hash_block_tokens`` is 0,
        else a trace's coarser ids mapped onto this engine's blocks (once per request)."""
        if not request.hash_block_tokens:
            return request.block_hashes
        hashes = self._converted.get(request.request_id)
        if hashes is None:
            hashes = engine_block_hashes(
                tuple(request.block_hashes), request.prompt_len, self.block_size, request.hash_block_tokens
            )
            self._converted[request.request_id] = hashes
        return hashes

    def lookup(self, request: SimRequest, free_blocks: int) -> int:
        """Tokens of ``request``'s prompt already cached here (whole blocks, at most prompt_len - 1)."""
        self.trim(free_blocks)
        hashes = self.hashes_of(request)
        limit = min(len(hashes), (request.prompt_len - 1) // self.block_size)
        refs, free = self._refs, self._free
        n = 0
        while n < limit and (hashes[n] in refs or hashes[n] in free):
            n += 1
        return n * self.block_size

    def schedule(self, request: SimRequest, num_new_tokens: int) -> None:
        """``num_new_tokens`` of ``request`` were scheduled from ``num_computed`` on: hold its cached hit (on
        admission) and cache every prompt block these tokens complete."""
        hashes = self.hashes_of(request)
        held = self._held.get(request.request_id)
        if held is None:
            held = self._held[request.request_id] = []
            if request.num_preemptions:  # a re-admission after preemption: its own blocks may still be here
                self.stats.recompute_hit_tokens += request.num_computed
            elif request.num_computed < request.prompt_len:  # a first admission (not a migrated-in resume)
                self.stats.admissions += 1
                self.stats.query_tokens += request.prompt_len
                self.stats.hit_tokens += request.num_computed
        upto = min((request.num_computed + num_new_tokens) // self.block_size, len(hashes))
        refs, free = self._refs, self._free
        for block_hash in hashes[len(held) : upto]:
            count = refs.get(block_hash)
            if count is not None:
                refs[block_hash] = count + 1
            else:
                if block_hash in free:
                    del free[block_hash]  # reused from the free queue
                else:
                    self.stats.stored_blocks += 1
                    if self.record_events:
                        self._events[block_hash] = True
                refs[block_hash] = 1
            held.append(block_hash)

    def release(self, request_id: str) -> None:
        """The request freed its blocks (finished, preempted, aborted, or its migration committed)."""
        held = self._held.pop(request_id, None)
        self._converted.pop(request_id, None)
        if not held:
            return
        refs, free = self._refs, self._free
        for block_hash in reversed(held):  # tail first: the last blocks are the first evicted (vLLM)
            count = refs[block_hash] - 1
            if count:
                refs[block_hash] = count
            else:
                del refs[block_hash]
                free[block_hash] = None

    def trim(self, free_blocks: int) -> None:
        """Evict least recently freed cached blocks until the cached free ones fit in ``free_blocks``."""
        free = self._free
        excess = len(free) - max(0, free_blocks)
        if excess <= 0:
            return
        self.stats.evicted_blocks += excess
        for _ in range(excess):
            block_hash, _ = free.popitem(last=False)
            if self.record_events:
                self._events[block_hash] = False

    # ------------------------------------------------------------------------------------------ events
    def drain_events(self) -> tuple[list[int], list[int]]:
        """(stored, removed) hashes since the last drain: the net effect per hash (its last event), so the
        two lists are disjoint and may be applied in any order."""
        events, self._events = self._events, {}
        stored = [h for h, is_stored in events.items() if is_stored]
        removed = [h for h, is_stored in events.items() if not is_stored]
        return stored, removed


class PrefixReporter:
    """Turns one live simulated engine's cache events into heartbeat reports, the way the vLLM engines'
    :class:`engines.vllm.kv_events.KvEventListener` does: ``(epoch, seq)`` numbered batches of the net
    stored / removed hashes, a full listing first, every ``full_every_s`` and on request (a resync).

    Two threads: :meth:`collect` runs on the engine's event loop (the only thread that touches the cache)
    after every step and whenever a listing is wanted; :meth:`report` runs on the heartbeater's thread and
    reads only what ``collect`` handed over, under a lock. Memory: the pending events are bounded by the
    engine's blocks (net effect per hash), a listing by its cached blocks (~9 bytes a hash on the wire).
    """

    def __init__(
        self, cache: PrefixCache, *, full_every_s: float = 10.0, wake: Callable[[], None] | None = None
    ) -> None:
        self.cache = cache
        self.full_every_s = full_every_s
        self.epoch = uuid.uuid4().hex[:12]
        self._wake = wake  # asks the engine's loop to call collect() soon (from any thread)
        self._lock = threading.Lock()
        self._pending: dict[int, bool] = {}  # hash -> stored (else removed), net since the last report
        self._listing: list[int] | None = None  # a full listing collected, not yet reported
        self._sending: ChunkedListing | None = None  # a listing being sent, a chunk a report
        self._want_full = True  # the first report lists everything
        self._seq = -1
        self._last_full = -float("inf")
        self.resyncs_requested = 0

    def request_full(self) -> None:
        """The control plane asked for a resync (any thread): the next collected state is a full listing."""
        with self._lock:
            self._want_full = True
            self.resyncs_requested += 1
        if self._wake is not None:
            self._wake()

    def collect(self) -> None:
        """Engine loop: hand the cache's events (or, when wanted, a full listing) to the reporter."""
        stored, removed = self.cache.drain_events()
        with self._lock:
            if self._want_full:
                self._want_full = False
                self._listing = self.cache.cached_hashes()  # supersedes every event drained so far
                self._pending.clear()
                return
            pending = self._pending
            for block_hash in removed:
                pending[block_hash] = False
            for block_hash in stored:
                pending[block_hash] = True

    def report(self, now: float | None = None, max_blocks: int = DEFAULT_MAX_BLOCKS) -> PrefixCacheReport:
        """Heartbeater thread: the next report: a chunk of a full listing while one is being sent, else the
        net events since the last one, at most ``max_blocks`` hashes (``seq`` moves only with a listing or
        events)."""
        now = time.monotonic() if now is None else now
        stats = self.cache.stats
        wake = False
        chunk, chunks = 0, 1
        with self._lock:
            listing, self._listing = self._listing, None
            if listing is not None:  # collected: sent from this report on, a chunk at a time
                self._seq += 1
                self._last_full = now
                self._sending = ChunkedListing(listing, self._seq, max_blocks)
            sending = self._sending
            removed: list[int] = []
            if sending is not None:
                stored, chunk, chunks = sending.take()
                full = True
                seq = sending.seq
                if sending.done:
                    self._sending = None
            else:
                full = False
                stored = []
                if self._pending:
                    self._seq += 1
                    stored, removed = take_pending(self._pending, max_blocks)
                if now - self._last_full >= self.full_every_s and not self._want_full:
                    self._want_full = wake = True
                seq = self._seq
        if wake and self._wake is not None:
            self._wake()
        return PrefixCacheReport(
            epoch=self.epoch,
            seq=seq,
            stored=stored,
            removed=removed,
            full=full,
            chunk=chunk,
            chunks=chunks,
            num_cached=self.cache.num_cached_blocks,
            query_tokens=stats.query_tokens,
            hit_tokens=stats.hit_tokens,
        )
