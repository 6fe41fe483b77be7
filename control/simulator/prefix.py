"""Prefix caching in the cluster simulator: traces with prefix-block hashes, engines with vLLM's automatic
prefix cache, and a global prefix index fed by the engines' cache events, as the live control plane's is.

* :func:`load_prefix_trace` reads a ``timestamp,input_tokens,output_tokens,hash_ids`` CSV (the Mooncake
  synthetic trace: one id per 512 prompt tokens, equal ids at equal positions = a shared prefix);
* :class:`PrefixClusterSimulator` gives every engine a :class:`engines.sim.prefix_cache.PrefixCache`, maps
  each request's trace ids onto the engine's block size, puts the prompt's block hashes into the dispatch
  demand, and on every scheduler tick (the heartbeat period) hands each engine's stored/removed events to the
  dispatch policy's prefix index as one numbered batch, exactly what the live feed does;
* with ``prefix_aware_migration`` a round's migrations prefer destinations that hold the request's prefix
  (:func:`control.policy.kv_aware.prefer_prefix_destinations`).

Prompts longer than the engines' ``max_model_len`` are not truncated: the simulator rejects them and counts
them (``result.rejected``).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.policy.kv_aware import prefer_prefix_destinations
from control.policy.migration import MigrationDecision
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import RequestDemand
from control.simulator.cluster import ClusterConfig, ClusterSimulator
from control.simulator.metrics import SimulationResult
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineCore, SimRequest
from engines.sim.prefix_cache import TRACE_BLOCK_TOKENS, PrefixCache, PrefixCacheStats, engine_block_hashes


@dataclass(frozen=True, slots=True)
class PrefixTrace:
    """Requests of a trace plus each one's prefix-block ids (``trace_block_tokens`` tokens an id)."""

    requests: list[RequestSpec]
    hash_ids: dict[str, tuple[int, ...]]
    trace_block_tokens: int = TRACE_BLOCK_TOKENS


