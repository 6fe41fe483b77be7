"""A model stage: the weights of a contiguous layer range plus the KV pools of those layers.

A stage is what an engine computes with. An engine holding the whole model has one stage over [0, L); a
pipeline group chains several (:mod:`engines.torch.pipeline`). Stages can drop layers at run time and
turn the freed weight bytes into KV blocks for the layers they keep (KunServe's parameter-centric memory),
then restore them from the model files. The stage's memory budget (weights + KV) is fixed when it is built:
given, or implied by the initial weights plus the initial KV pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch.attention import AttentionMetadata
from engines.torch.batch import StageBatch, StageResult
from engines.torch.config import LlamaConfig, torch_dtype
from engines.torch.kv_cache import PagedKvCache
from engines.torch.model import (
    EdgeWeights,
    LayerWeights,
    Rotary,
    decoder_layer,
    edge_param_names,
    edge_weights,
    rms_norm,
)
from engines.torch.weights import EMBED, FINAL_NORM, LM_HEAD, WeightFiles, layer_param_names


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """What a drop or restore did to a stage's memory."""

    layers_before: tuple[int, int]
    layers_after: tuple[int, int]
    weight_bytes_before: int
    weight_bytes_after: int
    kv_blocks_before: int
    kv_blocks_after: int
    kv_bytes_before: int
    kv_bytes_after: int
    budget_bytes: int
    seconds: float

    @property
    def freed_weight_bytes(self) -> int:
        return self.weight_bytes_before - self.weight_bytes_after


