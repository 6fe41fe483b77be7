"""Running the gateway: in the foreground (``drover gateway``) or on a thread of its own (tests, benchmarks).

HTTPS when ``ssl_certfile`` and ``ssl_keyfile`` are set (uvicorn's TLS).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from control.apps.gateway.app import create_app
from control.gateway_settings import GatewaySettings
from observability.metrics import Metrics

if TYPE_CHECKING:
    from control.settings import NatsSettings


def uvicorn_server(app: FastAPI, settings: GatewaySettings, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def serve(
    settings: GatewaySettings, nats_url: str, *, log_level: str = "info", nats_settings: NatsSettings | None = None
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both); ``nats_settings``: NATS credentials and TLS."""
    uvicorn_server(create_app(settings, nats_url, nats_settings=nats_settings), settings, log_level).run()


class GatewayThread:
    """A gateway serving from a daemon thread (its own event loop); ``port=0`` picks a free port."""

    def __init__(
        self,
        settings: GatewaySettings,
        nats_url: str,
        metrics: Metrics | None = None,
        *,
        nats_settings: NatsSettings | None = None,
    ) -> None:
        self.app = create_app(settings, nats_url, metrics, nats_settings=nats_settings)
        self.settings = settings
        self.server = uvicorn_server(self.app, settings)
        self._thread = threading.Thread(target=self._run, name="drover-gateway", daemon=True)
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits with SystemExit(3) when the app fails to start
            self._failure = exc

    def start(self, timeout_s: float = 10.0) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = self.app.state.gateway.startup_error or self._failure or "timed out"
                raise RuntimeError(f"the gateway did not start: {why}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
