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
    write_blocks: torch.Tensor  # [T] block id of each new token's slot
    write_offsets: torch.Tensor  # [T] offset in that block
    read_blocks: torch.Tensor  # [B, Lmax] block id of each context position (0 where padded)
    read_offsets: torch.Tensor  # [B, Lmax]
    query_rows: torch.Tensor  # [B, Qmax] row of each padded query slot (0 where padded)
    unpad_index: torch.Tensor  # [T] index of each row in the flattened [B * Qmax] padded layout
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] True where a query may attend a key

    @classmethod
    def build(cls, batch: StageBatch, block_size: int) -> AttentionMetadata:
        positions = batch.positions
        starts = batch.query_start
        query_lens = starts[1:] - starts[:-1]
        num_seqs = batch.num_seqs
        seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
        tables = batch.block_tables
        write_blocks = tables[seq_of_row, positions // block_size]
        write_offsets = positions % block_size

        max_query = int(query_lens.max()) if num_seqs else 0
        max_context = int(batch.context_lens.max()) if num_seqs else 0
        key_pos = torch.arange(max_context)
        key_valid = key_pos[None, :] < batch.context_lens[:, None]  # [B, Lmax]
        block_index = (key_pos // block_size).clamp(max=tables.shape[1] - 1)
        read_blocks = torch.where(key_valid, tables[:, block_index], 0)
        read_offsets = (key_pos % block_size).expand(num_seqs, -1)

        slot = torch.arange(max_query)
        query_valid = slot[None, :] < query_lens[:, None]  # [B, Qmax]
        query_rows = torch.where(query_valid, starts[:-1, None] + slot[None, :], 0)
        query_pos = torch.where(query_valid, positions[query_rows], 0)
        mask = key_valid[:, None, :] & (key_pos[None, None, :] <= query_pos[:, :, None])
        # Padded query slots attend key 0 only: softmax over an all-masked row would give NaN.
        mask[:, :, 0] |= ~query_valid
        unpad_index = (seq_of_row * max_query) + (torch.arange(positions.shape[0]) - starts[seq_of_row])
        return cls(write_blocks, write_offsets, read_blocks, read_offsets, query_rows, unpad_index, mask[:, None])


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
    pool[meta.write_blocks, 0, meta.write_offsets] = k
    pool[meta.write_blocks, 1, meta.write_offsets] = v
    keys = pool[meta.read_blocks, 0, meta.read_offsets].transpose(1, 2)  # [B, kv_heads, Lmax, dim]
    values = pool[meta.read_blocks, 1, meta.read_offsets].transpose(1, 2)
    queries = q[meta.query_rows].transpose(1, 2)  # [B, heads, Qmax, dim]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale)
    out = out.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[2])  # [B * Qmax, heads * dim]
    return out[meta.unpad_index]
