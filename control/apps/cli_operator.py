"""Operator commands added to `drover` (gateway, top, trace, metrics): registered by control/apps/cli.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import typer


def context_settings(ctx: typer.Context) -> Any:
    """Effective settings from the root command's global options, with the cluster context."""
    from control.apps.cli_common import cli_settings

    return cli_settings(ctx)


def need_url(s: Any) -> str:
    from control.apps import cli_common

    return cli_common.need_url(s)


def _parse_keys(pairs: list[str]) -> list[dict[str, str]]:
    keys = []
    for pair in pairs:
        key, sep, client_id = pair.partition("=")
        if not sep or not key or not client_id:
            raise typer.BadParameter(f"expected KEY=CLIENT_ID, got {pair!r}", param_hint="--api-key")
        keys.append({"key": key, "client_id": client_id})
    return keys


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main CLI app."""

    @app.command()
    def gateway(
        ctx: typer.Context,
        host: str | None = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
        port: int | None = typer.Option(None, "--port", help="Port (default 8000)."),
        api_key: list[str] = typer.Option([], "--api-key", help="KEY=CLIENT_ID; repeat. None: no auth."),
        requests_per_minute: float | None = typer.Option(None, "--rpm", help="Per-client rate limit; 0: none."),
        token_quota: int | None = typer.Option(None, "--token-quota", help="Per-client tokens; 0: unlimited."),
        ssl_certfile: str | None = typer.Option(None, "--ssl-certfile", help="PEM certificate: serve HTTPS."),
        ssl_keyfile: str | None = typer.Option(None, "--ssl-keyfile", help="PEM key of --ssl-certfile."),
    ) -> None:
        """Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
        from control.apps import cli
        from control.apps.gateway.server import serve
        from observability.logs import setup_logging
        from observability.tracing import setup_tracing, shutdown_tracing

        overrides: dict[str, Any] = {
            "host": host,
            "port": port,
            "requests_per_minute": requests_per_minute,
            "token_quota": token_quota,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
        }
        if api_key:
            overrides["api_keys"] = _parse_keys(api_key)
        from control.apps.cli_common import cli_settings

        # Flags go through the settings loader: a bad value is one line naming the flag, never the key itself.
        s = cli_settings(ctx, {"gateway": overrides})
        settings = s.gateway
        url = need_url(s)
        obs = s.observability
        setup_logging(obs.log_level)
        setup_tracing(
            f"{obs.service_name}-gateway", obs.exporter, jsonl_path=obs.jsonl_path, otlp_endpoint=obs.otlp_endpoint
        )
        span_bus = None
        if obs.ship_to_control:  # the gateway's spans go to the control plane's trace file as well
            from control.apps.processes import bus_options, ship_spans
            from transport.bus import Bus

            span_bus = Bus(bus_options(s, "drover-gateway-spans")).start()
            ship_spans(s, span_bus)
        scheme = "https" if settings.tls else "http"
        auth = f"{len(settings.api_keys)} API keys" if settings.api_keys else "no authentication"
        cli.console.print(f"gateway on {scheme}://{settings.host}:{settings.port}/v1 -> {url} ({auth})")
        try:
            serve(settings, url, log_level=obs.log_level.lower(), nats_settings=s.nats)
        finally:
            shutdown_tracing()
            if span_bus is not None:
                span_bus.stop()

    @app.command()
    def top(
        ctx: typer.Context,
        interval: float = typer.Option(1.0, "--interval", "-i", min=0.1, help="Seconds between refreshes."),
        once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    ) -> None:
        """Live dashboard: instances, KV use, queue, requests in flight, moves between instances."""
        from control.apps import cli
        from control.apps.top import run_top

        s = context_settings(ctx)
        url = need_url(s)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                run_top(
                    url,
                    interval_s=interval,
                    once=once,
                    console=cli.console,
                    connect_options=cli.CLI_CONNECT,
                    nats_settings=s.nats,
                    slo=s.autoscaling.slo,
                )
            )

    @app.command("trace")
    def trace_cmd(
        ctx: typer.Context,
        request_id: str = typer.Argument(..., help="Request id (the gateway's response id) or a trace id."),
        files: list[Path] = typer.Option(
            [],
            "--file",
            "-f",
            help="JSON-lines span files (default: the observability.jsonl_path setting); repeat for several.",
        ),
        width: int | None = typer.Option(
            None, "--width", min=10, help="Timeline width in characters (default: 48, less on a narrow terminal)."
        ),
    ) -> None:
        """Waterfall of a request's spans across gateway, client, scheduler, engines and migrations."""
        from control.apps import cli
        from control.apps.cli_common import context_traces, fail
        from observability.trace_view import TraceNotFound, find_request_spans, render_waterfall

        s = context_settings(ctx)
        paths = [p.resolve() for p in files] or [context_traces(s).resolve()]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            exporter = s.observability.exporter
            why = (
                f"the exporter is {exporter!r}: set DROVER_OBSERVABILITY__EXPORTER=jsonl on the cluster"
                if exporter != "jsonl"
                else "no process of this cluster has written spans there yet: pass the cluster's file with --file"
            )
            fail(f"no span file {', '.join(missing)} ({why})")
        try:
            found = find_request_spans(paths, request_id)
        except TraceNotFound as exc:
            fail(f"{exc} (spans are written in batches: retry in a second)", 1)
        columns = cli.console.size.width
        narrow = columns < 120
        longest = max((len(s.name) + 2 * 4 for s in found), default=20)  # span names, indented up to 4 deep
        fitted = max(10, min(48, columns - longest - 26))  # what start, duration and borders leave the bar
        cli.console.print(render_waterfall(found, request_id, width or fitted, narrow=narrow))

    @app.command()
    def metrics(
        ctx: typer.Context,
        port: int = typer.Option(9400, "--port", help="Prometheus scrape port."),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address."),
        interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between status polls."),
        once: bool = typer.Option(False, "--once", help="Poll once, print the exposition, exit."),
    ) -> None:
        """Serve cluster metrics for Prometheus (instance load, queue, engine request outcomes)."""
        from control.apps import cli

        s = context_settings(ctx)
        url = need_url(s)
        asyncio.run(_serve_metrics(url, host, port, interval, once, cli.CLI_CONNECT, s.nats, s.autoscaling.slo))


