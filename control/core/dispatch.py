"""The dispatch loop: which waiting request is tried next, where it goes, and what keeps waiting.

Sans-I/O, like the rest of the core: no clock (``now`` is passed in), no bus, no engine. Both shells drive one
:class:`Dispatcher`: the SchedulerActor (``actors/scheduler.py``) and the cluster simulator
(``control/simulator/cluster.py``, ``elastic.py``). What it owns:

- the **dispatch index** (``control/policy/dispatch.py``): ``choose`` and ``on_dispatched`` are called here
  and nowhere else, so a placement is counted exactly once, whichever shell carries it out; ``drover``'s
  late binding (``predict_hold``) is the index answering None, after which the request waits here;
- the **waiting queue** (:class:`control.core.wait_queue.WaitQueue`): first come, first served with
  head-of-line blocking (a request that fits nowhere keeps every later one back, so a large prompt is not
  starved by small ones). With ``queue_hold_all`` (``drover``) the index holds every request that cannot
  start now, each tick tries the first ``queue_backfill_scan`` of them in order (a later one may start where
  the head does not fit; the index's reservation keeps the head's instance for it), and with
  ``queue_aging_tokens_per_s`` the order is shortest prefill first with aging instead of arrival;
- the **fair queue** (``scheduler.fairness``): deficit round robin across clients
  (``control/policy/fairness.py``), released only while the instances have room (each at most
  ``fairness_max_waiting`` waiting), so the backlog waits here where the fair order applies;
- **class routing** (Chiron, when request classes are on): an interactive request goes where
  :func:`control.core.classes.place_by_class` says, evicting the batch requests it names; an overflow onto a
  full instance with nothing to evict is held back;
- the **global batch queue** (:class:`control.core.classes.BatchQueue`) and its release into spare slots.

Events in are method calls; commands out are :class:`Place` values. The methods that may place several
requests are generators: the shell carries out each :class:`Place` before asking for the next, so the state
it shows through its :class:`FleetView` (which the core only reads) is current at every decision, exactly as
when the loop was written inside each shell.

Given a :class:`~control.core.record.DecisionLog`, the dispatcher records each event (``queue_event``), each
placement it makes (``queue_place``), the event's end (``queue_end``) and every answer the shell's view gave it
(``view``), in order: the replay parity test feeds them to the simulator's dispatcher, which must place the same
requests in the same order (``tests/parity/replays.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from control.core.classes import BatchQueue, place_by_class
from control.core.record import DecisionLog
from control.core.wait_queue import WaitQueue
from control.policy.autoscaling import BATCH, AutoscaleParams, FleetInstance, RunningBatch
from control.policy.dispatch import DispatchIndex
from control.policy.fairness import FairQueue, dispatch_room
from control.policy.snapshots import RequestDemand


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request as the dispatch loop sees it."""

    demand: RequestDemand
    request_class: str = "interactive"
    client: str = ""
    """Whose share it counts against in the fair queue (the identity the NATS server authenticated)."""
    cost: int = 1
    """Its fair-queue cost in tokens: prompt + max_tokens."""
    deadline: float = 0.0
    """A batch request's deadline on the shell's clock (its place in the batch queue)."""
    queued: bool = True
    """False when it has started meanwhile (the fair queue then skips it)."""

    @property
    def request_id(self) -> str:
        return self.demand.request_id


@dataclass(frozen=True, slots=True)
class Place:
    """Command: start ``request_id`` on ``instance_id`` now; evict the batch requests in ``evict`` there first
    (they come back through the batch queue with what their clients already have)."""

    request_id: str
    instance_id: str
    evict: tuple[str, ...] = ()


class FleetView(Protocol):
    """What the core reads of a shell's state; read again before every decision."""

    def waiting(self, request_id: str) -> Waiting | None:
        """The request as it waits now; None when it is gone (ended, cancelled)."""
        ...

    def __contains__(self, request_id: object) -> bool:
        """The request is still known (the batch queue drops entries that are not)."""
        ...

    def class_loads(self) -> Sequence[FleetInstance]:
        """Every instance as the request-class rules read it (roles, slots, requests per class)."""
        ...

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        """Batch requests running there that can be evicted and come back where they left off."""
        ...

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        """(instance id, requests waiting in its engine) of every instance that takes dispatch (the fair queue's
        room; :func:`control.core.requests.takes_no_dispatch` says which)."""
        ...


