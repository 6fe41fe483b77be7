"""A full prefix-cache listing sent in chunks, one per heartbeat, so no message outgrows NATS' ``max_payload``.

A listing costs ~9 bytes a block on the wire: 8 MiB (our ``max_payload``) holds ~900 k blocks, the 1 MiB
NATS default ~110 k, and a heartbeat carries other fields too. Both reporters (vLLM's KV events,
``engines/vllm/kv_events.py``; the simulated cache, ``engines/sim/prefix_cache.py``) send a listing as
``chunks`` reports sharing its ``seq``, numbered by ``chunk``; events that happen meanwhile wait and follow as
``seq + 1`` once the last chunk is out. The control plane's index applies a listing only when every chunk
arrived in order (``PrefixIndex.resync_chunk``), and asks again otherwise.
"""

from __future__ import annotations

DEFAULT_MAX_BLOCKS = 100_000
"""Hashes per report when the sender knows no ``max_payload`` (~0.9 MB: under NATS' 1 MiB default)."""

BYTES_PER_BLOCK = 9  # a 64-bit hash as msgpack: one type byte and eight


def max_blocks_for(max_payload: int) -> int:
    """Hashes one report may carry in a heartbeat of at most ``max_payload`` bytes: a quarter of it, which
    leaves the rest of the beat (running requests, load) its room."""
    return max(64, max_payload // 4 // BYTES_PER_BLOCK)


class ChunkedListing:
    """One listing (the cached hashes at ``seq``) being sent a chunk at a time."""

    __slots__ = ("hashes", "next", "seq", "size", "total")

    def __init__(self, hashes: list[int], seq: int, max_blocks: int) -> None:
        self.hashes = hashes
        self.seq = seq
        self.size = max(1, max_blocks)
        self.total = max(1, -(-len(hashes) // self.size))
        self.next = 0

    def take(self) -> tuple[list[int], int, int]:
        """(hashes, chunk index, chunks) of the next chunk."""
        i = self.next
        self.next += 1
        return self.hashes[i * self.size : (i + 1) * self.size], i, self.total

    @property
    def done(self) -> bool:
        return self.next >= self.total


def take_pending(pending: dict[int, bool], max_blocks: int) -> tuple[list[int], list[int]]:
    """(stored, removed) of at most ``max_blocks`` pending net events, removed from ``pending``; the rest wait
    for the next report (each hash's net state, so the split keeps their meaning)."""
    stored: list[int] = []
    removed: list[int] = []
    if len(pending) <= max_blocks:
        for block_hash, is_stored in pending.items():
            (stored if is_stored else removed).append(block_hash)
        pending.clear()
        return stored, removed
    for _ in range(max_blocks):
        block_hash, is_stored = pending.popitem()
        (stored if is_stored else removed).append(block_hash)
    return stored, removed
