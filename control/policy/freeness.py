"""Llumnix freeness: KV blocks available per request, after *virtual usage* (see SEEDS.md).

Virtual usage = physical usage + watermark + queued demand + priority headroom (or infinity when the
instance drains). Freeness = (capacity - virtual usage) / the requests it counts, i.e.

* dispatch (and scaling): F = (free - watermark - headroom - blocks(all waiting)) / (running + waiting)
* migration: F = (free - watermark - headroom - blocks(first waiting)) / (running + [waiting > 0])

An empty instance has F = +inf; a draining one F = -inf (its fake request of infinite usage), so it is
never a dispatch target and always a migration source.

One deviation from the paper's ratio: when the numerator is negative (an overloaded instance, or one whose
headroom exceeds its free blocks), dividing by the request count would rank a *busier* instance as freer
(-100/50 > -100/2). We multiply instead (F = available x requests), which keeps F decreasing in both
usage and request count; for available >= 0 it is exactly the paper's formula.

Plain functions: the dispatch index, the migration planner, the simulator and the autoscaler call these.
"""

from __future__ import annotations

import math

from control.policy.snapshots import InstanceSnapshot

INF = math.inf


def per_request(available: float, num_requests: int) -> float:
    """Available blocks per request, monotone when ``available`` is negative (see the module docstring)."""
    return available / num_requests if available >= 0 else available * num_requests


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """KV blocks ``num_tokens`` tokens occupy."""
    return -(-num_tokens // block_size) if num_tokens > 0 else 0


def priority_headroom_blocks(
    snapshot: InstanceSnapshot, cap_tokens: int, *, hosts_high_priority: bool | None = None
) -> int:
    """Blocks reserved on an instance hosting high-priority requests.

    Llumnix reduces such an instance's available blocks so that its effective load stays around
    ``cap_tokens``; normal requests then see it as full (dispatch avoids it, migration moves them off).
    ``hosts_high_priority`` overrides the snapshot (e.g. a high-priority request was just dispatched there,
    or we ask "what if a high-priority request went here").
    """
    hosts = snapshot.num_high_priority > 0 if hosts_high_priority is None else hosts_high_priority
    if not hosts:
        return 0
    return max(0, snapshot.num_total_blocks - blocks_for_tokens(cap_tokens, snapshot.block_size))


def virtual_usage(
    snapshot: InstanceSnapshot,
    *,
    watermark_blocks: int = 0,
    headroom_blocks: int = 0,
    queued_blocks: int | None = None,
) -> float:
    """Used + watermark + queued demand + headroom blocks; infinite when draining.

    ``queued_blocks`` defaults to all waiting requests' blocks (the dispatch view).
    """
    if snapshot.draining:
        return INF
    queued = snapshot.waiting_blocks if queued_blocks is None else queued_blocks
    return snapshot.num_used_blocks + watermark_blocks + queued + headroom_blocks


def dispatch_freeness(
    snapshot: InstanceSnapshot,
    *,
    watermark_blocks: int = 0,
    headroom_blocks: int = 0,
    extra_waiting: int = 0,
    extra_waiting_blocks: int = 0,
) -> float:
    """Freeness for dispatch: every queued request's blocks count as used.

    ``extra_waiting``/``extra_waiting_blocks`` add requests the scheduler dispatched since the snapshot.
    """
    if snapshot.draining:
        return -INF
    num_requests = snapshot.num_running + snapshot.num_waiting + extra_waiting
    if num_requests == 0:
        return INF
    available = (
        snapshot.num_free_blocks - watermark_blocks - headroom_blocks - snapshot.waiting_blocks - extra_waiting_blocks
    )
    return per_request(available, num_requests)


def migration_freeness(snapshot: InstanceSnapshot, *, watermark_blocks: int = 0, headroom_blocks: int = 0) -> float:
    """Freeness for migration: only the head of the queue counts (it is what blocks the instance now)."""
    if snapshot.draining:
        return -INF
    has_waiting = 1 if snapshot.num_waiting > 0 else 0
    num_requests = snapshot.num_running + has_waiting
    if num_requests == 0:
        return INF
    head = snapshot.head_waiting_blocks if has_waiting else 0
    available = snapshot.num_free_blocks - watermark_blocks - headroom_blocks - head
    return per_request(available, num_requests)


def physical_usage(snapshot: InstanceSnapshot, *, extra_blocks: int = 0) -> float:
    """INFaaS++ load: fraction of KV blocks used or claimed by queued requests (no headroom, no per-request
    normalisation). Draining instances report infinity so no caller mistakes them for idle."""
    if snapshot.draining:
        return INF
    total = max(1, snapshot.num_total_blocks)
    return (snapshot.num_used_blocks + snapshot.waiting_blocks + extra_blocks) / total
