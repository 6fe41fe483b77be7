"""Feed engines' prefix-cache reports (carried in heartbeats) into the dispatch policy's prefix index.

The scheduler calls :func:`apply_prefix_report` for every heartbeat; the index (``control/policy/
prefix_index.py``) does the bookkeeping: sequence numbers, resyncs, bounds. Only policies that keep an index
(``kv_aware``) have one; for the others this only keeps the count that ``drover status`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from control.block_hash import vllm_block_hashes
from control.policy.kv_aware import prefer_prefix_destinations
from control.policy.migration import MigrationDecision
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import InstanceSnapshot
from transport.messages import PrefixCacheReport


def apply_prefix_report(policy: object, instance_id: str, report: PrefixCacheReport | None, now: float) -> int:
    """Apply one report; returns the instance's cached-block count (-1: it reports none)."""
    if report is None:
        return -1
    index = getattr(policy, "prefix_index", None)
    if isinstance(index, PrefixIndex):
        if report.full:
            index.resync_chunk(
                instance_id,
                epoch=report.epoch,
                seq=report.seq,
                chunk=report.chunk,
                chunks=report.chunks,
                hashes=report.stored,
                now=now,
            )
        elif report.stored or report.removed or report.cleared:
            index.apply(
                instance_id,
                epoch=report.epoch,
                seq=report.seq,
                stored=report.stored,
                removed=report.removed,
                cleared=report.cleared,
                now=now,
            )
        else:
            index.heard(instance_id, epoch=report.epoch, seq=report.seq, now=now)
    return report.num_cached


def prefix_aware_destinations(
    policy: object,
    decisions: list[MigrationDecision],
    snapshots: Sequence[InstanceSnapshot],
    prompt_of: Callable[[str], Sequence[int] | None],
) -> list[MigrationDecision]:
    """Migration's destinations, swapped within a round toward instances that hold each request's prompt
    prefix (``kv_aware`` only; a few hashes per decision, so cheap)."""
    index = getattr(policy, "prefix_index", None)
    if not isinstance(index, PrefixIndex) or len(decisions) < 2:
        return decisions
    block_size = {s.instance_id: s.block_size for s in snapshots}
    hashes: dict[str, Sequence[int]] = {}
    for decision in decisions:
        prompt = prompt_of(decision.request_id)
        if prompt:
            hashes[decision.request_id] = vllm_block_hashes(prompt, block_size.get(decision.source_id, 32))
    return prefer_prefix_destinations(decisions, snapshots, index, hashes)


class ResyncRequests:
    """When to ask an engine for a full listing of its cache (``PrefixResync``): the index says it lost track
    (a gap in the report sequence, a stream whose start it missed, a heartbeat ahead of the last batch it
    applied: after a lost batch, a control-plane restart or a reconnect), at most once per
    ``min_interval_s`` per instance, so a flapping link costs one listing a second, not one a beat."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self.min_interval_s = min_interval_s
        self.sent = 0
        self._last: dict[str, float] = {}  # instance -> when it was last asked

    def due(self, policy: object, instance_id: str, now: float) -> bool:
        index = getattr(policy, "prefix_index", None)
        if not isinstance(index, PrefixIndex) or not index.needs_resync(instance_id):
            return False
        if now - self._last.get(instance_id, -math.inf) < self.min_interval_s:
            return False
        if len(self._last) > 2 * len(index.instances()) + 16:  # bounded: forget instances the index forgot
            known = set(index.instances())
            self._last = {iid: t for iid, t in self._last.items() if iid in known}
        self._last[instance_id] = now
        self.sent += 1
        return True
