"""Deficit round robin by tokens (control/policy/fairness.py): one client's backlog cannot hold another's
requests longer than the documented bound, whatever its size."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.fairness import FairQueue, dispatch_room


def drain(queue: FairQueue) -> list[tuple[str, str, int]]:
    out = []
    while (picked := queue.pop()) is not None:
        key, item = picked
        out.append((key, item.item_id, item.cost))
    return out


def test_a_flood_does_not_hold_an_interactive_request() -> None:
    queue = FairQueue(quantum=1024)
    for index in range(100):
        queue.push("flood", f"f{index}", 300, now=0.0)
    queue.push("interactive", "i0", 40, now=1.0)
    order = [item for _, item, _ in drain(queue)]
    # the flood gets one quantum (3 requests of 300 tokens) before the interactive request's turn
    assert order.index("i0") == 3
    assert order[:3] == ["f0", "f1", "f2"] and order[4:] == [f"f{i}" for i in range(3, 100)]


def test_fifo_within_a_client_and_no_saving_up() -> None:
    queue = FairQueue(quantum=100)
    queue.push("a", "a1", 50, 0.0)
    assert drain(queue) == [("a", "a1", 50)]
    # idle, "a" kept no deficit: with b queued first, b is served before a's large request
    queue.push("b", "b1", 100, 0.0)
    queue.push("a", "a2", 100, 0.0)
    assert [i for _, i, _ in drain(queue)] == ["b1", "a2"]


def test_unpop_and_remove() -> None:
    queue = FairQueue(quantum=100)
    for i in range(3):
        queue.push("a", f"a{i}", 10, 0.0)
    queue.push("b", "b0", 10, 0.0)
    picked = queue.pop()
    assert picked is not None and picked[1].item_id == "a0"
    queue.unpop(*picked)  # could not be dispatched: first again, cost refunded
    assert queue.remove("a1") and not queue.remove("a1") and "a1" not in queue
    assert [i for _, i, _ in drain(queue)] == ["a0", "a2", "b0"]
    assert len(queue) == 0 and queue.oldest_wait(5.0) == 0.0


def test_large_requests_terminate() -> None:
    queue = FairQueue(quantum=1)
    queue.push("a", "big", 10**9, 0.0)
    queue.push("b", "small", 1, 0.0)
    assert {i for _, i, _ in drain(queue)} == {"big", "small"}


def test_bad_quantum() -> None:
    with pytest.raises(ValueError):
        FairQueue(quantum=0)


def test_dispatch_room() -> None:
    assert dispatch_room([0, 1, 5], 2) == 3 and dispatch_room([], 2) == 0


@settings(max_examples=200, deadline=None)
@given(
    quantum=st.integers(1, 500),
    backlog=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]), st.lists(st.integers(1, 800), min_size=1, max_size=30), min_size=2
    ),
)
def test_the_documented_delay_bound(quantum: int, backlog: dict[str, list[int]]) -> None:
    """Before a client's first request leaves, the others take at most
    ceil(cost / quantum) * (n - 1) * (quantum + max_cost) tokens, whatever their backlogs."""
    queue = FairQueue(quantum=quantum)
    for key, costs in backlog.items():
        for index, cost in enumerate(costs):
            queue.push(key, f"{key}{index}", cost, 0.0)
    order = drain(queue)
    max_cost = max(c for costs in backlog.values() for c in costs)
    n = len(backlog)
    for key, costs in backlog.items():
        first = next(i for i, (k, _, _) in enumerate(order) if k == key)
        others = sum(cost for k, _, cost in order[:first] if k != key)
        assert others <= math.ceil(costs[0] / quantum) * (n - 1) * (quantum + max_cost)
