"""Process entry points: the control plane and an engine host, each a long-running process on the bus."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from control.settings import Settings
from observability.logs import setup_logging
from observability.metrics import start_metrics_server
from observability.tracing import setup_tracing, shutdown_tracing
from transport.bus import Bus, BusOptions
from transport.nats_cluster import EmbeddedNatsCluster
from transport.nats_server import EmbeddedNatsServer

log = logging.getLogger(__name__)


def bus_options(settings: Settings, name: str) -> BusOptions:
    nats = settings.nats
    if not nats.url:
        raise ValueError("no NATS URL: pass --nats-url or set DROVER_NATS__URL")
    return BusOptions(
        url=nats.url,
        name=name,
        connect_timeout_s=nats.connect_timeout_s,
        request_timeout_s=nats.request_timeout_s,
        user=nats.user,
        password=nats.password,
        creds_file=nats.creds_file,
        tls_ca_file=nats.tls_ca_file,
        reconnect_wait_s=nats.reconnect_wait_s,
        ping_interval_s=nats.ping_interval_s,
        max_outstanding_pings=nats.max_outstanding_pings,
    )


@contextlib.contextmanager
def embedded_nats_if_needed(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a NATS URL, starting an embedded server when none is configured."""
    if settings.nats.url:
        yield settings
        return
    server: EmbeddedNatsServer | EmbeddedNatsCluster
    if settings.nats.embedded_cluster_size > 1:
        server = EmbeddedNatsCluster(
            settings.nats.embedded_cluster_size,
            host=settings.nats.embedded_host,
            jetstream=settings.nats.embedded_jetstream,
            max_payload_bytes=settings.nats.max_payload_bytes,
        )
    else:
        server = EmbeddedNatsServer(
            host=settings.nats.embedded_host,
            jetstream=settings.nats.embedded_jetstream,
            max_payload_bytes=settings.nats.max_payload_bytes,
        )
    url = server.start()
    update: dict[str, object] = {"nats": settings.nats.model_copy(update={"url": url})}
    if settings.nats.embedded_cluster_size > 1 and settings.reliability.output_replicas == 1:
        # A cluster keeps what clients were sent on every node, so losing one loses none of it.
        replicas = min(3, settings.nats.embedded_cluster_size)
        update["reliability"] = settings.reliability.model_copy(update={"output_replicas": replicas})
    try:
        yield settings.model_copy(update=update)
    finally:
        server.stop()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _observability(settings: Settings, service: str, metrics_port: int = 0) -> None:
    obs = settings.observability
    setup_logging(obs.log_level)
    setup_tracing(
        f"{obs.service_name}-{service}",
        obs.exporter,
        jsonl_path=obs.jsonl_path,
        otlp_endpoint=obs.otlp_endpoint,
    )
    if metrics_port:
        server = start_metrics_server(metrics_port, settings.metrics.host)
        log.info("metrics on http://%s:%d/metrics", settings.metrics.host, server.port)


def serve_control(settings: Settings) -> None:
    """Run the control plane until SIGINT/SIGTERM."""
    from actors.control_plane import ControlPlane
    from actors.engine_host import resolve_model_dir
    from engines.tokenizer import load_tokenizer

    _observability(settings, "control", settings.metrics.control_port)
    with embedded_nats_if_needed(settings) as settings:
        tokenizer = load_tokenizer(resolve_model_dir(settings) if settings.engine.kind == "vllm" else None)
        bus = Bus(bus_options(settings, "drover-control")).start()
        plane = ControlPlane(settings, bus, tokenizer).start()
        log.info("control plane on %s", settings.nats.url)
        try:
            _wait_for_signal()
        finally:
            plane.stop()
            bus.stop()
            shutdown_tracing()


def serve_engine(settings: Settings, instance_id: str) -> None:
    """Run one engine instance until SIGINT/SIGTERM."""
    from actors.engine_host import EngineHost, build_engine

    _observability(settings, f"engine-{instance_id}", settings.metrics.engine_port)
    bus = Bus(bus_options(settings, f"drover-engine-{instance_id}")).start()
    engine, tokenizer = build_engine(settings, instance_id)
    host = EngineHost(settings, bus, engine, tokenizer).start()
    try:
        _wait_for_signal()
        # SIGTERM drains by migration first, so a rolling restart loses no request and cuts no stream.
        if not host.drain(settings.engine.drain_timeout_s):
            log.warning(
                "engine %s: requests still running after %.0fs of draining: aborting them",
                instance_id,
                settings.engine.drain_timeout_s,
            )
    finally:
        host.stop()
        bus.stop()
        shutdown_tracing()