async def _serve_metrics(
    url: str,
    host: str,
    port: int,
    interval_s: float,
    once: bool,
    connect_options: dict[str, Any],
    nats_settings: Any = None,
    slo: Any = None,
) -> None:
    from control.apps.metrics_exporter import ClusterMetricsExporter
    from control.client import DroverClient
    from observability.health import HealthChecks, start_process_server
    from observability.metrics import Metrics

    source = Metrics(service_name="drover-metrics")
    client = await DroverClient(url, name="drover-metrics", nats_settings=nats_settings).connect(**connect_options)
    if not once:  # reachable: now connect for the long run, reconnecting forever through NATS restarts
        await client.close()
        client = await DroverClient(url, name="drover-metrics", nats_settings=nats_settings).connect()
    exporter = ClusterMetricsExporter(client, source, interval_s, slo=slo)
    try:
        if once:
            await exporter.poll_once()
            typer.echo(source.render().decode(), nl=False)
            return
        await exporter.start()
        try:
            # /metrics, /healthz (connected to NATS) and /readyz (+ the last status poll answered); 404 elsewhere
            health = HealthChecks(
                liveness={"bus": lambda: (client.nc.is_connected, "connected" if client.nc.is_connected else "down")},
                readiness={"poll": lambda: (exporter.last_poll_ok, exporter.last_poll_detail)},
            )
            server = start_process_server(port, host, health=health, source=source)
        except OSError as exc:
            from control.apps.cli_common import fail

            fail(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (pick another --port)")
        typer.echo(f"metrics on http://{host}:{server.port}/metrics from {url} (Ctrl-C stops)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await exporter.run(stop)
        finally:
            server.stop()
            await exporter.stop()
    finally:
        await client.close()
