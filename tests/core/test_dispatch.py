"""The control core's dispatch loop (control/core/dispatch.py): the waiting queue with head-of-line
blocking, late binding (``drover``'s ``predict_hold``), the fair queue between clients, class routing and
the global batch queue, each placement counted in the index exactly once. In process, real dispatch
indexes; the shell is a small in-memory view that carries placements out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from control.core.dispatch import Dispatcher, Place, Waiting
from control.core.record import DecisionLog
from control.policy.autoscaling import AutoscaleParams, FleetInstance, RunningBatch
from control.policy.dispatch import make_dispatch_policy
from control.policy.params import DispatchParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand


@dataclass
class Shell:
    """An in-memory shell: requests waiting, per-instance class counts, and what was carried out."""

    requests: dict[str, Waiting] = field(default_factory=dict)
    loads: dict[str, FleetInstance] = field(default_factory=dict)
    running_batch: dict[str, list[RunningBatch]] = field(default_factory=dict)
    engine_waiting: dict[str, int] = field(default_factory=dict)
    placed: list[Place] = field(default_factory=list)

    def add(self, rid: str, blocks: int = 1, request_class: str = "interactive", **kw: object) -> str:
        demand = RequestDemand(rid, blocks * 16, blocks)
        self.requests[rid] = Waiting(demand, request_class, **kw)  # type: ignore[arg-type]
        return rid

    def run(self, places: Iterator[Place]) -> list[str]:
        out = []
        for place in places:  # carried out one by one, as the shells do
            self.placed.append(place)
            out.append(place.request_id)
            waiting = self.requests.pop(place.request_id)
            load = self.loads.get(place.instance_id)
            if load is not None:
                batch = waiting.request_class == "batch"
                self.loads[place.instance_id] = replace(
                    load, num_interactive=load.num_interactive + (not batch), num_batch=load.num_batch + batch
                )
            self.engine_waiting[place.instance_id] = self.engine_waiting.get(place.instance_id, 0) + 1
        return out

    # the FleetView the core reads
    def waiting(self, request_id: str) -> Waiting | None:
        return self.requests.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.requests

    def class_loads(self) -> Sequence[FleetInstance]:
        return list(self.loads.values())

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        return self.running_batch.get(instance_id, [])

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        return list(self.engine_waiting.items())


def snapshot(iid: str, free: int, total: int = 100, running: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(iid, num_total_blocks=total, num_free_blocks=free, num_running=running, num_waiting=0)


class CountingIndex:
    """A real least-loaded index that counts the placements it is told about."""

    def __init__(self) -> None:
        self.inner = make_dispatch_policy("least_loaded")
        self.name = self.inner.name
        self.dispatched: list[tuple[str, str]] = []

    def upsert(self, s: InstanceSnapshot) -> None:
        self.inner.upsert(s)

    def remove(self, instance_id: str) -> None:
        self.inner.remove(instance_id)

    def choose(self, demand: RequestDemand) -> str | None:
        return self.inner.choose(demand)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        self.dispatched.append((demand.request_id, instance_id))
        self.inner.on_dispatched(instance_id, demand)


def test_a_request_that_fits_nowhere_waits_and_holds_back_later_ones() -> None:
    index = make_dispatch_policy("predictive", DispatchParams(predict_hold=True))
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=10, running=3))  # busy (an idle instance always takes a request)
    assert shell.run(core.submit(shell.add("big", blocks=50), shell, 0.0)) == []  # late binding: held
    assert shell.run(core.submit(shell.add("small", blocks=1), shell, 0.1)) == []  # behind the held one
    assert list(core.pending) == ["big", "small"]
    assert shell.run(core.retry(shell, 0.2)) == []  # still no room for the head
    big = shell.requests["big"].demand
    assert not core.fits_now(big) and list(core.pending) == ["big", "small"]  # admission's question: no change
    index.upsert(snapshot("a", free=100, total=200, running=3))  # a heartbeat shows room
    assert shell.run(core.retry(shell, 0.3)) == ["big", "small"] and not core.pending


def test_every_placement_is_counted_in_the_index_once_and_recorded() -> None:
    index, log = CountingIndex(), DecisionLog()
    core, shell = Dispatcher(index, log=log), Shell()
    for iid in ("a", "b"):
        index.upsert(snapshot(iid, free=100))
    placed = shell.run(core.submit(shell.add("r1"), shell, 0.0)) + shell.run(core.submit(shell.add("r2"), shell, 0.0))
    assert placed == ["r1", "r2"]
    assert [rid for rid, _ in index.dispatched] == ["r1", "r2"]
    assert {iid for _, iid in index.dispatched} == {"a", "b"}  # least loaded: the second goes elsewhere
    kinds = [(d.what, d.key) for d in log.entries() if d.what in ("choose", "dispatched")]
    assert kinds == [("choose", "r1"), ("dispatched", "r1"), ("choose", "r2"), ("dispatched", "r2")]
    assert core.attempts == 2
    # the queue events around them, with the view's answers, for the replay (tests/parity/replays.py)
    events = [(d.what, d.key) for d in log.entries() if d.what.startswith("queue_")]
    assert events == [
        ("queue_event", "r1"),
        ("queue_place", "r1"),
        ("queue_end", "r1"),
        ("queue_event", "r2"),
        ("queue_place", "r2"),
        ("queue_end", "r2"),
    ]
    assert [d.key for d in log.entries() if d.what == "view"] == ["waiting", "waiting"]


def test_requests_that_ended_while_waiting_are_skipped() -> None:
    index = make_dispatch_policy("least_loaded")
    core, shell = Dispatcher(index), Shell()
    for rid in ("gone", "kept"):
        shell.run(core.submit(shell.add(rid), shell, 0.0))  # no instance yet: both wait
    del shell.requests["gone"]  # cancelled
    index.upsert(snapshot("a", free=100))
    assert shell.run(core.retry(shell, 1.0)) == ["kept"] and not core.pending


def test_the_fair_queue_serves_clients_in_turn_within_the_instances_room() -> None:
    index = make_dispatch_policy("least_loaded")
    core, shell = Dispatcher(index, fair_quantum_tokens=16, fair_max_waiting=2), Shell()
    index.upsert(snapshot("a", free=100))
    shell.engine_waiting["a"] = 2  # the engine's queue is full: everything waits here
    for k in range(4):
        shell.run(core.submit(shell.add(f"flood{k}", client="flood", cost=16), shell, 0.0))
    shell.run(core.submit(shell.add("polite", client="polite", cost=16), shell, 0.1))
    assert core.num_queued == 5 and not shell.placed
    shell.engine_waiting["a"] = 0  # room for two
    assert shell.run(core.retry(shell, 1.0)) == ["flood0", "polite"]  # one each, not the flood's backlog
    assert core.num_queued == 3


def test_class_routing_batch_queue_and_held_back_overflow() -> None:
    params = AutoscaleParams()
    core, shell = Dispatcher(make_dispatch_policy("least_loaded"), classes=params), Shell()
    shell.loads = {
        "i": FleetInstance(instance_id="i", role="interactive", capacity=1),
        "b": FleetInstance(instance_id="b", role="batch", capacity=2),
    }
    assert shell.run(core.submit(shell.add("job", request_class="batch", deadline=60.0, cost=20), shell, 0.0)) == []
    assert len(core.batch) == 1 and not core.pending  # batch requests wait in the batch queue
    assert shell.run(core.release_batch(shell)) == ["job"]
    assert shell.placed[-1].instance_id == "b"  # into a batch instance's spare slot
    assert shell.run(core.submit(shell.add("chat"), shell, 0.0)) == ["chat"]
    assert shell.placed[-1].instance_id == "i"
    # The interactive instance is full and has nothing to evict: held back, never placed on it.
    assert shell.run(core.submit(shell.add("chat2"), shell, 0.0)) == []
    assert list(core.pending) == ["chat2"]


def test_an_overflow_evicts_a_batch_request_where_it_goes() -> None:
    core, shell = Dispatcher(make_dispatch_policy("least_loaded"), classes=AutoscaleParams()), Shell()
    shell.loads = {"m": FleetInstance(instance_id="m", role="mixed", capacity=2, num_interactive=1, num_batch=1)}
    shell.running_batch = {"m": [RunningBatch("old", 50, 1.0), RunningBatch("new", 3, 2.0)]}
    assert shell.run(core.submit(shell.add("chat"), shell, 0.0)) == ["chat"]
    assert shell.placed[-1] == Place("chat", "m", ("new",))


def test_a_batch_request_back_from_a_failover_keeps_its_place_in_the_batch_queue() -> None:
    core, shell = Dispatcher(make_dispatch_policy("least_loaded"), classes=AutoscaleParams()), Shell()
    shell.loads = {"b": FleetInstance(instance_id="b", role="batch", capacity=1)}
    shell.add("early", request_class="batch", deadline=60.0, cost=10)
    shell.add("late", request_class="batch", deadline=60.0, cost=10)
    shell.run(core.submit("early", shell, 0.0))
    shell.run(core.submit("late", shell, 1.0))
    assert core.dispatch_or_wait("early", shell, 5.0) is None and len(core.batch) == 2 and not core.pending
    assert shell.run(core.release_batch(shell)) == ["early"]  # one slot: the first enqueued, as before
