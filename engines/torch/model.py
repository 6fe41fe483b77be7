"""The Llama architecture as functions over weight tensors: RMSNorm, rotary embeddings, GQA attention over
paged KV, SwiGLU MLP.

Weights are plain tensors in small dataclasses rather than ``nn.Module`` trees: a stage adds and removes
whole layers at run time (drop and restore), and a dict of layer index -> :class:`LayerWeights` makes that
a dict operation whose freed bytes are exactly the tensors removed. The arithmetic follows transformers'
``LlamaForCausalLM`` step for step (float32 norm and rotary) so that outputs match it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from engines.torch.attention import AttentionMetadata, paged_attention
from engines.torch.config import LlamaConfig, inverse_frequencies
from engines.torch.weights import EMBED, FINAL_NORM, LM_HEAD, layer_param_names


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    @classmethod
    def from_tensors(cls, layer: int, tensors: dict[str, torch.Tensor]) -> LayerWeights:
        # layer_param_names() lists the checkpoint names in this dataclass's field order.
        return cls(*(tensors[name] for name in layer_param_names(layer)))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


@dataclass(slots=True)
class EdgeWeights:
    """Weights only the first stage (embedding) or the last stage (final norm, LM head) holds."""

    embed: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    lm_head: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for tensor in (self.embed, self.final_norm, self.lm_head):
            if tensor is not None and tensor.data_ptr() not in seen:  # a tied head shares the embedding
                seen.add(tensor.data_ptr())
                total += tensor.nbytes
        return total


def edge_param_names(config: LlamaConfig, first: int, last: int, available: set[str] | None = None) -> list[str]:
    names: list[str] = []
    if first == 0:
        names.append(EMBED)
    if last == config.num_layers:
        names.append(FINAL_NORM)
        tied = config.tie_word_embeddings or (available is not None and LM_HEAD not in available)
        if not tied:
            names.append(LM_HEAD)
        elif first != 0:
            names.append(EMBED)
    return names


def edge_weights(config: LlamaConfig, first: int, last: int, tensors: dict[str, torch.Tensor]) -> EdgeWeights:
    edge = EdgeWeights()
    if first == 0:
        edge.embed = tensors[EMBED]
    if last == config.num_layers:
        edge.final_norm = tensors[FINAL_NORM]
        edge.lm_head = tensors.get(LM_HEAD, tensors.get(EMBED))
    return edge


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class Rotary:
    """Rotary position embedding with the config's theta and scaling."""

    def __init__(self, config: LlamaConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(config).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # [T, 1, dim]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (_rotate_half(x) * sin)


def decoder_layer(
    hidden: torch.Tensor,
    weights: LayerWeights,
    pool: torch.Tensor,
    meta: AttentionMetadata,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    config: LlamaConfig,
) -> torch.Tensor:
    """One Llama decoder layer on a step's rows ``[T, hidden]``; writes the rows' K/V into ``pool``."""
    tokens = hidden.shape[0]
    x = rms_norm(hidden, weights.input_norm, config.rms_norm_eps)
    q = F.linear(x, weights.q_proj).view(tokens, config.num_heads, config.head_dim)
    k = F.linear(x, weights.k_proj).view(tokens, config.num_kv_heads, config.head_dim)
    v = F.linear(x, weights.v_proj).view(tokens, config.num_kv_heads, config.head_dim)
    cos, sin = cos_sin
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = paged_attention(q, k, v, pool, meta, config.head_dim**-0.5)
    hidden = hidden + F.linear(attn, weights.o_proj)
    x = rms_norm(hidden, weights.post_norm, config.rms_norm_eps)
    mlp = F.linear(F.silu(F.linear(x, weights.gate_proj)) * F.linear(x, weights.up_proj), weights.down_proj)
    return hidden + mlp
