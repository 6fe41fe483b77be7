"""Prefix-aware ``predictive`` dispatch (``predict_prefix``, ``drover``'s setting): a holder of the prompt's
prefix wins when its predicted time to first token (work ahead + uncached prompt tokens) is the soonest;
without prefix reports the decisions are exactly those of plain late binding."""

from __future__ import annotations

import random

from control.policy.dispatch import PredictiveIndex, make_dispatch_policy, reads_engine_block_hashes
from control.policy.params import DispatchParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot

BS = 16
PREFIX = DispatchParams(predict_hold=True, predict_prefix=True)
HASHES = tuple(range(1000, 1040))  # a 40-block prompt


def snap(iid: str, free: int, *, waiting_blocks: int = 0, running: int = 0, total: int = 400) -> InstanceSnapshot:
    reqs = tuple(RunningSnapshot(f"{iid}-r{i}", num_tokens=64, num_blocks=4) for i in range(running))
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=free,
        num_running=running,
        num_waiting=1 if waiting_blocks else 0,
        waiting_blocks=waiting_blocks,
        block_size=BS,
        running=reqs,
    )


def demand(rid: str, hashes: tuple[int, ...] = HASHES) -> RequestDemand:
    return RequestDemand(rid, num_prompt_tokens=len(HASHES) * BS, num_blocks=len(HASHES), prefix_block_hashes=hashes)


def index_of(*snapshots: InstanceSnapshot, params: DispatchParams = PREFIX) -> PredictiveIndex:
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex)
    for s in snapshots:
        index.upsert(s)
    return index


def cache(index: PredictiveIndex, iid: str, blocks: int) -> None:
    assert index.prefix_index is not None
    index.prefix_index.apply(iid, epoch="e", seq=0, stored=list(HASHES[:blocks]), removed=[])


def test_drover_is_prefix_aware_and_other_policies_keep_no_index() -> None:
    drover = user_policy_params("drover")
    assert drover.predict_prefix
    assert reads_engine_block_hashes(drover.dispatch_params(), drover.dispatch_policy)
    assert not reads_engine_block_hashes(DispatchParams(), "predictive")
    assert not reads_engine_block_hashes(PREFIX, "least_loaded")
    assert make_dispatch_policy("predictive", DispatchParams()).prefix_index is None  # type: ignore[attr-defined]


def test_a_holder_with_some_work_ahead_beats_an_idle_instance_that_must_prefill_it_all() -> None:
    # a: 10 blocks queued (160 tokens ahead), holds 30 of the 40 blocks -> 160 + 160 = 320 tokens to the first
    # token; b: idle, 0 ahead + 640 tokens of prompt
    index = index_of(snap("a", 300, waiting_blocks=10), snap("b", 400))
    assert index.choose(demand("r")) == "b"  # nothing cached yet: the load-only choice
    cache(index, "a", 30)
    assert index.choose(demand("r")) == "a"


def test_the_hit_must_outweigh_the_work_ahead() -> None:
    # a holds 10 blocks (160 tokens saved) but has 40 blocks (640 tokens) queued: b is sooner
    index = index_of(snap("a", 300, waiting_blocks=40), snap("b", 400))
    cache(index, "a", 10)
    assert index.choose(demand("r")) == "b"


def test_a_holder_under_memory_pressure_or_without_room_is_passed_over() -> None:
    pressed = index_of(snap("a", 20), snap("b", 400))  # a: 95 % used, outside the safe tier
    cache(pressed, "a", 40)
    assert pressed.choose(demand("r")) == "b"
    draining = index_of(
        InstanceSnapshot("a", 400, 400, 0, 0, draining=True, block_size=BS), snap("b", 300, waiting_blocks=10)
    )
    cache(draining, "a", 40)
    assert draining.choose(demand("r")) == "b"


def test_a_hit_counts_only_its_uncached_blocks_as_pending() -> None:
    index = index_of(snap("a", 300, waiting_blocks=10), snap("b", 400))
    cache(index, "a", 30)
    assert index.choose(demand("r")) == "a"
    index.on_dispatched("a", demand("r"))
    assert index.pending("a") == (1, 10)  # 40 prompt blocks, 30 cached
    index.on_dispatched("b", demand("r2"))  # not the last choice: looked up (b holds none)
    assert index.pending("b") == (1, 40)


def test_without_prefix_reports_the_decisions_equal_plain_late_binding() -> None:
    """A randomized run: prompts with hashes but an index nobody feeds (Azure, generated workloads, engines
    without prefix caching) must give exactly the decisions of ``predict_prefix`` off."""
    rng = random.Random(7)
    plain = make_dispatch_policy("predictive", DispatchParams(predict_hold=True))
    aware = make_dispatch_policy("predictive", PREFIX)
    for step in range(3000):
        if step % 3 == 0:
            iid = f"i{rng.randrange(12)}"
            total = 400
            free = rng.randrange(0, total + 1)
            s = snap(iid, free, waiting_blocks=rng.randrange(0, 60), running=rng.randrange(0, 8), total=total)
            plain.upsert(s)
            aware.upsert(s)
        blocks = rng.randrange(1, 80)
        d = RequestDemand(
            f"r{step % 50}",
            num_prompt_tokens=blocks * BS,
            num_blocks=blocks,
            prefix_block_hashes=tuple(rng.randrange(10**6) for _ in range(blocks)),
        )
        a, b = plain.choose(d), aware.choose(d)
        assert a == b
        if a is not None:
            plain.on_dispatched(a, d)
            aware.on_dispatched(a, d)


IDLE_FIRST = DispatchParams(predict_hold=True, predict_prefix=True, predict_prefix_idle_first=True)


def test_while_an_instance_is_idle_a_busy_holder_must_cache_the_whole_prompt() -> None:
    """``predict_prefix_idle_first`` (``drover``): the uncached rest of the prompt would be prefilled in steps
    shared with the holder's decodes; an idle instance stalls nobody (Mooncake at light load: p99 TPOT)."""
    assert user_policy_params("drover").predict_prefix_idle_first
    # a: one request decoding (16 tokens ahead), holds 30 of the 40 blocks: 16 + 160 tokens to the first token
    # against 640 on the idle b, so time to first token alone picks a
    for params, expected in ((PREFIX, "a"), (IDLE_FIRST, "b")):
        index = index_of(snap("a", 300, running=1), snap("b", 400), params=params)
        cache(index, "a", 30)
        assert index.choose(demand("r")) == expected
    index = index_of(snap("a", 300, running=1), snap("b", 400), params=IDLE_FIRST)
    cache(index, "a", 40)  # the whole prompt cached: nothing to prefill there, nothing stalls
    assert index.choose(demand("r")) == "a"
    index = index_of(snap("a", 300, running=1), snap("b", 380, running=1), params=IDLE_FIRST)
    cache(index, "a", 30)  # nobody idle: the hit's saved prefill is worth its stall, as before
    assert index.choose(demand("r")) == "a"
