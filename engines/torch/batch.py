"""The stage boundary: what one forward step hands from one pipeline stage to the next.

A :class:`StageBatch` carries everything a stage needs to run its layers on one step without any
scheduler state: token ids (first stage) or hidden states (later stages), each token's position, each
request's block table and context length, and which rows the last stage turns into logits. It is plain
tensors, so it travels between processes as bytes (:meth:`StageBatch.to_bytes`) as easily as it is passed
between stages in one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgspec
import torch

from engines.torch.config import DTYPES


class WireTensor(msgspec.Struct, frozen=True, array_like=True):
    """A tensor as bytes: dtype name, shape and the raw (native-endian) data."""

    dtype: str
    shape: list[int]
    data: bytes


class _WireTensors(msgspec.Struct, frozen=True):
    v: int
    kind: str
    tensors: dict[str, WireTensor]


_WIRE_VERSION = 1
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()} | {torch.int64: "int64", torch.int32: "int32"}
_NAMED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_WireTensors)


def tensor_to_wire(tensor: torch.Tensor) -> WireTensor:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return WireTensor(_DTYPE_NAMES[tensor.dtype], list(tensor.shape), data)


def tensor_from_wire(wire: WireTensor) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(wire.data), dtype=torch.uint8) if wire.data else torch.empty(0, dtype=torch.uint8)
    return raw.view(_NAMED_DTYPES[wire.dtype]).reshape(wire.shape)


def encode_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """Named tensors as one msgpack message (``kind`` says what they are, checked on decode)."""
    return _encoder.encode(_WireTensors(_WIRE_VERSION, kind, {k: tensor_to_wire(t) for k, t in tensors.items()}))


def decode_tensors(data: bytes, kind: str) -> dict[str, torch.Tensor]:
    wire = _decoder.decode(data)
    if wire.v != _WIRE_VERSION or wire.kind != kind:
        raise ValueError(f"expected {kind} v{_WIRE_VERSION}, got {wire.kind} v{wire.v}")
    return {name: tensor_from_wire(t) for name, t in wire.tensors.items()}


@dataclass(frozen=True, slots=True)
class StageBatch:
    """One step's input to a stage. Rows are the step's tokens, grouped by request (``query_start``).

    ``context_lens[b]`` counts request b's tokens whose KV exists once this step has written its chunk;
    the chunk covers positions ``context_lens[b] - query_len[b] .. context_lens[b] - 1``.
    """

    positions: torch.Tensor  # [T] int64
    query_start: torch.Tensor  # [B + 1] int64, cumulative row offsets
    context_lens: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    logits_indices: torch.Tensor  # [N] int64: rows whose logits the last stage returns
    token_ids: torch.Tensor | None = None  # [T] int64, input of the first stage
    hidden: torch.Tensor | None = None  # [T, hidden_size], input of later stages

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def to(self, device: torch.device) -> StageBatch:
        """The same step with every tensor on ``device`` (itself when they are there already)."""
        if self.positions.device == device:
            return self
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None
        }
        return StageBatch(**moved)

    def with_hidden(self, hidden: torch.Tensor) -> StageBatch:
        """The same step for the next stage: hidden states replace the token ids."""
        return dataclasses.replace(self, token_ids=None, hidden=hidden)

    def select(self, seqs: list[int]) -> tuple[StageBatch, torch.Tensor]:
        """The sub-batch of requests ``seqs`` (ascending), and which of this batch's logits rows it yields
        (positions in ``logits_indices``, in the sub-batch's order). Block tables are trimmed to the widest
        request kept, so a micro-batch of decodes does not pay for a long prefill's padding."""
        starts = self.query_start.tolist()
        rows = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in seqs])
        lens = torch.tensor([starts[b + 1] - starts[b] for b in seqs], dtype=torch.long)
        query_start = torch.zeros(len(seqs) + 1, dtype=torch.long)
        query_start[1:] = torch.cumsum(lens, 0)
        context_lens = self.context_lens[seqs]
        width = int(self.block_tables.shape[1])
        if hint := _block_size_hint(self):  # <= the real block size, so the trimmed tables still cover
            width = min(width, max(1, -(-int(context_lens.max()) // hint)))
        new_row = torch.full((self.num_tokens,), -1, dtype=torch.long)
        new_row[rows] = torch.arange(rows.shape[0])
        mapped = new_row[self.logits_indices]
        kept = (mapped >= 0).nonzero().flatten()
        sub = StageBatch(
            positions=self.positions[rows],
            query_start=query_start,
            context_lens=context_lens,
            block_tables=self.block_tables[seqs][:, :width],
            logits_indices=mapped[kept],
            token_ids=None if self.token_ids is None else self.token_ids[rows],
            hidden=None if self.hidden is None else self.hidden[rows],
        )
        return sub, kept

    def to_bytes(self) -> bytes:
        fields = dataclasses.fields(self)
        return encode_tensors("stage_batch", {f.name: v for f in fields if (v := getattr(self, f.name)) is not None})

    @classmethod
    def from_bytes(cls, data: bytes) -> StageBatch:
        return cls(**decode_tensors(data, "stage_batch"))


def _block_size_hint(batch: StageBatch) -> int:
    """Tokens per block implied by the widest block table (tables are built exactly as wide as the longest
    request needs); 0 when it cannot tell, and then nothing is trimmed."""
    width = int(batch.block_tables.shape[1])
    longest = int(batch.context_lens.max()) if batch.num_seqs else 0
    return -(-longest // width) if width and longest else 0


@dataclass(frozen=True, slots=True)
class StageResult:
    """A stage's output: hidden states for the next stage, or (last stage) logits of ``logits_indices``."""

    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def to_bytes(self) -> bytes:
        fields = dataclasses.fields(self)
        return encode_tensors("stage_result", {f.name: v for f in fields if (v := getattr(self, f.name)) is not None})

    @classmethod
    def from_bytes(cls, data: bytes) -> StageResult:
        return cls(**decode_tensors(data, "stage_result"))
