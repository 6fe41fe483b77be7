"""Migration pairing: caps, disjoint roles, ordering, priorities, draining (unit + property tests)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.freeness import migration_freeness
from control.policy.migration import (
    REASON_DRAIN,
    REASON_PREEMPTION,
    REASON_PRIORITY,
    InFlightMigration,
    MigrationDecision,
    destination_room,
    plan_migrations,
)
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot

PARAMS = PolicyParams()


def inst(
    iid: str,
    free: int,
    reqs: list[tuple[int, int]] | None = None,  # (tokens, priority)
    *,
    total: int = 200,
    waiting: int = 0,
    head: int = 0,
    preempted: int = 0,
    draining: bool = False,
    model: str = "m",
) -> InstanceSnapshot:
    running = tuple(
        RunningSnapshot(f"{iid}/r{i}", num_tokens=t, num_blocks=-(-t // 32), priority=p)
        for i, (t, p) in enumerate(reqs or [])
    )
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=free,
        num_running=len(running),
        num_waiting=waiting,
        waiting_blocks=head * waiting,
        head_waiting_blocks=head,
        num_preempted=preempted,
        draining=draining,
        model=model,
        running=running,
    )


def test_pairs_lowest_source_with_highest_destination() -> None:
    snaps = [
        inst("s1", free=2, reqs=[(100, 0), (300, 0)]),  # F = 1
        inst("s2", free=4, reqs=[(100, 0), (50, 0)]),  # F = 2
        inst("d1", free=150, reqs=[(100, 0)]),  # F = 150
        inst("d2", free=100, reqs=[(100, 0)]),  # F = 100
        inst("mid", free=10, reqs=[(100, 0)]),  # F = 10: neither
    ]
    decisions = plan_migrations(snaps, [], PARAMS)
    assert [(d.source_id, d.destination_id) for d in decisions] == [("s1", "d1"), ("s2", "d2")]
    assert decisions[0].request_id == "s1/r0"  # shortest running request
    assert decisions[1].request_id == "s2/r1"


def test_pick_policies() -> None:
    snaps = [inst("s", free=1, reqs=[(200, 0), (64, 0), (500, 0)]), inst("d", free=190)]
    pick = {
        name: plan_migrations(snaps, [], dataclasses.replace(PARAMS, migration_pick=name))[0].request_id
        for name in ("shortest", "longest", "last_come", "first_come")
    }
    assert pick == {"shortest": "s/r1", "longest": "s/r2", "last_come": "s/r2", "first_come": "s/r0"}


def test_preempting_instance_is_a_source_and_never_a_destination() -> None:
    snaps = [inst("p", free=150, reqs=[(100, 0)], preempted=1), inst("d", free=190)]
    decisions = plan_migrations(snaps, [], PARAMS)
    assert [(d.source_id, d.destination_id, d.reason) for d in decisions] == [("p", "d", REASON_PREEMPTION)]
    snaps = [inst("s", free=1, reqs=[(100, 0)]), inst("p", free=150, reqs=[(100, 0)], preempted=2)]
    assert all(d.destination_id != "p" for d in plan_migrations(snaps, [], PARAMS))


def test_draining_moves_everything_and_is_never_a_destination() -> None:
    snaps = [
        inst("drain", free=190, reqs=[(100, 0)], draining=True),
        inst("d", free=190),
        inst("s", free=0, reqs=[(100, 0)]),
    ]
    assert migration_freeness(snaps[0]) == float("-inf")
    decisions = plan_migrations(snaps, [], PARAMS)
    assert decisions[0].source_id == "drain" and decisions[0].reason == REASON_DRAIN
    assert all(d.destination_id != "drain" for d in decisions)


def test_priority_isolation_moves_normal_requests_off_high_priority_hosts() -> None:
    # 200 blocks, cap 1600 tokens = 50 blocks -> headroom 150. Free 180 -> F = (180-150)/3 = 10 -> with a
    # threshold of 12 it is a source only because of its headroom; its raw freeness is 60.
    params = dataclasses.replace(PARAMS, migrate_threshold=12.0)
    snaps = [inst("hp", free=180, reqs=[(64, 1), (32, 0), (300, 0)]), inst("d", free=190)]
    decisions = plan_migrations(snaps, [], params)
    assert len(decisions) == 1
    assert decisions[0].reason == REASON_PRIORITY and decisions[0].request_id == "hp/r1"
    only_high = [inst("hp", free=180, reqs=[(64, 1), (64, 1)]), inst("d", free=190)]
    assert plan_migrations(only_high, [], params) == []  # nothing normal to move away
    assert plan_migrations(snaps, [], dataclasses.replace(params, priority_isolation=False)) == []


def test_low_priority_moves_before_high_priority() -> None:
    snaps = [inst("s", free=0, reqs=[(32, 1), (900, 0)]), inst("d", free=190)]
    assert plan_migrations(snaps, [], PARAMS)[0].request_id == "s/r1"


def test_request_must_fit_destination_and_models_must_match() -> None:
    snaps = [inst("s", free=0, reqs=[(3200, 0)], total=300), inst("d", free=50)]  # 100 blocks > 50
    assert plan_migrations(snaps, [], PARAMS) == []
    snaps = [inst("s", free=0, reqs=[(100, 0)]), inst("d", free=190, model="other")]
    assert plan_migrations(snaps, [], PARAMS) == []


def test_in_flight_caps() -> None:
    snaps = [inst("s1", free=0, reqs=[(100, 0)] * 3), inst("s2", free=0, reqs=[(100, 0)]), inst("d", free=190)]
    busy = [InFlightMigration("s1", "x", "s1/r0")]
    decisions = plan_migrations(snaps, busy, PARAMS)
    assert [d.source_id for d in decisions] == ["s2"]
    capped = dataclasses.replace(PARAMS, max_migrations_total=1)
    assert plan_migrations(snaps, busy, capped) == []
    assert plan_migrations(snaps, [], dataclasses.replace(PARAMS, migration_enabled=False)) == []


request_lists = st.lists(st.tuples(st.integers(1, 2000), st.integers(0, 1)), max_size=6)
instances = st.lists(
    st.builds(
        inst,
        iid=st.sampled_from([f"i{k}" for k in range(10)]),
        free=st.integers(0, 200),
        reqs=request_lists,
        waiting=st.integers(0, 3),
        head=st.integers(0, 20),
        preempted=st.integers(0, 1),
        draining=st.booleans(),
        model=st.sampled_from(["a", "b"]),
    ),
    max_size=12,
    unique_by=lambda s: s.instance_id,
)


@settings(max_examples=200, deadline=None)
@given(
    snaps=instances,
    in_flight_pairs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=4),
    per_instance=st.integers(1, 3),
    total=st.integers(0, 6),
    threshold=st.floats(0.0, 30.0),
    isolation=st.booleans(),
)
def test_invariants(
    snaps: list[InstanceSnapshot],
    in_flight_pairs: list[tuple[int, int]],
    per_instance: int,
    total: int,
    threshold: float,
    isolation: bool,
) -> None:
    params = dataclasses.replace(
        PARAMS,
        max_migrations_per_instance=per_instance,
        max_migrations_total=total,
        migrate_threshold=threshold,
        priority_isolation=isolation,
    )
    in_flight = [InFlightMigration(f"i{a}", f"i{b}", f"i{a}/r0") for a, b in in_flight_pairs if a != b]
    decisions = plan_migrations(snaps, in_flight, params)
    by_id = {s.instance_id: s for s in snaps}

    # caps: per instance (in flight + new) and cluster-wide
    load: dict[str, int] = {}
    pairs: list[InFlightMigration | MigrationDecision] = [*in_flight, *decisions]
    for m in pairs:
        load[m.source_id] = load.get(m.source_id, 0) + 1
        load[m.destination_id] = load.get(m.destination_id, 0) + 1
    new_ids = {d.source_id for d in decisions} | {d.destination_id for d in decisions}
    assert all(load[i] <= per_instance for i in new_ids)
    if total:
        assert len(in_flight) + len(decisions) <= max(total, len(in_flight))
    # roles are disjoint within the round; each instance at most once
    sources = [d.source_id for d in decisions]
    destinations = [d.destination_id for d in decisions]
    assert not set(sources) & set(destinations)
    assert len(set(sources)) == len(sources) and len(set(destinations)) == len(destinations)
    migrating = {m.request_id for m in in_flight}
    for d in decisions:
        src, dst = by_id[d.source_id], by_id[d.destination_id]
        assert not dst.draining and dst.num_preempted == 0
        assert d.destination_freeness > threshold
        assert src.draining or src.num_preempted > 0 or d.source_freeness < threshold
        assert src.model == dst.model and src.block_size == dst.block_size
        request = next(r for r in src.running if r.request_id == d.request_id)
        assert request.request_id not in migrating and request.decoding
        assert request.num_blocks < dst.num_free_blocks
        if d.reason == REASON_PRIORITY:
            assert request.priority == 0
        # low priority first: no lower-priority movable request was skipped unless it could not fit
        assert all(
            r.priority >= request.priority
            or r.num_blocks + 1 > destination_room(dst, params, high_priority=r.priority > 0)
            for r in src.running
            if r.request_id not in migrating
        )


@settings(max_examples=200, deadline=None)
@given(snap=instances.filter(bool).map(lambda s: s[0]), isolation=st.booleans())
def test_inlined_freeness_matches_freeness_module(snap: InstanceSnapshot, isolation: bool) -> None:
    from control.policy.freeness import priority_headroom_blocks
    from control.policy.migration import migration_rate

    params = dataclasses.replace(PARAMS, priority_isolation=isolation, watermark_blocks=3)
    headroom = priority_headroom_blocks(snap, params.high_priority_load_cap_tokens) if isolation else 0
    rated = migration_rate(snap, params)
    assert rated.freeness == migration_freeness(snap, watermark_blocks=3, headroom_blocks=headroom)
    assert rated.raw_freeness == migration_freeness(snap, watermark_blocks=3)


# -- the incremental planner and Drover's cost-aware rules ------------------------------------------------
from control.policy.migration import MigrationPlanner  # noqa: E402

COST = dataclasses.replace(
    PARAMS,
    migration_cost_aware=True,
    migration_budget_per_request=2,
    migration_cooldown_s=2.0,
    migration_pingpong_window_s=30.0,
)


@settings(max_examples=150, deadline=None)
@given(first=instances, second=instances)
def test_incremental_planner_equals_a_fresh_plan(first: list[InstanceSnapshot], second: list[InstanceSnapshot]) -> None:
    planner = MigrationPlanner(PARAMS)
    planner.sync(first)
    planner.sync(second)  # updates, removals and additions
    assert planner.plan([], now=0.0) == plan_migrations(second, [], PARAMS)


def test_cost_aware_moves_the_smallest_request_that_clears_the_deficit() -> None:
    # source: 3 requests, 2 free blocks, F < 3; moving the 5-block one gives (2+5)/2 = 3.5 >= 3; the 1-block
    # one (Llumnix's shortest) leaves it at 1.5, still a source
    src = inst("s", free=2, reqs=[(32, 0), (160, 0), (3200, 0)])
    dst = inst("d", free=190)
    assert plan_migrations([src, dst], [], PARAMS)[0].request_id == "s/r0"
    assert plan_migrations([src, dst], [], COST)[0].request_id == "s/r1"


def test_cost_aware_refuses_a_move_that_leaves_the_destination_more_pressed_than_the_source_was() -> None:
    src = inst("s", free=2, reqs=[(3200, 0), (3200, 0)])  # 100 blocks each, F = 1
    dst = inst("d", free=103, reqs=[(32, 0)] * 3, total=400)  # F = 34 before, (103 - 100 - 1) / 4 = 0.5 after
    assert plan_migrations([src, dst], [], PARAMS)  # Llumnix moves it
    assert plan_migrations([src, dst], [], COST) == []
    roomy = inst("d", free=160, reqs=[(32, 0)] * 3, total=400)  # (160 - 101) / 4 = 14.75 after: it pays
    assert plan_migrations([src, roomy], [], COST)


def test_preempting_source_is_exempt_from_budget_and_cooldown() -> None:
    planner = MigrationPlanner(COST)
    planner.sync([inst("a", free=0, reqs=[(320, 0), (320, 0)]), inst("b", free=190)])
    moved = planner.plan([], now=0.0)[0].request_id
    b2 = InstanceSnapshot("b", 200, 0, 1, 0, running=(RunningSnapshot(moved, 320, 10),), model="m")
    planner.sync([b2, inst("c", free=190)])
    assert planner.plan([], now=0.5) == []  # cooldown
    preempting = dataclasses.replace(b2, num_preempted=1)
    planner.sync([preempting, inst("c", free=190)])
    assert [d.request_id for d in planner.plan([], now=0.5)] == [moved]


def test_budget_cooldown_and_no_ping_pong() -> None:
    planner = MigrationPlanner(COST)
    a = inst("a", free=0, reqs=[(320, 0), (320, 0)])
    b = inst("b", free=190)
    planner.sync([a, b])
    first = planner.plan([], now=0.0)
    assert [(d.source_id, d.destination_id) for d in first] == [("a", "b")]
    moved = first[0].request_id
    # the request now sits on b, which is pressed; a has room again
    b2 = InstanceSnapshot("b", 200, 0, 1, 0, running=(RunningSnapshot(moved, 320, 10),), model="m")
    a2 = inst("a", free=190)
    planner.sync([a2, b2])
    assert planner.plan([], now=1.0) == []  # cooldown (2 s)
    assert planner.plan([], now=5.0) == []  # a is the instance it left 5 s ago: no ping-pong (30 s)
    c = inst("c", free=190)
    planner.sync([a2, b2, c])
    second = planner.plan([], now=5.0)
    assert [(d.request_id, d.destination_id) for d in second] == [(moved, "c")]
    c2 = InstanceSnapshot("c", 200, 0, 1, 0, running=(RunningSnapshot(moved, 320, 10),), model="m")
    d = inst("d", free=190)
    planner.sync([a2, c2, d])
    assert planner.plan([], now=60.0) == []  # budget of 2 moves spent


def test_draining_ignores_budget_and_cooldown_but_not_ping_pong() -> None:
    planner = MigrationPlanner(COST)
    a = inst("a", free=0, reqs=[(320, 0), (320, 0)])
    b = inst("b", free=190)
    planner.sync([a, b])
    moved = planner.plan([], now=0.0)[0].request_id
    b2 = InstanceSnapshot("b", 200, 180, 1, 0, running=(RunningSnapshot(moved, 320, 10),), draining=True, model="m")
    planner.sync([inst("a", free=190), b2])
    assert planner.plan([], now=0.5) == []  # the only destination is the instance it just left
    planner.sync([inst("a", free=190), b2, inst("c", free=190)])
    assert [d.destination_id for d in planner.plan([], now=0.5)] == ["c"]


def test_per_round_cap() -> None:
    snaps = [inst(f"s{k}", free=0, reqs=[(320, 0)] * 2) for k in range(5)] + [inst(f"d{k}", free=190) for k in range(5)]
    assert len(plan_migrations(snaps, [], PARAMS)) == 5
    assert len(plan_migrations(snaps, [], dataclasses.replace(PARAMS, max_migrations_per_round=2))) == 2


def test_budget_and_ping_pong_apply_to_llumnix_pairing_too() -> None:
    rules_only = dataclasses.replace(COST, migration_cost_aware=False)
    planner = MigrationPlanner(rules_only)
    planner.sync([inst("a", free=0, reqs=[(320, 0), (320, 0)]), inst("b", free=190)])
    moved = planner.plan([], now=0.0)[0].request_id
    b2 = InstanceSnapshot("b", 200, 0, 1, 0, running=(RunningSnapshot(moved, 320, 10),), model="m")
    planner.sync([b2, inst("a", free=190)])
    assert planner.plan([], now=5.0) == []  # back to the instance it left: ping-pong


def test_planner_memory_is_bounded_with_a_budget() -> None:
    planner = MigrationPlanner(COST)
    planner.sync([inst("a", free=0, reqs=[(320, 0), (320, 0)]), inst("b", free=190)])
    assert planner.plan([], now=0.0)
    planner.sync([inst("a", free=190), inst("b", free=190)])
    planner.plan([], now=100.0)
    assert len(planner._moves) == 1
    planner.sync([inst("a", free=0, reqs=[(320, 0), (320, 0)]), inst("b", free=190)])
    planner.plan([], now=1000.0)
    assert all(m.last_s == 1000.0 for m in planner._moves.values())


def test_migration_sources_rules() -> None:
    """``migration_sources``: which instances moves start from (a destination with room in each case)."""
    dst = inst("dst", free=180, reqs=[(32, 0)])
    queued = inst("queued", free=20, reqs=[(320, 0), (320, 0)], waiting=1, head=30)  # F < 3 by its queue head
    tight = inst("tight", free=1, reqs=[(320, 0), (320, 0)])  # 1 free block, 2 decodes: preemption imminent
    preempting = inst("preempting", free=40, reqs=[(320, 0)], preempted=1)
    draining = inst("draining", free=150, reqs=[(64, 0)], draining=True)

    def sources(rule: str) -> set[str]:
        params = PARAMS.with_updates(migration_sources=rule)
        found: set[str] = set()
        for src in (queued, tight, preempting, draining):
            found |= {d.source_id for d in plan_migrations([src, dst], [], params)}
        return found

    assert sources("freeness") == {"queued", "tight", "preempting", "draining"}
    assert sources("pressure") == {"tight", "preempting", "draining"}  # a queue head alone is no pressure
    assert sources("drain") == {"draining"}


def test_migration_sources_is_validated() -> None:
    with pytest.raises(ValueError, match="migration_sources"):
        PARAMS.with_updates(migration_sources="sometimes")
    assert PARAMS.with_updates(migration_sources="drain").migration_sources == "drain"
