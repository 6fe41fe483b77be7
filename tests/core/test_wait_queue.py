"""One queue for the cluster (issue 17): the dispatch loop's wait queue (control/core/wait_queue.py) and
``drover``'s ``queue_hold_all`` / ``queue_aging_tokens_per_s`` through the real Dispatcher and the real
predictive index, then a whole simulated run. In process, no clock, no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from control.core.dispatch import Dispatcher
from control.core.wait_queue import WaitQueue
from control.policy.dispatch import PredictiveIndex, make_dispatch_policy
from control.policy.params import DispatchParams, PolicyParams
from control.policy.recommended import user_policy_params
from control.simulator.cluster import ClusterConfig, simulate
from control.simulator.workload import RequestSpec
from tests.core.test_dispatch import Shell, snapshot


def test_first_come_first_served_without_aging() -> None:
    queue = WaitQueue()
    for i, prompt in enumerate((900, 10, 500)):
        queue.push(f"r{i}", now=float(i), prompt_tokens=prompt)
    assert list(queue) == ["r0", "r1", "r2"] and len(queue) == 3 and "r1" in queue
    queue.push("r0", now=9.0)  # queued already: keeps its place
    queue.remove("r1")
    queue.append("back")
    assert list(queue) == ["r0", "r2", "back"] and "r1" not in queue
    queue.remove("missing")  # nothing to do
    assert queue.head(2) == ["r0", "r2"]


def test_a_request_appended_twice_keeps_its_first_place_and_leaves_with_one_remove() -> None:
    """``dispatch_or_wait`` appends; an id appended while it still waits must not leave a second item that no
    ``remove`` can take out (the dispatch loop would read it at the head forever)."""
    queue = WaitQueue()
    queue.append("a", 1.0)
    queue.push("b", now=2.0)
    queue.append("a", 3.0)
    assert list(queue) == ["a", "b"] and queue.queued_at("a") == 1.0
    queue.remove("a")
    assert list(queue) == ["b"] and len(queue) == 1 and "a" not in queue


def test_shortest_prefill_first_with_aging_overtakes_only_within_the_aging_window() -> None:
    queue = WaitQueue()
    aging = 100.0  # tokens per second
    queue.push("long", now=0.0, prompt_tokens=1000, aging_tokens_per_s=aging)  # key 10.0
    queue.push("short-soon", now=1.0, prompt_tokens=100, aging_tokens_per_s=aging)  # key 2.0: overtakes
    queue.push("short-late", now=10.5, prompt_tokens=100, aging_tokens_per_s=aging)  # key 11.5: does not
    assert list(queue) == ["short-soon", "long", "short-late"]
    queue.remove("long")
    queue.append("requeued")  # a failover goes to the back whatever its size
    assert list(queue) == ["short-soon", "short-late", "requeued"]


def _held_index(hold_all: bool, aging: float = 0.0, scan: int = 32) -> PredictiveIndex:
    params = DispatchParams(
        predict_hold=True, queue_hold_all=hold_all, queue_aging_tokens_per_s=aging, queue_backfill_scan=scan
    )
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex)
    return index


def test_hold_all_keeps_every_request_that_cannot_start_in_the_cluster_queue() -> None:
    index = _held_index(hold_all=True)
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=20, running=3))
    index.upsert(snapshot("b", free=10, running=3))
    assert shell.run(core.submit(shell.add("big", blocks=50), shell, 0.0)) == []  # reserves a, held
    assert shell.run(core.submit(shell.add("mid", blocks=30), shell, 0.1)) == []  # held too (was: sent to b)
    assert list(core.pending) == ["big", "mid"]
    # room for mid on b, not yet for big anywhere: mid backfills past the head; big keeps its place and
    # re-reserves the roomiest instance, a
    index.upsert(snapshot("a", free=60, running=3))
    index.upsert(snapshot("b", free=50, running=3))
    assert shell.run(core.retry(shell, 0.2)) == ["mid"] and list(core.pending) == ["big"]
    assert shell.placed[-1].instance_id == "b"
    index.upsert(snapshot("a", free=90, running=3))
    assert shell.run(core.retry(shell, 0.3)) == ["big"] and not core.pending
    assert shell.placed[-1].instance_id == "a"


def test_without_hold_all_the_second_request_queues_at_an_engine() -> None:
    index = _held_index(hold_all=False)
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=20, running=3))
    index.upsert(snapshot("b", free=10, running=3))
    assert shell.run(core.submit(shell.add("big", blocks=50), shell, 0.0)) == []
    assert shell.run(core.submit(shell.add("mid", blocks=30), shell, 0.1)) == ["mid"]  # to b's engine queue
    assert list(core.pending) == ["big"]


def test_aging_tries_the_short_prompt_first_and_the_scan_is_bounded() -> None:
    index = _held_index(hold_all=True, aging=16.0)
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=5, running=3))
    for rid, blocks, t in (("long", 40, 0.0), ("short", 2, 0.5)):  # 640 vs 32 prompt tokens
        assert shell.run(core.submit(shell.add(rid, blocks=blocks), shell, t)) == []
    assert list(core.pending) == ["short", "long"]
    index.upsert(snapshot("a", free=100, total=200, running=3))
    assert shell.run(core.retry(shell, 1.0)) == ["short", "long"] and not core.pending
    # the scan per tick is bounded: with a scan of 1 only the head is tried
    bounded = _held_index(hold_all=True, scan=1)
    core, shell = Dispatcher(bounded), Shell()
    bounded.upsert(snapshot("a", free=5, running=3))
    for rid in ("r1", "r2"):
        shell.run(core.submit(shell.add(rid, blocks=20), shell, 0.0))
    bounded.upsert(snapshot("a", free=150, total=200, running=3))
    assert shell.run(core.retry(shell, 1.0)) == ["r1"] and list(core.pending) == ["r2"]
    assert shell.run(core.retry(shell, 1.1)) == ["r2"]


def test_policy_params_validate_and_drover_turns_the_queue_rules_on() -> None:
    drover = user_policy_params("drover")
    assert drover.queue_hold_all and drover.queue_backfill_scan >= 1
    assert drover.dispatch_params().queue_hold_all
    assert not user_policy_params("least_loaded").queue_hold_all
    with pytest.raises(ValueError, match="queue_aging_tokens_per_s"):
        PolicyParams().with_updates(queue_aging_tokens_per_s="-1")
    with pytest.raises(ValueError, match="queue_backfill_scan"):
        PolicyParams().with_updates(queue_backfill_scan="0")


def test_a_whole_simulated_burst_finishes_every_request_with_the_cluster_queue() -> None:
    # a burst that overfills two small instances: prompts of 1 to 24 blocks arriving faster than they finish
    specs = [RequestSpec(f"r{i}", i * 0.01, 16 * (1 + (i * 7) % 24), 20 + (i * 13) % 60) for i in range(300)]
    base = ClusterConfig(num_instances=2)
    drover = user_policy_params("drover")
    for params in (drover, dataclasses.replace(drover, queue_hold_all=False, queue_aging_tokens_per_s=0.0)):
        result = simulate(dataclasses.replace(base, policy=params), specs)
        assert all(r.done for r in result.requests), params.queue_hold_all
        assert len(result.requests) == len(specs)


def test_a_request_held_past_queue_starvation_s_is_not_overtaken_any_more() -> None:
    params = DispatchParams(predict_hold=True, queue_hold_all=True, queue_starvation_s=2.0)
    index = make_dispatch_policy("predictive", params)
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=20, running=3))
    index.upsert(snapshot("b", free=10, running=3))
    for rid, blocks in (("big", 50), ("small", 2)):
        assert shell.run(core.submit(shell.add(rid, blocks=blocks), shell, 0.0)) == []
    assert core.pending.queued_at("big") == 0.0 and core.pending.queued_at("gone") == float("inf")
    index.upsert(snapshot("b", free=40, running=3))  # room for small only (a is big's, and too small)
    assert shell.run(core.retry(shell, 1.0)) == ["small"]  # big has waited 1 s: small may overtake it
    index.upsert(snapshot("b", free=10, running=3))
    assert shell.run(core.submit(shell.add("small3", blocks=2), shell, 2.5)) == []  # no room: held
    index.upsert(snapshot("b", free=40, running=3))
    assert shell.run(core.retry(shell, 3.0)) == []  # big has waited 3 s > 2 s: small3 waits behind it
    assert list(core.pending) == ["big", "small3"]


def _two_held(ttft_slo_s: float) -> tuple[PredictiveIndex, Dispatcher, Shell]:
    """One instance with no room; "old" held at 0 s, "new" at 1.5 s; each needs 20 of the instance's blocks."""
    params = DispatchParams(predict_hold=True, queue_hold_all=True, queue_backfill_scan=4, queue_ttft_slo_s=ttft_slo_s)
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex)
    core, shell = Dispatcher(index), Shell()
    index.upsert(snapshot("a", free=5, running=3))
    for rid, t in (("old", 0.0), ("new", 1.5)):
        assert shell.run(core.submit(shell.add(rid, blocks=20), shell, t)) == []
    return index, core, shell