def blocks_for_budget(
    config: LlamaConfig, layers: tuple[int, int], budget_bytes: int, block_size: int, dtype: torch.dtype
) -> int:
    """KV blocks that fit beside the weights of ``layers`` in ``budget_bytes``."""
    first, last = layers
    weights = config.weight_bytes(first, last, dtype.itemsize)
    block = config.kv_block_bytes(last - first, block_size, dtype.itemsize)
    return max(0, (budget_bytes - weights) // block) if block else 0


class ModelStage:
    """Layers [first, last) of a Llama model with their paged KV pools; runs one step at a time."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        layer_range: tuple[int, int] | None = None,
        block_size: int = 32,
        num_blocks: int | None = None,
        memory_budget_bytes: int | None = None,
        dtype: str = "float32",
        config: LlamaConfig | None = None,
        device: str = "cpu",
    ) -> None:
        """``device``: where weights and KV pools live and the step computes ("cpu", "cuda", "cuda:1");
        step inputs arrive on the CPU and are moved here, outputs stay here (the wire moves them back)."""
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.config = config or LlamaConfig.from_model_dir(self.model_dir)
        self.dtype_name = dtype
        self.dtype = torch_dtype(dtype)
        self.block_size = block_size
        first, last = layer_range or (0, self.config.num_layers)
        if not 0 <= first < last <= self.config.num_layers:
            raise ValueError(f"layer range [{first}, {last}) is not within [0, {self.config.num_layers})")
        self.home_range = (first, last)
        self.layer_range = (first, last)
        self._files = WeightFiles(self.model_dir)
        self.rotary = Rotary(self.config, self.device)
        if memory_budget_bytes is not None:
            blocks = blocks_for_budget(self.config, self.home_range, memory_budget_bytes, block_size, self.dtype)
            if blocks < 1:
                raise ValueError(
                    f"memory budget {memory_budget_bytes} B leaves no KV block beside "
                    f"{self.config.weight_bytes(first, last, self.dtype.itemsize)} B of weights"
                )
            if num_blocks is not None and num_blocks > blocks:
                raise ValueError(f"{num_blocks} blocks do not fit the memory budget ({blocks} do)")
            num_blocks = num_blocks or blocks
        num_blocks = 512 if num_blocks is None else num_blocks
        self.layers: dict[int, LayerWeights] = {}
        self._edge_tensors: dict[str, torch.Tensor] = {}
        self.edge = EdgeWeights()
        self._load(first, last)
        self.kv = PagedKvCache(
            range(first, last),
            num_blocks,
            block_size=block_size,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.home_num_blocks = num_blocks
        self.budget_bytes = (
            memory_budget_bytes if memory_budget_bytes is not None else self.weight_bytes + self.kv.nbytes
        )

    # ------------------------------------------------------------------------------------------ shape
    @property
    def first(self) -> int:
        return self.layer_range[0]

    @property
    def last(self) -> int:
        return self.layer_range[1]

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.last == self.config.num_layers

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.layers.values()) + self.edge.nbytes

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes

    def _load(self, first: int, last: int) -> None:
        """Load the weights of layers [first, last) that are not held, and the edge weights that range needs."""
        wanted = [layer for layer in range(first, last) if layer not in self.layers]
        names = [name for layer in wanted for name in layer_param_names(layer)]
        available = {name for name in (EMBED, FINAL_NORM, LM_HEAD) if name in self._files}
        edge_names = edge_param_names(self.config, first, last, available)
        held = {name: t for name, t in self._edge_tensors.items() if name in edge_names}
        tensors = self._files.load(names + [n for n in edge_names if n not in held], self.dtype, self.device)
        for layer in wanted:
            self.layers[layer] = LayerWeights.from_tensors(layer, tensors)
        self._edge_tensors = held | {name: tensors[name] for name in edge_names if name not in held}
        self.edge = edge_weights(self.config, first, last, self._edge_tensors)

    # ------------------------------------------------------------------------------------------ compute
    @torch.inference_mode()
    def forward(self, batch: StageBatch) -> StageResult:
        """Run this stage's layers on one step: hidden states out, or logits of ``logits_indices`` at the end."""
        batch = batch.to(self.device)
        if self.is_first:
            if batch.token_ids is None or self.edge.embed is None:
                raise ValueError("the first stage needs token ids")
            hidden = F.embedding(batch.token_ids, self.edge.embed)
        else:
            if batch.hidden is None:
                raise ValueError(f"stage [{self.first}, {self.last}) needs hidden states")
            hidden = batch.hidden.to(device=self.device, dtype=self.dtype)
        meta = AttentionMetadata.build(batch, self.block_size)
        cos_sin = self.rotary.cos_sin(batch.positions, self.dtype)
        for layer in range(self.first, self.last):
            hidden = decoder_layer(hidden, self.layers[layer], self.kv.pool(layer), meta, cos_sin, self.config)
        if not self.is_last:
            return StageResult(hidden=hidden)
        assert self.edge.final_norm is not None and self.edge.lm_head is not None
        rows = rms_norm(hidden[batch.logits_indices], self.edge.final_norm, self.config.rms_norm_eps)
        return StageResult(logits=F.linear(rows, self.edge.lm_head).float())

    # ------------------------------------------------------------------------------------------ drop/restore
    def drop_layers(self, keep: tuple[int, int]) -> MemoryReport:
        """Free every layer outside ``keep`` (weights and KV) and regrow the KV pool to fill the budget.

        Block ids below the old pool size keep their contents: requests' KV for kept layers survives.
        """
        first, last = keep
        if not self.first <= first < last <= self.last:
            raise ValueError(f"cannot keep [{first}, {last}) of held layers [{self.first}, {self.last})")
        started = time.perf_counter()
        before = self._snapshot()
        dropped = [layer for layer in self.layers if not first <= layer < last]
        for layer in dropped:
            del self.layers[layer]
        self.kv.remove_layers(dropped)
        self.layer_range = (first, last)
        self._load(first, last)  # edge weights of the new range: drops an end it lost, loads a tied head it needs
        blocks = max(self.kv.num_blocks, self._blocks_in_budget())
        self.kv.resize(blocks)
        return self._report(before, started)

    def restore_layers(self, layer_range: tuple[int, int] | None = None, num_blocks: int | None = None) -> MemoryReport:
        """Reload layers up to ``layer_range`` (default: the range this stage was built with) from the files.

        The KV pool first shrinks to ``num_blocks`` (default: what fits the budget then), so that the
        budget holds while weights come back; every block id in use must already be below it (compact
        first). The restored layers' KV pools start empty: import a running request's KV for them.
        """
        first, last = layer_range or self.home_range
        if not (first <= self.first and self.last <= last):
            raise ValueError(f"[{first}, {last}) does not contain held layers [{self.first}, {self.last})")
        started = time.perf_counter()
        before = self._snapshot()
        target_range = (first, last)
        blocks = num_blocks if num_blocks is not None else self._blocks_in_budget(target_range)
        self.kv.resize(blocks)
        self._load(first, last)
        self.layer_range = target_range
        self.kv.add_layers(range(first, last))
        return self._report(before, started)

    def _blocks_in_budget(self, layers: tuple[int, int] | None = None) -> int:
        return blocks_for_budget(
            self.config, layers or self.layer_range, self.budget_bytes, self.block_size, self.dtype
        )

    def _snapshot(self) -> tuple[tuple[int, int], int, int, int]:
        return self.layer_range, self.weight_bytes, self.kv.num_blocks, self.kv.nbytes

    def _report(self, before: tuple[tuple[int, int], int, int, int], started: float) -> MemoryReport:
        layers, weights, blocks, kv_bytes = before
        return MemoryReport(
            layers_before=layers,
            layers_after=self.layer_range,
            weight_bytes_before=weights,
            weight_bytes_after=self.weight_bytes,
            kv_blocks_before=blocks,
            kv_blocks_after=self.kv.num_blocks,
            kv_bytes_before=kv_bytes,
            kv_bytes_after=self.kv.nbytes,
            budget_bytes=self.budget_bytes,
            seconds=time.perf_counter() - started,
        )

    # ------------------------------------------------------------------------------------------ KV transfer
    def held_layers(self) -> list[int]:
        return list(range(self.first, self.last))

    def export_kv(self, layers: list[int], block_ids: list[int]) -> dict[int, torch.Tensor]:
        return self.kv.export_blocks(layers, block_ids)

    def import_kv(self, kv: dict[int, torch.Tensor], block_ids: list[int]) -> None:
        self.kv.import_blocks(kv, block_ids)

    def move_blocks(self, moves: dict[int, int]) -> None:
        self.kv.move_blocks(moves)
