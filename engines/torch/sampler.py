"""Token sampling: greedy, or temperature / top-k / top-p with a per-request seed.

Randomness is a function of (request seed, output index), not of a generator that advances with the
engine: a request that is preempted and recomputed, resumed after a migration, or run through a pipeline
group instead of one engine samples exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_MASK63 = (1 << 63) - 1
_MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows: treat as greedy (as vLLM does)


def request_seed(engine_seed: int, request_id: str) -> int:
    """The seed of a request without an explicit one: stable across processes (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{engine_seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def _step_seed(seed: int, output_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """How to sample one row of logits."""

    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    output_index: int = 0  # index of the token being sampled in the request's output

    @property
    def greedy(self) -> bool:
        return self.temperature < _MIN_TEMPERATURE


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One token per row of ``logits`` ``[N, vocab]`` (float32)."""
    if len(rows) != logits.shape[0]:
        raise ValueError(f"{len(rows)} sampling rows for {logits.shape[0]} logits rows")
    tokens = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not row.greedy:
            tokens[i] = _sample_row(logits[i].cpu(), row)  # a CPU generator: same draws on any device
    return [int(t) for t in tokens]


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    scaled = logits.float() / row.temperature
    if 0 < row.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, row.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = (cumulative - sorted_probs) >= row.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # and always the most likely token (top_p <= 0 would otherwise drop them all)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = torch.Generator().manual_seed(_step_seed(row.seed, row.output_index))
    return int(torch.multinomial(probs, 1, generator=generator).item())
