"""The dispatch loop's queue of requests waiting for an instance, in the order they are tried.

Sans-I/O and clock-free like the rest of the core: the caller passes ``now``. Two orders:

* **first come, first served** (``aging_tokens_per_s == 0``, the default of every policy, ``drover``
  included): the order of arrival, exactly the deque the loop kept before.
* **shortest prefill first, with aging** (opt-in, ``queue_aging_tokens_per_s > 0``; off in ``drover`` because
  past the knee it raised p99 TTFT above INFaaS++'s, see docs/policies.md): a request's key is its arrival time
  plus its prompt tokens divided by ``aging_tokens_per_s``, i.e. an earliest-deadline-first order on a deadline
  that grows with the work the request needs before its first token. A short prompt overtakes a long one that
  came less than ``(long - short) / aging`` seconds earlier and no more, so nothing starves: every request
  reaches the head within ``prompt / aging`` seconds of arriving plus the time to serve what arrived before it.
  Why: goodput counts requests that meet a TTFT SLO, and when a burst fills the cluster, serving the queue's
  short prompts first lets many more of them start inside the SLO than a long prompt that would delay them all.

Keys are kept in a sorted list (``bisect``): the queue is short when the cluster keeps up, and a scan reads
its head in order.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterator


class WaitQueue:
    """Request ids waiting for an instance, head first (see the module docstring for the order).

    A :class:`collections.abc.Collection` of request ids (admission counts and reads it)."""

    __slots__ = ("_ids", "_items", "_queued_at", "_seq")

    def __init__(self) -> None:
        self._items: list[tuple[float, int, str]] = []  # (key, arrival sequence, request id), sorted
        self._ids: dict[str, tuple[float, int, str]] = {}
        self._seq = 0
        self._queued_at: dict[str, float] = {}  # request id -> when it was queued (the shell's clock)

    def push(self, request_id: str, now: float = 0.0, prompt_tokens: int = 0, aging_tokens_per_s: float = 0.0) -> None:
        """Queue ``request_id`` in its place: at the back (FCFS, ``aging_tokens_per_s`` 0), else by the key
        ``now + prompt_tokens / aging_tokens_per_s``. A request queued already keeps its place."""
        if request_id in self._ids:
            return
        self._seq += 1
        key = now + prompt_tokens / aging_tokens_per_s if aging_tokens_per_s > 0 else 0.0
        item = (key, self._seq, request_id)
        self._ids[request_id] = item
        self._queued_at[request_id] = now
        if not self._items or item > self._items[-1]:
            self._items.append(item)  # FCFS, and most keyed arrivals: no search
        else:
            insort(self._items, item)

    def append(self, request_id: str, now: float = float("inf")) -> None:
        """At the back, whatever the order (FCFS's push); ``now`` unknown (a request restored as queued):
        it never counts as having waited long. A request queued already keeps its place, as in ``push``: a
        second item under one id could never be removed (``_ids`` maps an id to one item)."""
        if request_id in self._ids:
            return
        self._queued_at[request_id] = now
        self._seq += 1
        key = self._items[-1][0] if self._items else 0.0
        item = (key, self._seq, request_id)
        self._ids[request_id] = item
        self._items.append(item)

    def head(self, limit: int) -> list[str]:
        """The first ``limit`` request ids, head first (a copy: the caller may remove them meanwhile)."""
        return [item[2] for item in self._items[:limit]]

    def head_meetable_first(self, limit: int, lost_before: float, starved_before: float = -math.inf) -> list[str]:
        """The first ``limit`` request ids in the goodput-first order (``queue_ttft_slo_s``): those queued at or
        before ``starved_before`` (waited past the starvation bound, kept first so it still bounds a wait), then
        those queued after ``lost_before`` (they can still meet the TTFT SLO), then the rest (queued at or
        before ``lost_before``: lost already), each group in queue order. A request restored without its
        queue time never counts as lost. The walk stops once the first two groups fill ``limit``; a long run
        of lost requests at the head is walked once a tick."""
        starved: list[str] = []
        meetable: list[str] = []
        lost: list[str] = []
        queued_at = self._queued_at
        for item in self._items:
            request_id = item[2]
            at = queued_at[request_id]
            if at <= starved_before:
                starved.append(request_id)
            elif at > lost_before:
                meetable.append(request_id)
            elif len(lost) < limit:
                lost.append(request_id)
            if len(starved) + len(meetable) >= limit:
                break
        return (starved + meetable + lost)[:limit]

    def remove(self, request_id: str) -> None:
        item = self._ids.pop(request_id, None)
        if item is None:
            return
        self._queued_at.pop(request_id, None)
        items = self._items
        if items and items[0] == item:
            del items[0]
            return
        items.pop(bisect_left(items, item))

    def queued_at(self, request_id: str) -> float:
        """When the request was queued (``now`` at its push), or ``inf`` when it is not queued."""
        return self._queued_at.get(request_id, float("inf"))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter([item[2] for item in self._items])

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids


__all__ = ["WaitQueue"]
