"""A request's trace in a real trace viewer: Drover's OTLP exporter sends the spans of the client, the control
plane and a sim engine (three processes) to Arize Phoenix, and the test reads them back through Phoenix's
REST API as one trace.

Phoenix lives in its own venv (.venv-viewer, made by scripts/setup.sh) because its pins clash with ours;
without it the test is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from transport.nats_server import EmbeddedNatsServer

REPO = Path(__file__).resolve().parents[2]
VIEWER_VENV = Path(os.environ.get("DROVER_VIEWER_VENV", REPO / ".venv-viewer"))
PHOENIX = VIEWER_VENV / "bin" / "phoenix"

pytestmark = pytest.mark.skipif(
    not PHOENIX.exists(), reason=f"no Phoenix at {PHOENIX}: run scripts/setup.sh (it builds .venv-viewer)"
)

CLIENT = """
import asyncio, sys
from control.client import DroverClient
from observability.tracing import setup_tracing, shutdown_tracing

async def main() -> None:
    async with DroverClient(sys.argv[1], name="phoenix-client") as client:
        await client.wait_for_instances(1, timeout_s=60)
        result = await (await client.submit("hello phoenix", max_tokens=8, request_id=sys.argv[2])).result()
        assert result.done is not None, result

setup_tracing("drover-client", "otlp", otlp_endpoint=sys.argv[3])
asyncio.run(main())
shutdown_tracing()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def phoenix(tmp_path: Path) -> Iterator[str]:
    """`phoenix serve` on free ports with its database in a temporary directory; yields its base URL."""
    port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    }
    env.pop("PYTHONPATH", None)  # Phoenix runs on its own venv's packages only
    log = (tmp_path / "phoenix.log").open("wb")
    proc = subprocess.Popen([str(PHOENIX), "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "phoenix.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Phoenix did not start within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


def _spans(url: str, project: str = "drover") -> list[dict[str, Any]]:
    """Every span of ``project`` through Phoenix's REST API (following its cursor)."""
    spans: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        response = httpx.get(f"{url}/v1/projects/{project}/spans", params=params, timeout=10)
        if response.status_code == 404:  # no span has arrived yet, so the project does not exist
            return []
        response.raise_for_status()
        body = response.json()
        spans += body["data"]
        cursor = body.get("next_cursor")
        if not cursor:
            return spans


def test_a_request_trace_reaches_phoenix_and_reads_back(phoenix: str, tmp_path: Path) -> None:
    endpoint = f"{phoenix}/v1/traces"
    otlp = {
        "DROVER_OBSERVABILITY__EXPORTER": "otlp",
        "DROVER_OBSERVABILITY__OTLP_ENDPOINT": endpoint,
        "DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.1",
        "DROVER_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
    }
    request_id = "phoenix-req-1"
    with EmbeddedNatsServer() as nats:
        nats_url = nats.url

        def drover(*args: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "control.apps.cli", "--nats-url", nats_url, *args],
                env={**os.environ, **otlp},
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        control = drover("control", "serve")
        engine = drover("engine", "serve", "--instance-id", "px-0", "--kind", "sim")
        try:
            subprocess.run(
                [sys.executable, "-c", CLIENT, nats_url, request_id, endpoint],
                env={**os.environ, **otlp},
                cwd=tmp_path,
                check=True,
                timeout=120,
            )
        finally:
            _stop(engine)  # SIGTERM flushes each process's span batch to Phoenix
            _stop(control)

    names = {"drover.submit", "drover.dispatch", "drover.engine.request"}  # client, control plane, engine
    deadline = time.monotonic() + 30
    while True:
        spans = _spans(phoenix)
        mine = [s for s in spans if s["attributes"].get("drover.request.id") == request_id]
        if mine:
            trace_id = mine[0]["context"]["trace_id"]
            in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
            if names <= {s["name"] for s in in_trace}:
                break
        assert time.monotonic() < deadline, f"spans in Phoenix: {sorted({s['name'] for s in spans})}"
        time.sleep(0.5)

    # One trace across three processes: every span but the client's root has its parent in the trace.
    ids = {s["context"]["span_id"] for s in in_trace}
    roots = [s for s in in_trace if s["parent_id"] is None]
    assert [r["name"] for r in roots] == ["drover.submit"]
    assert all(s["parent_id"] in ids for s in in_trace if s["parent_id"] is not None)
    engine_span = next(s for s in in_trace if s["name"] == "drover.engine.request")
    assert engine_span["attributes"]["drover.instance.id"] == "px-0"
    assert engine_span["end_time"] >= engine_span["start_time"]
