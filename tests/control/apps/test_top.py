"""`drover top --once`, `drover metrics --once` and `drover trace` against a real cluster (in-process
control plane and sim engines on a real nats-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from actors.local_cluster import InProcessCluster
from control.apps.cli import app
from control.apps.top import TopState, autoscaler_line, render_frame
from control.client import DroverClient, RequestStream
from observability import spans
from observability.tracing import JsonLinesSpanExporter
from tests.actors.test_autoscaler import autoscale_settings, autoscale_status, make_engine
from tests.integration.conftest import make_sim_cluster

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(nats_url: str) -> Iterator[InProcessCluster]:
    c = make_sim_cluster(nats_url, 2, time_scale=0.5, max_model_len=2048)
    yield c
    c.stop()


def drover(cluster: InProcessCluster, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--nats-url", cluster.url, *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


async def _long_requests(url: str, n: int) -> tuple[DroverClient, list[RequestStream]]:
    client = await DroverClient(url, name="top-test").connect()
    await client.wait_for_instances(2, timeout_s=10)
    streams = [await client.submit(f"busy {i}", max_tokens=1500, request_id=f"top-busy-{i}") for i in range(n)]
    for stream in streams:
        async for _ in stream.events():
            break  # running: it produced a token
    return client, streams


async def _cancel_all(client: DroverClient, streams: list[RequestStream]) -> None:
    for stream in streams:
        await stream.cancel()
        await stream.result()
    await client.close()


def test_top_once_shows_instances_and_requests(cluster: InProcessCluster) -> None:
    loop = asyncio.new_event_loop()
    try:
        client, streams = loop.run_until_complete(_long_requests(cluster.url, 3))
        code, out = drover(cluster, "top", "--once", "--interval", "0.2")
        loop.run_until_complete(_cancel_all(client, streams))
    finally:
        loop.close()
    assert code == 0, out
    assert "sim-0" in out and "sim-1" in out and "serving" in out
    assert "policy freeness" in out and "in flight 3 (3 running)" in out
    assert "top-busy-0" in out  # among the oldest requests
    assert "disp/s" in out and "/512" in out and "migrations 0 running" in out


def test_top_without_a_control_plane_is_a_clear_error() -> None:
    result = runner.invoke(app, ["--nats-url", "nats://127.0.0.1:1", "top", "--once"])
    assert result.exit_code == 2 and "cannot reach NATS at nats://127.0.0.1:1" in result.output


def test_frames_infer_moves_between_instances(cluster: InProcessCluster) -> None:
    from transport.messages import RequestClass, RequestStatus, StatusReply

    def status(instance: str) -> StatusReply:
        request = RequestStatus(
            request_id="r1",
            instance_id=instance,
            state="running",
            prompt_tokens=3,
            age_s=1.0,
            priority=0,
            request_class=RequestClass.INTERACTIVE,
        )
        return StatusReply(instances=[], requests=[request], queued=0, dispatch_policy="freeness")

    state = TopState()
    state.observe(status("sim-0"), 1.0)
    state.observe(status("sim-1"), 2.0)
    assert state.moves_seen == 1 and state.recent_moves == [("r1", "sim-0", "sim-1")]
    frame = render_frame(status("sim-1"), {}, state)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(frame)
    assert "recent moves" in console.export_text()


def test_metrics_once_exports_instance_gauges(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "metrics", "--once")
    assert code == 0, out
    assert 'drover_instance_total_blocks{instance="sim-0"} 512.0' in out
    assert "drover_queue_depth" in out and "drover_migrations_in_flight 0.0" in out


def test_trace_shows_a_real_request(cluster: InProcessCluster, span_exporter: Any, tmp_path: Path) -> None:
    async def one() -> str:
        async with DroverClient(cluster.url, name="trace-test") as client:
            result = await client.generate("trace me", max_tokens=3, request_id="top-traced-1")
            assert result.done is not None
            return result.request_id

    span_exporter.clear()
    request_id = asyncio.run(one())
    deadline = time.monotonic() + 5
    while {spans.CLIENT_SUBMIT, spans.SCHEDULER_DISPATCH, spans.ENGINE_REQUEST} - {
        s.name for s in span_exporter.get_finished_spans()
    }:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    path = tmp_path / "traces.jsonl"
    JsonLinesSpanExporter(path).export(span_exporter.get_finished_spans())  # the real exporter's format
    code, out = drover(cluster, "trace", request_id, "--file", str(path))
    assert code == 0, out
    names = [line.strip("│ ").split()[0].lstrip("└") for line in out.splitlines() if "█" in line]
    assert names[0] == spans.CLIENT_SUBMIT
    assert spans.SCHEDULER_DISPATCH in out and spans.ENGINE_REQUEST in out
    code, out = drover(cluster, "trace", "no-such-request", "--file", str(path))
    assert code == 1 and "no span of request" in out


def test_top_says_autoscaler_off_when_it_is_disabled(cluster: InProcessCluster) -> None:
    assert not cluster.settings.autoscaler.enabled
    code, out = drover(cluster, "top", "--once", "--interval", "0.1")
    assert code == 0, out
    assert "autoscaler off" in out


def test_autoscaler_line_shows_the_last_decision_and_its_reason() -> None:
    from transport.messages import AutoscaleStatusReply, RoleScaleStatus

    role = RoleScaleStatus(
        role="interactive",
        instances=2,
        starting=1,
        draining=0,
        target=3,
        min_instances=1,
        max_instances=4,
        pinned=False,
    )
    reply = AutoscaleStatusReply(
        enabled=True,
        provisioner="local",
        period_s=5.0,
        startup_estimate_s=2.0,
        roles=[role],
        last_reason="interactive 2 -> 3: backpressure 0.92 > 0.8",
        last_decision_at=100.0,
    )
    text = autoscaler_line(reply, now=112.0).plain
    assert "last decision 12s ago" in text and "interactive 2 -> 3: backpressure 0.92 > 0.8" in text
    assert "interactive 2+1/3" in text
    assert "no decision yet" in autoscaler_line(msgspec.structs.replace(reply, last_decision_at=0.0)).plain
    assert autoscaler_line(msgspec.structs.replace(reply, enabled=False)).plain == "autoscaler off"
    assert "unavailable (permissions violation)" in autoscaler_line("permissions violation").plain


async def test_top_shows_a_live_autoscalers_last_decision(tmp_path: Path) -> None:
    """A real control plane with the autoscaler on (on a NATS server of its own: this module's cluster has it
    off): its first plan starts min_instances, and `drover top`'s frame carries the reason it reports."""
    from rich.console import Console

    from actors.control_plane import ControlPlane
    from control.apps.provisioning import InProcessProvisioner
    from control.apps.top import run_top
    from engines.tokenizer import ByteTokenizer
    from transport.bus import Bus, BusOptions
    from transport.nats_server import EmbeddedNatsServer

    (tmp_path / "nats").mkdir()
    nats = EmbeddedNatsServer(store_dir=str(tmp_path / "nats"))
    url = nats.start()
    settings = autoscale_settings(url, enabled=True)
    provisioner = InProcessProvisioner(settings, make_engine, prefix="toptest")
    bus = Bus(BusOptions(url=url, name="drover-control")).start()
    control = ControlPlane(settings, bus, ByteTokenizer(), provisioner=provisioner).start()
    try:
        deadline = time.monotonic() + 30
        while not (status := await autoscale_status(url)).last_decision_at or not status.last_reason:
            assert time.monotonic() < deadline, "the autoscaler never decided"
            await asyncio.sleep(0.1)
        console = Console(record=True, width=1000)
        await run_top(url, once=True, interval_s=0.1, console=console)
        out = console.export_text()
        after = await autoscale_status(url)
    finally:
        control.stop()
        bus.stop()
        nats.stop()
    assert "last decision" in out and "autoscaler off" not in out, out
    # the reason of the plan top asked about: the one before or after its frame (plans are 0.5 s apart)
    assert status.last_reason in out or after.last_reason in out, (status.last_reason, after.last_reason, out)
