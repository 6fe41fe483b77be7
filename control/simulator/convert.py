"""``drover sim convert``: public LLM traces to the simulator's CSV ``timestamp,input_tokens,output_tokens[,hash_ids]``.

* Mooncake JSONL (kvcache-ai/Mooncake ``FAST25-release/traces/*.jsonl``): ``timestamp`` in integer ms,
  ``input_length``, ``output_length``, ``hash_ids`` (a list; 512 tokens a block) → seconds after the first
  request (3 decimals) and a space-separated ``hash_ids`` column.
* Azure LLM inference trace CSV (Azure/AzurePublicDataset, 2023 and 2024): ``TIMESTAMP`` (a date-time with 7
  fractional digits), ``ContextTokens``, ``GeneratedTokens`` → seconds after the first request, exact to
  the 7 digits (integer arithmetic, no float rounding).
* BurstGPT CSV (HPMLL/BurstGPT): ``Timestamp`` (seconds), ``Request tokens``, ``Response tokens`` (``Model``
  optionally filtered) → seconds after the first request. Rows with 0 response tokens (failed requests in the
  source) or 0 request tokens are dropped and counted.

Rows keep their order; the output is sorted by time only if the input was not (stable).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

FORMATS = ("auto", "mooncake", "azure", "burstgpt")


@dataclass(frozen=True, slots=True)
class ConvertReport:
    format: str
    rows: int
    dropped: int
    duration_s: float
    has_hashes: bool


@dataclass(frozen=True, slots=True)
class _Row:
    ticks: int  # time in the source's exact unit (see ``scale``)
    input_tokens: int
    output_tokens: int
    hash_ids: str | None


def detect_format(path: Path) -> str:
    """``mooncake`` for JSON lines, ``azure`` or ``burstgpt`` by the CSV header; ValueError otherwise."""
    with open(path, newline="") as handle:
        first = handle.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    header = {h.strip() for h in first.split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= header:
        return "azure"
    if {"Timestamp", "Request tokens", "Response tokens"} <= header:
        return "burstgpt"
    raise ValueError(
        f"{path}: unknown trace format (expected Mooncake JSONL, an Azure CSV with TIMESTAMP,ContextTokens,"
        "GeneratedTokens or a BurstGPT CSV with Timestamp,Request tokens,Response tokens)"
    )


def _mooncake(path: Path) -> Iterator[_Row | None]:
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                hashes = obj.get("hash_ids")
                yield _Row(
                    int(obj["timestamp"]),
                    int(obj["input_length"]),
                    int(obj["output_length"]),
                    " ".join(str(int(h)) for h in hashes) if hashes is not None else None,
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: line {number}: {exc!r}") from None


def _azure_ticks(text: str) -> int:
    """A ``YYYY-MM-DD HH:MM:SS[.fffffff]`` time as integer 100 ns ticks since the epoch (UTC)."""
    base, _, frac = text.strip().partition(".")
    seconds = int(datetime.strptime(base, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
    digits = (frac + "0000000")[:7] if frac else "0000000"
    return seconds * 10_000_000 + int(digits)


def _csv_rows(path: Path, kind: str, model: str | None) -> Iterator[_Row | None]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            try:
                if kind == "azure":
                    yield _Row(
                        _azure_ticks(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"]), None
                    )
                else:
                    if model is not None and row.get("Model", "").strip() != model:
                        continue
                    ms = round(float(row["Timestamp"]) * 1000)
                    yield _Row(ms, int(float(row["Request tokens"])), int(float(row["Response tokens"])), None)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc!r}") from None


_SCALE = {"mooncake": (1000, 3), "azure": (10_000_000, 7), "burstgpt": (1000, 3)}


def convert(source: Path, out: IO[str], fmt: str = "auto", *, model: str | None = None) -> ConvertReport:
    """Convert ``source`` and write the CSV to ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not source.is_file():
        raise ValueError(f"{source} not found")
    kind = detect_format(source) if fmt == "auto" else fmt
    rows_iter = _mooncake(source) if kind == "mooncake" else _csv_rows(source, kind, model)
    rows: list[_Row] = []
    dropped = 0
    for row in rows_iter:
        if row is None:
            continue
        if row.input_tokens < 1 or row.output_tokens < 1:
            dropped += 1
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: no usable rows")
    if any(b.ticks < a.ticks for a, b in itertools.pairwise(rows)):
        rows.sort(key=lambda r: r.ticks)
    scale, decimals = _SCALE[kind]
    t0 = rows[0].ticks
    has_hashes = any(r.hash_ids is not None for r in rows)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["timestamp", "input_tokens", "output_tokens", *(["hash_ids"] if has_hashes else [])])
    for r in rows:
        whole, part = divmod(r.ticks - t0, scale)
        stamp = f"{whole}.{part:0{decimals}d}"
        writer.writerow([stamp, r.input_tokens, r.output_tokens, *([r.hash_ids or ""] if has_hashes else [])])
    return ConvertReport(kind, len(rows), dropped, (rows[-1].ticks - t0) / scale, has_hashes)
