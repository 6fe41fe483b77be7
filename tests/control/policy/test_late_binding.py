"""Late binding in ``predictive`` dispatch (``predict_hold``): hold a request no instance can start now, one
reservation at a time (EASY backfilling), backfill elsewhere, expire a reservation nobody asks about."""

from __future__ import annotations

import dataclasses

import pytest

from control.policy.dispatch import RESERVATION_EXPIRY_DECISIONS, DispatchIndex, make_dispatch_policy
from control.policy.params import DispatchParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot

HOLD = DispatchParams(predict_hold=True, predict_growth_blocks=4)


def snap(iid: str, free: int, running: int = 0, *, total: int = 100) -> InstanceSnapshot:
    reqs = tuple(RunningSnapshot(f"{iid}-r{i}", num_tokens=64, num_blocks=2) for i in range(running))
    return InstanceSnapshot(
        instance_id=iid, num_total_blocks=total, num_free_blocks=free, num_running=running, num_waiting=0, running=reqs
    )


def demand(rid: str, blocks: int) -> RequestDemand:
    return RequestDemand(rid, num_prompt_tokens=blocks * 16, num_blocks=blocks)


def index_of(*snapshots: InstanceSnapshot, params: DispatchParams = HOLD) -> DispatchIndex:
    index = make_dispatch_policy("predictive", params)
    for s in snapshots:
        index.upsert(s)
    return index


def test_holds_a_request_no_instance_can_start_now() -> None:
    # room = free - growth reserve: a: 30 - 5 x 4 = 10, b: 20 - 2 x 4 = 12
    index = index_of(snap("a", 30, running=5), snap("b", 20, running=2))
    assert index.choose(demand("big", 20)) is None  # needs 20 + 4 blocks: nowhere now
    assert index.choose(demand("small", 4)) == "a"  # 4 + 4 fits; b is reserved for "big" (it has the most room)
    # without late binding the same request is queued somewhere at once
    assert index_of(snap("a", 30, running=5), snap("b", 20, running=2), params=DispatchParams()).choose(
        demand("big", 20)
    ) in ("a", "b")


def test_the_held_request_starts_on_its_reserved_instance_once_it_frees() -> None:
    index = index_of(snap("a", 30, running=5), snap("b", 20, running=2))
    assert index.choose(demand("big", 20)) is None  # reserves b (room 12, the most)
    index.upsert(snap("a", 60, running=1))  # a frees first and now has the most room...
    assert index.choose(demand("small", 2)) == "a"  # ...backfill may use it
    index.upsert(snap("b", 90, running=0))
    assert index.choose(demand("big", 20)) == "b"
    assert index.choose(demand("next", 2)) in ("a", "b")  # the reservation is gone


def test_backfill_never_takes_the_reserved_instance() -> None:
    index = index_of(snap("a", 20, running=2), snap("b", 14, running=1))  # rooms 12 and 10
    assert index.choose(demand("big", 40)) is None  # reserves a
    for k in range(5):
        assert index.choose(demand(f"s{k}", 2)) == "b"  # a fits 2 + 4 too, but it is kept for "big"
        index.on_dispatched("b", demand(f"s{k}", 2))


def test_only_one_request_is_held_at_a_time() -> None:
    index = index_of(snap("a", 20, running=2), snap("b", 14, running=1))
    assert index.choose(demand("big", 40)) is None
    # a second request that fits nowhere queues at the roomiest other instance instead of waiting in series
    assert index.choose(demand("big2", 40)) == "b"


def test_an_idle_instance_takes_a_request_the_reserve_would_keep_out() -> None:
    index = index_of(snap("a", 10, total=10))
    assert index.choose(demand("r", 9)) == "a"  # 9 + 4 > 10 blocks, but nothing runs there to make room


def test_a_reservation_nobody_asks_about_again_expires() -> None:
    index = index_of(snap("a", 20, running=2), snap("b", 14, running=1))
    assert index.choose(demand("gone", 40)) is None  # reserves a; then it is cancelled and never asked again
    for k in range(RESERVATION_EXPIRY_DECISIONS):
        assert index.choose(demand(f"s{k}", 2)) == "b"
    assert index.choose(demand("later", 2)) == "a"  # a is the better instance again


def test_without_late_binding_predictive_always_chooses() -> None:
    index = index_of(snap("a", 0, running=9), params=DispatchParams())
    assert index.choose(demand("r", 50)) == "a"


def test_prefill_blocks_count_the_chunks_a_running_prompt_still_allocates() -> None:
    """``predict_prefill_blocks``: a prompt admitted under chunked prefill holds only its computed chunks'
    blocks. Without the rule ``a`` shows room 56 and a 16-block request is queued in its engine, where it
    would wait until the prompt's later chunks (60 blocks) are in and something finishes; with it ``a``'s room
    is -4 and ``b``'s 16 (< 16 + 4), so the request is held in the cluster's queue for whichever frees first."""
    prefilling = RunningSnapshot("a-long", num_tokens=80 * 16, num_blocks=20, decoding=False)

    def instance_a(running: RunningSnapshot) -> InstanceSnapshot:
        return InstanceSnapshot(
            instance_id="a",
            num_total_blocks=100,
            num_free_blocks=60,
            num_running=1,
            num_waiting=0,
            block_size=16,
            running=(running,),
        )

    b = snap("b", 24, running=2)
    rule = DispatchParams(predict_hold=True, predict_growth_blocks=4, predict_prefill_blocks=True)
    assert index_of(instance_a(prefilling), b).choose(demand("r", 16)) == "a"
    assert index_of(instance_a(prefilling), b, params=rule).choose(demand("r", 16)) is None
    # a decoding request holds all its blocks already: nothing more is counted for it
    decoding = dataclasses.replace(prefilling, decoding=True)
    assert index_of(instance_a(decoding), b, params=rule).choose(demand("r", 16)) == "a"


