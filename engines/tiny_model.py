"""Deterministic random-weight Llama models that vLLM and transformers load, built locally without a download.

Tests, the demo and the migration benchmark need a real model directory but no network. :func:`ensure_model`
writes a Hugging Face ``LlamaForCausalLM`` directory (config, safetensors weights, a byte-level fast
tokenizer whose ids equal :class:`engines.tokenizer.ByteTokenizer`'s) from a seed, caches it under a hash
of its spec, and builds it atomically (temporary directory + rename) so concurrent builders are safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.tokenizer import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID, UNK_ID

_FORMAT_VERSION = 1  # bump when the files written for a spec change
_VOCAB_MULTIPLE = 64
_SPECIAL_TOKENS = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape and seed of a generated model; its hash names the cache directory."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str = "float32"
    seed: int = 0
    # Larger than the usual 0.02: with 0.02 a small random Llama tends to repeat one token forever, which
    # makes output comparisons (migration, resume) vacuous. 0.1 gives varied, context-dependent greedy text.
    init_std: float = 0.1
    rope_theta: float = 10000.0
    # Where the random draws happen. "cuda" makes an 8B-sized model in about a second instead of minutes on
    # the CPU; the draws differ, so a non-default device is part of the digest.
    init_device: str = "cpu"

    @property
    def vocab_size(self) -> int:
        """Byte vocabulary (259 ids) padded to a multiple of 64, as kernels prefer."""
        return -(-BYTE_VOCAB_SIZE // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes over all layers (K and V)."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["init_device"] == "cpu":  # digests of specs from before the field existed stay the same
            del fields["init_device"]
        payload = json.dumps({"format": _FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


TINY = ModelSpec(
    name="drover-tiny",
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)
"""Tests and the demo: 4 KiB of KV per token in float32, loads in seconds."""

MIGRATION_BENCH = ModelSpec(
    name="drover-migration-bench",
    hidden_size=512,
    intermediate_size=1024,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
    max_position_embeddings=10240,
)
"""Migration benchmark: 2*8 layers*8 KV heads*64*4 B = 32 KiB of KV per token, 8k context plus headroom."""

SPECS: dict[str, ModelSpec] = {"tiny": TINY, "migration-bench": MIGRATION_BENCH}


def ensure_model(cache_dir: Path, spec: ModelSpec = TINY) -> Path:
    """The directory of ``spec``'s model under ``cache_dir``, built on first use."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{spec.name}-{spec.digest()}"
    if (final / "drover_model.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=cache_dir))
    try:
        _write_model(tmp, spec)
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "drover_model.json").exists():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 directories; the cache is shared by users and engine processes."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _write_model(directory: Path, spec: ModelSpec) -> None:
    _write_json(directory / "config.json", hf_config(spec))
    _write_json(directory / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    _write_weights(directory / "model.safetensors", spec)
    _write_tokenizer(directory, spec)
    # Written last: its presence marks a complete directory.
    _write_json(directory / "drover_model.json", {"tokenizer": "drover-bytes", "spec": dataclasses.asdict(spec)})


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": spec.vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": spec.dtype,
        "dtype": spec.dtype,
        "use_cache": True,
    }


def _weight_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every parameter, in the fixed order the generator draws them."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    shapes: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (spec.vocab_size, h), "embed")]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,), "ones"),
            (f"{p}.self_attn.q_proj.weight", (q, h), "normal"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "normal"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "normal"),
            (f"{p}.self_attn.o_proj.weight", (h, q), "normal"),
            (f"{p}.post_attention_layernorm.weight", (h,), "ones"),
            (f"{p}.mlp.gate_proj.weight", (spec.intermediate_size, h), "normal"),
            (f"{p}.mlp.up_proj.weight", (spec.intermediate_size, h), "normal"),
            (f"{p}.mlp.down_proj.weight", (h, spec.intermediate_size), "normal"),
        ]
    shapes += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (spec.vocab_size, h), "normal")]
    return shapes


def _write_weights(path: Path, spec: ModelSpec) -> None:
    import torch  # heavy; only builders need it
    from safetensors.torch import save_file

    device = torch.device(spec.init_device)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape, init in _weight_shapes(spec):
        if init == "ones":
            value = torch.ones(shape)
        else:
            std = 1.0 if init == "embed" else spec.init_std
            value = torch.randn(shape, generator=generator, device=device) * std
        tensors[name] = value.to(dtype).cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _padding_token(token_id: int) -> str:
    return f"<pad_{token_id}>"


def build_byte_tokenizer(vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer`` whose ids are ByteTokenizer's: specials 0..2, byte ``b`` -> ``b + 3``.

    A BPE model without merges over the ByteLevel alphabet maps each byte to exactly one token; ids past
    the byte range are special padding tokens (skipped on decode) so that the vocabulary matches the
    model's padded embedding.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab: dict[str, int] = {text: token_id for token_id, text in _SPECIAL_TOKENS.items()}
    vocab.update({char: b + BYTE_OFFSET for b, char in _bytes_to_unicode().items()})
    vocab.update({_padding_token(i): i for i in range(BYTE_VOCAB_SIZE, vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    specials = [*_SPECIAL_TOKENS.values(), *(_padding_token(i) for i in range(BYTE_VOCAB_SIZE, vocab_size))]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.encode_special_tokens = True  # not saved in tokenizer.json: tokenizer_config says it instead
    return tokenizer


def _write_tokenizer(directory: Path, spec: ModelSpec) -> None:
    build_byte_tokenizer(spec.vocab_size).save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            # Literal "<s>" in text is bytes, as in ByteTokenizer, not the BOS token.
            "split_special_tokens": True,
            "model_max_length": spec.max_position_embeddings,
        },
    )
    _write_json(directory / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
