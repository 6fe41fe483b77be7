"""``PipelineGroup``: stages holding consecutive layer ranges, chained so they compute as one model.

Stage i's hidden states feed stage i+1 through a :class:`~engines.torch.batch.StageBatch`; the last stage
returns logits. Every stage indexes its own KV pools with the same block ids, so one scheduler (one block
allocator) drives the whole group, and its capacity is the smallest stage's pool. A ``hop`` between
stages can stand in for the wire: ``PipelineGroup(stages, hop=serialize_hop)`` sends every boundary
through bytes, exactly as a cross-process pipeline would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from engines.torch.batch import StageBatch, StageResult

Hop = Callable[[StageBatch], StageBatch]


class Stage(Protocol):
    """One pipeline stage (a local :class:`~engines.torch.stage.ModelStage`, or a proxy to a remote one)."""

    @property
    def layer_range(self) -> tuple[int, int]: ...

    @property
    def num_blocks(self) -> int: ...

    def held_layers(self) -> list[int]: ...

    def forward(self, batch: StageBatch) -> StageResult: ...

    def export_kv(self, layers: list[int], block_ids: list[int]) -> dict[int, torch.Tensor]: ...

    def import_kv(self, kv: dict[int, torch.Tensor], block_ids: list[int]) -> None: ...

    def move_blocks(self, moves: dict[int, int]) -> None: ...


def serialize_hop(batch: StageBatch) -> StageBatch:
    """Send a boundary through its wire form (what a cross-process pipeline does)."""
    return StageBatch.from_bytes(batch.to_bytes())


class PipelineGroup:
    """g stages covering [0, L) in order; runs a step through all of them (a :class:`StageRunner`)."""

    def __init__(self, stages: Sequence[Stage], *, hop: Hop | None = None) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        expected = 0
        for stage in stages:
            first, last = stage.layer_range
            if first != expected:
                raise ValueError(f"stage layers [{first}, {last}) do not follow layer {expected - 1}")
            expected = last
        self.stages = list(stages)
        self.hop = hop
        self.num_layers = expected

    @property
    def layer_range(self) -> tuple[int, int]:
        return (0, self.num_layers)

    @property
    def num_blocks(self) -> int:
        return min(stage.num_blocks for stage in self.stages)

    def held_layers(self) -> list[int]:
        return list(range(self.num_layers))

    def owner_of(self, layer: int) -> Stage:
        for stage in self.stages:
            first, last = stage.layer_range
            if first <= layer < last:
                return stage
        raise KeyError(f"no stage holds layer {layer}")

    def forward(self, batch: StageBatch) -> StageResult:
        for stage in self.stages[:-1]:
            result = stage.forward(batch)
            assert result.hidden is not None
            batch = batch.with_hidden(result.hidden)
            if self.hop is not None:
                batch = self.hop(batch)
        return self.stages[-1].forward(batch)

    def export_kv(self, layers: list[int], block_ids: list[int]) -> dict[int, torch.Tensor]:
        kv: dict[int, torch.Tensor] = {}
        for stage, owned in self._by_owner(layers):
            kv.update(stage.export_kv(owned, block_ids))
        return kv

    def import_kv(self, kv: dict[int, torch.Tensor], block_ids: list[int]) -> None:
        for stage, owned in self._by_owner(list(kv)):
            stage.import_kv({layer: kv[layer] for layer in owned}, block_ids)

    def move_blocks(self, moves: dict[int, int]) -> None:
        for stage in self.stages:
            stage.move_blocks(moves)

    def _by_owner(self, layers: list[int]) -> list[tuple[Stage, list[int]]]:
        groups: list[tuple[Stage, list[int]]] = []
        for stage in self.stages:
            first, last = stage.layer_range
            owned = [layer for layer in layers if first <= layer < last]
            if owned:
                groups.append((stage, owned))
        unowned = set(layers) - {layer for _, owned in groups for layer in owned}
        if unowned:
            raise KeyError(f"no stage holds layers {sorted(unowned)}")
        return groups
