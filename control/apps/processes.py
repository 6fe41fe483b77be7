"""Process entry points: the control plane and an engine host, each a long-running process on the bus."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from control.settings import Settings
from observability.health import HealthChecks, ProcessServer, start_process_server
from observability.logs import setup_logging
from observability.tracing import CallbackSpanExporter, add_span_exporter, setup_tracing, shutdown_tracing
from transport.bus import Bus, BusOptions
from transport.nats_cluster import EmbeddedNatsCluster
from transport.nats_server import EmbeddedNatsServer

log = logging.getLogger(__name__)


def bus_options(settings: Settings, name: str, inbox_prefix: str | None = None) -> BusOptions:
    """``inbox_prefix``: where this connection's request replies arrive (engines: their own prefix)."""
    nats = settings.nats
    if not nats.url:
        raise ValueError("no NATS URL: pass --nats-url or set DROVER_NATS__URL")
    return BusOptions.with_auth(
        nats.url,
        name,
        nats.auth(),
        connect_timeout_s=nats.connect_timeout_s,
        request_timeout_s=nats.request_timeout_s,
        reconnect_wait_s=nats.reconnect_wait_s,
        ping_interval_s=nats.ping_interval_s,
        max_outstanding_pings=nats.max_outstanding_pings,
        inbox_prefix=inbox_prefix,
    )


