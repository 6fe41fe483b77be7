"""KunServe memory policy: drop trigger, restore condition and group plans keep their invariants."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.policy.memory import (
    GroupSnapshot,
    MemoryParams,
    MemorySnapshot,
    freed_blocks,
    group_kv_blocks,
    plan_drop,
    should_drop,
    should_restore,
    split_layers,
)

PARAMS = MemoryParams()
BLOCK = 8 << 20
WEIGHTS = 13_500_000_000


@st.composite
def snapshots(draw: st.DrawFn, index: int = 0) -> MemorySnapshot:
    total = draw(st.integers(1, 4000))
    free = draw(st.integers(0, total))
    return MemorySnapshot(
        instance_id=f"i{index}",
        num_layers=draw(st.sampled_from([4, 32, 80])),
        weight_bytes=WEIGHTS,
        kv_block_bytes=BLOCK,
        num_total_blocks=total,
        num_free_blocks=free,
        pending_blocks=draw(st.integers(0, 6000)),
        num_waiting=draw(st.integers(0, 50)),
        draining=draw(st.booleans()),
        grouped=draw(st.booleans()),
        compat_key=draw(st.sampled_from(["a", "b"])),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[MemorySnapshot]:
    n = draw(st.integers(1, 10))
    return [draw(snapshots(i)) for i in range(n)]


@given(snapshots())
def test_trigger_only_when_both_conditions_hold(snap: MemorySnapshot) -> None:
    expected = (
        not snap.draining
        and not snap.grouped
        and snap.memory_use >= PARAMS.drop_memory_use
        and snap.pending_blocks > 0
        and snap.pending_blocks >= snap.num_free_blocks
    )
    assert should_drop(snap, PARAMS) == expected


def test_full_pool_with_empty_queue_does_not_drop() -> None:
    snap = MemorySnapshot("i", 32, WEIGHTS, BLOCK, num_total_blocks=100, num_free_blocks=0, pending_blocks=0)
    assert not should_drop(snap, PARAMS)
    queue_fits = dataclasses.replace(snap, num_free_blocks=4, pending_blocks=3)
    assert not should_drop(queue_fits, PARAMS)
    overloaded = dataclasses.replace(snap, num_free_blocks=4, pending_blocks=40)
    assert should_drop(overloaded, PARAMS)


@given(clusters(), st.integers(2, 8))
def test_groups_hold_one_full_copy_of_compatible_live_instances(cluster: list[MemorySnapshot], max_g: int) -> None:
    params = dataclasses.replace(PARAMS, max_group_size=max_g)
    plan = plan_drop(cluster, params)
    by_id = {s.instance_id: s for s in cluster}
    seen: set[str] = set()
    for group in plan.groups:
        members = [by_id[m] for m in group.members]
        assert 2 <= group.size <= max_g
        assert not seen & set(group.members), "an instance joined two groups"
        seen |= set(group.members)
        assert all(not m.draining and not m.grouped for m in members)
        assert len({(m.compat_key, m.num_layers) for m in members}) == 1
        assert any(should_drop(m, params) for m in members), "a group formed with no overloaded member"
        # every layer is owned by exactly one member: one full copy of the model
        layers = members[0].num_layers
        owned = [layer for first, last in group.layer_ranges for layer in range(first, last)]
        assert sorted(owned) == list(range(layers))
        assert all(last > first for first, last in group.layer_ranges)
        assert group.pipeline_overhead <= params.max_pipeline_overhead


@given(clusters())
def test_no_voter_no_group(cluster: list[MemorySnapshot]) -> None:
    if not any(should_drop(s, PARAMS) for s in cluster):
        assert plan_drop(cluster, PARAMS).groups == ()


def test_group_size_grows_with_demand() -> None:
    def cluster(pending: int) -> list[MemorySnapshot]:
        hot = MemorySnapshot("hot", 32, WEIGHTS, BLOCK, 3000, 10, pending_blocks=pending)
        return [hot] + [MemorySnapshot(f"c{i}", 32, WEIGHTS, BLOCK, 3000, 2000) for i in range(4)]

    small = plan_drop(cluster(100), PARAMS).groups
    large = plan_drop(cluster(5000), PARAMS).groups
    assert small[0].size == 2
    assert large[0].size > 2
    assert large[0].freed_blocks >= freed_blocks(WEIGHTS, BLOCK, 3)


@given(
    total=st.integers(1, 10_000),
    used=st.integers(0, 10_000),
    waiting=st.integers(0, 5),
    previous=st.floats(0.0, 1.0),
    normal=st.integers(0, 10_000),
)
def test_restore_only_when_thresholds_hold(total: int, used: int, waiting: int, previous: float, normal: int) -> None:
    used = min(used, total)
    group = GroupSnapshot("g", total, total - used, waiting, normal)
    restore = should_restore(group, PARAMS, previous)
    if restore:
        assert waiting == 0
        assert group.memory_use <= PARAMS.restore_memory_use
        assert group.memory_use < previous
        assert used <= normal
    elif waiting == 0 and group.memory_use <= PARAMS.restore_memory_use and group.memory_use < previous:
        assert used > normal


@given(budget=st.integers(20 << 30, 80 << 30), g=st.integers(1, 8))
def test_group_pool_gains_the_dropped_weights(budget: int, g: int) -> None:
    alone = group_kv_blocks(budget, WEIGHTS, BLOCK, 1)
    pooled = group_kv_blocks(budget, WEIGHTS, BLOCK, g)
    assert pooled >= g * alone + freed_blocks(WEIGHTS, BLOCK, g)
    assert pooled <= g * alone + freed_blocks(WEIGHTS, BLOCK, g) + g


def test_split_layers_and_validation() -> None:
    assert split_layers(32, 2) == ((0, 16), (16, 32))
    assert split_layers(5, 3) == ((0, 1), (1, 3), (3, 5))
    with pytest.raises(ValueError):
        split_layers(2, 3)
    with pytest.raises(ValueError):
        MemoryParams(restore_memory_use=0.99).validate()