def test_goodput_first_order_serves_the_request_that_can_still_meet_its_ttft_slo() -> None:
    """Room for one at 2 s with a 1 s TTFT SLO: "old" has waited 2 s (its TTFT is lost whatever happens),
    "new" 0.5 s. First come, first served spends the room on "old", and "new" misses too; goodput first
    starts "new" and "old" still runs when room frees again (demoted, not dropped)."""
    for slo, first in ((0.0, "old"), (1.0, "new")):
        index, core, shell = _two_held(slo)
        index.upsert(snapshot("a", free=40, running=3))  # room for one 20-block prompt beside the growth reserve
        assert shell.run(core.retry(shell, 2.0)) == [first], slo
        index.upsert(snapshot("a", free=40, running=3))
        assert shell.run(core.retry(shell, 2.1)) == [{"old": "new", "new": "old"}[first]] and not core.pending


def test_goodput_first_order_keeps_the_starvation_bound_first() -> None:
    queue = WaitQueue()
    for rid, t in (("starved", 0.0), ("lost", 5.0), ("meetable", 9.5), ("meetable2", 9.8)):
        queue.push(rid, now=t)
    queue.append("restored")  # no queue time: never counts as lost
    now, slo, starvation = 10.0, 1.0, 8.0
    assert queue.head_meetable_first(4, now - slo) == ["meetable", "meetable2", "restored", "starved"]
    assert queue.head_meetable_first(9, now - slo, now - starvation) == [
        "starved",
        "meetable",
        "meetable2",
        "restored",
        "lost",
    ]
    assert queue.head_meetable_first(1, now - slo) == ["meetable"]
    assert list(queue) == ["starved", "lost", "meetable", "meetable2", "restored"]  # the queue itself is unchanged


def test_queue_ttft_slo_s_validates_and_takes_the_run_slo_in_the_simulator() -> None:
    assert PolicyParams().with_updates(queue_ttft_slo_s="-1").dispatch_params().queue_ttft_slo_s == -1.0
    with pytest.raises(ValueError, match="queue_ttft_slo_s"):
        PolicyParams().with_updates(queue_ttft_slo_s="-2")
    assert user_policy_params("drover").queue_ttft_slo_s == 0.0  # opt-in
