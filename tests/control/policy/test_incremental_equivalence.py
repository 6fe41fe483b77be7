"""The incremental indexes decide exactly what a from-scratch computation decides (issue #17, "Scale").

The dispatch indexes and the migration planner keep state across heartbeats for speed (lazy heaps, pools
built on first read, per-heartbeat cached terms, a lazy source heap). Each test drives one long-lived
object through a random stream of heartbeats, departures, draining flips, model changes and dispatches,
and compares every decision with an object rebuilt from the same current state at that moment: any state
the speed-ups fail to keep up to date shows up as a different choice.
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from collections.abc import Iterable

import pytest

from control.policy.dispatch import FreenessIndex, make_dispatch_policy, prefix_block_hashes
from control.policy.migration import InFlightMigration, MigrationPlanner, plan_migrations
from control.policy.params import DispatchParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from scripts.bench_policy_scale import random_snapshot
from tests.control.policy.streams import check_against_rebuilt

MODELS = ("llama", "qwen")


def _snapshot(rng: random.Random, iid: str) -> InstanceSnapshot:
    model = rng.choice(MODELS) if rng.random() < 0.97 else ""  # an any-model instance now and then
    snapshot = random_snapshot(rng, iid, model)
    if rng.random() < 0.03:  # an idle instance: freeness is infinite there
        snapshot = dataclasses.replace(
            snapshot, num_running=0, num_waiting=0, running=(), high_priority_count=0, running_totals=None
        )
    return snapshot


def _demand(rng: random.Random, k: int) -> RequestDemand:
    blocks = rng.randint(1, 300)
    return RequestDemand(
        f"r{k}",
        num_prompt_tokens=blocks * 16,
        num_blocks=blocks,
        priority=1 if rng.random() < 0.1 else 0,
        model=rng.choice((*MODELS, "", "absent")),
    )


@pytest.mark.parametrize("policy", ["least_loaded", "freeness", "predictive"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dispatch_index_matches_a_rebuilt_one(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice((3, 12, 60))
    index = make_dispatch_policy(policy)
    if seed % 2:  # read every pool from the start, so they are kept up to date rather than built late
        for model in (*MODELS, ""):
            index.choose(RequestDemand("probe", 16, 1, model=model))
    decisions = check_against_rebuilt(
        rng,
        index,
        lambda: make_dispatch_policy(policy),
        instances=n,
        snapshot=lambda iid: _snapshot(rng, iid),
        demand=lambda step: _demand(rng, step),
        heartbeat_below=0.35,
        departure_below=0.38,
    )
    assert decisions > 300  # the stream did exercise dispatch


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_migration_planner_matches_a_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice((6, 40, 200))
    # the per-request rules remember earlier rounds, which a full scan cannot: switched off here so that a
    # round is a function of the snapshots and the migrations in flight alone
    params = user_policy_params("drover" if seed % 2 else "llumnix").with_updates(
        migration_budget_per_request=0,
        migration_cooldown_s=0.0,
        migration_pingpong_window_s=0.0,
        migration_sources="pressure" if seed == 1 else "freeness",  # drover's own rule moves off draining only
    )
    if seed >= 2:
        params = params.with_updates(max_migrations_per_instance=1, max_migrations_total=20)
    snapshots = {f"i{i}": random_snapshot(rng, f"i{i}", rng.choice(MODELS)) for i in range(n)}
    planner = MigrationPlanner(params)
    planner.sync(list(snapshots.values()))
    in_flight: list[InFlightMigration] = []
    moved = 0
    for round_ in range(150):
        for _ in range(rng.randint(0, n // 4 + 1)):
            iid = f"i{rng.randrange(n)}"
            snapshots[iid] = random_snapshot(rng, iid, rng.choice(MODELS))
            planner.update(snapshots[iid])
        if rng.random() < 0.05:
            gone = f"i{rng.randrange(n)}"
            if snapshots.pop(gone, None) is not None:
                planner.remove(gone)
        now = 0.05 * round_
        expected = plan_migrations(list(snapshots.values()), in_flight, params, now=now)
        got = planner.plan(in_flight, now=now)
        assert got == expected, f"round {round_}"
        moved += len(got)
        in_flight = [InFlightMigration(d.source_id, d.destination_id, d.request_id) for d in got[: rng.randint(0, 4)]]
    assert moved > 0


@pytest.mark.parametrize("seed", [4, 5])
def test_migration_planner_put_off_syncs_match_a_full_scan(seed: int) -> None:
    """Under ``migration_sources = drain`` a sync without a draining source is put off (not rated); rounds
    with and without such syncs, and updates or removals between them, still plan what a full scan plans."""
    rng = random.Random(seed)
    n = rng.choice((6, 40))
    params = user_policy_params("drover").with_updates(
        migration_budget_per_request=0,
        migration_cooldown_s=0.0,
        migration_pingpong_window_s=0.0,
        migration_sources="drain",
    )
    snapshots = {f"i{i}": random_snapshot(rng, f"i{i}", rng.choice(MODELS)) for i in range(n)}
    planner = MigrationPlanner(params)
    moved = put_off = 0
    for round_ in range(200):
        for _ in range(rng.randint(0, n // 4 + 1)):
            iid = f"i{rng.randrange(n)}"
            snapshot = random_snapshot(rng, iid, rng.choice(MODELS))
            if rng.random() < 0.03:  # scale-in: a draining instance, the only kind of source here
                snapshot = dataclasses.replace(snapshot, draining=True)
            snapshots[iid] = snapshot
        roll = rng.random()
        if roll < 0.1:  # a heartbeat straight in, between syncs
            iid = rng.choice(sorted(snapshots))
            planner.update(snapshots[iid])
        elif roll < 0.15:
            gone = rng.choice(sorted(snapshots))
            del snapshots[gone]
            planner.remove(gone)
        else:
            planner.sync(list(snapshots.values()))
        if not any(s.draining and s.num_running for s in snapshots.values()):
            put_off += 1
        if rng.random() < 0.1:
            assert len(planner) == len(snapshots)
        now = 0.05 * round_
        expected = plan_migrations(list(snapshots.values()), [], params, now=now)
        if roll >= 0.15:  # after update/remove the planner's view lags the dict by design (no sync yet)
            assert planner.plan([], now=now) == expected, f"round {round_}"
            moved += len(expected)
    assert moved > 0 and put_off > 0


class _ReferencePrefixAffinity(FreenessIndex):
    """prefix_affinity as first written (issue #17's "before"): every holder's freeness computed with
    ``freeness()``, holders and histories in OrderedDicts, checkpoints recomputed per call. The index in
    control/policy/dispatch.py must decide exactly as this does."""

    def __init__(self, params: DispatchParams) -> None:
        super().__init__(params)
        self.holders_of: dict[int, OrderedDict[str, None]] = {}
        self.history: dict[str, OrderedDict[int, None]] = {}

    @staticmethod
    def checkpoints(num_blocks: int) -> list[int]:
        depths = list(range(min(4, num_blocks), 0, -1))
        depths[:0] = range(num_blocks - num_blocks % 4, 4, -4)
        if num_blocks > 4 and num_blocks % 4:
            depths.insert(0, num_blocks)
        return depths

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        super().upsert(snapshot)
        if snapshot.cached_prefix_hashes:
            self.forget(snapshot.instance_id)
            self.remember(snapshot.instance_id, snapshot.cached_prefix_hashes)

    def remove(self, instance_id: str) -> None:
        super().remove(instance_id)
        self.forget(instance_id)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        super().on_dispatched(instance_id, demand)
        hashes = demand.prefix_block_hashes
        if hashes and instance_id in self:
            self.remember(instance_id, [hashes[d - 1] for d in self.checkpoints(len(hashes))])

    def choose(self, demand: RequestDemand) -> str | None:
        hashes = demand.prefix_block_hashes
        if len(hashes) >= self.params.prefix_min_match_blocks:
            for depth in self.checkpoints(len(hashes)):
                if depth < self.params.prefix_min_match_blocks:
                    break
                best: tuple[float, str] | None = None
                for iid in self.holders_of.get(hashes[depth - 1], ()):
                    snapshot = self.snapshot(iid)
                    if snapshot is None or snapshot.draining or (demand.model and snapshot.model != demand.model):
                        continue
                    freeness = self.freeness(self._entries[iid], as_high_priority=demand.priority > 0)
                    if freeness >= self.params.affinity_min_freeness and (best is None or (-freeness, iid) < best):
                        best = (-freeness, iid)
                if best is not None:
                    return best[1]
        return super().choose(demand)

    def remember(self, instance_id: str, hashes: Iterable[int]) -> None:
        history = self.history.setdefault(instance_id, OrderedDict())
        for prefix_hash in hashes:
            history[prefix_hash] = None
            history.move_to_end(prefix_hash)
            holders = self.holders_of.setdefault(prefix_hash, OrderedDict())
            holders[instance_id] = None
            holders.move_to_end(instance_id)
            if len(holders) > self.params.prefix_holders_per_block:
                holders.popitem(last=False)
        snapshot = self.snapshot(instance_id)
        capacity = max(1, self.params.prefix_history_blocks or (snapshot.num_total_blocks if snapshot else 0))
        while len(history) > capacity:
            evicted, _ = history.popitem(last=False)
            self.drop_holder(evicted, instance_id)

    def forget(self, instance_id: str) -> None:
        for prefix_hash in self.history.pop(instance_id, OrderedDict()):
            self.drop_holder(prefix_hash, instance_id)

    def drop_holder(self, prefix_hash: int, instance_id: str) -> None:
        holders = self.holders_of.get(prefix_hash)
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self.holders_of[prefix_hash]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prefix_affinity_decides_as_the_reference(seed: int) -> None:
    """The long-lived prefix_affinity index (cached checkpoints, freeness read from its heap keys, holder
    lists, holders ruled out once per decision) against the straightforward reference, on a stream of
    heartbeats (some reporting cached hashes), departures, draining flips and dispatches of prompts that
    share prefixes; small histories and holder caps (odd seeds) exercise the evictions."""
    rng = random.Random(seed)
    n = rng.choice((4, 12, 40))
    params = DispatchParams(
        prefix_history_blocks=24 if seed % 2 else 0,
        prefix_holders_per_block=2 if seed % 2 else 4,
        prefix_min_match_blocks=1 if seed < 2 else 3,
    )
    index = make_dispatch_policy("prefix_affinity", params)
    reference = _ReferencePrefixAffinity(params)
    prefixes = [list(range(k * 1000, k * 1000 + 16 * rng.randint(1, 12))) for k in range(8)]
    decisions = by_prefix = 0
    for step in range(2500):
        roll = rng.random()
        iid = f"i{rng.randrange(n)}"
        if roll < 0.3:
            snapshot = _snapshot(rng, iid)
            if rng.random() < 0.1:  # an engine that reports what it caches
                prompt = rng.choice(prefixes)
                cached = prefix_block_hashes(prompt, 16)[: rng.randint(1, len(prompt) // 16)]
                snapshot = dataclasses.replace(snapshot, cached_prefix_hashes=frozenset(cached))
            index.upsert(snapshot)
            reference.upsert(snapshot)
        elif roll < 0.33:
            index.remove(iid)
            reference.remove(iid)
        else:
            prompt = rng.choice(prefixes) + [rng.randrange(300) for _ in range(rng.randint(0, 40))]
            demand = RequestDemand(
                f"r{step}",
                num_prompt_tokens=len(prompt),
                num_blocks=-(-len(prompt) // 16),
                priority=1 if rng.random() < 0.1 else 0,
                model=rng.choice((*MODELS, "")),
                prefix_block_hashes=prefix_block_hashes(prompt, 16),
            )
            chosen = index.choose(demand)
            assert chosen == reference.choose(demand), f"step {step}"
            if chosen is not None:
                by_prefix += any(chosen in reference.holders_of.get(h, ()) for h in demand.prefix_block_hashes)
                index.on_dispatched(chosen, demand)
                reference.on_dispatched(chosen, demand)
                decisions += 1
    assert decisions > 800 and by_prefix > 200  # dispatch ran, and often to a holder of the prefix
