"""`drover trace`'s reader and waterfall over spans written by the real JSON-lines exporter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from rich.console import Console

from observability import spans
from observability.trace_view import TraceNotFound, find_request_spans, render_waterfall, tree_order
from observability.tracing import JsonLinesSpanExporter


def write_request_trace(path: Path, request_id: str) -> str:
    """A request's spans across two 'services', plus an unrelated trace, through a local provider (the
    global provider belongs to the session's span_exporter fixture)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "drover-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    engine_provider = TracerProvider(resource=Resource.create({"service.name": "drover-engine-sim-0"}))
    engine_provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer, engine_tracer = provider.get_tracer("test"), engine_provider.get_tracer("test")
    with (
        tracer.start_as_current_span("drover.gateway.request", attributes={spans.REQUEST_ID: request_id}) as root,
        tracer.start_as_current_span(spans.CLIENT_SUBMIT),
    ):
        with tracer.start_as_current_span(
            spans.SCHEDULER_DISPATCH, attributes={spans.REQUEST_ID: request_id, spans.INSTANCE_ID: "sim-0"}
        ):
            pass
        with engine_tracer.start_as_current_span(
            spans.ENGINE_REQUEST, attributes={spans.REQUEST_ID: request_id}
        ) as engine:
            engine.add_event("first_token")
    with tracer.start_as_current_span("unrelated", attributes={spans.REQUEST_ID: "someone-else"}):
        pass
    provider.shutdown()
    engine_provider.shutdown()
    return f"{root.get_span_context().trace_id:032x}"


def test_finds_every_span_of_the_request_trace_in_tree_order(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    trace_id = write_request_trace(path, "req-1")
    with open(path, "a") as handle:
        handle.write('{"truncated": \n')  # a partial line of a file being written is skipped
    found = find_request_spans([path], "req-1")
    assert {s.trace_id for s in found} == {trace_id}
    ordered = [(s.name, depth) for s, depth in tree_order(found)]
    assert ordered == [
        ("drover.gateway.request", 0),
        (spans.CLIENT_SUBMIT, 1),
        (spans.SCHEDULER_DISPATCH, 2),
        (spans.ENGINE_REQUEST, 2),
    ]
    assert find_request_spans([path], trace_id) == found  # a trace id works too


def test_waterfall_shows_names_services_bars_and_details(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    write_request_trace(path, "req-2")
    console = Console(record=True, width=200)
    console.print(render_waterfall(find_request_spans([path], "req-2"), "req-2"))
    out = console.export_text()
    assert "request req-2" in out and "4 spans" in out
    lines = [line.strip("│ ") for line in out.splitlines() if "drover." in line and "█" in line]
    assert lines[0].startswith("drover.gateway.request")
    assert any("└ drover.dispatch" in line and "instance.id=sim-0" in line for line in lines)
    assert any("drover-engine-sim-0" in line and "@first_token" in line for line in lines)


def test_unknown_request_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    write_request_trace(path, "req-3")
    with pytest.raises(TraceNotFound, match="no-such-request"):
        find_request_spans([path], "no-such-request")


def test_spans_of_a_live_request_render(tmp_path: Path) -> None:
    """Spans recorded by the real SDK path (ReadableSpans of an in-memory exporter) written as JSON lines."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("outer", attributes={spans.REQUEST_ID: "mem-1"}),
        tracer.start_as_current_span("inner", kind=trace.SpanKind.CLIENT),
    ):
        pass
    path = tmp_path / "mem.jsonl"
    JsonLinesSpanExporter(path).export(memory.get_finished_spans())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["name"] for r in rows} == {"outer", "inner"}
    assert [s.name for s, _ in tree_order(find_request_spans([path], "mem-1"))] == ["outer", "inner"]
