"""Prefill/decode disaggregation decisions (control/policy/pd.py): intake phases and the decode choice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.pd import (
    ANY_PHASE,
    DECODE_SIDE,
    PREFILL_SIDE,
    HandoffCandidate,
    PdParams,
    disaggregates,
    handoff_candidates,
    intake_phases,
    parse_phase,
    phase_or_both,
    plan_handoffs,
    plan_split,
)
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot


def snap(
    iid: str, free: int, total: int = 100, running: int = 0, *, draining: bool = False, model: str = ""
) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=free,
        num_running=running,
        num_waiting=0,
        draining=draining,
        model=model,
    )


def test_modes_pick_intake_phases() -> None:
    assert intake_phases(PdParams(), 10_000) == ANY_PHASE
    assert intake_phases(PdParams(mode="disaggregated"), 3) == PREFILL_SIDE
    adaptive = PdParams(mode="adaptive", adaptive_min_prompt_tokens=512)
    assert intake_phases(adaptive, 511) == DECODE_SIDE
    assert intake_phases(adaptive, 512) == PREFILL_SIDE
    assert not disaggregates(PdParams(), 10_000)
    assert disaggregates(adaptive, 512) and not disaggregates(adaptive, 100)


def test_phase_parsing() -> None:
    assert parse_phase("decode") == "decode"
    with pytest.raises(ValueError, match="prefill, decode, both"):
        parse_phase("middle")
    assert phase_or_both("from-the-future") == "both"
    with pytest.raises(ValueError, match=r"pd\.mode"):
        PdParams(mode="sometimes").validate()  # type: ignore[arg-type]


def test_decode_choice_is_the_freest_that_fits() -> None:
    cand = HandoffCandidate("r1", "p0", num_blocks=10)
    decode = [snap("d0", free=30, running=3), snap("d1", free=80, running=3), snap("d2", free=11)]
    [h] = plan_handoffs([cand], decode, PdParams(mode="disaggregated"))
    assert (h.request_id, h.source_id, h.destination_id, h.num_blocks) == ("r1", "p0", "d1", 10)


def test_stays_when_no_decode_instance_has_room() -> None:
    params = PdParams(mode="disaggregated", decode_headroom_blocks=2)
    cand = HandoffCandidate("r1", "p0", num_blocks=10)
    assert plan_handoffs([cand], [snap("d0", free=11), snap("d1", free=90, draining=True)], params) == []
    assert plan_handoffs([cand], [], params) == []
    other_model = HandoffCandidate("r2", "p0", num_blocks=10, model="m")
    assert plan_handoffs([other_model], [snap("d0", free=90, model="other")], params) == []


def test_prefix_holder_wins_over_a_little_more_room() -> None:
    params = PdParams(mode="disaggregated", prefix_weight=1.0)
    cand = HandoffCandidate("r1", "p0", num_blocks=4, prefix_hashes=(1, 2, 3))
    decode = [snap("d0", free=50, running=1), snap("d1", free=52, running=1)]
    held = {"d0": 3}
    [h] = plan_handoffs([cand], decode, params, lambda iid, hashes: held.get(iid, 0))
    assert h.destination_id == "d0"
    [h] = plan_handoffs([cand], decode, params)  # no index: freeness only
    assert h.destination_id == "d1"


def test_a_round_counts_its_own_reservations() -> None:
    params = PdParams(mode="disaggregated", decode_headroom_blocks=0)
    cands = [HandoffCandidate(f"r{i}", "p0", num_blocks=10) for i in range(3)]
    out = plan_handoffs(cands, [snap("d0", free=25), snap("d1", free=12)], params)
    # d0 takes two (25 >= 10, then 15 >= 10), d1 one; nothing over-commits
    assert sorted(h.destination_id for h in out) == ["d0", "d0", "d1"]


def test_candidates_are_decoding_requests_on_prefill_instances() -> None:
    running = (
        RunningSnapshot("a", num_tokens=600, num_blocks=20, decoding=True),
        RunningSnapshot("b", num_tokens=600, num_blocks=20, decoding=False),  # still prefilling
        RunningSnapshot("c", num_tokens=40, num_blocks=2, decoding=True),  # short prompt (adaptive)
        RunningSnapshot("d", num_tokens=900, num_blocks=30, decoding=True),  # migrating already
    )
    report = InstanceSnapshot("p0", 100, 10, 4, 0, running=running)
    prompts = {"a": 599, "b": 600, "c": 39, "d": 899}
    adaptive = PdParams(mode="adaptive", adaptive_min_prompt_tokens=100)
    got = handoff_candidates(report, "prefill", adaptive, prompts, lambda rid: rid == "d")
    assert [c.request_id for c in got] == ["a"]
    assert handoff_candidates(report, "both", adaptive, prompts, lambda rid: False) == []
    assert handoff_candidates(report, "prefill", PdParams(), prompts, lambda rid: False) == []


@settings(max_examples=200, deadline=None)
@given(
    needs=st.lists(st.integers(0, 60), min_size=0, max_size=8),
    frees=st.lists(st.integers(0, 120), min_size=0, max_size=5),
    headroom=st.integers(0, 4),
)
def test_handoffs_never_overcommit_and_never_fail(needs: list[int], frees: list[int], headroom: int) -> None:
    """Every handoff fits in what its destination had left; a candidate left out had nowhere to go."""
    params = PdParams(mode="disaggregated", decode_headroom_blocks=headroom)
    cands = [HandoffCandidate(f"r{i}", "p0", n) for i, n in enumerate(needs)]
    decode = [snap(f"d{i}", free=f, total=200) for i, f in enumerate(frees)]
    out = plan_handoffs(cands, decode, params)
    assert len({h.request_id for h in out}) == len(out)
    left = {s.instance_id: s.num_free_blocks for s in decode}
    placed = {h.request_id: h for h in out}
    for c in cands:
        h = placed.get(c.request_id)
        if h is None:  # stays: no decode instance had room for it at its turn
            assert all(room < c.num_blocks + headroom for room in left.values())
            continue
        assert left[h.destination_id] >= c.num_blocks + headroom
        left[h.destination_id] -= c.num_blocks


def pressed(iid: str, used: int, waiting: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(iid, 200, 200 - used, 1, 1 if waiting else 0, waiting_blocks=waiting)


def test_split_moves_the_least_pressed_instance_toward_the_pressed_pool() -> None:
    params = PdParams(mode="disaggregated", rebalance_ratio=1.5, rebalance_min_pressure=0.05)
    fleet = [
        (pressed("p0", 50, waiting=80), "prefill"),  # a queue of prompts
        (pressed("p1", 60, waiting=60), "prefill"),
        (pressed("d0", 150, waiting=2), "decode"),  # much KV in use, hardly a queue: not short
        (pressed("d1", 10), "decode"),
        (pressed("d2", 30), "decode"),
    ]
    change = plan_split(fleet, params)  # type: ignore[arg-type]
    assert change is not None and (change.instance_id, change.phase) == ("d1", "prefill")
    assert "prefill pressure" in change.reason


def test_split_holds_within_the_hysteresis_and_keeps_one_of_each() -> None:
    params = PdParams(mode="disaggregated", rebalance_ratio=1.5, rebalance_min_pressure=0.05)
    even = [(pressed("p0", 50, 40), "prefill"), (pressed("d0", 40, 30), "decode"), (pressed("d1", 40, 30), "decode")]
    assert plan_split(even, params) is None  # type: ignore[arg-type]
    no_queue = [(pressed("p0", 20), "prefill"), (pressed("d0", 190), "decode"), (pressed("d1", 1), "decode")]
    assert plan_split(no_queue, params) is None  # type: ignore[arg-type]
    slight = [(pressed("p0", 20, 8), "prefill"), (pressed("d0", 1), "decode"), (pressed("d1", 1), "decode")]
    assert plan_split(slight, params) is None  # type: ignore[arg-type]  # 8/200 < 0.05
    lone = [(pressed("p0", 90, 90), "prefill"), (pressed("d0", 1), "decode")]
    assert plan_split(lone, params) is None  # type: ignore[arg-type]
    hot_decode = [(pressed("p0", 5), "prefill"), (pressed("p1", 1), "prefill"), (pressed("d0", 180, 60), "decode")]
    change = plan_split(hot_decode, params)  # type: ignore[arg-type]
    assert change is not None and (change.instance_id, change.phase) == ("p1", "decode")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100), st.sampled_from(["prefill", "decode", "both"]))))
def test_a_split_change_keeps_both_pools_and_goes_toward_pressure(
    fleet: list[tuple[int, int, str]],
) -> None:
    params = PdParams(mode="disaggregated")
    instances = [(pressed(f"i{k}", used, waiting), phase) for k, (used, waiting, phase) in enumerate(fleet)]
    change = plan_split(instances, params)  # type: ignore[arg-type]
    if change is None:
        return
    before = {s.instance_id: phase for s, phase in instances}
    assert before[change.instance_id] != change.phase and before[change.instance_id] in ("prefill", "decode")
    after = dict(before, **{change.instance_id: change.phase})
    assert "prefill" in after.values() and "decode" in after.values()


def test_pd_settings_section() -> None:
    from control.settings import Settings

    settings = Settings(pd={"mode": "adaptive", "adaptive_min_prompt_tokens": 512}, engine={"phase": "decode"})
    assert settings.pd.mode == "adaptive" and settings.pd.adaptive_min_prompt_tokens == 512
    assert settings.engine.phase == "decode" and Settings().pd == PdParams() and Settings().engine.phase == "both"
    with pytest.raises(ValueError, match="rebalance_ratio"):
        Settings(pd={"mode": "disaggregated", "rebalance_ratio": 0.5})
    with pytest.raises(ValueError):
        Settings(engine={"phase": "middle"})