def test_physical_hold_starts_what_fits_now_and_keeps_the_reserve_in_placement() -> None:
    # predict_hold_physical: the hold test is physical room (free, less queued) against the prompt's blocks;
    # the same 20-block request the growth reserve holds (test_holds_a_request_no_instance_can_start_now)
    # starts at once, on b: fewer decodes share its step there (the safe tier's key, reserve and all)
    physical = dataclasses.replace(HOLD, predict_hold_physical=True)
    index = index_of(snap("a", 30, running=5), snap("b", 20, running=2), params=physical)
    assert index.choose(demand("big", 20)) == "b"
    index.on_dispatched("b", demand("big", 20))
    assert index.choose(demand("big2", 25)) == "a"  # b has no physical room left; a has 30
    index.on_dispatched("a", demand("big2", 25))
    assert index.choose(demand("big3", 10)) is None  # 5 and 0 blocks left: held


def test_hold_growth_blocks_lets_a_small_prompt_start_among_many_small_decodes() -> None:
    # many hosted requests: the hold test's growth reserve (10 x 4 = 40 blocks) exceeds the 30 free blocks, so
    # a 4-block prompt is held although the instance has the room; with a 1-block reserve per hosted request
    # in the hold test (predict_hold_growth_blocks) it starts: 30 - 10 x 1 = 20 >= 4 + 1
    crowded = snap("a", 30, running=10)
    assert index_of(crowded).choose(demand("small", 4)) is None
    smaller = dataclasses.replace(HOLD, predict_hold_growth_blocks=1)
    assert index_of(crowded, params=smaller).choose(demand("small", 4)) == "a"
    assert index_of(crowded, params=smaller).choose(demand("big", 20)) is None  # 20 < 20 + 1: still held
    # -1 is the full reserve (predict_growth_blocks), as without the knob
    assert (
        index_of(crowded, params=dataclasses.replace(HOLD, predict_hold_growth_blocks=-1)).choose(demand("small", 4))
        is None
    )


def test_growth_share_bounds_the_reserve_by_the_free_room() -> None:
    # ten small decodes on a small pool: the hold reserve (10 x 4 = 40 blocks) leaves 50 - 40 = 10 blocks of
    # room, so a 15-block prompt (15 + 4) is held though the instance has 50 blocks free; bounded by half the
    # free room (predict_hold_growth_share 0.5) the reserve is 25 and the prompt starts: 50 - 25 = 25 >= 19
    crowded = snap("a", 50, running=10, total=96)
    assert index_of(crowded).choose(demand("r", 15)) is None
    bounded = dataclasses.replace(HOLD, predict_hold_growth_share=0.5)
    assert index_of(crowded, params=bounded).choose(demand("r", 15)) == "a"
    # the newcomer still leaves the hosted requests half the free room: 27 + 4 > 25, held
    assert index_of(crowded, params=bounded).choose(demand("big", 27)) is None


def test_growth_share_leaves_a_reserve_under_the_bound_as_it_is() -> None:
    # two decodes with 60 free blocks: the reserve (8) is under half the free room (30), so the bound changes
    # nothing: room 52, a 48-block prompt (48 + 4) starts and a 49-block one is held, with the bound or without
    roomy = snap("a", 60, running=2)
    bounded = dataclasses.replace(HOLD, predict_hold_growth_share=0.5)
    for params in (HOLD, bounded):
        assert index_of(roomy, params=params).choose(demand("fits", 48)) == "a"
        assert index_of(roomy, params=params).choose(demand("over", 49)) is None


def test_growth_share_follows_dispatches_until_the_next_report() -> None:
    # each dispatch takes its blocks from the free room, so the bound shrinks with it: 50 free, 10 hosted, half
    # the free room reserved; after a 15-block dispatch 35 are free, the reserve is 17.5 (under 11 x 4), room
    # 17.5: a second 15-block prompt (15 + 4) is held, a 13-block one (13 + 4) starts
    bounded = dataclasses.replace(HOLD, predict_hold_growth_share=0.5)
    index = index_of(snap("a", 50, running=10, total=96), params=bounded)
    assert index.choose(demand("r1", 15)) == "a"
    index.on_dispatched("a", demand("r1", 15))
    assert index.choose(demand("r2", 13)) == "a"
    index.on_dispatched("a", demand("r2", 13))
    # 22 free, 12 hosted: room 11 < 15 + 4, and a has requests running (no idle exception): held
    assert index.choose(demand("r3", 15)) is None


def test_growth_share_rejects_values_outside_zero_to_one() -> None:
    from control.policy.params import PolicyParams

    with pytest.raises(ValueError, match="predict_hold_growth_share"):
        PolicyParams().with_updates(predict_hold_growth_share="1.5")
    assert (
        PolicyParams().with_updates(predict_hold_growth_share="0.5").dispatch_params().predict_hold_growth_share == 0.5
    )
