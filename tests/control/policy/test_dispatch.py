"""Dispatch policies: eligibility invariants (property tests) and each policy's ordering."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.dispatch import (
    POLICY_NAMES,
    FreenessIndex,
    PrefixAffinityIndex,
    _IndexBase,
    make_dispatch_policy,
    prefix_block_hashes,
)
from control.policy.freeness import dispatch_freeness, migration_freeness, priority_headroom_blocks
from control.policy.params import DispatchParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot


def snap(
    iid: str,
    free: int,
    running: int = 0,
    waiting: int = 0,
    *,
    total: int = 100,
    waiting_blocks: int = 0,
    draining: bool = False,
    model: str = "m",
    high: int = 0,
) -> InstanceSnapshot:
    reqs = tuple(
        RunningSnapshot(f"{iid}-r{i}", num_tokens=32, num_blocks=1, priority=1 if i < high else 0)
        for i in range(running)
    )
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=free,
        num_running=running,
        num_waiting=waiting,
        waiting_blocks=waiting_blocks,
        head_waiting_blocks=waiting_blocks // waiting if waiting else 0,
        draining=draining,
        model=model,
        running=reqs,
    )


def demand(rid: str = "r", blocks: int = 2, model: str = "", priority: int = 0) -> RequestDemand:
    return RequestDemand(rid, num_prompt_tokens=blocks * 32, num_blocks=blocks, model=model, priority=priority)


snapshots_strategy = st.lists(
    st.builds(
        snap,
        iid=st.sampled_from([f"i{k}" for k in range(12)]),
        free=st.integers(0, 100),
        running=st.integers(0, 8),
        waiting=st.integers(0, 4),
        waiting_blocks=st.integers(0, 40),
        draining=st.booleans(),
        model=st.sampled_from(["a", "b"]),
        high=st.integers(0, 2),
    ),
    max_size=20,
)
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["choose", "remove", "dispatch"]),
        st.sampled_from(["", "a", "b", "c"]),
        st.integers(0, 1),
        st.integers(0, 11),
    ),
    max_size=30,
)


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=80, deadline=None)
@given(snapshots=snapshots_strategy, ops=ops_strategy)
def test_never_picks_draining_or_wrong_model(
    name: str, snapshots: list[InstanceSnapshot], ops: list[tuple[str, str, int, int]]
) -> None:
    index = make_dispatch_policy(name)
    live: dict[str, InstanceSnapshot] = {}
    for s in snapshots:
        index.upsert(s)
        live[s.instance_id] = s
    for op, model, priority, k in ops:
        iid = f"i{k}"
        if op == "remove":
            index.remove(iid)
            live.pop(iid, None)
            continue
        d = demand(model=model, priority=priority, rid=f"{op}{k}")
        chosen = index.choose(d)
        eligible = {i for i, s in live.items() if not s.draining and (model == "" or s.model == model)}
        if chosen is None:
            assert not eligible
        else:
            assert chosen in eligible
            if op == "dispatch":
                index.on_dispatched(chosen, d)


def test_freeness_picks_highest_and_empty_is_infinite() -> None:
    index = make_dispatch_policy("freeness")
    index.upsert(snap("busy", free=10, running=5))  # F = 2
    index.upsert(snap("light", free=60, running=2))  # F = 30
    assert index.choose(demand()) == "light"
    index.upsert(snap("empty", free=5, running=0))  # F = +inf even with few free blocks
    assert index.choose(demand()) == "empty"


def test_on_dispatched_counts_virtual_usage_until_next_upsert() -> None:
    index = make_dispatch_policy("freeness")
    index.upsert(snap("a", free=50, running=1))  # F = 50
    index.upsert(snap("b", free=40, running=1))  # F = 40
    assert index.choose(demand(blocks=20)) == "a"
    index.on_dispatched("a", demand(blocks=20))  # a: (50-20)/2 = 15
    assert index.choose(demand(blocks=20)) == "b"
    index.upsert(snap("a", free=50, running=1))  # heartbeat replaces the bump
    assert index.choose(demand(blocks=20)) == "a"


def test_least_loaded_uses_physical_usage_not_batch_size() -> None:
    index = make_dispatch_policy("least_loaded")
    index.upsert(snap("many_small", free=80, running=10))  # usage 0.2, freeness 8
    index.upsert(snap("few_big", free=70, running=1))  # usage 0.3, freeness 70
    assert index.choose(demand()) == "many_small"
    assert make_dispatch_policy("freeness").name == "freeness"
    fi = make_dispatch_policy("freeness")
    fi.upsert(snap("many_small", free=80, running=10))
    fi.upsert(snap("few_big", free=70, running=1))
    assert fi.choose(demand()) == "few_big"


def test_queue_size_picks_fewest_waiting_blind_to_memory() -> None:
    """Llumnix's queue-size balancer: fewest waiting requests, whatever the memory; ties to the first id;
    dispatches count as waiting until the next snapshot."""
    index = make_dispatch_policy("queue_size")
    index.upsert(snap("a", free=5, running=9, waiting=1))  # nearly full memory, one waiting
    index.upsert(snap("b", free=90, running=1, waiting=3))
    index.upsert(snap("c", free=1, running=12, waiting=1))
    assert index.choose(demand()) == "a"
    index.on_dispatched("a", demand())
    assert index.choose(demand()) == "c"
    index.on_dispatched("c", demand())
    index.on_dispatched("a", demand())
    assert index.choose(demand()) == "c"  # a: 3 waiting, b: 3, c: 2
    index.upsert(snap("b", free=90, running=1, waiting=0))
    assert index.choose(demand()) == "b"


def test_round_robin_cycles_and_skips_draining() -> None:
    index = make_dispatch_policy("round_robin")
    for iid in ("a", "b", "c"):
        index.upsert(snap(iid, free=10))
    index.upsert(snap("b", free=10, draining=True))
    picks = [index.choose(demand()) for _ in range(4)]
    assert picks == ["a", "c", "a", "c"]


def test_model_filter_and_none_when_nothing_eligible() -> None:
    for name in POLICY_NAMES:
        index = make_dispatch_policy(name)
        assert index.choose(demand()) is None
        index.upsert(snap("x", free=10, model="llama"))
        assert index.choose(demand(model="qwen")) is None
        assert index.choose(demand(model="llama")) == "x"
        assert index.choose(demand(model="")) == "x"
        index.upsert(snap("x", free=10, model="llama", draining=True))
        assert index.choose(demand(model="llama")) is None


def test_normal_requests_avoid_high_priority_hosts_and_high_priority_joins_them() -> None:
    params = DispatchParams(high_priority_load_cap_tokens=1600)  # 50 blocks of 32 tokens
    index = make_dispatch_policy("freeness", params)
    index.upsert(snap("hp", free=95, running=1, total=100, high=1))  # headroom 50 -> F = 45
    index.upsert(snap("normal", free=60, running=1, total=100))  # F = 60; as-high: 60-50 = 10
    assert index.choose(demand()) == "normal"
    assert index.choose(demand(priority=1)) == "hp"


def test_high_priority_dispatch_bump_applies_headroom() -> None:
    index = make_dispatch_policy("freeness")
    index.upsert(snap("a", free=100, running=1, total=100))
    index.upsert(snap("b", free=90, running=1, total=100))
    index.on_dispatched("a", demand(priority=1, blocks=1))
    assert index.choose(demand()) == "b"


def test_prefix_affinity_prefers_holder_then_falls_back() -> None:
    tokens = list(range(200))
    hashes = prefix_block_hashes(tokens, 32)
    assert len(hashes) == 6
    assert prefix_block_hashes(tokens[:100], 32) == hashes[:3]
    index = make_dispatch_policy("prefix_affinity")
    index.upsert(snap("a", free=50, running=1))
    index.upsert(snap("b", free=90, running=1))
    d = RequestDemand("r1", 200, 7, prefix_block_hashes=hashes)
    assert index.choose(d) == "b"  # nobody holds it: freeness
    index.on_dispatched("a", d)
    index.upsert(snap("a", free=50, running=1))
    assert index.choose(RequestDemand("r2", 200, 7, prefix_block_hashes=hashes)) == "a"
    index.upsert(snap("a", free=2, running=1))  # holder overloaded: fall back
    assert index.choose(RequestDemand("r3", 200, 7, prefix_block_hashes=hashes)) == "b"
    index.remove("a")
    assert index.choose(RequestDemand("r4", 200, 7, prefix_block_hashes=hashes)) == "b"


def test_freeness_formulas() -> None:
    s = snap("a", free=40, running=3, waiting=2, waiting_blocks=10)
    assert dispatch_freeness(s) == pytest.approx((40 - 10) / 5)
    assert migration_freeness(s) == pytest.approx((40 - 5) / 4)
    assert dispatch_freeness(snap("e", free=0)) == math.inf
    assert dispatch_freeness(snap("d", free=100, draining=True)) == -math.inf
    assert migration_freeness(snap("d", free=100, draining=True)) == -math.inf
    # overloaded: a busier instance must not look freer (the paper's ratio would invert here)
    assert dispatch_freeness(snap("busy", free=0, running=50, waiting=1, waiting_blocks=20)) < dispatch_freeness(
        snap("idle", free=0, running=2, waiting=1, waiting_blocks=20)
    )
    hp = snap("h", free=90, running=2, total=100, high=1)
    assert priority_headroom_blocks(hp, 1600) == 50
    assert priority_headroom_blocks(snap("n", free=90, running=2), 1600) == 0


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        make_dispatch_policy("fastest")
    assert isinstance(make_dispatch_policy("freeness"), FreenessIndex)


def test_prefix_holders_are_bounded_to_the_most_recent() -> None:
    params = DispatchParams(prefix_holders_per_block=2)
    index = make_dispatch_policy("prefix_affinity", params)
    hashes = prefix_block_hashes(list(range(64)), 32)
    for iid in ("a", "b", "c"):
        index.upsert(snap(iid, free=90, running=1))
        index.on_dispatched(iid, RequestDemand(f"r-{iid}", 64, 2, prefix_block_hashes=hashes))
    assert isinstance(index, PrefixAffinityIndex)
    assert index.holders(hashes[0]) == frozenset({"b", "c"})


def test_prefix_affinity_prefers_the_longest_match_with_room() -> None:
    tokens = list(range(256))
    full = prefix_block_hashes(tokens, 32)  # 8 blocks
    index = make_dispatch_policy("prefix_affinity")
    index.upsert(snap("short", free=60, running=1))
    index.upsert(snap("long", free=40, running=1))
    index.upsert(snap("none", free=99, running=0))
    index.on_dispatched("short", RequestDemand("a", 64, 2, prefix_block_hashes=full[:2]))
    index.on_dispatched("long", RequestDemand("b", 192, 6, prefix_block_hashes=full[:6]))
    index.upsert(snap("short", free=60, running=1))
    index.upsert(snap("long", free=40, running=1))
    assert index.choose(RequestDemand("c", 256, 8, prefix_block_hashes=full)) == "long"
    index.upsert(snap("long", free=2, running=1))  # deepest holder has no room: next-deepest
    assert index.choose(RequestDemand("d", 256, 8, prefix_block_hashes=full)) == "short"


# -- lazy heaps: the index's choice equals a brute-force scan after any sequence of updates ---------------
update_ops = st.lists(
    st.tuples(
        st.sampled_from(["upsert", "dispatch", "remove"]),
        st.integers(0, 7),
        st.integers(0, 100),
        st.integers(0, 6),
        st.booleans(),
    ),
    min_size=1,
    max_size=300,
)


@pytest.mark.parametrize("name", ["least_loaded", "freeness", "predictive"])
@settings(max_examples=60, deadline=None)
@given(ops=update_ops)
def test_lazy_heap_choice_matches_brute_force(name: str, ops: list[tuple[str, int, int, int, bool]]) -> None:
    index = make_dispatch_policy(name)
    assert isinstance(index, _IndexBase)
    for op, k, free, running, draining in ops:
        iid = f"i{k}"
        if op == "upsert":
            index.upsert(snap(iid, free, running, waiting=running % 2, waiting_blocks=running, draining=draining))
        elif op == "remove":
            index.remove(iid)
        else:
            chosen = index.choose(demand())
            live = {i: e for i, e in index._entries.items() if not e.snapshot.draining}
            if not live:
                assert chosen is None
                continue
            best = min(live.values(), key=lambda e: (index._keys(e)[0], e.snapshot.instance_id))
            assert chosen is not None
            assert index._keys(index._entries[chosen])[0] == index._keys(best)[0]
            index.on_dispatched(chosen, demand())
    for pool in index._pools.values():
        for heap in pool:
            assert len(heap) <= 4 * len(index) + 16 + 1


def test_round_robin_draining_flips_keep_the_cycle_over_eligible_instances() -> None:
    index = make_dispatch_policy("round_robin")
    assert isinstance(index, _IndexBase)
    for k in range(6):
        index.upsert(snap(f"i{k}", 50))
    for flip in range(40):
        k = flip % 6
        index.upsert(snap(f"i{k}", 50, draining=flip % 3 == 0))
        eligible = {iid for iid, e in index._entries.items() if not e.snapshot.draining}
        seen = [index.choose(demand()) for _ in range(len(eligible))]
        assert set(seen) == eligible  # each eligible instance exactly once per cycle
    index.remove("i1")
    assert "i1" not in {index.choose(demand()) for _ in range(12)}


def test_predictive_avoids_an_instance_prefilling_a_long_prompt() -> None:
    index = make_dispatch_policy("predictive")
    # i0 uses fewer blocks but holds a 4,000-token prompt of which only 10 blocks (320 tokens) are computed
    long_prefill = RunningSnapshot("long", num_tokens=4000, num_blocks=10, decoding=False)
    i0 = InstanceSnapshot(
        "i0", num_total_blocks=1000, num_free_blocks=990, num_running=1, num_waiting=0, running=(long_prefill,)
    )
    decodes = tuple(RunningSnapshot(f"d{k}", num_tokens=300, num_blocks=10) for k in range(3))
    i1 = InstanceSnapshot(
        "i1", num_total_blocks=1000, num_free_blocks=970, num_running=3, num_waiting=0, running=decodes
    )
    index.upsert(i0)
    index.upsert(i1)
    assert index.choose(demand()) == "i1"
    assert make_index_choice("least_loaded", [i0, i1]) == "i0"  # INFaaS++ sees only the allocated blocks


def test_predictive_leaves_the_safe_tier_when_memory_is_predicted_full() -> None:
    index = make_dispatch_policy("predictive", DispatchParams(predict_high_watermark=0.5))
    index.upsert(snap("full", free=40, total=100))  # 60 % used: outside the safe tier
    # busy: 20 used + 2 queued + 3 requests x 4 growth = 34 % predicted: safe, though it has a queue
    index.upsert(snap("busy", free=80, running=2, total=100, waiting=1, waiting_blocks=2))
    assert index.choose(demand()) == "busy"


def make_index_choice(name: str, snapshots: list[InstanceSnapshot]) -> str | None:
    index = make_dispatch_policy(name)
    for s in snapshots:
        index.upsert(s)
    return index.choose(demand())
