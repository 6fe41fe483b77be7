"""KunServe groups over torch engines: g engines that each held the whole model drop to 1/g of the layers,
turn the freed weight memory into KV blocks, and serve the leader's requests as a g-stage pipeline; later
they restore the dropped layers and the leader serves alone again.

Member r keeps layers [r*L/g, (r+1)*L/g) (KunServe's static grouping). Running requests keep going: their
KV for the layers that change owner is exported from the old owner and imported at the new one while every
engine is paused, so no token is recomputed and outputs are exactly those of an undisturbed run. When the
restored pool is smaller than the group's, the latest requests that do not fit are preempted (recomputed).

Limits (the paper's rebalancing across micro-batches is not modelled): members must be idle when the group
forms (requests run on the leader; a control plane would migrate or drain the others first), and the
pipeline runs one micro-batch at a time, in one process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines.base import EngineError
from engines.torch.engine import TorchEngine
from engines.torch.pipeline import Hop, PipelineGroup
from engines.torch.stage import MemoryReport


@dataclass(frozen=True, slots=True)
class GroupReport:
    """What forming or dissolving a group did."""

    ranges: list[tuple[int, int]]
    stages: list[MemoryReport]  # one per member, in member order
    kv_blocks_before: int  # blocks the leader could hand out before
    kv_blocks_after: int
    moved_requests: int
    moved_kv_bytes: int
    preempted: list[str]
    seconds: float

    @property
    def freed_weight_bytes(self) -> int:
        return sum(r.freed_weight_bytes for r in self.stages)


def split_layers(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """KunServe's static split: member r keeps layers [r*L/g, (r+1)*L/g)."""
    if not 1 <= groups <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {groups} stages")
    return [(r * num_layers // groups, (r + 1) * num_layers // groups) for r in range(groups)]


def _payload_bytes(payload: dict[str, Any]) -> int:
    return sum(t.nbytes for t in payload["kv"].values())


class LayerGroup:
    """A formed group: ``engines[0]`` leads (schedules and samples); every member runs one stage."""

    def __init__(self, engines: Sequence[TorchEngine], ranges: list[tuple[int, int]], pipeline: PipelineGroup) -> None:
        self.engines = list(engines)
        self.ranges = ranges
        self.pipeline = pipeline

    @property
    def leader(self) -> TorchEngine:
        return self.engines[0]

    @classmethod
    async def form(cls, engines: Sequence[TorchEngine], *, hop: Hop | None = None) -> tuple[LayerGroup, GroupReport]:
        """Drop layers on every engine and chain them; the leader's running requests continue through it."""
        started = time.perf_counter()
        engines = list(engines)
        if len(engines) < 2:
            raise ValueError("a group needs at least two engines")
        leader = engines[0]
        num_layers = leader.config.num_layers
        for engine in engines:
            if engine.role != "standalone" or engine.stage.layer_range != (0, num_layers):
                raise EngineError(f"{engine.instance_id} must hold every layer and be in no group to join one")
            if engine.kv_layout != leader.kv_layout:
                raise EngineError(f"{engine.instance_id} has KV layout {engine.kv_layout}, not {leader.kv_layout}")
        for member in engines[1:]:
            if member.scheduler.has_work:
                raise EngineError(f"{member.instance_id} has requests: drain or migrate them before it joins a group")
        ranges = split_layers(num_layers, len(engines))
        async with contextlib.AsyncExitStack() as stack:
            for engine in engines:
                await stack.enter_async_context(engine.paused())
            blocks_before = leader.allocator.num_blocks
            moving = leader.requests_with_kv()
            payloads = [
                leader.export_kv(request_id, list(range(*ranges[r])))
                for r in range(1, len(engines))
                for request_id in moving
            ]
            reports = [await e.drop_layers_paused(ranges[r]) for r, e in enumerate(engines)]
            pipeline = PipelineGroup([e.stage for e in engines], hop=hop)
            leader.use_runner(pipeline, "leader")
            for member in engines[1:]:
                member.use_runner(member.stage, "member")
            for payload in payloads:
                leader.import_kv(payload["request_id"], payload)
            report = GroupReport(
                ranges=ranges,
                stages=reports,
                kv_blocks_before=blocks_before,
                kv_blocks_after=leader.allocator.num_blocks,
                moved_requests=len(moving),
                moved_kv_bytes=sum(_payload_bytes(p) for p in payloads),
                preempted=[],
                seconds=time.perf_counter() - started,
            )
        return cls(engines, ranges, pipeline), report

    async def dissolve(self) -> GroupReport:
        """Restore every engine's layers; the leader's running requests continue on the leader alone."""
        started = time.perf_counter()
        leader = self.leader
        async with contextlib.AsyncExitStack() as stack:
            for engine in self.engines:
                await stack.enter_async_context(engine.paused())
            blocks_before = leader.allocator.num_blocks
            target = leader.stage.home_num_blocks
            preempted = leader.fit_blocks(target)  # compacts in every stage, so the exports below see final ids
            kept = set(leader.stage.held_layers())
            returning = [layer for layer in range(leader.config.num_layers) if layer not in kept]
            moving = leader.requests_with_kv()
            payloads = [leader.export_kv(request_id, returning) for request_id in moving]
            leader.use_runner(leader.stage, "standalone")
            reports = [await leader.restore_layers_paused(target)]
            for payload in payloads:
                leader.import_kv(payload["request_id"], payload)
            for member in self.engines[1:]:
                reports.append(await member.restore_layers_paused())
                member.use_runner(member.stage, "standalone")
            return GroupReport(
                ranges=[(0, leader.config.num_layers)] * len(self.engines),
                stages=reports,
                kv_blocks_before=blocks_before,
                kv_blocks_after=leader.allocator.num_blocks,
                moved_requests=len(moving),
                moved_kv_bytes=sum(_payload_bytes(p) for p in payloads),
                preempted=preempted,
                seconds=time.perf_counter() - started,
            )
