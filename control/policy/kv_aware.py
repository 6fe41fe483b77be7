"""``kv_aware`` dispatch: weigh the prompt's expected prefix-cache hits on each instance against its load.

Anchor: NVIDIA Dynamo's KV router scores each worker by ``overlap_weight * prefill blocks it would still
have to compute + its active blocks`` and picks the lowest (at its default temperature 0; softmax-sampled
above). Here:

    cost(i) = overlap_weight * (prompt blocks - blocks of the prompt's prefix cached on i)
              + queued blocks on i (every waiting request's blocks, the blocks its running prefills have yet to
                compute, and the *uncached* blocks of what was dispatched to it since its last heartbeat, so
                a burst does not herd)
              + used_weight * blocks in use on i

and the lowest cost wins (ties: the freer instance). How it differs from Dynamo:

* the load term is queued prefill demand first (Llumnix's virtual usage without the running part), and the
  blocks of running requests count only ``used_weight`` (0.1): TTFT is set by the prefill work ahead of a
  request, and a decoding request's blocks cost little compute; counting them fully (Dynamo's active
  blocks) let one running request that shares the prompt's prefix push the prompt away from its cache.
  Memory pressure is the freeness gate's job;
* a dispatch adds only the blocks the instance does not hold to its pending demand;
* freeness gates it: an instance whose dispatch freeness is below ``affinity_min_freeness`` (a migration
  source) is only chosen when it is the freest one, so a hot prefix cannot pile requests onto an instance
  that migration would then have to relieve;
* deterministic argmin, as Dynamo at temperature 0 (no temperature option: reproducible runs, and the
  freeness gate already spreads a hot prefix);
* only a few candidates are scored, so a decision costs O(log(prompt blocks) * candidates) rather than
  O(instances): the holders of the deepest cached block, the holders of the half-depth block, and the
  ``candidates`` freest instances, each with its own overlap found by binary search
  over the chained hashes; each instance's load term and freeness are kept from when it was last re-keyed
  (a heartbeat or a dispatch), so scoring a candidate is one dict read (docs/kv_routing.md: p99 per size).

Cached blocks come from a :class:`control.policy.prefix_index.PrefixIndex` (``self.prefix_index``) fed by
engine events; with an empty index it picks the least loaded of the few freest instances.
High-priority requests use Llumnix's priority dispatch unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from math import inf as INF
from typing import Any

from control.policy.dispatch import FreenessIndex
from control.policy.migration import MigrationDecision
from control.policy.params import DispatchParams
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import InstanceSnapshot, RequestDemand


@dataclass(frozen=True, slots=True)
class KvAwareParams:
    overlap_weight: float = 1.0
    """Blocks of load one uncached prompt block is worth (Dynamo's ``overlap_score_weight``, default 1)."""
    used_weight: float = 0.1
    """Weight of a block in use against a queued (still to prefill) block in the load term."""
    candidates: int = 3
    """Freest instances scored beside the prefix holders (the best choices if the prefix is ignored)."""
    holders_scored: int = 4
    """At most this many holders of one depth are scored (a prefix cached everywhere costs no more)."""


class KvAwareIndex(FreenessIndex):
    """Dispatch by expected prefix-cache hits against virtual usage; see the module docstring."""

    name = "kv_aware"

    def __init__(
        self, params: DispatchParams, kv_params: KvAwareParams | None = None, prefix_index: PrefixIndex | None = None
    ) -> None:
        super().__init__(params)
        self.kv_params = kv_params or KvAwareParams()
        self.prefix_index = prefix_index or PrefixIndex()
        self._last: tuple[str, str, int] = ("", "", 0)  # (request, instance, cached blocks) of the last choice
        self._prefilling: dict[str, int] = {}  # instance -> blocks its running prefills have yet to compute
        # instance -> (load term, dispatch freeness, model), kept with its heap keys (each heartbeat and
        # dispatch re-keys one instance) so a decision reads one tuple per candidate instead of recomputing
        self._scores: dict[str, tuple[float, float, str]] = {}

    # -- Protocol --------------------------------------------------------------------------------------
    def upsert(self, snapshot: InstanceSnapshot) -> None:
        bs = max(1, snapshot.block_size)
        prefilling = 0  # a plain loop: every heartbeat walks up to hundreds of running requests
        for r in snapshot.running:
            if not r.decoding:
                left = -(-r.num_tokens // bs) - r.num_blocks
                if left > 0:
                    prefilling += left
        self._prefilling[snapshot.instance_id] = prefilling  # before linking: the cached score reads it
        super().upsert(snapshot)
        self.prefix_index.set_capacity(snapshot.instance_id, snapshot.num_total_blocks)

    def remove(self, instance_id: str) -> None:
        super().remove(instance_id)
        self.prefix_index.remove_instance(instance_id)
        self._prefilling.pop(instance_id, None)
        self._scores.pop(instance_id, None)

    def choose(self, demand: RequestDemand) -> str | None:
        if demand.priority > 0:
            return super().choose(demand)
        pool = self._pool(demand.model)
        best = self._freest(pool[0], max(1, self.kv_params.candidates)) if pool else None
        if not best:
            return None
        freest = best[0]  # the same instance _top would return: _freest yields live items in key order
        hashes = demand.prefix_block_hashes
        candidates = self._candidates(hashes, best)
        chosen = self._cheapest(demand, hashes, candidates, freest)
        self._last = (demand.request_id, chosen, candidates.get(chosen, 0))
        return chosen

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        rid, iid, cached = self._last
        if rid != demand.request_id or iid != instance_id:  # not the choice just made: look it up
            hashes = demand.prefix_block_hashes
            cached = self.prefix_index.overlap(instance_id, hashes) if hashes else 0
        # only the blocks it will prefill count as pending demand there
        self._add_pending(
            instance_id, max(0, demand.num_blocks - cached) if cached else demand.num_blocks, demand.priority
        )

    def expected_hit_blocks(self, instance_id: str, hashes: Sequence[int]) -> int:
        return self.prefix_index.overlap(instance_id, hashes)

    # -- Internals -------------------------------------------------------------------------------------
    def _link(self, entry: Any) -> None:  # dispatch's entry (its class is private to that module)
        super()._link(entry)
        self._rescore(entry)

    def _rekey(self, entry: Any) -> None:
        # a dispatch re-keys in one step without _link: the load term must move with it, or a burst sent
        # between two heartbeats all lands on the instance that looked cheapest before the first of it
        super()._rekey(entry)
        self._rescore(entry)

    def _rescore(self, entry: Any) -> None:
        snapshot = entry.snapshot
        iid = snapshot.instance_id
        keys = entry.keys  # empty while draining; else keys[0] is minus the freeness (the dispatch heaps' key)
        if not keys:
            self._scores.pop(iid, None)
            return
        own = keys[0]
        assert isinstance(own, (int, float))
        used = snapshot.num_total_blocks - snapshot.num_free_blocks
        queued = snapshot.waiting_blocks + entry.extra_blocks + self._prefilling.get(iid, 0)
        self._scores[iid] = (queued + self.kv_params.used_weight * used, -float(own), snapshot.model)

    def _freest(self, heap: list[Any], k: int) -> list[str]:
        """The ``k`` freest live instances in key order, read without changing the heap (``_peek``: a
        best-first walk down the heap's tree, O(k log k) on a small frontier)."""
        return [item[1] for item in self._peek(heap, k)]

    def _candidates(self, hashes: Sequence[int], freest: Iterable[str]) -> dict[str, int]:
        """Instance id -> cached prefix blocks, for the few instances worth scoring: holders of the deepest
        and of the half-depth cached block, and the freest instances (the load-only choices)."""
        index = self.prefix_index
        deepest, found = index.deep_holders(hashes, self.kv_params.holders_scored)
        if not deepest:  # nobody holds even the first block: only the freest are worth scoring
            return dict.fromkeys(freest, 0)
        first_holders = index.holders(hashes[0])
        for iid in freest:
            if iid not in found:  # one set lookup rules out most: they do not hold even the first block
                found[iid] = index.overlap(iid, hashes, deepest) if iid in first_holders else 0
        return found

    def _cheapest(self, demand: RequestDemand, hashes: Sequence[int], candidates: dict[str, int], freest: str) -> str:
        """Lowest (cost, -freeness, id) among the candidates that pass the model and freeness checks."""
        weight = self.kv_params.overlap_weight
        floor = self.params.affinity_min_freeness
        prompt_blocks = max(demand.num_blocks, len(hashes))
        best_cost = INF
        best_free = -INF
        best = ""
        scores = self._scores
        model = demand.model
        for iid, cached in candidates.items():
            score = scores.get(iid)
            if score is None:  # gone, or draining
                continue
            load, freeness, instance_model = score
            if model and instance_model != model:
                continue
            if freeness < floor and iid != freest:
                continue
            cost = weight * (prompt_blocks - cached) + load
            # (cost, -freeness, id) compared field by field: no key tuple per candidate
            if (
                not best
                or cost < best_cost
                or (cost == best_cost and (freeness > best_free or (freeness == best_free and iid < best)))
            ):
                best_cost, best_free, best = cost, freeness, iid
        return best or freest


def prefer_prefix_destinations(
    decisions: Sequence[MigrationDecision],
    snapshots: Sequence[InstanceSnapshot],
    prefix_index: PrefixIndex,
    request_hashes: dict[str, Sequence[int]],
) -> list[MigrationDecision]:
    """Migration's destination choice, made prefix-aware where it is cheap: this round's destinations were
    each judged free enough by the pairing; a request swaps destinations with a later decision when the
    other destination holds more of its prompt's prefix (fewer blocks to copy, and its next turns hit
    there) and both requests fit where they go. Decisions without known hashes keep their destination. The
    destination still reserves before each stage, so a stale snapshot only aborts a move."""
    if len(decisions) < 2 or not request_hashes:
        return list(decisions)
    free = {s.instance_id: s.num_free_blocks for s in snapshots}
    out = list(decisions)
    for i in range(len(out)):
        decision = out[i]
        hashes = request_hashes.get(decision.request_id)
        if not hashes:
            continue
        best_j, best = -1, prefix_index.overlap(decision.destination_id, hashes)
        for j in range(i + 1, len(out)):
            other = out[j]
            if free.get(other.destination_id, 0) < decision.num_blocks:
                continue
            if free.get(decision.destination_id, 0) < other.num_blocks:
                continue
            overlap = prefix_index.overlap(other.destination_id, hashes)
            if overlap > best:
                best_j, best = j, overlap
        if best_j >= 0:
            other = out[best_j]
            out[i] = replace(decision, destination_id=other.destination_id)
            out[best_j] = replace(other, destination_id=decision.destination_id)
    return out
