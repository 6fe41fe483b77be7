"""Request classes (Chiron): where an interactive request goes, and the global batch queue, with no I/O and
no clock (``now`` is passed in).

Both shells use these: the SchedulerActor's :class:`actors.request_classes.RequestClasses` and the
simulator's :class:`control.simulator.elastic.ElasticSimulator`. The decisions are the pure functions of
``control/policy/autoscaling.py``; what this module adds is what both shells must do the same way around
them:

* an interactive request overflowing to a full instance with no batch request to evict there is **held
  back** (it waits in the scheduler's queue, the backlog the autoscaler scales out for), never placed on the
  full instance;
* the batch queue releases its head (earliest deadline, then first enqueued) into spare slots by
  :func:`batch_release`; a request that comes back (evicted, or resumed after a failover) keeps the place
  its first enqueue gave it.

Fairness between clients (``control/policy/fairness.py``, the security issue) orders requests *within* a
class: it plugs in as the tie-break of :meth:`BatchQueue.push` and of the scheduler's interactive queue.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from control.policy.autoscaling import (
    AutoscaleParams,
    FleetInstance,
    QueuedBatch,
    RunningBatch,
    batch_release,
    batch_spare,
    batch_victims,
    instance_slots,
    route_class,
)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new request goes: ``instance_id`` None means hold it back; ``evict`` first."""

    instance_id: str | None
    evict: tuple[str, ...]
    reason: str


def place_by_class(
    request_class: str,
    loads: Sequence[FleetInstance],
    evictable: Callable[[str], Sequence[RunningBatch]],
    params: AutoscaleParams,
) -> Placement:
    """Chiron's role rule (:func:`route_class`), then the batch requests to evict on the chosen instance
    (``evictable`` lists those that can come back where they left off). An overflow onto an instance that is
    full and has nothing to evict is held back."""
    decision = route_class(request_class, loads, params)
    if decision.instance_id is None:
        return Placement(None, (), decision.reason)
    chosen = next(load for load in loads if load.instance_id == decision.instance_id)
    candidates = evictable(decision.instance_id) if decision.preempt_batch else ()
    n_evict = min(decision.preempt_batch, len(candidates))
    if decision.overflow and not n_evict and chosen.num_requests >= instance_slots(chosen, params):
        return Placement(None, (), f"hold: {decision.instance_id} is full and has no batch request to evict")
    return Placement(decision.instance_id, batch_victims(candidates, n_evict), decision.reason)


class BatchQueue:
    """The global batch queue: earliest deadline first, then first enqueued (ties by request id)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, float, str]] = []
        self._queued: set[str] = set()
        self._first_enqueued: dict[str, float] = {}
        self._deadline: dict[str, tuple[float, int]] = {}  # request -> (deadline, tokens: prompt + max output)

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._queued

    def clear(self) -> None:
        self._heap.clear()
        self._queued.clear()

    def push(self, request_id: str, deadline: float, tokens: int, now: float) -> None:
        """Queue a request (again: it keeps its first place); a request already queued is not queued twice."""
        if request_id in self._queued:
            return
        first = self._first_enqueued.setdefault(request_id, now)
        self._deadline[request_id] = (deadline, tokens)
        self._queued.add(request_id)
        heapq.heappush(self._heap, (deadline, first, request_id))

    def forget(self, request_id: str) -> None:
        """The request ended (finished, cancelled, failed): drop it, queued or not."""
        self._queued.discard(request_id)
        self._first_enqueued.pop(request_id, None)
        self._deadline.pop(request_id, None)

    def release(
        self, loads: Sequence[FleetInstance], params: AutoscaleParams, alive: Container[str] | None = None
    ) -> list[tuple[str, str]]:
        """Requests to place now, (request id, instance id), by :func:`batch_release` over the spare slots;
        the rest stay queued. Entries whose request is gone (not in ``alive``, when given) are dropped."""
        heap = self._heap
        while heap and (heap[0][2] not in self._queued or (alive is not None and heap[0][2] not in alive)):
            self._queued.discard(heapq.heappop(heap)[2])
        if not heap:
            return []
        spare = sum(batch_spare(load, params) for load in loads)
        if spare <= 0:
            return []
        head: list[tuple[float, float, str]] = []
        while heap and len(head) < spare:
            entry = heapq.heappop(heap)
            if entry[2] in self._queued and (alive is None or entry[2] in alive):
                head.append(entry)
            else:
                self._queued.discard(entry[2])
        queued = [QueuedBatch(rid, deadline, self._deadline.get(rid, (0.0, 0))[1]) for deadline, _, rid in head]
        placed = {a.request_id: a.instance_id for a in batch_release(queued, loads, params)}
        for entry in head:
            if entry[2] in placed:
                self._queued.discard(entry[2])
            else:
                heapq.heappush(heap, entry)
        return list(placed.items())
