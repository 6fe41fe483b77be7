"""OpenTelemetry set-up, once per process, and trace-context propagation through NATS headers.

A request is one trace across processes: the client injects W3C ``traceparent`` into the NATS headers of
its submission, the control plane and the engine extract it and start child spans. Span names and
attribute keys live in :mod:`observability.spans`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_provider: TracerProvider | None = None
_file_lock = threading.Lock()  # one writer at a time per process: local spans and shipped ones share a file


def append_span_dicts(path: str | Path, spans: Sequence[Mapping[str, Any]]) -> None:
    """Append span dicts (the :func:`span_to_dict` form) to a JSON-lines trace file, one per line."""
    if not spans:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(span), separators=(",", ":"), default=str) for span in spans]
    with _file_lock, open(target, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file; hex ids, so `drover trace` can read it."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        append_span_dicts(self._path, [span_to_dict(span) for span in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class CallbackSpanExporter(SpanExporter):
    """Hands each batch of finished spans, as :func:`span_to_dict` dicts, to ``send``.

    The process set-up passes a callable that publishes them on the bus (``drover.v1.spans``), so spans of
    every process, on any host, reach the control plane's trace file; observability stays a leaf that knows
    nothing of the bus. ``send`` must not block for long (it runs on the batch processor's thread)."""

    def __init__(self, send: Callable[[list[dict[str, Any]]], None]) -> None:
        self._send = send

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self._send([span_to_dict(span) for span in spans])
        except Exception as exc:  # a closed bus must not break the batch processor
            log.warning("shipping %d spans failed: %r", len(spans), exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": f"{context.trace_id:032x}" if context else "",
        "span_id": f"{context.span_id:016x}" if context else "",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "service": span.resource.attributes.get("service.name", ""),
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "ts_ns": e.timestamp} for e in span.events],
    }


def setup_tracing(
    service_name: str,
    exporter: str = "jsonl",
    *,
    jsonl_path: str = ".drover/traces.jsonl",
    otlp_endpoint: str = "http://127.0.0.1:6006/v1/traces",
    extra_exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Install the process's tracer provider (idempotent: a second call returns the first provider)."""
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        resource = Resource.create(
            {
                "service.name": service_name,
                "service.instance.id": f"{os.uname().nodename}:{os.getpid()}",
                "openinference.project.name": "drover",  # Phoenix groups projects by this attribute
            }
        )
        provider = TracerProvider(resource=resource)
        chosen: SpanExporter | None = None
        if exporter == "console":
            chosen = ConsoleSpanExporter()
        elif exporter == "jsonl":
            chosen = JsonLinesSpanExporter(jsonl_path)
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen = OTLPSpanExporter(endpoint=otlp_endpoint)
        if chosen is not None:
            provider.add_span_processor(BatchSpanProcessor(chosen, schedule_delay_millis=500))
        if extra_exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(extra_exporter, schedule_delay_millis=100))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def add_span_exporter(
    exporter: SpanExporter, *, schedule_delay_millis: int = 200, max_batch: int = 128, provider: Any = None
) -> bool:
    """Add a batched exporter to ``provider`` (default: the one :func:`setup_tracing` installed), e.g. the
    bus exporter once the bus is up; ``max_batch`` keeps one batch well under NATS's payload limit. False
    when there is no SDK provider to add it to."""
    with _lock:
        target = provider if provider is not None else _provider
        if not isinstance(target, TracerProvider):
            return False
        target.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_millis, max_export_batch_size=max_batch)
        )
        return True


def shutdown_tracing() -> None:
    with _lock:
        if _provider is not None:
            _provider.force_flush(timeout_millis=2000)


def tracer(name: str = "drover") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Current (or given) trace context as W3C headers to put on a NATS message."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """Trace context from NATS headers; an empty context when there are none."""
    return propagate.extract(dict(headers or {}))
