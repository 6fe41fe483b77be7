"""Fair share between clients: deficit round robin by tokens (Shreedhar & Varghese, SIGCOMM '95).

Pure (no clock, no I/O: ``now`` is passed in), so the live scheduler and the simulator run the same code.
Keys are the identities the NATS server authenticated (``transport.subjects.client_identity``), never a
message field, so a client cannot split itself into many keys or charge another's.

Each visit of a client's turn adds ``quantum`` tokens to its deficit; its queued requests leave, oldest
first, while their cost (prompt tokens + max_tokens) fits the deficit. A client with nothing queued keeps no
deficit (no saving up). The bound (docs/security.md, "Fair share"): with ``n`` clients queued, a request that
reaches the head of its client's queue leaves after at most ``ceil(cost / quantum)`` rounds, and in each
round every other client takes at most ``quantum + max_cost`` tokens of dispatch capacity, whatever its
backlog: one client's flood delays another's request by at most
``ceil(cost / quantum) * (n - 1) * (quantum + max_cost)`` tokens of dispatches, independent of the flood's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Queued:
    item_id: str
    cost: int
    enqueued_at: float


@dataclass
class FairQueue:
    """Per-key FIFO queues served by deficit round robin. ``quantum``: tokens per key per round."""

    quantum: int = 1024
    _queues: dict[str, deque[Queued]] = field(default_factory=dict)
    _deficit: dict[str, int] = field(default_factory=dict)
    _active: deque[str] = field(default_factory=deque)  # keys with queued items, in round-robin order
    _granted: bool = False  # the head key got its quantum for this visit
    _where: dict[str, str] = field(default_factory=dict)  # item id -> key

    def __post_init__(self) -> None:
        if self.quantum <= 0:
            raise ValueError("quantum must be positive")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._where

    def __iter__(self) -> Iterator[str]:
        """The queued item ids (every key's, in no particular order)."""
        return iter(self._where)

    def push(self, key: str, item_id: str, cost: int, now: float) -> None:
        """Queue ``item_id`` (cost in tokens, at least 1) behind ``key``'s earlier items."""
        if item_id in self._where:
            raise ValueError(f"{item_id!r} is queued already")
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._deficit[key] = 0
            self._active.append(key)
        queue.append(Queued(item_id, max(1, cost), now))
        self._where[item_id] = key

    def pop(self) -> tuple[str, Queued] | None:
        """The next (key, item) by deficit round robin, or None when nothing is queued."""
        while self._active:
            key = self._active[0]
            queue = self._queues[key]
            if not self._granted:
                # skip whole rounds a large item would need, instead of looping through them one by one
                short = queue[0].cost - self._deficit[key]
                rounds = max(1, -(-short // self.quantum)) if len(self._active) == 1 else 1
                self._deficit[key] += rounds * self.quantum
                self._granted = True
            head = queue[0]
            if head.cost <= self._deficit[key]:
                self._deficit[key] -= head.cost
                queue.popleft()
                del self._where[head.item_id]
                if not queue:  # idle keys keep no deficit
                    self._forget(key)
                return key, head
            self._active.rotate(-1)
            self._granted = False
        return None

    def unpop(self, key: str, item: Queued) -> None:
        """Undo :meth:`pop` (the item could not be dispatched after all): back at the head, cost refunded."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._deficit[key] = 0
            self._active.appendleft(key)
        elif self._active[0] != key:
            self._active.remove(key)
            self._active.appendleft(key)
        queue.appendleft(item)
        self._where[item.item_id] = key
        self._deficit[key] += item.cost
        self._granted = True

    def remove(self, item_id: str) -> bool:
        """Drop a queued item (cancelled, expired); False when it is not queued."""
        key = self._where.pop(item_id, None)
        if key is None:
            return False
        queue = self._queues[key]
        self._queues[key] = deque(q for q in queue if q.item_id != item_id)
        if not self._queues[key]:
            self._forget(key)
        return True

    def queued(self, key: str) -> int:
        return len(self._queues.get(key, ()))

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting head item has waited (0 when empty)."""
        heads = [q[0].enqueued_at for q in self._queues.values() if q]
        return max(0.0, now - min(heads)) if heads else 0.0

    def _forget(self, key: str) -> None:
        del self._queues[key]
        del self._deficit[key]
        was_head = self._active and self._active[0] == key
        self._active.remove(key)
        if was_head:
            self._granted = False


def dispatch_room(waiting_per_instance: list[int], max_waiting: int) -> int:
    """How many more requests may go to engines now: the fair queue only works if the backlog waits here
    rather than in the engines' FIFO queues, so each instance gets at most ``max_waiting`` waiting."""
    return sum(max(0, max_waiting - waiting) for waiting in waiting_per_instance)
