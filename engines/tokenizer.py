"""Tokenizers the control plane (prompt -> ids) and engine actors (ids -> streamed text) share.

Drover's generated tiny model uses a byte-level vocabulary: ids 0..2 are special (<unk>, <s>, </s>) and
byte ``b`` is id ``b + 3``. :class:`ByteTokenizer` implements it in pure Python (the simulator and sim
engines use it; it needs no files), and :func:`load_tokenizer` reads any Hugging Face ``tokenizer.json``
through the ``tokenizers`` library for real models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, BOS included when the model uses one."""
        ...

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """UTF-8 bytes of the tokens (special tokens skipped); may end inside a multi-byte character."""
        ...


class ByteTokenizer:
    """The byte-level tokenizer of Drover's generated models."""

    bos_token_id: int | None = BOS_ID
    eos_token_id: int | None = EOS_ID

    def encode(self, text: str) -> list[int]:
        return [BOS_ID, *(b + BYTE_OFFSET for b in text.encode("utf-8"))]

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        return bytes(t - BYTE_OFFSET for t in token_ids if BYTE_OFFSET <= t < BYTE_VOCAB_SIZE)


class HFTokenizer:
    """Any Hugging Face fast tokenizer (``tokenizer.json``), via the ``tokenizers`` library."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer as _HFTok  # heavy-ish import, only for real models

        self._tok = _HFTok.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token_id = self._tok.token_to_id(config["bos_token"]) if config.get("bos_token") else None
        self.eos_token_id = self._tok.token_to_id(config["eos_token"]) if config.get("eos_token") else None
        self._add_bos = bool(config.get("add_bos_token", self.bos_token_id is not None))

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if self._add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        return self._tok.decode(token_ids, skip_special_tokens=True).encode("utf-8")


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """The tokenizer for a model directory; Drover's byte vocabulary when there is none or it is ours."""
    if model_dir is None:
        return ByteTokenizer()
    path = Path(model_dir)
    marker = path / "drover_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("tokenizer") == "drover-bytes":
        return ByteTokenizer()
    return HFTokenizer(path)


class IncrementalDetokenizer:
    """Turns a token stream into text deltas without splitting multi-byte UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending = b""

    def push(self, token_ids: list[int]) -> str:
        data = self._pending + self._tokenizer.decode_bytes(token_ids)
        # Emit the longest prefix that is complete UTF-8; keep up to 3 trailing bytes of a partial char.
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text
