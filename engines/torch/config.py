"""The model shape the torch engine needs, read from a Hugging Face ``config.json`` (Llama family).

Byte accounting lives here too because the memory budget (weights + KV pool) is a function of the shape
alone: an engine must know what a layer range and a KV block cost before it loads anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (one of {sorted(DTYPES)})") from None


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` "default", "linear" or "llama3"), as transformers computes it."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling = RopeScaling()
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LlamaConfig:
        directory = Path(model_dir)
        raw: dict[str, Any] = json.loads((directory / "config.json").read_text())
        generation = directory / "generation_config.json"
        generation_raw: dict[str, Any] = json.loads(generation.read_text()) if generation.exists() else {}
        return cls.from_dict(raw, generation_raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> LlamaConfig:
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if raw.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in architectures:
            raise ValueError(f"not a Llama model: model_type={raw.get('model_type')!r}")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ValueError("attention/MLP biases are not supported by the torch engine")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {raw.get('hidden_act')!r} (SwiGLU with silu only)")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        eos: list[int] = []
        for source in (generation or {}, raw):
            value = source.get("eos_token_id")
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in eos:
                    eos.append(token)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(rope_params, int(raw.get("max_position_embeddings", 2048))),
            eos_token_ids=tuple(eos),
        )

    # ------------------------------------------------------------------------------------------ bytes
    def layer_weight_numel(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two norms)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h

    def weight_bytes(self, first: int, last: int, itemsize: int) -> int:
        """Bytes of the weights a stage holding layers [first, last) loads (embedding / head at the ends)."""
        numel = (last - first) * self.layer_weight_numel()
        embed = self.vocab_size * self.hidden_size
        if first == 0:
            numel += embed
        if last == self.num_layers:
            numel += self.hidden_size  # final norm
            if not self.tie_word_embeddings or first != 0:
                numel += embed  # lm_head (a tied head on a stage without the embedding loads its own copy)
        return numel * itemsize

    def kv_block_bytes(self, num_layers: int, block_size: int, itemsize: int) -> int:
        """Bytes of one KV block (K and V) over ``num_layers`` layers."""
        return num_layers * 2 * block_size * self.num_kv_heads * self.head_dim * itemsize


def _rope_scaling(params: dict[str, Any], max_positions: int) -> RopeScaling:
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type == "default":
        return RopeScaling()
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_positions)),
        )
    raise ValueError(f"unsupported rope_type {rope_type!r} (default, linear, llama3)")


def inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies, computed exactly as transformers does (float32)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq
