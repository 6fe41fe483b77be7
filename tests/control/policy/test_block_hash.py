"""Drover computes vLLM's own prefix-cache block hashes (the keys of the kv_aware index)."""

from __future__ import annotations

import pytest

from control.policy.block_hash import vllm_block_hashes


def test_chained_full_blocks_only() -> None:
    tokens = list(range(100))
    hashes = vllm_block_hashes(tokens, 32)
    assert len(hashes) == 3
    assert vllm_block_hashes(tokens[:64] + [7] * 36, 32)[:2] == hashes[:2]
    assert vllm_block_hashes([9, *tokens[1:]], 32)[1] != hashes[1]  # chained: a change upstream changes all
    assert vllm_block_hashes(tokens, 32, cache_salt="s")[0] != hashes[0]
    assert all(0 <= h < 1 << 64 for h in hashes)


def test_equal_to_vllm() -> None:
    utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    hashing = pytest.importorskip("vllm.utils.hashing")
    utils.init_none_hash(hashing.sha256)
    tokens = [(i * 7919) % 250 for i in range(130)]
    parent = None
    expected = []
    for k in range(len(tokens) // 32):
        extra = (("cache_salt", "salt"),) if k == 0 else None
        parent = utils.hash_block_tokens(hashing.sha256, parent, tokens[k * 32 : (k + 1) * 32], extra)
        expected.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    assert list(vllm_block_hashes(tokens, 32, cache_salt="salt")) == expected
