"""Paged KV memory: a block allocator (ids and a free list) and per-layer block pools (the bytes).

The two are separate on purpose. The allocator is scheduler state: one per logical engine, and in a
pipeline group one for the whole group, because every stage indexes its own pool with the same block ids
(a request's block table is valid on every stage). A pool exists only for the layers a stage holds, so
dropping layers frees their KV and the freed bytes can be re-cut into more blocks for the kept layers.

Pool layout per layer: ``[num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]``: one block of one
layer is contiguous (it can be sent as one segment over the KV data plane), and a token's K or V for all
heads is one row (written by a single indexed store).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class BlockAllocator:
    """Block ids ``0..num_blocks-1`` with a free list; lowest ids are handed out first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self._num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._used: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """``count`` free block ids; raises if there are not enough (check ``can_allocate`` first)."""
        if count > len(self._free):
            raise RuntimeError(f"cannot allocate {count} blocks: {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise RuntimeError(f"block {block} freed twice or never allocated")
            self._used.remove(block)
            self._free.append(block)

    def compaction_plan(self, num_blocks: int) -> dict[int, int]:
        """Moves (old id -> new id) that bring every used block below ``num_blocks``; {} if none needed.

        Raises if more blocks are in use than ``num_blocks``. The caller moves the bytes in every pool and
        rewrites block tables, then calls :meth:`apply` and :meth:`resize`.
        """
        if len(self._used) > num_blocks:
            raise RuntimeError(f"{len(self._used)} blocks in use do not fit in {num_blocks}")
        movers = sorted(b for b in self._used if b >= num_blocks)
        targets = sorted(b for b in self._free if b < num_blocks)
        return dict(zip(movers, targets, strict=False))

    def apply(self, moves: dict[int, int]) -> None:
        """Record that the blocks in ``moves`` now live at their new ids."""
        for old, new in moves.items():
            if old not in self._used or new in self._used:
                raise RuntimeError(f"invalid block move {old} -> {new}")
            self._used.remove(old)
            self._used.add(new)
        self._free = sorted((b for b in range(self._num_blocks) if b not in self._used), reverse=True)

    def resize(self, num_blocks: int) -> None:
        """Grow or shrink the id space; shrinking needs every used id below ``num_blocks`` (compact first)."""
        if any(b >= num_blocks for b in self._used):
            raise RuntimeError(f"blocks at or above {num_blocks} are in use: compact first")
        self._num_blocks = num_blocks
        self._free = sorted((b for b in range(num_blocks) if b not in self._used), reverse=True)


class PagedKvCache:
    """One preallocated KV pool per held layer, indexed by block id."""

    def __init__(
        self,
        layers: Iterable[int],
        num_blocks: int,
        *,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.device = torch.device(device)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self._num_blocks = num_blocks
        self.pools: dict[int, torch.Tensor] = {layer: self._new_pool(num_blocks) for layer in layers}

    def _new_pool(self, num_blocks: int) -> torch.Tensor:
        # zeros, not empty: touching the pages now makes the reported bytes real and the first step fast.
        return torch.zeros(
            num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def layers(self) -> list[int]:
        return sorted(self.pools)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every held layer."""
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return per_layer * len(self.pools)

    @property
    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools.values())

    def pool(self, layer: int) -> torch.Tensor:
        return self.pools[layer]

    # ------------------------------------------------------------------------------------------ shape
    def resize(self, num_blocks: int) -> None:
        """Reallocate every pool with ``num_blocks`` blocks, keeping blocks below both sizes (compact first)."""
        keep = min(num_blocks, self._num_blocks)
        for layer, old in self.pools.items():
            new = self._new_pool(num_blocks)
            new[:keep] = old[:keep]
            self.pools[layer] = new
            del old
        self._num_blocks = num_blocks

    def remove_layers(self, layers: Iterable[int]) -> None:
        for layer in layers:
            self.pools.pop(layer, None)

    def add_layers(self, layers: Iterable[int]) -> None:
        for layer in layers:
            if layer not in self.pools:
                self.pools[layer] = self._new_pool(self._num_blocks)

    def move_blocks(self, moves: dict[int, int]) -> None:
        """Copy block ``old`` to ``new`` in every pool (compaction before a shrink)."""
        if not moves:
            return
        src = torch.tensor(list(moves), dtype=torch.long, device=self.device)
        dst = torch.tensor(list(moves.values()), dtype=torch.long, device=self.device)
        for pool in self.pools.values():
            pool[dst] = pool[src]

    # ------------------------------------------------------------------------------------------ transfer
    def export_blocks(self, layers: Sequence[int], block_ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """A copy of ``block_ids`` (in that order) of each layer: ``{layer: [n, 2, bs, heads, dim]}``, on the
        pools' device."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        return {layer: self.pools[layer][index].clone() for layer in layers}

    def import_blocks(self, kv: dict[int, torch.Tensor], block_ids: Sequence[int]) -> None:
        """Write exported blocks into ``block_ids`` (same order); every layer of ``kv`` must be held here.
        The blocks may come from another device (a CPU wire payload into GPU pools)."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        for layer, blocks in kv.items():
            if layer not in self.pools:
                raise KeyError(f"layer {layer} is not held here (held: {self.layers})")
            if blocks.shape[0] != len(block_ids):
                raise ValueError(f"layer {layer}: {blocks.shape[0]} blocks for {len(block_ids)} ids")
            self.pools[layer][index] = blocks.to(device=self.device, dtype=self.dtype)