class QueueRules(NamedTuple):
    """The waiting queue's rules, from the dispatch index's params (``control/policy/params.py``); an index
    without them gets first come, first served with head-of-line blocking (``Dispatcher._queue_rules``)."""

    hold_all: bool  # queue_hold_all
    aging_tokens_per_s: float  # queue_aging_tokens_per_s
    backfill_scan: int  # queue_backfill_scan
    starvation_s: float  # queue_starvation_s
    ttft_slo_s: float  # queue_ttft_slo_s (<= 0: off)


class TapedView:
    """A :class:`FleetView` that records each answer it gives the dispatcher (``view`` entries of a
    :class:`DecisionLog`: which question, its arguments, the answer), so that a replay can give the same ones."""

    def __init__(self, view: FleetView, log: DecisionLog) -> None:
        self.view = view
        self.log = log

    def waiting(self, request_id: str) -> Waiting | None:
        answer = self.view.waiting(request_id)
        self.log.add("view", "waiting", (request_id,), answer)
        return answer

    def __contains__(self, request_id: object) -> bool:
        answer = request_id in self.view
        self.log.add("view", "contains", (request_id,), answer)
        return answer

    def class_loads(self) -> Sequence[FleetInstance]:
        answer = tuple(self.view.class_loads())
        self.log.add("view", "class_loads", (), answer)
        return answer

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        answer = tuple(self.view.evictable(instance_id))
        self.log.add("view", "evictable", (instance_id,), answer)
        return answer

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        answer = tuple(self.view.serving_waiting())
        self.log.add("view", "serving_waiting", (), answer)
        return answer


