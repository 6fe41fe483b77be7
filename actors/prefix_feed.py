"""Feed engines' prefix-cache reports (carried in heartbeats) into the dispatch policy's prefix index.

The scheduler calls :func:`apply_prefix_report` for every heartbeat; the index (``control/policy/
prefix_index.py``) does the bookkeeping: sequence numbers, resyncs, bounds. Only policies that keep an index
(``kv_aware``) have one; for the others this only keeps the count that ``drover status`` shows.
"""

from __future__ import annotations

from control.policy.prefix_index import PrefixIndex
from transport.messages import PrefixCacheReport


def apply_prefix_report(policy: object, instance_id: str, report: PrefixCacheReport | None, now: float) -> int:
    """Apply one report; returns the instance's cached-block count (-1: it reports none)."""
    if report is None:
        return -1
    index = getattr(policy, "prefix_index", None)
    if isinstance(index, PrefixIndex):
        if report.full:
            index.resync(instance_id, epoch=report.epoch, seq=report.seq, hashes=report.stored, now=now)
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
