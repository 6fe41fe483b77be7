"""Session-wide fixtures: one real nats-server for the whole session (tests use real servers, never mocks)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import hypothesis  # noqa: F401  # loaded now: its plugin's late import at session end can hit a CPython 3.11
import pytest  # compile bug ("AST constructor recursion depth mismatch") while engine threads still run

from transport.nats_server import EmbeddedNatsServer

os.environ.setdefault("DROVER_OBSERVABILITY__EXPORTER", "none")
os.environ.setdefault("DROVER_AUDIT__PATH", "")  # audit records go to the log only (tests that read them set a file)
logging.getLogger("nats").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def span_exporter():  # type: ignore[no-untyped-def]
    """An in-memory span exporter on this process's tracer provider (set once per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every actor a test left running: pykka threads are not daemons and would keep pytest alive."""
    import pykka

    pykka.ActorRegistry.stop_all(block=True, timeout=10)
