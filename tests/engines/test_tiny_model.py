"""The generated model: deterministic bytes, ByteTokenizer-compatible tokenizer, loadable by transformers."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engines.tiny_model import MIGRATION_BENCH, TINY, ModelSpec, build_byte_tokenizer, ensure_model
from engines.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

SAMPLES = ["hello world", "héllo ✓ 日本語", " two  spaces\n\ttab", "", "<s> not special </s>"]

SMALL = ModelSpec(
    name="drover-test-small",
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=1,
    num_kv_heads=1,
    head_dim=64,
    max_position_embeddings=256,
)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_spec_gives_identical_bytes(tmp_path: Path) -> None:
    first = ensure_model(tmp_path / "a", SMALL)
    second = ensure_model(tmp_path / "b", SMALL)
    assert first.name == second.name
    assert _files(first) == _files(second)
    marker = json.loads((first / "drover_model.json").read_text())
    assert marker["tokenizer"] == "drover-bytes"
    assert load_tokenizer(first).__class__ is ByteTokenizer


def test_other_seed_other_directory_and_weights(tmp_path: Path) -> None:
    other = dataclasses.replace(SMALL, seed=1)
    a, b = ensure_model(tmp_path, SMALL), ensure_model(tmp_path, other)
    assert a != b
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_concurrent_builders_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_model(tmp_path, SMALL), range(4)))
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temporary directory left behind


def test_specs_shapes() -> None:
    assert TINY.vocab_size % 64 == 0 and TINY.vocab_size >= 259
    assert TINY.kv_bytes_per_token == 4 * 1024
    assert MIGRATION_BENCH.kv_bytes_per_token >= 32 * 1024
    assert MIGRATION_BENCH.max_position_embeddings >= 8192


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_ids_equal_byte_tokenizer(text: str) -> None:
    tok = build_byte_tokenizer(TINY.vocab_size)
    expected = ByteTokenizer().encode(text)
    assert tok.encode(text).ids == expected
    assert tok.decode(expected, skip_special_tokens=True) == text


def test_auto_tokenizer_and_transformers_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = ensure_model(tmp_path, SMALL)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    hf = HFTokenizer(path)
    for text in SAMPLES:
        expected = ByteTokenizer().encode(text)
        assert auto(text)["input_ids"] == expected
        if "<" not in text:  # HFTokenizer reads tokenizer.json only: literal "<s>" matches the special token
            assert hf.encode(text) == expected
        assert auto.decode(expected, skip_special_tokens=True) == text
    assert auto.bos_token_id == 1 and auto.eos_token_id == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == SMALL.vocab_size
    prompt = torch.tensor([ByteTokenizer().encode("The quick brown fox")])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(prompt))
    generated = out[0, prompt.shape[1] :].tolist()
    assert len(set(generated)) > 4, f"degenerate greedy output {generated}"