@contextlib.contextmanager
def embedded_nats_if_needed(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a NATS URL, starting an embedded server when none is configured."""
    if settings.nats.url:
        yield settings
        return
    bundle = None
    if settings.nats.secure:  # generated per-role users; this process connects as the control plane
        from transport.nats_auth import default_users, make_bundle

        bundle = make_bundle(Path(settings.nats.secure_dir), default_users(), mode=settings.nats.secure_auth)
    config_text = bundle.config_text if bundle else ""
    server: EmbeddedNatsServer | EmbeddedNatsCluster
    if settings.nats.embedded_cluster_size > 1:
        server = EmbeddedNatsCluster(
            settings.nats.embedded_cluster_size,
            host=settings.nats.embedded_host,
            jetstream=settings.nats.embedded_jetstream,
            max_payload_bytes=settings.nats.max_payload_bytes,
            config_text=config_text,
        )
    else:
        server = EmbeddedNatsServer(
            host=settings.nats.embedded_host,
            jetstream=settings.nats.embedded_jetstream,
            max_payload_bytes=settings.nats.max_payload_bytes,
            config_text=config_text,
        )
    url = server.start()
    nats_update: dict[str, object] = {"url": url}
    if bundle is not None:
        bundle.write_settings(url)  # what other processes connect with: drover --config FILE ...
        nats_update.update(dataclasses.asdict(bundle.auth["control"]))
        nats_update.update(bundle.reply_fields())
        log.info("embedded NATS with generated credentials: settings files per user in %s", bundle.directory)
    update: dict[str, object] = {"nats": settings.nats.model_copy(update=nats_update)}
    if settings.nats.embedded_cluster_size > 1 and settings.reliability.output_replicas == 1:
        # A cluster keeps what clients were sent on every node, so losing one loses none of it.
        replicas = min(3, settings.nats.embedded_cluster_size)
        update["reliability"] = settings.reliability.model_copy(update={"output_replicas": replicas})
    if settings.nats.embedded_cluster_size > 1 and settings.ha.replicas == 1:
        replicas = min(3, settings.nats.embedded_cluster_size)  # the lease and the control state as well
        update["ha"] = settings.ha.model_copy(update={"replicas": replicas})
    try:
        yield settings.model_copy(update=update)
    finally:
        server.stop()


def _wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; returns which came."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    stop.wait()
    return received[0]


def _observability(settings: Settings, service: str) -> None:
    obs = settings.observability
    setup_logging(obs.log_level)
    setup_tracing(
        f"{obs.service_name}-{service}",
        obs.exporter,
        jsonl_path=obs.jsonl_path,
        otlp_endpoint=obs.otlp_endpoint,
    )


def ship_spans(settings: Settings, bus: Bus) -> bool:
    """With ``observability.ship_to_control``: also publish this process's finished spans (batched) on
    ``drover.v1.spans``, for the control plane's trace file; True when shipping was switched on."""
    if not settings.observability.ship_to_control:
        return False
    from transport import subjects
    from transport.messages import SpanBatch

    def send(spans: list[dict[str, object]]) -> None:
        bus.publish(subjects.SPANS, SpanBatch(spans=spans))

    return add_span_exporter(CallbackSpanExporter(send))


def _http(settings: Settings, port: int, health: HealthChecks) -> ProcessServer | None:
    """The process's one HTTP port: /metrics, /healthz, /readyz (port 0 in settings: none)."""
    if not port:
        return None
    try:
        server = start_process_server(port, settings.metrics.host, health=health)
    except OSError as exc:  # say which setting holds the port, not a traceback from the HTTP server
        raise OSError(
            exc.errno,
            f"metrics/health port {settings.metrics.host}:{port} unavailable ({exc.strerror}): set "
            "[metrics] control_port / engine_port (DROVER_METRICS__..._PORT) to a free port, or 0 for none",
        ) from None
    log.info("metrics and health on %s (/metrics, /healthz, /readyz)", server.url())
    return server


def serve_control(settings: Settings) -> None:
    """Run the control plane until SIGINT/SIGTERM."""
    from actors.control_plane import ControlPlane
    from actors.engine_host import resolve_model_dir
    from control.apps.health import control_plane_checks
    from control.apps.provisioning import make_provisioner
    from engines.tokenizer import load_tokenizer

    _observability(settings, "control")
    with embedded_nats_if_needed(settings) as settings:
        tokenizer = load_tokenizer(resolve_model_dir(settings) if settings.engine.kind == "vllm" else None)
        bus = Bus(bus_options(settings, "drover-control")).start()
        reply_auth = settings.nats.reply_auth()  # the client-bound user (docs/security.md)
        reply_bus = None
        if reply_auth is not None:
            assert settings.nats.url
            reply_bus = Bus(BusOptions.with_auth(settings.nats.url, "drover-control-reply", reply_auth)).start()
        plane = ControlPlane(
            settings, bus, tokenizer, provisioner_factory=make_provisioner, reply_bus=reply_bus
        ).start()
        from observability.metrics import metrics

        metrics().set_leader_probe(lambda: getattr(plane, "leading", True) is not False)
        log.info("control plane on %s", settings.nats.url)
        http = _http(settings, settings.metrics.control_port, control_plane_checks(plane))
        try:
            _wait_for_signal()
        finally:
            if http is not None:
                http.stop()
            plane.stop()
            bus.stop()
            if reply_bus is not None:
                reply_bus.stop()
            shutdown_tracing()


def serve_engine(settings: Settings, instance_id: str) -> None:
    """Run one engine instance until SIGINT/SIGTERM."""
    from actors.engine_host import EngineHost, build_engine
    from control.apps.health import engine_host_checks

    _observability(settings, f"engine-{instance_id}")
    from transport import subjects

    bus = Bus(
        bus_options(settings, f"drover-engine-{instance_id}", inbox_prefix=subjects.engine_inbox_prefix(instance_id))
    ).start()
    ship_spans(settings, bus)
    engine, tokenizer = build_engine(settings, instance_id)
    host = EngineHost(settings, bus, engine, tokenizer)
    # Serve health before the engine loads (vLLM takes a while): live at once, ready once loaded.
    http = _http(settings, settings.metrics.engine_port, engine_host_checks(host))
    try:
        host.start()
        # SIGTERM drains by migration first, so a rolling restart loses no request and cuts no stream. SIGINT
        # (Ctrl-C, or `drover up` stopping the whole cluster) stops at once: nowhere to migrate to.
        if _wait_for_signal() == signal.SIGINT:
            log.info("engine %s: SIGINT: stopping without draining", instance_id)
        elif not host.drain(settings.engine.drain_timeout_s):
            log.warning(
                "engine %s: requests still running after %.0fs of draining: aborting them",
                instance_id,
                settings.engine.drain_timeout_s,
            )
    finally:
        host.stop()
        if http is not None:
            http.stop()
        bus.stop()
        shutdown_tracing()
