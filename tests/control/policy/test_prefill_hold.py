"""The prefill-backlog hold of ``predictive`` dispatch (``predict_hold_prefill_tokens``, issue 17): an instance
takes a new request only while the prompt work queued on it is at most the limit; otherwise the request waits
in the scheduler's queue and starts on the first instance whose queue falls under it."""

from __future__ import annotations

import dataclasses

import pytest

from control.policy.dispatch import DispatchIndex, make_dispatch_policy
from control.policy.params import DispatchParams, PolicyParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot
from control.simulator.presets import get_preset
from control.simulator.runner import fixed_simulator
from control.simulator.workload import RequestSpec

LIMIT = 2048
HOLD = DispatchParams(predict_hold=True, predict_hold_prefill_tokens=LIMIT)
BS = 32  # InstanceSnapshot's default block size


def snap(iid: str, *, waiting_tokens: int = 0, prefilling: int = 0, free: int = 5000) -> InstanceSnapshot:
    """An instance with room for anything, ``waiting_tokens`` of prompts queued and one running prompt with
    ``prefilling`` tokens still to compute (its blocks so far: one)."""
    running = (
        (RunningSnapshot(f"{iid}-p", num_tokens=BS + prefilling, num_blocks=1, decoding=False),) if prefilling else ()
    )
    waiting = waiting_tokens // BS
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=5000,
        num_free_blocks=free,
        num_running=len(running),
        num_waiting=1 if waiting else 0,
        waiting_blocks=waiting,
        head_waiting_blocks=waiting,
        running=running,
    )


def demand(rid: str, tokens: int) -> RequestDemand:
    return RequestDemand(rid, num_prompt_tokens=tokens, num_blocks=-(-tokens // BS))


def index_of(*snapshots: InstanceSnapshot, params: DispatchParams = HOLD) -> DispatchIndex:
    index = make_dispatch_policy("predictive", params)
    for s in snapshots:
        index.upsert(s)
    return index


def test_a_request_waits_while_every_instance_has_more_than_the_limit_queued() -> None:
    """a is prefilling a prompt with 3,000 tokens left, b has 2,400 tokens of prompts waiting: both have room
    for the blocks, so late binding alone sends the request to one of them, behind that queue; with the hold
    it waits, and goes to b once b's queue is down to the limit."""
    busy = (snap("a", prefilling=3000), snap("b", waiting_tokens=2400))
    assert index_of(*busy, params=DispatchParams(predict_hold=True)).choose(demand("r", 500)) in ("a", "b")
    index = index_of(*busy)
    assert index.choose(demand("r", 500)) is None
    index.upsert(snap("b", waiting_tokens=LIMIT))
    assert index.choose(demand("r", 500)) == "b"


def test_requests_dispatched_since_the_snapshot_count_as_queued() -> None:
    index = index_of(snap("a", prefilling=100))
    for rid in ("r1", "r2"):  # 100 + 0, then 100 + 1,024 queued: both at most the limit
        assert index.choose(demand(rid, 1024)) == "a"
        index.on_dispatched("a", demand(rid, 1024))
    assert index.choose(demand("r3", 1024)) is None  # 100 + 2,048 > 2,048


def test_an_idle_instance_takes_a_prompt_larger_than_the_limit() -> None:
    """The limit is on the work queued ahead of a request, not on the request: a prompt of any size starts on
    an instance with nothing queued."""
    assert index_of(snap("a")).choose(demand("long", 8000)) == "a"


def test_off_by_default_on_in_drover_and_validated() -> None:
    assert DispatchParams().predict_hold_prefill_tokens == 0
    assert PolicyParams().predict_hold_prefill_tokens == 0
    assert user_policy_params("drover").predict_hold_prefill_tokens == LIMIT
    assert user_policy_params("least_loaded").predict_hold_prefill_tokens == 0
    with pytest.raises(ValueError, match="predict_hold_prefill_tokens"):
        PolicyParams().with_updates(predict_hold_prefill_tokens="-1")
    assert (
        PolicyParams().with_updates(predict_hold_prefill_tokens="2048").dispatch_params().predict_hold_prefill_tokens
        == LIMIT
    )


QWEN = get_preset("qwen2.5-7b-a10")


def run(params: PolicyParams, specs: list[RequestSpec]) -> tuple[list[float], list[float], list[int]]:
    """Each request's wait in the scheduler's queue, its TTFT and its instance."""
    sim = fixed_simulator(QWEN.cluster_config(2, params), specs)
    result = sim.run()
    assert all(r.done for r in result.requests)  # nothing held forever
    requests = sorted(result.requests, key=lambda r: r.spec.request_id)
    return (
        [r.dispatch_time - r.spec.arrival for r in requests],
        [r.prefill for r in requests],
        [r.instances[0] for r in requests],
    )


def test_a_burst_waits_in_the_cluster_queue_and_every_request_finishes() -> None:
    """40 prompts of 1,500 tokens at once on 2 qwen instances: with the hold only ~2 of them queue on an engine
    at a time, the rest in the scheduler's queue, and every one finishes; a light run (one prompt every 2 s)
    is decided exactly as without the hold."""
    hold = user_policy_params("drover")
    drover = dataclasses.replace(hold, predict_hold_prefill_tokens=0)
    burst = [RequestSpec(f"b{i}", 0.0, 1500, 50) for i in range(40)]
    held, ttft_held, _ = run(hold, burst)
    plain, ttft_plain, _ = run(drover, burst)
    # late binding alone sends the burst to the engines' queues within 0.5 s; with the hold the backlog waits
    # in the scheduler's queue (the last request ~4.5 s), at no cost to the first tokens
    assert max(plain) < 1.0 < 3.0 < max(held)
    assert sum(ttft_held) <= 1.01 * sum(ttft_plain)
    light = [RequestSpec(f"l{i}", 2.0 * i, 1500, 100) for i in range(10)]
    assert run(hold, light) == run(drover, light)


def test_a_prefix_holder_takes_its_request_past_the_limit() -> None:
    """The hold does not apply to a prefix holder: its queue plus the uncached rest is this request's soonest
    first token, and anywhere else the prefix is computed again (Mooncake at 4.18x: attainment 0.60 with the
    hold on holders too, 0.99 without). A request without a hit is held."""
    hashes = tuple(range(500, 600))  # a 100-block (3,200-token) prompt
    params = dataclasses.replace(HOLD, predict_prefix=True)
    index = make_dispatch_policy("predictive", params)
    for s in (snap("a", waiting_tokens=2400), snap("b", waiting_tokens=4000)):
        index.upsert(s)
    prefix = getattr(index, "prefix_index", None)
    assert prefix is not None
    prefix.apply("a", epoch="e", seq=0, stored=list(hashes[:90]), removed=[])
    hit = RequestDemand("hit", num_prompt_tokens=3200, num_blocks=100, prefix_block_hashes=hashes)
    miss = RequestDemand("miss", num_prompt_tokens=3200, num_blocks=100, prefix_block_hashes=tuple(range(700, 800)))
    assert index.choose(hit) == "a"  # 2,400 queued + 320 uncached
    assert index.choose(miss) is None
