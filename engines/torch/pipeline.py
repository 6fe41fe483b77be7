"""``PipelineGroup``: stages holding consecutive layer ranges, chained so they compute as one model.

Stage i's hidden states feed stage i+1 through a :class:`~engines.torch.batch.StageBatch`; the last stage
returns logits. Every stage indexes its own KV pools with the same block ids, so one scheduler (one block
allocator) drives the whole group, and its capacity is the smallest stage's pool. A ``hop`` between
stages can stand in for the wire: ``PipelineGroup(stages, hop=serialize_hop)`` sends every boundary
through bytes, exactly as a cross-process pipeline would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    """g stages covering [0, L) in order; runs a step through all of them (a :class:`StageRunner`).

    With ``micro_batches`` > 1 a step's requests are cut into micro-batches (prefill chunks apart from
    decodes, then by count) that flow through the stages as a pipeline: stage s computes micro-batch m
    while stage s+1 computes m-1, each stage in a thread of its own, so remote stages (other processes)
    work at the same time instead of in turn. Requests are independent rows, so the tokens are the same.
    """

    def __init__(self, stages: Sequence[Stage], *, hop: Hop | None = None, micro_batches: int = 1) -> None:
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
        self.micro_batches = max(1, micro_batches)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the stage threads (micro-batched pipelines)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

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
        parts = split_micro_batches(batch, self.micro_batches) if len(self.stages) > 1 else []
        if len(parts) < 2:
            return self._forward_one(batch)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.stages), thread_name_prefix="pipeline-stage")
        pool = self._pool
        current = [sub for sub, _ in parts]
        logits: list[torch.Tensor | None] = [None] * len(parts)
        last = len(self.stages) - 1
        for tick in range(len(parts) + last):  # stage s runs micro-batch tick - s
            running = [
                (tick - s, s, pool.submit(self.stages[s].forward, current[tick - s]))
                for s in range(len(self.stages))
                if 0 <= tick - s < len(parts)
            ]
            for m, s, future in running:
                result = future.result()
                if s < last:
                    assert result.hidden is not None
                    current[m] = current[m].with_hidden(result.hidden)
                    if self.hop is not None:
                        current[m] = self.hop(current[m])
                else:
                    logits[m] = result.logits
        if batch.logits_indices.numel() == 0:
            return StageResult(logits=next(t for t in logits if t is not None))
        first = next(t for t in logits if t is not None)
        out = torch.empty((batch.logits_indices.shape[0], first.shape[-1]), dtype=first.dtype, device=first.device)
        for (_, positions), part in zip(parts, logits, strict=True):
            if part is not None and positions.numel():
                out[positions.to(first.device)] = part.to(first.device)
        return StageResult(logits=out)

    def _forward_one(self, batch: StageBatch) -> StageResult:
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


def split_micro_batches(batch: StageBatch, count: int) -> list[tuple[StageBatch, torch.Tensor]]:
    """Cut a step into up to ``count`` micro-batches of whole requests: prefill chunks apart from decodes
    (a decode padded to a prefill's query length wastes the most), then into nearly equal token counts.
    Each comes with the positions of its logits rows in the step's ``logits_indices`` (see
    :meth:`StageBatch.select`). One part (no split) when ``count`` < 2 or the step has one request."""
    if count < 2 or batch.num_seqs < 2:
        return []
    lens = (batch.query_start[1:] - batch.query_start[:-1]).tolist()
    decodes = [b for b, n in enumerate(lens) if n == 1]
    prefills = [b for b, n in enumerate(lens) if n > 1]
    groups = [g for g in (prefills, decodes) if g]
    while len(groups) < count:
        widest = max(range(len(groups)), key=lambda i: sum(lens[b] for b in groups[i]))
        group = groups[widest]
        if len(group) < 2:
            break
        total, running, cut = sum(lens[b] for b in group), 0, 1
        for i, b in enumerate(group[:-1]):
            running += lens[b]
            cut = i + 1
            if running * 2 >= total:
                break
        groups[widest : widest + 1] = [group[:cut], group[cut:]]
    if len(groups) < 2:
        return []
    return [batch.select(sorted(group)) for group in groups]
