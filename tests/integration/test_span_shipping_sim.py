"""Spans cross hosts over the bus: an engine process with ``observability.ship_to_control`` publishes its
finished spans on drover.v1.spans, the control plane process appends them to its own trace file, and
`drover trace`'s reader finds one request's spans of both services there (issue #9, tracing views)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from control.client import DroverClient
from observability.trace_view import find_request_spans
from transport.messages import SamplingParams
from transport.nats_server import EmbeddedNatsServer


def _drover(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "control.apps.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_engine_spans_reach_the_control_planes_trace_file(tmp_path: Path) -> None:
    (tmp_path / "nats").mkdir()
    nats = EmbeddedNatsServer(store_dir=str(tmp_path / "nats"))
    url = nats.start()
    control_file, engine_file = tmp_path / "control" / "traces.jsonl", tmp_path / "engine" / "traces.jsonl"
    common = {"DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.1", "DROVER_METRICS__CONTROL_PORT": "0"}
    control = _drover(
        ["--nats-url", url, "control", "serve"],
        {**common, "DROVER_OBSERVABILITY__EXPORTER": "jsonl", "DROVER_OBSERVABILITY__JSONL_PATH": str(control_file)},
        tmp_path,
    )
    # The engine keeps no file of its own: its spans can only reach the control plane's file over NATS.
    engine = _drover(
        ["--nats-url", url, "engine", "serve", "--instance-id", "ship-0", "--kind", "sim"],
        {
            **common,
            "DROVER_METRICS__ENGINE_PORT": "0",
            "DROVER_OBSERVABILITY__EXPORTER": "none",
            "DROVER_OBSERVABILITY__JSONL_PATH": str(engine_file),
            "DROVER_OBSERVABILITY__SHIP_TO_CONTROL": "true",
        },
        tmp_path,
    )
    try:
        async with DroverClient(url, name="span-ship") as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    status = await client.status(timeout_s=2)
                    if any(i.info.instance_id == "ship-0" and i.state == "serving" for i in status.instances):
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the engine never registered with the control plane"
                await asyncio.sleep(0.2)
            result = await client.generate("hello across hosts", sampling=SamplingParams(max_tokens=4))
            assert result.done is not None
        rid = result.request_id

        deadline = time.monotonic() + 30
        found = []
        while time.monotonic() < deadline:
            found = find_request_spans([control_file], rid) if control_file.exists() else []
            if {s.service for s in found} >= {"drover-control", "drover-engine-ship-0"}:
                break
            await asyncio.sleep(0.3)
        services = {s.service for s in found}
        assert services >= {"drover-control", "drover-engine-ship-0"}, services
        engine_spans = [s for s in found if s.service == "drover-engine-ship-0"]
        control_traces = {s.trace_id for s in found if s.service == "drover-control"}
        assert any(s.attributes.get("drover.request.id") == rid for s in engine_spans)
        assert {s.trace_id for s in engine_spans} <= control_traces  # one trace across both processes
        assert not engine_file.exists()  # the engine's spans went over the bus, not to a file of its own
    finally:
        _stop(engine)
        _stop(control)
        nats.stop()
