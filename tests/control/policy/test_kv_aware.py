"""``kv_aware`` dispatch: expected prefix hits against load, the freeness gate, migration destinations."""

from __future__ import annotations

import dataclasses
import random

import pytest

from control.policy.dispatch import POLICY_NAMES, make_dispatch_policy
from control.policy.kv_aware import KvAwareIndex, prefer_prefix_destinations
from control.policy.migration import MigrationDecision
from control.policy.params import DispatchParams
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from scripts.bench_policy_scale import random_snapshot
from tests.control.policy.streams import check_against_rebuilt

HASHES = tuple(range(1000, 1064))  # a 64-block prompt


def snap(
    iid: str, *, free: int = 1000, running: int = 0, waiting: int = 0, waiting_blocks: int = 0
) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=1000,
        num_free_blocks=free,
        num_running=running,
        num_waiting=waiting,
        waiting_blocks=waiting_blocks,
        block_size=16,
    )


def demand(rid: str = "r", hashes: tuple[int, ...] = HASHES) -> RequestDemand:
    return RequestDemand(rid, len(hashes) * 16, len(hashes), prefix_block_hashes=hashes)


def index_with(*snapshots: InstanceSnapshot) -> KvAwareIndex:
    index = make_dispatch_policy("kv_aware")
    assert isinstance(index, KvAwareIndex) and "kv_aware" in POLICY_NAMES
    for s in snapshots:
        index.upsert(s)
    return index


def test_goes_to_the_instance_holding_the_prefix() -> None:
    index = index_with(snap("a"), snap("b"), snap("c"))
    index.prefix_index.apply("b", epoch="e", seq=0, stored=HASHES[:60])
    index.prefix_index.apply("c", epoch="e", seq=0, stored=HASHES[:10])
    assert index.choose(demand()) == "b"


def test_load_outweighs_a_short_hit() -> None:
    index = index_with(snap("a"), snap("b", free=500, running=2, waiting=2, waiting_blocks=400))
    index.prefix_index.apply("b", epoch="e", seq=0, stored=HASHES[:8])
    assert index.choose(demand()) == "a"  # 8 cached blocks do not pay for 400 queued ones


def test_freeness_gate_skips_a_loaded_holder() -> None:
    index = index_with(snap("a"), snap("b", free=20, running=10))  # freeness 2 < 3
    index.prefix_index.apply("b", epoch="e", seq=0, stored=HASHES)
    assert index.choose(demand()) == "a"


def test_dispatch_counts_only_uncached_blocks_as_pending() -> None:
    index = index_with(snap("a"), snap("b"))
    index.prefix_index.apply("a", epoch="e", seq=0, stored=HASHES[:60])
    index.on_dispatched("a", demand())
    assert index.pending("a") == (1, 4)
    for n in range(5):  # a burst of the same prefix stays on its holder
        chosen = index.choose(demand(f"r{n}"))
        assert chosen == "a"
        index.on_dispatched(chosen, demand(f"r{n}"))


def test_draining_and_removed_instances_are_never_chosen() -> None:
    index = index_with(snap("a"), snap("b"))
    index.prefix_index.apply("b", epoch="e", seq=0, stored=HASHES)
    index.upsert(InstanceSnapshot("b", 1000, 1000, 0, 0, draining=True, block_size=16))
    assert index.choose(demand()) == "a"
    index.remove("b")
    assert index.prefix_index.num_blocks("b") == 0


def test_without_hashes_it_is_least_loaded() -> None:
    index = index_with(snap("a", free=100, running=5, waiting=1, waiting_blocks=100), snap("b"))
    assert index.choose(demand(hashes=())) == "b"


def test_migration_destinations_prefer_prefix_holders() -> None:
    prefix = PrefixIndex()
    prefix.apply("d2", epoch="e", seq=0, stored=HASHES[:30])

    def decision(rid: str, dst: str) -> MigrationDecision:
        return MigrationDecision("s" + rid, dst, rid, 10, 0, "load", 1.0, 10.0)

    decisions = [decision("r1", "d1"), decision("r2", "d2")]
    snapshots = [snap("d1"), snap("d2")]
    out = prefer_prefix_destinations(decisions, snapshots, prefix, {"r1": HASHES})
    assert [(d.request_id, d.destination_id) for d in out] == [("r1", "d2"), ("r2", "d1")]
    tight = [snap("d1"), snap("d2", free=5)]  # r1 would not fit on d2
    assert prefer_prefix_destinations(decisions, tight, prefix, {"r1": HASHES}) == decisions


def test_burst_between_heartbeats_spreads_by_load() -> None:
    """Each dispatch re-keys its instance's load term: a burst of uncached prompts alternates."""
    index = index_with(snap("a"), snap("b"))
    chosen = []
    for n in range(4):
        d = demand(f"r{n}", tuple(range(n * 100, n * 100 + 64)))
        chosen.append(index.choose(d))
        index.on_dispatched(chosen[-1], d)  # type: ignore[arg-type]
    assert sorted(chosen) == ["a", "a", "b", "b"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_lived_index_matches_a_rebuilt_one(seed: int) -> None:
    """kv_aware keeps per-instance scores and heaps across heartbeats and dispatches; every choice must be
    the one an index rebuilt from the current snapshots, pending dispatches and prefix holdings makes."""
    rng = random.Random(seed)
    n = rng.choice((3, 12, 60))
    prefixes = [tuple(rng.getrandbits(62) for _ in range(64)) for _ in range(6)]
    holdings = PrefixIndex()
    index = KvAwareIndex(DispatchParams(), prefix_index=holdings)
    seqs: dict[str, int] = {}

    def report(iid: str) -> None:  # the instance reports prefix blocks stored and removed
        seq = seqs[iid] = seqs.get(iid, -1) + 1
        prefix = prefixes[rng.randrange(len(prefixes))]
        holdings.apply(iid, epoch="e", seq=seq, stored=prefix[: rng.randint(1, 64)], removed=prefix[40:])

    def request(step: int) -> RequestDemand:
        prefix = prefixes[rng.randrange(len(prefixes))]
        hashes = prefix[: rng.randint(1, 64)] + tuple(rng.getrandbits(62) for _ in range(rng.randint(0, 8)))
        return RequestDemand(f"r{step}", len(hashes) * 16, len(hashes), prefix_block_hashes=hashes)

    def uncached(chosen: str, d: RequestDemand) -> RequestDemand:
        # what it adds to pending demand is fixed at dispatch (the blocks not cached then)
        cached = holdings.overlap(chosen, d.prefix_block_hashes)
        return dataclasses.replace(d, num_blocks=d.num_blocks - cached, prefix_block_hashes=())

    decisions = check_against_rebuilt(
        rng,
        index,
        lambda: KvAwareIndex(DispatchParams(), prefix_index=holdings),
        instances=n,
        snapshot=lambda iid: random_snapshot(rng, iid, ""),
        demand=request,
        heartbeat_below=0.3,
        departure_below=0.32,
        other=(0.45, report),
        pending_demand=uncached,
    )
    assert decisions > 300
