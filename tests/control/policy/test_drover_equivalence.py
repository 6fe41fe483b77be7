"""``drover``'s dispatch index (``predictive`` with late binding and prefix awareness, the prefix index filled)
decides exactly as a straightforward scan of every instance (issue #17, "Scale").

The index keeps sorted structures, cached per-heartbeat terms and the last choice's cache hit for speed; the
reference below keeps only the snapshots, what was dispatched since each, the reservation and the same
:class:`PrefixIndex`, and recomputes every key and ordering from scratch on each decision (the formulas of
``docs/policies.md``, "Dispatch: predictive", written out plainly). Any state the speed-ups fail to keep up to
date shows up as a different choice, or a different pending count.
"""

from __future__ import annotations

import dataclasses
import random
from itertools import islice
from typing import Any

import pytest

from control.policy.dispatch import (
    RESERVATION_EXPIRY_DECISIONS,
    PredictiveIndex,
    make_dispatch_policy,
    prefix_block_hashes,
)
from control.policy.params import DispatchParams
from control.policy.prefix_index import PrefixIndex
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot, running_totals
from scripts.bench_policy_scale import random_snapshot

MODELS = ("llama", "qwen")
BS = 16


class _ReferenceDrover:
    """``predictive`` with ``predict_hold`` and ``predict_prefix``, by brute force: O(instances) per decision."""

    HOLDERS = 4  # holders of one depth scored
    PROBE = 4  # safe-tier candidates checked for room before the roomiest instance is taken

    def __init__(self, params: DispatchParams) -> None:
        self.params = params
        self.snapshots: dict[str, InstanceSnapshot] = {}
        self.extra: dict[str, list[int]] = {}  # instance -> [requests, blocks] dispatched since its snapshot
        self.reservations: dict[str, list[Any]] = {}  # model -> [request, instance, decisions since]
        self.prefix_index = PrefixIndex()
        self.last_hit: tuple[str, str, int] = ("", "", 0)
        self.served: set[str] = set()  # models some decision found an instance for

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        self.snapshots[snapshot.instance_id] = snapshot
        self.extra[snapshot.instance_id] = [0, 0]
        self.prefix_index.set_capacity(snapshot.instance_id, snapshot.num_total_blocks)

    def remove(self, instance_id: str) -> None:
        self.snapshots.pop(instance_id, None)
        self.extra.pop(instance_id, None)
        self.prefix_index.remove_instance(instance_id)

    def pending(self, instance_id: str) -> tuple[int, int]:
        extra = self.extra.get(instance_id, [0, 0])
        return extra[0], extra[1]

    def eligible(self, model: str) -> list[str]:
        # an instance without a model serves only requests that name none; draining ones serve nobody
        return [iid for iid, s in self.snapshots.items() if not s.draining and (model == "" or s.model == model)]

    def hold_growth(self) -> int:
        """The hold test's growth reserve per hosted request: predict_hold_growth_blocks (-1: the load key's
        predict_growth_blocks), 0 with predict_hold_physical (the room leaves the reserve out)."""
        p = self.params
        if p.predict_hold_physical:
            return 0
        return p.predict_growth_blocks if p.predict_hold_growth_blocks < 0 else p.predict_hold_growth_blocks

    def keys(self, iid: str) -> tuple[tuple[float, float, float], float]:
        """(tier, prefill work ahead or load, load) and minus the blocks a new request could take now."""
        s = self.snapshots[iid]
        waiting, blocks = self.extra[iid]
        p = self.params
        prefilling = sum(max(0, r.num_tokens - r.num_blocks * s.block_size) for r in s.running if not r.decoding)
        total = max(1, s.num_total_blocks)
        demand = s.num_used_blocks + s.waiting_blocks + blocks
        if p.predict_prefill_blocks:  # the blocks running prompts' later chunks will still take
            demand += sum(
                -(-(r.num_tokens - r.num_blocks * s.block_size) // s.block_size)
                for r in s.running
                if not r.decoding and r.num_tokens > r.num_blocks * s.block_size
            )
        physical = demand  # predict_hold_physical: the hold test's room leaves the growth reserve out
        demand += p.predict_growth_blocks * (s.num_running + s.num_waiting + waiting)
        load = demand / total
        free = total - physical
        held_back = float(self.hold_growth() * (s.num_running + s.num_waiting + waiting))
        if p.predict_hold_growth_share > 0:  # the reserve takes at most this share of the free room
            held_back = min(held_back, p.predict_hold_growth_share * max(0, free))
        room = -float(free - held_back)
        if load >= p.predict_high_watermark:
            return (1.0, load, 0.0), room
        ahead = float((s.waiting_blocks + blocks) * s.block_size + prefilling)
        ahead += p.predict_decode_weight * (s.num_running + waiting)
        return (0.0, ahead, load), room

    def choose(self, demand: RequestDemand) -> str | None:
        if demand.model not in self.served:
            if not any(demand.model in ("", s.model) for s in self.snapshots.values()):
                return None  # nobody serves the model at all (a draining instance still counts)
            # from then on the index keeps the model's pool: an empty one still runs the late-binding steps
            self.served.add(demand.model)
        candidates = {iid: self.keys(iid) for iid in self.eligible(demand.model)}
        by_key = sorted((k[0], iid) for iid, k in candidates.items())
        if demand.prefix_block_hashes:
            holder = self.choose_holder(demand, candidates, by_key)
            if holder is not None:
                return holder
        return self.choose_late(demand, candidates, by_key)

    def choose_holder(
        self, demand: RequestDemand, candidates: dict[str, Any], by_key: list[tuple[Any, str]]
    ) -> str | None:
        index = self.prefix_index
        hashes = demand.prefix_block_hashes
        self.last_hit = ("", "", 0)
        deepest = index.deepest(hashes)
        if not deepest:
            return None
        found = dict.fromkeys(islice(index.holders(hashes[deepest - 1]), self.HOLDERS), deepest)
        half = deepest // 2
        if half and len(found) < self.HOLDERS:
            for iid in islice(index.holders(hashes[half - 1]), self.HOLDERS):
                if iid not in found:
                    found[iid] = index.overlap(iid, hashes, deepest, half)
        reservation = self.reservations.get(demand.model)
        reserved = reservation[1] if reservation is not None and reservation[0] != demand.request_id else None
        # predict_prefix_idle_first: while the load-only choice is idle, a holder hosting requests must cache
        # the whole prompt (the rest's prefill would stall its decodes)
        spare_busy = self.params.predict_prefix_idle_first and bool(by_key) and self.idle(by_key[0][1])
        best: tuple[float, str, int] | None = None
        for iid, cached in found.items():
            if iid not in candidates or iid == reserved:
                continue
            key, room = candidates[iid]
            if key[0] != 0.0:
                continue
            growth = self.hold_growth()
            if -room < max(0, demand.num_blocks - cached) + growth:
                continue
            uncomputed = demand.num_prompt_tokens - cached * self.snapshots[iid].block_size
            if spare_busy and uncomputed > 0 and not self.idle(iid):
                continue
            cost = key[1] + max(0, uncomputed)
            if best is None or cost < best[0]:
                best = (cost, iid, cached)
        if best is None:
            return None
        if by_key:
            top_key, top = by_key[0]
            if top != best[1] and top_key[0] == 0.0 and top_key[1] + demand.num_prompt_tokens <= best[0]:
                return None
        if reservation is not None and reservation[0] == demand.request_id:
            del self.reservations[demand.model]
        self.last_hit = (demand.request_id, best[1], best[2])
        return best[1]

    def idle(self, iid: str) -> bool:
        return self.snapshots[iid].is_empty and self.extra[iid][0] == 0

    def choose_late(
        self, demand: RequestDemand, candidates: dict[str, Any], by_key: list[tuple[Any, str]]
    ) -> str | None:
        reservation = self.reservations.get(demand.model)
        reserved = None
        if reservation is not None:
            if reservation[0] == demand.request_id:
                del self.reservations[demand.model]
                reservation = None
            else:
                reservation[2] += 1
                if reservation[2] > RESERVATION_EXPIRY_DECISIONS:
                    del self.reservations[demand.model]
                    reservation = None
                else:
                    reserved = reservation[1]
        need = demand.num_blocks + self.hold_growth()
        p = self.params
        if p.predict_interference > 0 or p.predict_decode_stall > 0:
            # of the few best safe-tier instances with room now, the least work ahead plus the stall the
            # prompt's chunks impose there: on every running request (predict_interference), on every
            # decoding one (predict_decode_stall)
            wi = p.predict_interference * demand.num_prompt_tokens
            ws = p.predict_decode_stall * demand.num_prompt_tokens
            quiet: tuple[float, str] | None = None
            for key, iid in by_key[: self.PROBE + 1]:
                if key[0] != 0.0:
                    break
                if iid == reserved or -candidates[iid][1] < need or not self.under_limit(iid):
                    continue
                s = self.snapshots[iid]
                decoding = sum(1 for r in s.running if r.decoding)
                score = key[1] + wi * (s.num_running + self.extra[iid][0]) + ws * decoding
                if quiet is None or score < quiet[0]:
                    quiet = (score, iid)
            if quiet is not None:
                return quiet[1]
        by_room = sorted((k[1], iid) for iid, k in candidates.items())[:2]
        roomiest = next((c for c in by_room if c[1] != reserved), None)
        if roomiest is None:
            return None
        if -roomiest[0] < need:
            s = self.snapshots[roomiest[1]]
            if s.is_empty and self.extra[roomiest[1]][0] == 0:
                return roomiest[1]
            if reservation is not None:
                return None if self.params.queue_hold_all else roomiest[1]
            self.reservations[demand.model] = [demand.request_id, roomiest[1], 0]
            return None
        for _, iid in by_key[: self.PROBE + 1]:
            if iid != reserved and -candidates[iid][1] >= need and self.under_limit(iid):
                return iid
        if not self.under_limit(roomiest[1]):
            return None  # predict_hold_prefill_tokens: held in the scheduler's queue, no reservation
        return roomiest[1]

    def under_limit(self, iid: str) -> bool:
        """predict_hold_prefill_tokens: the prompt tokens queued there (waiting, dispatched since the snapshot,
        the rest of running prompts) are at most the limit (0: no limit)."""
        limit = self.params.predict_hold_prefill_tokens
        if not limit:
            return True
        s = self.snapshots[iid]
        prefilling = sum(max(0, r.num_tokens - r.num_blocks * s.block_size) for r in s.running if not r.decoding)
        return (s.waiting_blocks + self.extra[iid][1]) * s.block_size + prefilling <= limit

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        if instance_id not in self.extra:
            return
        blocks = demand.num_blocks
        if demand.prefix_block_hashes:
            rid, iid, cached = self.last_hit
            if rid != demand.request_id or iid != instance_id:
                cached = self.prefix_index.overlap(instance_id, demand.prefix_block_hashes)
            blocks = max(0, blocks - cached)
        self.extra[instance_id][0] += 1
        self.extra[instance_id][1] += blocks


def _snapshot(rng: random.Random, iid: str) -> InstanceSnapshot:
    model = rng.choice(MODELS) if rng.random() < 0.97 else ""  # an any-model instance now and then
    snapshot = random_snapshot(rng, iid, model)
    roll = rng.random()
    if roll < 0.05:  # an idle instance
        snapshot = dataclasses.replace(
            snapshot, num_running=0, num_waiting=0, running=(), high_priority_count=0, running_totals=(0, 0, 0)
        )
    elif roll < 0.12:  # one request decoding, nothing queued: a holder whose hit beats an idle instance's start
        lone = RunningSnapshot(f"{iid}/lone", num_tokens=rng.randint(16, 4000), num_blocks=rng.randint(1, 250))
        snapshot = dataclasses.replace(
            snapshot,
            num_free_blocks=snapshot.num_total_blocks - lone.num_blocks,
            num_running=1,
            num_waiting=0,
            waiting_blocks=0,
            head_waiting_blocks=0,
            running=(lone,),
            high_priority_count=0,
            running_totals=None,  # summed by the index (a builder that does not sum them)
        )
    elif roll < 0.25:  # a quiet one, in the safe tier with room: where prefix hits can win
        snapshot = dataclasses.replace(
            snapshot,
            num_free_blocks=snapshot.num_total_blocks - rng.randint(0, 400),
            num_running=min(snapshot.num_running, 6),
            running=snapshot.running[:6],
            high_priority_count=-1,
            running_totals=running_totals(snapshot.running[:6], snapshot.block_size),  # a builder that sums them
        )
    return snapshot


def _feed(indexes: tuple[PrefixIndex, ...], seq: int, rng: random.Random, iid: str, prefixes: list[Any]) -> None:
    """One engine cache report, to both: a prefix (or part of it) stored, some blocks removed, or a clear."""
    hashes = rng.choice(prefixes)
    depth = rng.randint(1, len(hashes))
    roll = rng.random()
    batch: dict[str, Any] = {"stored": list(hashes[:depth])}
    if roll < 0.15:
        batch = {"removed": list(hashes[rng.randrange(len(hashes)) :])}  # the tail first, as vLLM evicts
    elif roll < 0.18:
        batch = {"cleared": True}
    elif roll < 0.21:  # a lost removal: holdings that break the chain (the lookups must still agree)
        batch = {"stored": [hashes[k] for k in sorted(rng.sample(range(len(hashes)), depth))]}
    for target in indexes:
        target.apply(iid, epoch="e", seq=seq, **batch)


@pytest.mark.parametrize(
    ("seed", "prefill_blocks", "physical", "stall", "prefill_hold"),
    [
        (0, True, False, None, True),
        (1, True, False, None, True),
        (2, True, False, None, True),
        (3, True, False, None, True),
        (4, False, False, None, True),
        (5, True, True, None, True),
        (6, True, False, 1.0, True),
        (7, True, False, 0.25, True),
        (8, True, 1, None, True),
        (9, True, False, None, False),
        (10, True, False, 1.0, False),
        (11, True, False, None, True),
        (12, True, False, None, False),
    ],
)
def test_drover_dispatch_decides_as_a_full_scan(
    seed: int, prefill_blocks: bool, physical: bool | int, stall: float | None, prefill_hold: bool
) -> None:
    rng = random.Random(seed)
    n = rng.choice((4, 12, 40))
    params = user_policy_params("drover").dispatch_params()
    # drover counts the blocks running prompts' later chunks take (predict_prefill_blocks); one seed without
    params = dataclasses.replace(params, predict_prefill_blocks=prefill_blocks)
    if physical is True:  # the hold test on physical room (opt-in, predict_hold_physical)
        params = dataclasses.replace(params, predict_hold_physical=True)
    elif physical is not False:  # a smaller growth reserve in the hold test (opt-in, predict_hold_growth_blocks)
        params = dataclasses.replace(params, predict_hold_growth_blocks=physical)
    if seed in (11, 12):  # the hold reserve unbounded by the free room (predict_hold_growth_share off)
        params = dataclasses.replace(params, predict_hold_growth_share=0.0)
    if stall is not None:  # the decode-stall rule (opt-in): at weight 1, and at a weight where ties are rare
        params = dataclasses.replace(params, predict_decode_stall=stall)
    if (
        not prefill_hold
    ):  # drover's prefill-backlog hold (predict_hold_prefill_tokens) off: the index's paths without it
        params = dataclasses.replace(params, predict_hold_prefill_tokens=0)
    assert params.predict_hold_prefill_tokens == (2048 if prefill_hold else 0)
    assert params.predict_hold and params.predict_prefix
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex) and index.prefix_index is not None
    assert params.predict_prefix_idle_first  # the reference runs this rule of drover too
    reference = _ReferenceDrover(params)
    prefixes = [prefix_block_hashes(list(range(k * 1000, k * 1000 + BS * rng.randint(1, 24))), BS) for k in range(6)]
    held: list[RequestDemand] = []  # requests the index held (late binding): asked again later
    decisions = hits = holds = 0
    for step in range(3000):
        roll = rng.random()
        iid = f"i{rng.randrange(n)}"
        if roll < 0.25:
            snapshot = _snapshot(rng, iid)
            index.upsert(snapshot)
            reference.upsert(snapshot)
        elif roll < 0.27:
            index.remove(iid)
            reference.remove(iid)
        elif roll < 0.40:
            _feed((index.prefix_index, reference.prefix_index), step, rng, iid, prefixes)
        else:
            if held and rng.random() < 0.3:
                demand = held.pop(rng.randrange(len(held)))
            else:
                tail = rng.randint(0, 40) * BS + rng.randint(0, BS - 1)
                base = rng.choice(prefixes)
                hashes = base + prefix_block_hashes([step] * tail, BS) if rng.random() < 0.8 else ()
                tokens = (len(base) * BS if hashes else rng.randint(1, 200) * BS) + tail
                if rng.random() < 0.1:  # a long prompt that few instances (or none) have room for now
                    tokens = rng.randint(300, 2600) * BS
                demand = RequestDemand(
                    f"r{step}",
                    num_prompt_tokens=tokens,
                    num_blocks=-(-tokens // BS),
                    priority=1 if rng.random() < 0.1 else 0,
                    model=rng.choice((*MODELS, MODELS[0], "", "absent")),
                    prefix_block_hashes=tuple(hashes),
                )
            chosen = index.choose(demand)
            assert chosen == reference.choose(demand), f"step {step}"
            if chosen is None:
                if reference.reservations.get(demand.model, [None])[0] == demand.request_id:  # held
                    held.append(demand)
                    holds += 1
                continue
            hits += reference.last_hit[0] == demand.request_id
            index.on_dispatched(chosen, demand)
            reference.on_dispatched(chosen, demand)
            assert index.pending(chosen) == reference.pending(chosen), f"step {step}"
            decisions += 1
    assert decisions > 500 and hits > 40 and holds > 20, (decisions, hits, holds)


def test_a_dispatch_after_a_cache_report_counts_the_hit_the_report_made() -> None:
    """A choice that found the prefix nowhere spares the dispatch its lookup, but only while the prefix index is
    unchanged: a cache report between ``choose`` and ``on_dispatched`` (a shell placing by class after asking)
    must be seen, as the lookup would see it."""
    index = make_dispatch_policy("predictive", user_policy_params("drover").dispatch_params())
    assert isinstance(index, PredictiveIndex) and index.prefix_index is not None
    index.upsert(random_snapshot(random.Random(0), "a", "llama"))
    hashes = prefix_block_hashes(list(range(10 * BS)), BS)
    demand = RequestDemand("r", num_prompt_tokens=10 * BS, num_blocks=10, model="llama", prefix_block_hashes=hashes)
    index.choose(demand)  # nobody holds it yet
    index.prefix_index.apply("a", epoch="e", seq=0, stored=list(hashes[:6]))
    index.on_dispatched("a", demand)
    assert index.pending("a") == (1, 4)  # 10 blocks, 6 of them cached by now
    other = dataclasses.replace(demand, request_id="r2", prefix_block_hashes=(1, 2, 3))
    index.choose(other)
    index.on_dispatched("a", other)
    assert index.pending("a") == (2, 14)  # nobody holds (1, 2, 3): all 10 pending, without a lookup


def test_running_totals_summed_by_the_builder_or_by_the_index_decide_alike() -> None:
    """A heartbeat builder that sums its running requests (``InstanceSnapshot.running_totals``, the scheduler and
    the simulators) and one that leaves it to the index (None) give the same keys and the same choices."""
    rng = random.Random(11)
    params = user_policy_params("drover").dispatch_params()
    given, summed = make_dispatch_policy("predictive", params), make_dispatch_policy("predictive", params)
    assert isinstance(given, PredictiveIndex) and isinstance(summed, PredictiveIndex)
    prefilling = 0
    for step in range(2000):
        iid = f"i{rng.randrange(30)}"
        snapshot = random_snapshot(rng, iid, MODELS[0])
        assert snapshot.running_totals == running_totals(snapshot.running, snapshot.block_size)
        prefilling += snapshot.running_totals[0] > 0
        given.upsert(snapshot)
        summed.upsert(dataclasses.replace(snapshot, running_totals=None))
        demand = RequestDemand(f"r{step}", num_prompt_tokens=300, num_blocks=19, model=MODELS[0])
        chosen = given.choose(demand)
        assert chosen == summed.choose(demand), f"step {step}"
        if chosen is not None:
            given.on_dispatched(chosen, demand)
            summed.on_dispatched(chosen, demand)
    assert prefilling > 100  # the prefill terms were exercised, not only zeros
    for iid in ("i0", "i7", "i29"):
        assert given._entries[iid].keys == summed._entries[iid].keys
