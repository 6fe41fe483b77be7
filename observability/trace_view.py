"""`drover trace REQUEST_ID`: a terminal waterfall of one request's spans, read from the JSON-lines files
that :class:`observability.tracing.JsonLinesSpanExporter` writes.

Spans carrying ``drover.request.id`` name the trace(s) of the request; every span of those traces is shown,
sorted by start, indented under its parent, with a bar placed and sized on the trace's time line. Files are
read twice, line by line (first the trace ids, then their spans), so large trace files need no memory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

REQUEST_ID_ATTRIBUTE = "drover.request.id"
BAR_WIDTH = 48
_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
# Attributes worth a glance in the waterfall (the rest stay in the file).
_SHOWN_ATTRIBUTES = (
    "drover.instance.id",
    "drover.dispatch.policy",
    "drover.client.id",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "drover.migration.blocks",
    "drover.migration.bytes",
    "drover.migration.downtime_s",
)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    service: str = ""
    status: str = "UNSET"
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[tuple[str, int], ...] = ()

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SpanRecord:
        start = int(raw["start_ns"])
        end = raw.get("end_ns")
        return cls(
            trace_id=str(raw["trace_id"]),
            span_id=str(raw["span_id"]),
            parent_id=raw.get("parent_id"),
            name=str(raw["name"]),
            start_ns=start,
            end_ns=int(end) if end is not None else start,
            service=str(raw.get("service", "")),
            status=str(raw.get("status", "UNSET")),
            attributes=dict(raw.get("attributes") or {}),
            events=tuple((str(e.get("name", "")), int(e.get("ts_ns", start))) for e in raw.get("events") or ()),
        )


class TraceNotFound(LookupError):
    """No span in the files names the request (or trace) asked for."""


def _records(paths: Iterable[Path], needle: str | None = None) -> Iterator[SpanRecord]:
    """Spans of every file, skipping lines that are not span objects (a file being written may end in a
    partial line). ``needle``: only parse lines containing it (a cheap pre-filter)."""
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if needle is not None and needle not in line:
                    continue
                try:
                    yield SpanRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue


def find_request_spans(paths: Iterable[Path], request_id: str) -> list[SpanRecord]:
    """Every span of every trace that has a span with ``drover.request.id == request_id`` (or, if
    ``request_id`` is a trace id, that trace's spans), sorted by start."""
    paths = list(paths)
    trace_ids = {
        s.trace_id
        for s in _records(paths, request_id)
        if s.attributes.get(REQUEST_ID_ATTRIBUTE) == request_id or s.trace_id == request_id
    }
    if not trace_ids:
        raise TraceNotFound(f"no span of request {request_id!r} in {', '.join(str(p) for p in paths)}")
    found = [s for s in _records(paths) if s.trace_id in trace_ids]
    return sorted(found, key=lambda s: (s.start_ns, s.end_ns))


def tree_order(spans: list[SpanRecord]) -> list[tuple[SpanRecord, int]]:
    """Spans depth-first, children by start time, each with its depth. Spans whose parent is missing (not
    exported yet, or in a file not read) are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        children[span.parent_id if span.parent_id in ids else None].append(span)
    ordered: list[tuple[SpanRecord, int]] = []

    def visit(parent: str | None, depth: int) -> None:
        for child in sorted(children.get(parent, ()), key=lambda s: (s.start_ns, s.end_ns)):
            ordered.append((child, depth))
            visit(child.span_id, depth + 1)

    visit(None, 0)
    return ordered


def _bar(span: SpanRecord, origin: int, total: int, colour: str, width: int) -> Text:
    begin = round((span.start_ns - origin) / total * width)
    length = max(1, round(span.duration_ns / total * width))
    begin = min(begin, width - 1)
    length = min(length, width - begin)
    bar = Text(" " * begin)
    bar.append("█" * length, style=colour)
    for _, ts in span.events:  # events (e.g. first_token) as ticks on the bar
        at = round((ts - origin) / total * width)
        if begin <= at < begin + length:
            bar.stylize("bold white on " + colour, at, at + 1)
    return bar


def _details(span: SpanRecord) -> str:
    shown = [
        f"{k.removeprefix('drover.').removeprefix('gen_ai.')}={span.attributes[k]}"
        for k in _SHOWN_ATTRIBUTES
        if k in span.attributes
    ]
    shown += [f"@{name}" for name, _ in span.events]
    if span.status == "ERROR":
        shown.insert(0, "ERROR")
    return " ".join(str(s) for s in shown)


def render_waterfall(
    spans: list[SpanRecord], request_id: str = "", width: int = BAR_WIDTH, narrow: bool = False
) -> RenderableType:
    """One table per trace: span tree, service, start offset and duration (ms), bar, key attributes.
    ``narrow`` (an 80-column terminal): the span names carry their service's colour instead of a service
    column, a legend names the colours, and the attributes are left out, so nothing is squeezed to nothing."""
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    parts: list[RenderableType] = []
    for trace_id, members in sorted(by_trace.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        origin = min(s.start_ns for s in members)
        total = max(1, max(s.end_ns for s in members) - origin)
        services = sorted({s.service for s in members if s.service})
        colours = {svc: _COLOURS[i % len(_COLOURS)] for i, svc in enumerate(services)}
        table = Table(
            title=f"request {request_id}  trace {trace_id}  {total / 1e6:.2f} ms  {len(members)} spans",
            title_justify="left",
            expand=False,
            pad_edge=False,
        )
        table.add_column("span", no_wrap=True)
        if not narrow:
            table.add_column("service", no_wrap=True)
        table.add_column("start ms", justify="right", no_wrap=True)
        table.add_column("dur ms", justify="right", no_wrap=True)
        table.add_column("timeline", no_wrap=True, min_width=width)
        if not narrow:
            table.add_column("details", overflow="fold")
        for span, depth in tree_order(members):
            colour = colours.get(span.service, "white")
            name = Text("  " * depth + ("└ " if depth else "") + span.name, style=colour if narrow else "")
            start, duration = f"{(span.start_ns - origin) / 1e6:.2f}", f"{span.duration_ns / 1e6:.2f}"
            bar = _bar(span, origin, total, colour, width)
            if narrow:
                table.add_row(name, start, duration, bar)
            else:
                table.add_row(name, Text(span.service, style=colour), start, duration, bar, _details(span))
        parts.append(table)
        if narrow:
            legend = Text("services: ")
            for svc in services:
                legend.append(svc, style=colours[svc])
                legend.append("  ")
            parts.append(legend)
    return Group(*parts)
