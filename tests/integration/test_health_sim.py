"""/healthz and /readyz over HTTP on a real control plane, a sim engine and the gateway, each on the same
port as its /metrics; readiness goes false when the engine stops and when NATS goes away."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.local_cluster import InProcessCluster
from control.apps.gateway.server import GatewayThread
from control.apps.health import control_plane_checks, engine_host_checks
from control.gateway_settings import GatewaySettings
from observability.health import ProcessServer, start_process_server
from tests.integration.conftest import make_sim_cluster
from transport.nats_server import EmbeddedNatsServer


def wait_status(url: str, status: int, timeout_s: float = 15.0) -> httpx.Response:
    """Poll ``url`` until it answers ``status``; fail with the last body otherwise."""
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=3)
            if last.status_code == status:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} never answered {status}; last: {last.status_code if last else None} {last and last.text}")


@pytest.fixture()
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A NATS server of this test's own, so stopping it cuts off only this test's cluster (its directory is
    the test's, so it can start again on the same port)."""
    (tmp_path / "nats").mkdir()
    server = EmbeddedNatsServer(store_dir=str(tmp_path / "nats"))
    server.start()
    yield server
    server.stop()


def test_health_and_readiness_follow_the_engine_and_the_bus(own_nats: EmbeddedNatsServer) -> None:
    cluster: InProcessCluster = make_sim_cluster(own_nats.url, 1, time_scale=0.2)
    servers: list[ProcessServer] = []
    try:
        assert cluster.control is not None
        host = cluster.hosts["sim-0"]
        control = start_process_server(0, health=control_plane_checks(cluster.control))
        engine = start_process_server(0, health=engine_host_checks(host))
        servers += [control, engine]
        gateway = GatewayThread(GatewaySettings(port=0), own_nats.url).start()

        # Everything alive and ready; the same port serves the Prometheus scrape.
        assert httpx.get(control.url("/healthz")).json()["checks"]["bus"]["ok"] is True
        ready = wait_status(control.url("/readyz"), 200).json()
        assert ready["status"] == "ok" and set(ready["checks"]) == {"bus", "actors", "scheduler"}
        ready = wait_status(engine.url("/readyz"), 200).json()
        assert ready["checks"]["registered"]["detail"] == "control plane sees it serving"
        assert httpx.get(engine.url("/metrics")).status_code == 200
        assert httpx.get(control.url("/metrics")).headers["content-type"].startswith("text/plain")
        assert httpx.get(control.url("/nope")).status_code == 404
        assert wait_status(f"{gateway.url}/healthz", 200).json() == {"status": "ok"}

        # The engine stops: its host is still alive on the bus, but no longer ready.
        host.heartbeater.state = "stopping"
        host.heartbeater.beat()
        host.heartbeater.stop()
        assert host.actor is not None
        host.actor.stop()
        not_ready = wait_status(engine.url("/readyz"), 503).json()
        assert not_ready["checks"]["engine"]["ok"] is False
        assert not not_ready["checks"]["registered"]["ok"]
        assert httpx.get(engine.url("/healthz")).status_code == 200
        assert wait_status(control.url("/readyz"), 200).status_code == 200  # zero engines: still ready

        # NATS goes away: nobody is alive any more (reconnecting forever, but cut off).
        own_nats.stop()
        cut_off = wait_status(control.url("/healthz"), 503).json()
        assert cut_off["checks"]["bus"] == {"ok": False, "detail": "not connected to NATS"}
        assert wait_status(control.url("/readyz"), 503).json()["checks"]["bus"]["ok"] is False
        assert wait_status(engine.url("/healthz"), 503).status_code == 503
        assert wait_status(f"{gateway.url}/healthz", 503).json()["status"] == "fail"

        # NATS comes back on the same port: everyone reconnects and is healthy (and ready) again.
        own_nats.start()
        assert wait_status(control.url("/readyz"), 200).json()["checks"]["bus"]["ok"] is True
        assert wait_status(f"{gateway.url}/healthz", 200).status_code == 200
        assert wait_status(engine.url("/healthz"), 200).status_code == 200
        gateway.stop()
    finally:
        for server in servers:
            server.stop()
        cluster.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drover(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "control.apps.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_drover_processes_serve_health_on_their_metrics_port(own_nats: EmbeddedNatsServer) -> None:
    """`drover control serve` and `drover engine serve` answer /healthz, /readyz and /metrics on one port."""
    control_port, engine_port = _free_port(), _free_port()
    common = {"DROVER_OBSERVABILITY__EXPORTER": "none", "DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.1"}
    nats_url = own_nats.url
    control = _drover(
        ["--nats-url", nats_url, "control", "serve"], {**common, "DROVER_METRICS__CONTROL_PORT": str(control_port)}
    )
    engine = _drover(
        ["--nats-url", nats_url, "engine", "serve", "--instance-id", "health-probe", "--kind", "sim"],
        {**common, "DROVER_METRICS__ENGINE_PORT": str(engine_port)},
    )
    try:
        wait_status(f"http://127.0.0.1:{control_port}/readyz", 200, timeout_s=60)
        wait_status(f"http://127.0.0.1:{engine_port}/readyz", 200, timeout_s=60)
        assert httpx.get(f"http://127.0.0.1:{engine_port}/healthz").json()["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{control_port}/metrics").status_code == 200
        engine.send_signal(signal.SIGTERM)  # drains, then leaves: the endpoint goes away with the process
        assert engine.wait(timeout=30) == 0
    finally:
        for proc in (engine, control):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