def load_prefix_trace(
    path: str | Path,
    *,
    time_compression: float = 1.0,
    limit: int | None = None,
    max_output_len: int | None = None,
    trace_block_tokens: int = TRACE_BLOCK_TOKENS,
) -> PrefixTrace:
    """Read a trace with a ``hash_ids`` column (space-separated ints), ``time_compression`` times faster."""
    if time_compression <= 0:
        raise ValueError("time_compression must be > 0")
    specs: list[RequestSpec] = []
    hash_ids: dict[str, tuple[int, ...]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "hash_ids" not in reader.fieldnames:
            raise ValueError(f"{path}: no hash_ids column (need timestamp,input_tokens,output_tokens,hash_ids)")
        for row in reader:
            output = max(1, int(row["output_tokens"]))
            if max_output_len is not None:
                output = min(output, max_output_len)
            spec = RequestSpec(
                f"trace-{len(specs)}",
                float(row["timestamp"]) / time_compression,
                max(1, int(row["input_tokens"])),
                output,
            )
            specs.append(spec)
            hash_ids[spec.request_id] = tuple(int(x) for x in row["hash_ids"].split())
            if limit is not None and len(specs) >= limit:
                break
    return PrefixTrace(specs, hash_ids, trace_block_tokens)


@dataclass(frozen=True, slots=True)
class PrefixSummary:
    """The cluster's prefix-cache figures over a run."""

    hit_rate: float  # cached prompt tokens / prompt tokens looked up, over all admissions
    prefill_tokens_saved: int
    query_tokens: int
    evicted_blocks: int
    index_entries: int  # in the dispatch policy's prefix index at the end (0 without one)
    index_batches: int


class PrefixClusterSimulator(ClusterSimulator):
    """:class:`ClusterSimulator` with prefix caching in every engine and a prefix index fed by their events."""

    def __init__(
        self,
        config: ClusterConfig,
        trace: PrefixTrace,
        *,
        prefix_caching: bool = True,
        prefix_aware_migration: bool = False,
    ) -> None:
        super().__init__(config, trace.requests)
        self.trace = trace
        self.prefix_caching = prefix_caching
        self.prefix_aware_migration = prefix_aware_migration
        self.prefix_index: PrefixIndex | None = getattr(self.index, "prefix_index", None)
        self._event_seq: dict[str, int] = {}
        for inst in self.instances:
            self._attach_cache(inst.core)

    def _attach_cache(self, core: SimEngineCore) -> None:
        if self.prefix_caching:
            core.prefix_cache = PrefixCache(core.config.block_size, record_events=self.prefix_index is not None)

    def add_instance(self, role: str = "mixed", *, startup_s: float = 0.0) -> Any:
        inst = super().add_instance(role, startup_s=startup_s)
        self._attach_cache(inst.core)
        return inst

    # -- requests ---------------------------------------------------------------------------------------
    def _admit(self, request: SimRequest, spec: RequestSpec) -> None:
        ids = self.trace.hash_ids.get(spec.request_id, ())
        request.block_hashes = engine_block_hashes(
            ids, spec.prompt_len, self.config.engine.block_size, self.trace.trace_block_tokens
        )
        request.hash_block_tokens = 0  # already one chained hash per engine block
        super()._admit(request, spec)

    def _demand(self, request: SimRequest) -> RequestDemand:
        return dataclasses.replace(super()._demand(request), prefix_block_hashes=request.block_hashes)

    # -- the event feed (one numbered batch per engine per heartbeat) -----------------------------------
    def _refresh_snapshots(self) -> bool:
        index = self.prefix_index
        if index is not None and self.prefix_caching:
            for inst in self.instances:
                cache = inst.core.prefix_cache
                if cache is None or inst.state in ("starting", "stopped"):
                    continue
                stored, removed = cache.drain_events()
                if stored or removed:
                    seq = self._event_seq.get(inst.instance_id, -1) + 1
                    self._event_seq[inst.instance_id] = seq
                    index.apply(inst.instance_id, epoch="sim", seq=seq, stored=stored, removed=removed, now=self.now)
        return super()._refresh_snapshots()

    def _plan_migrations(self) -> list[MigrationDecision]:
        decisions = super()._plan_migrations()
        if not self.prefix_aware_migration or self.prefix_index is None or len(decisions) < 2:
            return decisions
        hashes: dict[str, Sequence[int]] = {}
        for decision in decisions:
            src = self.instances[int(decision.source_id.rsplit("-", 1)[1])]
            request = src.core.requests.get(decision.request_id)
            if request is not None and request.block_hashes:
                hashes[decision.request_id] = request.block_hashes
        return prefer_prefix_destinations(decisions, self._snapshots, self.prefix_index, hashes)

    # -- results ----------------------------------------------------------------------------------------
    def prefix_summary(self) -> PrefixSummary:
        total = PrefixCacheStats()
        for inst in self.instances:
            cache = inst.core.prefix_cache
            if cache is None:
                continue
            total.query_tokens += cache.stats.query_tokens
            total.hit_tokens += cache.stats.hit_tokens
            total.evicted_blocks += cache.stats.evicted_blocks
        index = self.prefix_index
        return PrefixSummary(
            hit_rate=total.hit_rate,
            prefill_tokens_saved=total.hit_tokens,
            query_tokens=total.query_tokens,
            evicted_blocks=total.evicted_blocks,
            index_entries=index.total_entries() if index is not None else 0,
            index_batches=index.stats.batches if index is not None else 0,
        )


def simulate_with_prefixes(
    config: ClusterConfig, trace: PrefixTrace, **kwargs: bool
) -> tuple[SimulationResult, PrefixSummary]:
    sim = PrefixClusterSimulator(config, trace, **kwargs)
    result = sim.run()
    return result, sim.prefix_summary()
