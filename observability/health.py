"""One small HTTP server per process: Prometheus ``/metrics`` plus ``/healthz`` (liveness) and ``/readyz``
(readiness), so each process exposes one port for scrapers, load balancers and Kubernetes probes.

Checks are plain callables returning ``(ok, detail)``; the process that starts the server decides what they
look at (control/apps/health.py has the control plane's and an engine host's). Both endpoints answer 200 when
every check passes, else 503, with a JSON body naming each check::

    {"status": "ok", "checks": {"bus": {"ok": true, "detail": "connected"}, ...}}

A check that raises counts as failed (its exception is the detail): a probe must never take the process down.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from observability.metrics import CONTENT_TYPE, Metrics, metrics

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


@dataclass
class HealthChecks:
    """Named liveness checks (``/healthz``) and readiness checks (``/readyz``, which also runs liveness)."""

    liveness: dict[str, Check] = field(default_factory=dict)
    readiness: dict[str, Check] = field(default_factory=dict)

    def live(self) -> tuple[bool, dict[str, dict[str, object]]]:
        return run_checks(self.liveness)

    def ready(self) -> tuple[bool, dict[str, dict[str, object]]]:
        return run_checks({**self.liveness, **self.readiness})


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, dict[str, object]]]:
    """Run every check (none short-circuits, so the body shows them all); ok when all pass."""
    results: dict[str, dict[str, object]] = {}
    for name, check in checks.items():
        try:
            ok, detail = check()
        except Exception as exc:
            ok, detail = False, f"check failed: {exc!r}"
        results[name] = {"ok": bool(ok), "detail": detail}
    return all(r["ok"] for r in results.values()), results


def _handler(source: Metrics, health: HealthChecks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                self._send(200, source.render(), CONTENT_TYPE)
            elif path in ("/healthz", "/readyz"):
                ok, checks = health.live() if path == "/healthz" else health.ready()
                body = json.dumps({"status": "ok" if ok else "fail", "checks": checks}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "not found: try /metrics, /healthz or /readyz"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


@dataclass
class ProcessServer:
    """A running ``/metrics`` + ``/healthz`` + ``/readyz`` endpoint on a daemon thread."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    health: HealthChecks

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str = "") -> str:
        host = self.server.server_address[0]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


def start_process_server(
    port: int, host: str = "127.0.0.1", *, health: HealthChecks | None = None, source: Metrics | None = None
) -> ProcessServer:
    """Serve ``source`` (default: this process's metrics) and ``health``; port 0 picks a free port."""
    checks = health or HealthChecks()
    server = ThreadingHTTPServer((host, port), _handler(source or metrics(), checks))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="drover-http", daemon=True)
    thread.start()
    return ProcessServer(server, thread, checks)
