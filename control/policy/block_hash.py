"""vLLM's prefix-cache block hashes for the policies; the implementation is :mod:`control.block_hash` (outside
the layers, so the simulated engine computes the very same hashes for what it caches)."""

from control.block_hash import DEFAULT_NONE_HASH_SEED, none_hash, vllm_block_hashes

__all__ = ["DEFAULT_NONE_HASH_SEED", "none_hash", "vllm_block_hashes"]