class Dispatcher:
    """The control core's dispatch loop (see the module docstring).

    ``classes``: the autoscaling parameters when class routing is on (None: the dispatch index places every
    request). ``fair_quantum_tokens``: the fair queue's quantum when fairness is on."""

    def __init__(
        self,
        index: DispatchIndex,
        *,
        classes: AutoscaleParams | None = None,
        fair_quantum_tokens: int | None = None,
        fair_max_waiting: int = 0,
        log: DecisionLog | None = None,
    ) -> None:
        self.index = index
        self.classes = classes
        self.fair = FairQueue(fair_quantum_tokens) if fair_quantum_tokens is not None else None
        self.fair_max_waiting = fair_max_waiting
        self.pending = WaitQueue()  # in the order the index's params ask for (_queue_rules)
        self.batch = BatchQueue()
        self.log = log
        self.attempts = 0  # placement decisions taken (the simulator reports them)

    @property
    def num_queued(self) -> int:
        """Requests waiting here for an instance (not counting the batch queue)."""
        return len(self.pending) + (len(self.fair) if self.fair is not None else 0)

    @property
    def queued(self) -> Collection[str]:
        """The ids of the requests waiting here for an instance: the waiting queue and the fair queue (what
        admission's queue limits count; the batch queue is bounded by the in-flight limits alone)."""
        return QueuedIds(self.pending, self.fair)

    def _record(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        if self.log is not None:
            self.log.add(what, key, inputs, output)

    # ------------------------------------------------------------------------------------------- one request
    def place(self, request: Waiting, view: FleetView) -> Place | None:
        """Where one request goes now, or None (nowhere yet: it waits). Counts the placement in the index."""
        self.attempts += 1
        demand = request.demand
        evict: tuple[str, ...] = ()
        if self.classes is not None:
            placement = place_by_class(request.request_class, view.class_loads(), view.evictable, self.classes)
            target = placement.instance_id
            evict = placement.evict
        else:
            target = self.index.choose(demand)
            self._record("choose", demand.request_id, (demand,), target)
        if target is None:
            return None
        self._dispatched(target, demand)
        return Place(demand.request_id, target, evict)

    def fits_now(self, demand: RequestDemand) -> bool:
        """Whether some instance would take the request now (admission asks when a queue is at its limit);
        nothing is placed or counted. With fairness on, a request with others in the fair queue ahead of it
        waits there (the queue is left only while the instances have room, and the last drain left these),
        whatever the index would say."""
        if self.fair is not None and len(self.fair):
            return False
        chosen = self.index.choose(demand)
        self._record("choose", demand.request_id, (demand,), chosen)
        self._record("queue_fits_now", demand.request_id, (demand,), chosen is not None)
        return chosen is not None

    def _dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        self.index.on_dispatched(instance_id, demand)
        self._record("dispatched", demand.request_id, (instance_id, demand), None)

    def _try(self, request: Waiting, view: FleetView, now: float) -> Place | bool:
        """Place the request, or hand a batch request to the batch queue (True); False: nowhere now."""
        if self.classes is not None and request.request_class == BATCH:
            self.queue_batch(request, now)
            return True
        placed = self.place(request, view)
        return placed if placed is not None else False

    def dispatch_or_wait(self, request_id: str, view: FleetView, now: float) -> Place | None:
        """A request to run again (failover, a KunServe group handing it back), or restored after a restart:
        place it now, or it waits at the back of the queue (a batch one in the batch queue, keeping its first
        place there)."""
        log = self.log
        if log is None:
            return self._dispatch_or_wait(request_id, view, now)
        log.add("queue_event", request_id, ("dispatch_or_wait", now), None)
        place = self._dispatch_or_wait(request_id, TapedView(view, log), now)
        if place is not None:
            log.add("queue_place", place.request_id, (), place)
        log.add("queue_end", request_id, ("dispatch_or_wait",), None)
        return place

    def _dispatch_or_wait(self, request_id: str, view: FleetView, now: float) -> Place | None:
        request = view.waiting(request_id)
        if request is None:
            return None
        placed = self._try(request, view, now)
        if placed is False:
            self.pending.append(request_id, now)
        return placed if isinstance(placed, Place) else None

    def _queue_rules(self) -> QueueRules:
        """The queue's rules from the index's params, read at each use: ``drover policy set`` swaps the index
        and its params in one step."""
        params = getattr(self.index, "params", None)
        return QueueRules(
            bool(getattr(params, "queue_hold_all", False)),
            float(getattr(params, "queue_aging_tokens_per_s", 0.0)),
            int(getattr(params, "queue_backfill_scan", 1)),
            float(getattr(params, "queue_starvation_s", 0.0)),
            float(getattr(params, "queue_ttft_slo_s", 0.0)),
        )

    def submit(self, request_id: str, view: FleetView, now: float) -> Iterator[Place]:
        """A new request (acknowledged to its client): a batch one joins the batch queue; with fairness on it
        joins its client's fair queue, which is then served; otherwise it is placed now or waits."""
        if self.log is None:
            return self._submit(request_id, view, now)
        return self._recorded("submit", request_id, now, lambda taped: self._submit(request_id, taped, now), view)

    def _submit(self, request_id: str, view: FleetView, now: float) -> Iterator[Place]:
        request = view.waiting(request_id)
        if request is None:
            return
        if self.classes is not None and request.request_class == BATCH:
            self.queue_batch(request, now)
            return
        if self.fair is not None:
            if request_id not in self.fair:
                self.fair.push(request.client, request_id, request.cost, now)
            yield from self._drain_fair(view, now)
            return
        placed = self._try(request, view, now)
        if isinstance(placed, Place):
            yield placed
        elif placed is False:
            aging = self._queue_rules().aging_tokens_per_s
            self.pending.push(request_id, now, request.demand.num_prompt_tokens, aging)

    def wait(self, request_id: str) -> None:
        """The request waits at the back of the queue (the shell restored it as queued)."""
        self._event("wait", request_id)
        self.pending.append(request_id)

    def _event(self, name: str, key: str, *inputs: object) -> None:
        """Record an event that places nothing (its start and end at once)."""
        if self.log is not None:
            self.log.add("queue_event", key, (name, *inputs), None)
            self.log.add("queue_end", key, (name,), None)

    def _recorded(
        self,
        name: str,
        key: str,
        now: float | None,
        places: Callable[[FleetView], Iterator[Place]],
        view: FleetView,
    ) -> Iterator[Place]:
        """An event that may place several requests, recorded: its start when the shell starts iterating, each
        placement as it is handed out (the shell carries it out before asking for the next), its end."""
        log = self.log
        assert log is not None
        log.add("queue_event", key, (name, now), None)
        for place in places(TapedView(view, log)):
            log.add("queue_place", place.request_id, (), place)
            yield place
        log.add("queue_end", key, (name,), None)

    # ------------------------------------------------------------------------------------------- queues
    def retry(self, view: FleetView, now: float) -> Iterator[Place]:
        """A tick, or a new instance: the fair queue while there is room, then the queue from its head until
        a request fits nowhere."""
        if self.log is None:
            return self._retry(view, now)
        return self._recorded("retry", "", now, lambda taped: self._retry(taped, now), view)

    def _retry(self, view: FleetView, now: float) -> Iterator[Place]:
        if self.fair is not None:
            yield from self._drain_fair(view, now)
        pending = self.pending
        rules = self._queue_rules()
        if rules.hold_all:
            yield from self._backfill(view, now, rules)
            return
        while pending:
            head = pending.head(1)[0]
            request = view.waiting(head)
            if request is None:  # ended or cancelled while it waited
                pending.remove(head)
                continue
            placed = self._try(request, view, now)
            if placed is False:
                return
            pending.remove(head)
            if isinstance(placed, Place):
                yield placed

    def _backfill(self, view: FleetView, now: float, rules: QueueRules) -> Iterator[Place]:
        """``queue_hold_all``: try the first ``backfill_scan`` held requests in queue order; those that fit nowhere
        stay in their places (EASY backfilling: the index keeps the head's reserved instance for the head),
        unless one has waited over ``starvation_s`` seconds (0: never). With ``ttft_slo_s`` (goodput first) the
        requests that can still meet their TTFT SLO are tried before those that have waited past it, so the
        first of them reserves: under a burst the queue no longer spends the freed room on requests that miss
        anyway while the ones behind them run past their SLO too (a cascade of misses)."""
        pending = self.pending
        starving = rules.starvation_s
        release = getattr(self.index, "release_reservations", None)
        if release is not None and pending:
            release()  # the head reserves afresh (see PredictiveIndex.release_reservations)
        if rules.ttft_slo_s > 0:
            scanned = pending.head_meetable_first(
                rules.backfill_scan, now - rules.ttft_slo_s, now - starving if starving > 0 else -math.inf
            )
        else:
            scanned = pending.head(rules.backfill_scan)
        for request_id in scanned:
            request = view.waiting(request_id)
            if request is None:  # ended or cancelled while it waited
                pending.remove(request_id)
                continue
            placed = self._try(request, view, now)
            if placed is False:
                if starving > 0 and now - pending.queued_at(request_id) > starving:
                    return  # it has waited too long: nothing behind it may overtake it (FCFS from here)
                continue
            pending.remove(request_id)
            if isinstance(placed, Place):
                yield placed

    def _drain_fair(self, view: FleetView, now: float) -> Iterator[Place]:
        fair = self.fair
        assert fair is not None
        pending = getattr(self.index, "pending", None)  # dispatched since the instance's last heartbeat
        waiting = [n + (pending(i)[0] if pending is not None else 0) for i, n in view.serving_waiting()]
        room = dispatch_room(waiting, self.fair_max_waiting)
        while room > 0:
            picked = fair.pop()
            if picked is None:
                return
            key, item = picked
            request = view.waiting(item.item_id)
            if request is None or not request.queued:
                continue  # cancelled or started meanwhile
            placed = self._try(request, view, now)
            if placed is False:
                fair.unpop(key, item)
                return
            room -= 1
            if isinstance(placed, Place):
                yield placed

    # ------------------------------------------------------------------------------------------- batch queue
    def queue_batch(self, request: Waiting, now: float) -> None:
        """A batch request waits in the global batch queue (earliest deadline first); one queued before keeps
        its first place, and one already queued is not queued twice."""
        self.batch.push(request.request_id, request.deadline, request.cost, now)
        if self.log is not None:  # inside an event it is part of that event; a shell's own call is one
            self.log.add("queue_batch", request.request_id, (request, now), None)

    def release_batch(self, view: FleetView) -> Iterator[Place]:
        """The head of the batch queue into the batch and mixed instances' spare slots (a tick)."""
        if self.log is None:
            return self._release_batch(view)
        return self._recorded("release_batch", "", None, self._release_batch, view)

    def _release_batch(self, view: FleetView) -> Iterator[Place]:
        if self.classes is None or not self.batch:
            return
        for request_id, instance_id in self.batch.release(view.class_loads(), self.classes, view):
            request = view.waiting(request_id)
            if request is None:
                continue
            self._dispatched(instance_id, request.demand)
            yield Place(request_id, instance_id)

    def forget(self, request_id: str) -> None:
        """The request ended: the batch queue drops it (the other queues skip it when they reach it)."""
        self._event("forget", request_id)
        self.batch.forget(request_id)


class QueuedIds(Collection[str]):
    """A live, read-only view of the ids waiting in a dispatcher's waiting queue and fair queue."""

    def __init__(self, pending: WaitQueue, fair: FairQueue | None) -> None:
        self.pending = pending
        self.fair = fair

    def __len__(self) -> int:
        return len(self.pending) + (len(self.fair) if self.fair is not None else 0)

    def __iter__(self) -> Iterator[str]:
        yield from self.pending
        if self.fair is not None:
            yield from self.fair

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.pending or (self.fair is not None and request_id in self.fair)


__all__ = ["Dispatcher", "FleetView", "Place", "QueuedIds", "TapedView", "Waiting"]
