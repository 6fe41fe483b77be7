"""Paged attention in plain torch: write a step's K/V into block pools, attend over each request's blocks.

The index tensors that map tokens to blocks are the same for every layer of a step, so they are built once
per step (:class:`AttentionMetadata`) and reused by each layer. Requests are padded to the longest query
chunk and the longest context of the step and run through one ``scaled_dot_product_attention`` call with a
mask: a mixed batch (decodes plus prefill chunks) is a single kernel call per layer, with no Python loop
over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.torch.batch import StageBatch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    key_slots: torch.Tensor  # [T] row of each new token's K in a pool viewed as [num_blocks * 2 * block_size, ...]
    value_slots: torch.Tensor  # [T] same for V
    read_blocks: torch.Tensor  # [B * max_blocks] every request's block table, flattened (0 where padded)
    max_blocks: int
    query_rows: torch.Tensor  # [B, Qmax] row of each padded query slot (0 where padded)
    unpad_index: torch.Tensor  # [T] index of each row in the flattened [B * Qmax] padded layout
    mask: torch.Tensor  # [B, 1, Qmax, max_blocks * block_size] True where a query may attend a key

    @classmethod
    def build(cls, batch: StageBatch, block_size: int) -> AttentionMetadata:
        positions = batch.positions
        starts = batch.query_start
        query_lens = starts[1:] - starts[:-1]
        num_seqs = batch.num_seqs
        device = positions.device  # every index tensor lives where the step computes (CPU or GPU)
        seq_of_row = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
        tables = batch.block_tables
        max_blocks = tables.shape[1]
        write_blocks = tables[seq_of_row, positions // block_size]
        key_slots = write_blocks * (2 * block_size) + positions % block_size
        value_slots = key_slots + block_size

        max_query = int(query_lens.max()) if num_seqs else 0
        key_pos = torch.arange(max_blocks * block_size, device=device)
        key_valid = key_pos[None, :] < batch.context_lens[:, None]  # [B, L]

        slot = torch.arange(max_query, device=device)
        query_valid = slot[None, :] < query_lens[:, None]  # [B, Qmax]
        query_rows = torch.where(query_valid, starts[:-1, None] + slot[None, :], 0)
        query_pos = torch.where(query_valid, positions[query_rows], 0)
        mask = key_valid[:, None, :] & (key_pos[None, None, :] <= query_pos[:, :, None])
        # Padded query slots attend key 0 only: softmax over an all-masked row would give NaN.
        mask[:, :, 0] |= ~query_valid
        unpad_index = (seq_of_row * max_query) + (torch.arange(positions.shape[0], device=device) - starts[seq_of_row])
        return cls(key_slots, value_slots, tables.reshape(-1), max_blocks, query_rows, unpad_index, mask[:, None])


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's ``k``/``v`` (``[T, kv_heads, dim]``) in ``pool``, attend, return ``[T, heads * dim]``.

    ``pool`` is one layer's ``[num_blocks, 2, block_size, kv_heads, dim]``; ``q`` is ``[T, heads, dim]``.
    """
    _, _, block_size, kv_heads, dim = pool.shape
    rows = pool.view(-1, kv_heads, dim)
    rows.index_copy_(0, meta.key_slots, k)
    rows.index_copy_(0, meta.value_slots, v)
    # Whole blocks of each request: [B, max_blocks, 2, block_size, kv_heads, dim] (contiguous block copies).
    blocks = pool.index_select(0, meta.read_blocks).view(-1, meta.max_blocks, 2, block_size, kv_heads, dim)
    num_seqs = blocks.shape[0]
    keys = blocks[:, :, 0].reshape(num_seqs, -1, kv_heads, dim).transpose(1, 2)  # [B, kv_heads, L, dim]
    values = blocks[:, :, 1].reshape(num_seqs, -1, kv_heads, dim).transpose(1, 2)
    queries = q[meta.query_rows].transpose(1, 2)  # [B, heads, Qmax, dim]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=q.shape[1] != kv_heads
    )
    out = out.transpose(1, 2).reshape(-1, q.shape[1] * dim)  # [B * Qmax, heads * dim]
    return out[meta.unpad_index]
