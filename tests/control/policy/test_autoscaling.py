"""Autoscaling policies: local batch limit, global plan (bounds, drains, deadlines, hysteresis), Chiron dispatch,
Llumnix's threshold autoscaler (unit + property tests)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.autoscaling import (
    ROLES,
    AutoscaleParams,
    BatchGroup,
    ClusterView,
    FleetInstance,
    LocalObservation,
    LocalParams,
    LocalState,
    PerRole,
    QueuedBatch,
    RunningBatch,
    ScalingState,
    SloParams,
    ThresholdParams,
    average_freeness,
    batch_groups,
    batch_release,
    batch_spare,
    batch_victims,
    estimated_completions,
    interactive_demand,
    local_batch_limit,
    meets_interactive_slo,
    plan_scaling,
    required_batch_throughput,
    route_class,
    threshold_scaling,
    total,
)
from control.policy.snapshots import InstanceSnapshot

PARAMS = AutoscaleParams()
SLO_ITL = PARAMS.slo.itl_s


# ---------------------------------------------------------------------------------------------------------
# Local autoscaler
# ---------------------------------------------------------------------------------------------------------


def obs(
    *,
    limit: int = 64,
    running: int = 64,
    waiting: int = 10,
    itl: float = 0.05,
    tps: float = 1000.0,
    role: str = "interactive",
    used: int = 1000,
    total_blocks: int = 2560,
    preempted: int = 0,
) -> LocalObservation:
    return LocalObservation(role, limit, running, waiting, itl, tps, total_blocks, used, preempted)  # type: ignore[arg-type]


def test_local_shrinks_when_itl_breaks_the_slo() -> None:
    d = local_batch_limit(obs(itl=SLO_ITL * 1.3), LocalState(), PARAMS)
    assert d.batch_limit == math.floor(64 * PARAMS.local.shrink_factor)
    assert d.reason.startswith("shrink")
    assert d.backpressure >= 1.3  # ITL over the SLO is reported upward


def test_local_shrinks_relative_to_what_actually_runs() -> None:
    d = local_batch_limit(obs(limit=256, running=40, waiting=0, itl=SLO_ITL * 2), LocalState(), PARAMS)
    assert d.batch_limit == 30  # 0.75 x the 40 running, not 0.75 x 256


def test_local_grows_with_slack_when_the_limit_binds() -> None:
    d = local_batch_limit(obs(itl=SLO_ITL * 0.5), LocalState(), PARAMS)
    assert d.batch_limit == 64 + PARAMS.local.grow_step
    assert d.reason.startswith("grow")


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"itl": SLO_ITL * 0.9}, "band"),  # between grow_below and shrink_above
        ({"waiting": 0}, "does not bind"),
        ({"running": 30, "waiting": 5}, "KV memory binds"),
        ({"used": 2500}, "KV memory full"),
        ({"preempted": 2}, "KV memory full"),
    ],
)
def test_local_holds(kw: dict, why: str) -> None:
    d = local_batch_limit(obs(**kw), LocalState(), PARAMS)
    assert d.batch_limit == 64 and why in d.reason


def test_local_batch_role_ignores_itl() -> None:
    d = local_batch_limit(obs(role="batch", itl=SLO_ITL * 5), LocalState(), PARAMS)
    assert d.batch_limit > 64


def test_local_reverts_a_growth_that_did_not_raise_throughput_and_remembers_the_ceiling() -> None:
    first = local_batch_limit(obs(limit=64, tps=1000.0, itl=0.03), LocalState(), PARAMS)
    assert first.batch_limit == 72
    flat = local_batch_limit(obs(limit=72, running=72, tps=1010.0, itl=0.03), first.state, PARAMS)
    assert flat.batch_limit == 64 and flat.reason.startswith("plateau")
    again = local_batch_limit(obs(limit=64, tps=1000.0, itl=0.03), flat.state, PARAMS)
    assert again.batch_limit == 64 and "ceiling" in again.reason
    rising = local_batch_limit(obs(limit=72, running=72, tps=1200.0, itl=0.03), first.state, PARAMS)
    assert rising.batch_limit == 80  # throughput still rose: keep growing


def test_local_ceiling_expires() -> None:
    state = LocalState(prev_limit=64, ceiling=64, ceiling_age=PARAMS.local.ceiling_windows)
    d = local_batch_limit(obs(limit=64, itl=0.03), state, PARAMS)
    assert d.batch_limit == 72


def test_local_capacity_is_bounded_by_kv() -> None:
    # 20 running requests use 1,280 of 2,560 blocks: about 40 of their size fit
    d = local_batch_limit(obs(limit=64, running=20, waiting=0, used=1280), LocalState(), PARAMS)
    assert d.capacity == 40 and d.backpressure == pytest.approx(20 / 40)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(0, 400),
    running=st.integers(0, 400),
    waiting=st.integers(0, 400),
    itl=st.floats(0, 2.0),
    tps=st.floats(0, 1e5),
    used=st.integers(0, 3000),
    role=st.sampled_from(ROLES),
    prev=st.integers(0, 300),
    ceiling=st.integers(0, 300),
)
def test_local_stays_within_bounds(
    limit: int, running: int, waiting: int, itl: float, tps: float, used: int, role: str, prev: int, ceiling: int
) -> None:
    lp = PARAMS.local
    o = obs(limit=limit, running=running, waiting=waiting, itl=itl, tps=tps, used=min(used, 2560), role=role)
    d = local_batch_limit(o, LocalState(prev, tps * 0.9, True, ceiling, 0), PARAMS)
    assert lp.min_batch <= d.batch_limit <= lp.max_batch
    assert 1 <= d.capacity <= d.batch_limit
    assert d.backpressure >= 0
    if role != "batch" and itl > SLO_ITL * lp.shrink_above and not (prev and limit > prev):
        assert d.batch_limit <= max(lp.min_batch, min(limit or lp.initial_batch, lp.max_batch))


# ---------------------------------------------------------------------------------------------------------
# Global autoscaler
# ---------------------------------------------------------------------------------------------------------


def load(
    iid: str,
    role: str = "interactive",
    *,
    state: str = "active",
    inter: int = 0,
    batch: int = 0,
    cap: int = 32,
    bp: float | None = None,
    tps: float = 0.0,
    started: float = 0.0,
) -> FleetInstance:
    return FleetInstance(
        iid,
        role,  # type: ignore[arg-type]
        state,  # type: ignore[arg-type]
        batch_limit=cap,
        capacity=cap,
        num_interactive=inter,
        num_batch=batch,
        backpressure=(inter + batch) / cap if bp is None else bp,
        tokens_per_s=tps,
        started_at=started,
    )


def view(instances: list[FleetInstance], now: float = 100.0, **kw: object) -> ClusterView:
    return ClusterView(now=now, instances=tuple(instances), **kw)  # type: ignore[arg-type]


def watched(now: float = 100.0) -> ScalingState:
    """A state that has watched for longer than the scale-in window."""
    return ScalingState(first_at=now - 10 * PARAMS.scale_in_window_s)


def test_interactive_demand_scales_out() -> None:
    insts = [load(f"i{k}", inter=32) for k in range(2)]
    plan = plan_scaling(view(insts, interactive_rate=20.0, interactive_service_s=8.0), watched(), PARAMS)
    # demand max(64 in system, 20/s x 8 s = 160) over 32 slots x 0.8 -> 7 interactive-capable
    assert plan.estimate.interactive_demand == pytest.approx(160.0)
    assert plan.targets.interactive + plan.targets.mixed == 7
    assert plan.start.interactive + plan.start.mixed == 5 and not plan.drain
    assert "start" in plan.reason


def test_pending_interactive_requests_count_as_demand() -> None:
    plan = plan_scaling(view([load("i0", inter=32)], pending_interactive=64), watched(), PARAMS)
    assert plan.estimate.interactive_demand == 96
    assert total(plan.start) >= 3


def test_queued_backlog_is_spread_over_the_time_new_capacity_takes() -> None:
    insts = [load("i0", inter=100), load("i1", inter=100)]  # 200 in system, 150 of them queued
    v = view(insts, interactive_rate=10.0, interactive_service_s=6.6, queued_interactive=150)
    t = PARAMS.startup_s + PARAMS.period_s
    # running 50 < rate x S = 66; backlog 150 x 6.6 / 33 = 30
    assert interactive_demand(v, PARAMS) == pytest.approx(66.0 + 150 * 6.6 / t)
    no_s = view(insts, queued_interactive=150)
    assert interactive_demand(no_s, PARAMS) == pytest.approx(50 + 150)  # no slot time yet: one slot each


def test_starting_instances_count_as_capacity() -> None:
    insts = [load("i0", inter=30), *(load(f"s{k}", state="starting") for k in range(6))]
    plan = plan_scaling(view(insts, interactive_rate=20.0, interactive_service_s=8.0), watched(), PARAMS)
    assert total(plan.start) == 0 and not plan.drain
    # the 7 are all interactive; the group's split wants 2 mixed: relabel, do not start
    assert len(plan.convert) == 2 and {c.to_role for c in plan.convert} == {"mixed"}


def test_batch_deadlines_drive_scale_out() -> None:
    insts = [load("i0", inter=5)]
    tps = PARAMS.prior_instance_tokens_per_s
    soon = view(insts, batch=(BatchGroup(100.0 + 600.0, 1000, int(tps * 600 * 4)),))
    later = view(insts, batch=(BatchGroup(100.0 + 6000.0, 1000, int(tps * 600 * 4)),))
    none = view(insts)
    b_soon = plan_scaling(soon, watched(), PARAMS).start.batch
    b_later = plan_scaling(later, watched(), PARAMS).start.batch
    assert b_soon > b_later >= 1
    assert plan_scaling(none, watched(), PARAMS).start.batch == 0
    assert "deadline" in plan_scaling(soon, watched(), PARAMS).reason


def test_more_batch_work_needs_more_instances() -> None:
    small = view([load("i0")], batch=(BatchGroup(1300.0, 100, 2_000_000),))
    big = view([load("i0")], batch=(BatchGroup(1300.0, 100, 20_000_000),))
    assert plan_scaling(big, watched(), PARAMS).start.batch > plan_scaling(small, watched(), PARAMS).start.batch


def test_required_throughput_is_the_earliest_deadline_first_bound() -> None:
    p = dataclasses.replace(PARAMS, startup_s=0.0, deadline_margin_s=0.0, min_slack_s=1.0)
    groups = [BatchGroup(1000.0, 1, 500_000), BatchGroup(200.0, 1, 100_000)]
    # EDF: 100k due in 200 s (500/s), then 600k due in 1000 s (600/s)
    assert required_batch_throughput(groups, 0.0, p) == pytest.approx(600.0)
    assert estimated_completions(groups, 0.0, 600.0) == pytest.approx((100_000 / 600, 1000.0))
    overdue = [BatchGroup(-50.0, 1, 1_000)]
    assert required_batch_throughput(overdue, 0.0, p) == pytest.approx(1_000.0)  # min_slack_s, not infinity
    assert batch_groups([(5.0, 10), (1.0, 3), (5.0, 7)]) == (BatchGroup(1.0, 1, 3), BatchGroup(5.0, 2, 17))


def test_measured_throughput_replaces_the_prior() -> None:
    insts = [load("b0", "batch", batch=32, tps=2000.0), load("i0")]
    plan = plan_scaling(view(insts, batch=(BatchGroup(1300.0, 10, 10_000_000),)), watched(), PARAMS)
    assert plan.estimate.tokens_per_instance_s == pytest.approx(2000.0)
    assert plan.state.tokens_per_instance_s == pytest.approx(2000.0)
    idle = [load("b0", "batch", batch=1, tps=100.0), load("i0")]  # not saturated: measures offered load
    plan2 = plan_scaling(view(idle), plan.state, PARAMS)
    assert plan2.estimate.tokens_per_instance_s == pytest.approx(2000.0)


def test_scale_in_waits_for_the_window_then_drains_least_loaded() -> None:
    insts = [load(f"i{k}", inter=k, started=float(k)) for k in range(6)]
    v = view(insts, now=0.0, interactive_rate=1.0, interactive_service_s=5.0)
    state = ScalingState()
    drained_at = None
    for step in range(12):
        now = step * PARAMS.period_s
        plan = plan_scaling(dataclasses.replace(v, now=now), state, PARAMS)
        state = plan.state
        if plan.drain:
            drained_at = now
            assert plan.drain[0] == "i0"  # fewest requests
            assert len(insts) - len(plan.drain) >= PARAMS.min_instances.interactive
            break
    assert drained_at is not None and drained_at >= PARAMS.scale_in_window_s


def test_scale_in_keeps_the_peak_of_the_window() -> None:
    p = dataclasses.replace(PARAMS, mixed_share=0.0, scale_in_cooldown_s=0.0)
    insts = [load(f"i{k}", inter=10) for k in range(8)]
    state = watched(0.0)
    high = plan_scaling(view(insts, now=0.0, interactive_rate=20.0, interactive_service_s=8.0), state, p)
    assert not high.acts  # 160 slots: 7 needed at 80 %, 9 at 60 %: 8 sits in the band
    low = plan_scaling(view(insts, now=10.0, interactive_rate=1.0, interactive_service_s=8.0), high.state, p)
    assert not low.drain and "needed 9" in low.reason
    later = plan_scaling(view(insts, now=70.0, interactive_rate=1.0, interactive_service_s=8.0), low.state, p)
    assert later.drain  # the peak left the window


def test_no_scale_in_while_a_drain_is_in_progress() -> None:
    insts = [load(f"i{k}") for k in range(6)] + [load("d0", state="draining")]
    plan = plan_scaling(view(insts), watched(), PARAMS)
    assert not plan.drain and "drain is in progress" in plan.reason
    assert all(c.to_role != "batch" for c in plan.convert)  # relabels inside the group lose no capacity


def test_shrinking_role_gives_instances_to_growing_role() -> None:
    insts = [load(f"i{k}", started=float(k)) for k in range(5)]
    v = view(insts, batch=(BatchGroup(900.0, 100, 20_000_000),))
    plan = plan_scaling(v, watched(), PARAMS)
    assert plan.convert and all(c.from_role == "interactive" and c.to_role == "batch" for c in plan.convert)
    assert plan.start.batch + len(plan.convert) >= 1
    moved = {c.instance_id for c in plan.convert}
    assert not moved & set(plan.drain)


def test_plan_is_deterministic() -> None:
    insts = [load(f"i{k}", inter=3 * k) for k in range(5)] + [load("b0", "batch", batch=20, tps=3000.0)]
    v = view(insts, interactive_rate=7.0, interactive_service_s=6.0, batch=(BatchGroup(2000.0, 50, 9_000_000),))
    assert plan_scaling(v, watched(), PARAMS) == plan_scaling(v, watched(), PARAMS)


roles = st.sampled_from(ROLES)
states = st.sampled_from(("starting", "active", "active", "active", "draining"))


@st.composite
def scenario(draw: st.DrawFn) -> tuple[ClusterView, ScalingState, AutoscaleParams]:
    mins = PerRole(draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    maxs = PerRole(*(m + draw(st.integers(0, 8)) for m in mins.values()))
    params = dataclasses.replace(
        PARAMS,
        min_instances=mins,
        max_instances=maxs,
        max_total=total(mins) + draw(st.integers(0, 12)),
        scale_in_cooldown_s=draw(st.sampled_from((0.0, 60.0))),
    )
    n = draw(st.integers(0, 14))
    instances = [
        load(
            f"x{k}",
            draw(roles),
            state=draw(states),
            inter=draw(st.integers(0, 60)),
            batch=draw(st.integers(0, 60)),
            cap=draw(st.integers(1, 64)),
            tps=draw(st.floats(0, 8000)),
            started=float(draw(st.integers(0, 500))),
        )
        for k in range(n)
    ]
    groups = tuple(
        BatchGroup(float(draw(st.integers(0, 4000))), 1, draw(st.integers(0, 50_000_000)))
        for _ in range(draw(st.integers(0, 3)))
    )
    v = view(
        instances,
        now=float(draw(st.integers(0, 3000))),
        interactive_rate=draw(st.floats(0, 200)),
        interactive_service_s=draw(st.floats(0, 30)),
        pending_interactive=draw(st.integers(0, 100)),
        batch=groups,
    )
    state = ScalingState(
        last_scale_out=PerRole(*(float(draw(st.integers(-100, 3000))) for _ in ROLES)),
        last_scale_in=PerRole(*(float(draw(st.integers(-100, 3000))) for _ in ROLES)),
        first_at=float(draw(st.integers(-1000, 3000))),
    )
    return v, state, params


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_plan_never_leaves_bounds_nor_scales_in_a_draining_role(case: tuple) -> None:
    v, state, params = case
    plan = plan_scaling(v, state, params)
    live = {r: [i for i in v.instances if i.role == r and i.state != "draining"] for r in ROLES}
    draining = {i.role for i in v.instances if i.state == "draining"}
    by_id = {i.instance_id: i for i in v.instances}
    for iid in plan.drain:
        assert by_id[iid].state != "draining"
    moved = [c.instance_id for c in plan.convert]
    assert len(set(plan.drain) | set(moved)) == len(plan.drain) + len(moved)
    after = {}
    for r in ROLES:
        gone = sum(1 for iid in plan.drain if by_id[iid].role == r) + sum(1 for c in plan.convert if c.from_role == r)
        came = plan.start[r] + sum(1 for c in plan.convert if c.to_role == r)
        after[r] = len(live[r]) - gone + came
        # never push a role below its minimum or above its maximum
        assert after[r] >= min(len(live[r]), params.min_instances[r])
        assert after[r] <= max(len(live[r]), params.max_instances[r])
        assert params.min_instances[r] <= plan.targets[r] <= params.max_instances[r]
    for group in (("interactive", "mixed"), ("batch",)):
        have = sum(len(live[r]) for r in group)
        if draining & set(group):  # no scale-in of a group while one of its instances drains (max aside)
            assert sum(after[r] for r in group) >= min(have, sum(params.max_instances[r] for r in group))
    assert total(plan.start) == 0 or sum(after.values()) <= params.max_total
    assert sum(plan.targets.values()) <= params.max_total


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_plan_is_a_pure_function(case: tuple) -> None:
    v, state, params = case
    assert plan_scaling(v, state, params) == plan_scaling(v, state, params)


def test_params_validate() -> None:
    PARAMS.validate()
    with pytest.raises(ValueError, match="min_instances"):
        dataclasses.replace(PARAMS, min_instances=PerRole(5, 0, 0), max_instances=PerRole(2, 64, 64)).validate()
    with pytest.raises(ValueError, match="occupancy"):
        dataclasses.replace(PARAMS, scale_in_occupancy=0.9).validate()
    with pytest.raises(ValueError, match="batch limits"):
        dataclasses.replace(PARAMS, local=LocalParams(min_batch=10, initial_batch=5)).validate()


def test_meets_interactive_slo() -> None:
    slo = SloParams(ttft_s=1.0, itl_s=0.1)
    assert meets_interactive_slo(0.5, 0.05, slo) and meets_interactive_slo(1.0, None, slo)
    assert not meets_interactive_slo(1.5, 0.05, slo) and not meets_interactive_slo(0.5, 0.2, slo)


# ---------------------------------------------------------------------------------------------------------
# Class-aware dispatch
# ---------------------------------------------------------------------------------------------------------


def test_interactive_goes_to_its_own_role_first() -> None:
    insts = [load("i0", inter=30), load("i1", inter=10), load("m0", "mixed")]
    r = route_class("interactive", insts, PARAMS)
    assert r.instance_id == "i1" and not r.overflow and r.preempt_batch == 0


def test_interactive_overflows_to_mixed_and_evicts_batch_there() -> None:
    insts = [load("i0", inter=32), load("m0", "mixed", inter=4, batch=28), load("m1", "mixed", inter=10, batch=22)]
    r = route_class("interactive", insts, PARAMS)
    assert r.overflow and r.instance_id == "m0" and r.preempt_batch == 1
    roomy = [load("i0", inter=32), load("m0", "mixed", inter=4, batch=28), load("m1", "mixed", inter=10)]
    r2 = route_class("interactive", roomy, PARAMS)
    assert r2.instance_id == "m1" and r2.preempt_batch == 0  # a free slot beats an eviction


def test_interactive_queues_when_everything_is_full() -> None:
    insts = [load("i0", inter=40), load("m0", "mixed", inter=33), load("s0", state="starting")]
    r = route_class("interactive", insts, PARAMS)
    assert r.instance_id == "m0" and r.overflow and "queue" in r.reason
    assert route_class("interactive", [load("s0", state="starting")], PARAMS).instance_id is None


def test_interactive_uses_batch_instances_only_without_interactive_capable_ones() -> None:
    insts = [load("b0", "batch", batch=32)]
    r = route_class("interactive", insts, PARAMS)
    assert r.instance_id == "b0" and r.preempt_batch == 1
    both = [load("b0", "batch"), load("i0", inter=40)]
    assert route_class("interactive", both, PARAMS).instance_id == "i0"


def test_batch_waits_in_the_global_queue() -> None:
    r = route_class("batch", [load("b0", "batch")], PARAMS)
    assert r.instance_id is None and "queue" in r.reason


def test_batch_release_fills_batch_instances_first_and_respects_spare() -> None:
    insts = [
        load("b0", "batch", batch=30),  # 2 spare
        load("m0", "mixed", inter=10, batch=10),  # 32 - ceil(3.2) - 20 = 8 spare
        load("i0"),  # never
        load("b1", "batch", state="draining"),  # never
    ]
    assert [batch_spare(i, PARAMS) for i in insts] == [2, 8, 0, 0]
    queue = [QueuedBatch(f"q{k}", 100.0 + k) for k in range(20)]
    out = batch_release(queue, insts, PARAMS)
    assert [a.instance_id for a in out] == ["b0", "b0"] + ["m0"] * 8
    assert [a.request_id for a in out] == [f"q{k}" for k in range(10)]


def test_batch_victims_least_progress_first() -> None:
    running = [RunningBatch("a", 50, 1.0), RunningBatch("b", 5, 2.0), RunningBatch("c", 5, 3.0)]
    assert batch_victims(running, 2) == ("c", "b")
    assert batch_victims(running, 0) == ()


# ---------------------------------------------------------------------------------------------------------
# Llumnix threshold autoscaler
# ---------------------------------------------------------------------------------------------------------


def snap(iid: str, free: int, running: int, waiting: int = 0, wblocks: int = 0, *, draining: bool = False):
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=1000,
        num_free_blocks=free,
        num_running=running,
        num_waiting=waiting,
        waiting_blocks=wblocks,
        draining=draining,
    )


def test_average_freeness_is_the_cluster_as_one_instance() -> None:
    snaps = [snap("a", 100, 10), snap("b", 500, 5, waiting=5, wblocks=100)]
    assert average_freeness(snaps) == pytest.approx((600 - 100) / 20)
    assert average_freeness([snap("a", 1000, 0)]) == math.inf
    # without b: its 500 used blocks land on a (free clamps at 0, as Llumnix), all 20 requests stay
    assert average_freeness(snaps, without=snaps[1]) == pytest.approx((0 - 100) * 20)


def test_threshold_scales_out_until_freeness_reaches_ten() -> None:
    snaps = [snap("a", 50, 20), snap("b", 50, 20)]  # F = 100 / 40 = 2.5
    d = threshold_scaling(snaps, starting=0, params=ThresholdParams())
    assert d.add >= 1 and not d.drain
    after = average_freeness(snaps, extra_instances=d.add, blocks_per_extra=1000)
    before = average_freeness(snaps, extra_instances=d.add - 1, blocks_per_extra=1000)
    assert after >= 10 > before


def test_threshold_scales_in_one_when_freeness_without_it_exceeds_sixty() -> None:
    snaps = [snap("a", 900, 2), snap("b", 990, 1), snap("c", 950, 1)]
    d = threshold_scaling(snaps, starting=0, params=ThresholdParams())
    assert d.drain == ("b",) and d.add == 0


def test_threshold_waits_for_starting_instances_and_drains() -> None:
    hot = [snap("a", 10, 50)]
    assert threshold_scaling(hot, starting=1, params=ThresholdParams()).add == 0
    idle = [snap("a", 1000, 0), snap("b", 1000, 0), snap("c", 1000, 0, draining=True)]
    assert threshold_scaling(idle, starting=0, params=ThresholdParams()).drain == ()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 80), st.integers(0, 20)), min_size=0, max_size=20),
    st.integers(1, 5),
    st.integers(5, 30),
)
def test_threshold_respects_min_and_max(rows: list, lo: int, span: int) -> None:
    params = ThresholdParams(min_instances=lo, max_instances=lo + span)
    snaps = [snap(f"s{k}", f, r, w, w * 30) for k, (f, r, w) in enumerate(rows)]
    d = threshold_scaling(snaps, starting=0, params=params)
    n = len(snaps)
    assert n + d.add - len(d.drain) >= min(n, lo)
    assert d.add == 0 or n + d.add <= max(n, lo + span)
    assert len(d.drain) <= 1
