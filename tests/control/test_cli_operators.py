"""Issue 15: the CLI as a new operator meets it, run as a real process at 80 columns (COLUMNS=80, piped), against
a real cluster (in-process control plane and sim engines on a real nats-server) or one `drover up` starts.

Every error is one line on stderr with exit code 2 (1: the cluster said no), never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from tests.integration.conftest import make_sim_cluster

ROOT = Path(__file__).resolve().parents[2]
LONG_ID = "sim-with-a-rather-long-instance-name-that-must-not-be-cut-0"


def drover(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=ROOT,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    everything = proc.stdout + proc.stderr
    assert proc.returncode == code, everything
    assert "Traceback" not in everything, everything
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, everything
    assert lines[0].startswith("drover: error: "), everything
    return lines[0]


@pytest.fixture(scope="module")
def cluster(nats_url: str) -> Iterator[InProcessCluster]:
    from engines.sim.live_migration import MigratableSimEngine

    c = make_sim_cluster(nats_url, 2, time_scale=1.0, max_model_len=1024)
    c.add_engine(MigratableSimEngine(LONG_ID, time_scale=1.0, max_model_len=1024))
    asyncio.run(_wait_instances(c.url, 3))
    yield c
    c.stop()


async def _wait_instances(url: str, count: int) -> None:
    async with DroverClient(url, name="test-wait") as client:
        await client.wait_for_instances(count, timeout_s=30)


def at(cluster: InProcessCluster, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return drover("--nats-url", cluster.url, *args, **kwargs)  # type: ignore[arg-type]


def status_json(cluster: InProcessCluster) -> dict[str, object]:
    proc = at(cluster, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


# --------------------------------------------------------------------------------------------- 1: fail fast
def test_submit_to_an_unreachable_nats_fails_within_seconds() -> None:
    proc = drover("--nats-url", "nats://127.0.0.1:1", "submit", "hello", timeout=30)
    assert "cannot reach NATS at nats://127.0.0.1:1" in assert_one_line_error(proc)


def test_submit_with_every_instance_drained_ends_at_its_deadline(cluster: InProcessCluster) -> None:
    ids = ["sim-0", "sim-1", LONG_ID]
    try:
        for instance in ids:
            assert at(cluster, "drain", instance, "--no-wait").returncode == 0
        proc = at(cluster, "submit", "nobody serves this", "--timeout", "1.5", timeout=30)
        line = assert_one_line_error(proc, code=1)
        assert "deadline" in line.lower(), line
    finally:
        for instance in ids:
            at(cluster, "drain", instance, "--undo")


# ------------------------------------------------------------------------------------ 2, 9: settings errors
@pytest.mark.parametrize(
    ("args", "env", "toml", "expected"),
    [
        (["config", "show"], {"DROVER_ENGINE__KIND": "loud"}, None, "$DROVER_ENGINE__KIND"),
        (["config", "show"], {}, "[nats]\nbogus = 1\n", "unknown setting nats.bogus"),
        (["config", "show"], {}, "[nats\n", "is not valid TOML"),
        (["--config", "/no/such/drover.toml", "status"], {}, None, "settings file /no/such/drover.toml not found"),
        (["--log-level", "LOUD", "config", "show"], {}, None, "--log-level"),
        (["gateway", "--api-key", "short=client-a"], {"DROVER_NATS__URL": "nats://127.0.0.1:1"}, None, "api_keys"),
        (["up", "--kind", "quantum"], {}, None, "--kind"),
    ],
)
def test_settings_and_usage_errors_are_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], toml: str | None, expected: str
) -> None:
    if toml is not None:
        (tmp_path / "drover.toml").write_text(toml)
        args = ["--config", str(tmp_path / "drover.toml"), *args]
    line = assert_one_line_error(drover(*args, env=env))
    assert expected in line, line
    assert "short" not in line  # a credential is never echoed


def test_metrics_port_in_use_is_blamed_on_the_port(cluster: InProcessCluster) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = assert_one_line_error(at(cluster, "metrics", "--port", str(port), timeout=30))
    assert "address already in use" in line.lower() and "control plane" not in line, line


# ---------------------------------------------------------------------------------------- 3: ids and --json
def test_ids_are_whole_at_80_columns_when_piped(cluster: InProcessCluster) -> None:
    proc = at(cluster, "instances")
    assert proc.returncode == 0, proc.stderr
    assert LONG_ID in proc.stdout, proc.stdout
    assert "…" not in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "args",
    [["status"], ["instances"], ["requests"], ["policy", "get"], ["autoscale", "status"], ["context", "show"]],
)
def test_listing_commands_print_json(cluster: InProcessCluster, args: list[str]) -> None:
    proc = at(cluster, *args, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    if args == ["instances"]:
        assert LONG_ID in {i["info"]["instance_id"] for i in data}


# ------------------------------------------------------------------------------ 4, 9: migrations and drains
def _start_long_requests(cluster: InProcessCluster, count: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control.cli",
                "--nats-url",
                cluster.url,
                "submit",
                f"long request {i}",
                "--max-tokens",
                "900",
                "--timeout",
                "120",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(count)
    ]


def _running_on(cluster: InProcessCluster, min_requests: int, timeout_s: float = 90) -> dict[str, list[str]]:
    """Where requests run, once the scheduler and the engines' own heartbeats agree that ``min_requests`` do."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = status_json(cluster)
        placed: dict[str, list[str]] = {}
        for req in status["requests"]:  # type: ignore[attr-defined]
            if req["state"] == "running" and req["instance_id"]:
                placed.setdefault(req["instance_id"], []).append(req["request_id"])
        engines = {  # what the engines' own heartbeats hold (running or waiting for a batch slot)
            i["info"]["instance_id"]: i["load"]["num_running"] + i["load"]["num_waiting"]
            for i in status["instances"]  # type: ignore[attr-defined]
        }
        if sum(map(len, placed.values())) >= min_requests and all(engines[i] >= len(r) for i, r in placed.items()):
            return placed
        time.sleep(0.2)
    raise AssertionError(f"requests did not start: {status}")


@pytest.fixture
def slow_heartbeat_cluster() -> Iterator[InProcessCluster]:
    """Sim engines with the default heartbeat period (0.25 s): a heartbeat sent before a move committed still
    lists the request at its source for that long, which is what planned the spurious moves. On a NATS server
    of its own: the module's cluster (another control plane) listens on the session's."""
    from control.settings import load_settings
    from engines.sim.live_migration import MigratableSimEngine
    from engines.tokenizer import ByteTokenizer
    from transport.nats_server import EmbeddedNatsServer

    server = EmbeddedNatsServer()
    nats_url = server.start()
    settings = load_settings(overrides={"nats": {"url": nats_url}, "engine": {"kind": "sim"}})
    assert settings.engine.heartbeat_interval_s >= 0.25
    c = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    c.start_control()
    for index in range(2):
        c.add_engine(MigratableSimEngine(f"hb-{index}", time_scale=1.0, max_model_len=1024))
    asyncio.run(_wait_instances(c.url, 2))
    yield c
    c.stop()
    server.stop()


def test_drain_where_every_move_succeeds_counts_no_aborted_migration(slow_heartbeat_cluster: InProcessCluster) -> None:
    cluster = slow_heartbeat_cluster
    before = status_json(cluster)
    submitted = _start_long_requests(cluster, 6)
    source = ""
    try:
        placed = _running_on(cluster, 6)
        source = max(placed, key=lambda i: len(placed[i]))
        proc = at(cluster, "drain", source, "--timeout", "60", timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(2.0)  # heartbeats that still list the moved requests at the source arrive now
        after = status_json(cluster)
        moved = len(placed[source])
        summary = (proc.stdout, placed, after["requests"])
        assert after["migrations_completed"] >= before["migrations_completed"] + moved, summary  # type: ignore[operator]
        assert after["migrations_aborted"] == before["migrations_aborted"], summary
        top = at(cluster, "top", "--once", "--interval", "0.2")
        assert "0 aborted" in top.stdout, top.stdout
    finally:
        if source:
            at(cluster, "drain", source, "--undo")
        for p in submitted:
            p.kill()
            p.wait()


def test_migrate_to_where_the_request_runs_says_so(cluster: InProcessCluster) -> None:
    submitted = _start_long_requests(cluster, 1)
    try:
        placed = _running_on(cluster, 1)
        instance, requests = next(iter(placed.items()))
        line = assert_one_line_error(at(cluster, "migrate", requests[0], "--to", instance))
        assert f"already runs on {instance}" in line, line
        line = assert_one_line_error(at(cluster, "migrate", requests[0], "--to", "engine-9"))
        assert "no such instance" in line, line
    finally:
        for p in submitted:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------- 10: names and --help
def test_policy_set_accepts_the_docs_names(cluster: InProcessCluster) -> None:
    try:
        proc = at(cluster, "policy", "set", "dispatch_policy=infaas++", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["dispatch_policy"] == "least_loaded"
    finally:
        at(cluster, "policy", "set", "dispatch_policy=freeness")


def test_help_shows_defaults_and_choices() -> None:
    proc = drover("up", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "vllm|sim|torch" in text and "(default: vllm)" in text and "(default: 2)" in text, proc.stdout
    text = " ".join(drover("--help", env={"COLUMNS": "200"}).stdout.split())
    assert "debug|info|warning|error|critical" in text, text


# ------------------------------------------------------------------------- 7, 10: drover up, context, stop
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_up(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "up.out"
    handle = out.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control.cli",
            "up",
            "--kind",
            "sim",
            "--keep",
            "--requests",
            "0",
            "--work-dir",
            str(tmp_path / "work"),
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while "cluster stays up" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)
    return proc, out


def _wait_gone(pids: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(pids, timeout=timeout_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_up_records_a_context_serves_health_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    from control.apps.launcher import STOP_BOUND_S

    engine_port = _free_port()
    env = {"DROVER_CONTEXT": str(tmp_path / "contexts.json"), "DROVER_METRICS__ENGINE_PORT": str(engine_port)}
    proc, out = _start_up(tmp_path, env)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "nats-server" in names and "control serve" in names and "engine-1" in names, names
        status = drover("status", env=env)  # no --nats-url: the context `drover up` wrote
        assert status.returncode == 0 and "engine-0" in status.stdout and "engine-1" in status.stdout, status
        context = json.loads(drover("context", "show", "--json", env=env).stdout)
        current = next(c for c in context["contexts"] if c["name"] == context["current"])
        import urllib.request

        with urllib.request.urlopen(current["metrics_url"] + "/healthz", timeout=30) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(current["metrics_url"] + "/metrics", timeout=30) as reply:
            control_metrics = reply.read().decode()
        assert "drover_control_plane_leader 1.0" in control_metrics, control_metrics
        for port in (engine_port, engine_port + 1):  # one variable, two engines: each its own port
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
                assert reply.status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
                engine_metrics = reply.read().decode()
            # the scheduler's series live in the control plane only: no zero-valued copies elsewhere
            assert "drover_queue_depth" not in engine_metrics and "drover_instances" not in engine_metrics
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_BOUND_S + 30)  # generous: a starved host stops slowly (no timing is asserted)
        assert not _wait_gone(children, 20), out.read_text()
        text = out.read_text()
        assert "stopping engines" in text and "nats-server stopped" in text, text
        assert drover("context", "show", "--json", env=env).stdout.count("nats_url") == 0  # it cleaned up
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_children_of_up_die_with_it_on_sigkill(tmp_path: Path) -> None:
    env = {"DROVER_CONTEXT": str(tmp_path / "contexts.json")}
    proc, _out = _start_up(tmp_path, env)
    children = psutil.Process(proc.pid).children(recursive=True)
    try:
        assert len(children) >= 4, children  # nats-server, control plane, two engines
        proc.kill()
        proc.wait()
        alive = _wait_gone(children, 20)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        for child in children:
            if child.is_running():
                child.kill()


# ------------------------------------------------------------------------------------------- 8: the gateway
def test_gateway_refuses_max_tokens_beyond_the_context_and_blames_bad_json(cluster: InProcessCluster) -> None:
    import httpx
    import openai

    port = _free_port()
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), "DROVER_OBSERVABILITY__EXPORTER": "none"}
    env["DROVER_GATEWAY__REQUEST_DEADLINE_S"] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "--nats-url", cluster.url, "gateway", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt="x", max_tokens=5000)  # the sim context is 1024
        assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens", info.value
        assert client.completions.create(model=model, prompt="x", max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]
        scraped = httpx.get(f"{url}/metrics", timeout=10).text
        assert "drover_gateway_requests_total" in scraped and "drover_queue_depth" not in scraped, scraped
        assert "drover_control_plane_leader" not in scraped
        bad = httpx.post(
            f"{url}/v1/completions",
            content=b'{"model": "m", "prompt": "x",,}',
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["param"] is None and "not valid JSON" in error["message"], error
        ids = ["sim-0", "sim-1", LONG_ID]
        try:  # every instance drained: the completion ends at the gateway's request deadline, not never
            for instance in ids:
                assert at(cluster, "drain", instance, "--no-wait").returncode == 0
            with pytest.raises(openai.APIStatusError) as waited:
                client.with_options(timeout=30).completions.create(model=model, prompt="x", max_tokens=3)
            assert waited.value.status_code == 504 and waited.value.code == "deadline_exceeded", waited.value
        finally:
            for instance in ids:
                at(cluster, "drain", instance, "--undo")
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


# ------------------------------------------------------------------------------------ 10: top at 80x24, SLOs
def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", f"drover-test-{os.getpid()}", *args], capture_output=True, text=True).stdout


@pytest.mark.skipif(not Path("/usr/bin/tmux").exists(), reason="needs tmux (apt-get install -y tmux)")
def test_top_fits_80x24_with_whole_ids_and_slo_attainment(cluster: InProcessCluster) -> None:
    import shlex

    python = f"env PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)}"
    command = f"{python} -m control.cli --nats-url {cluster.url} top --interval 0.5"
    _tmux("new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)
    try:
        time.sleep(3)  # top has subscribed to engine events: what ends now counts
        for i in range(3):
            assert at(cluster, "submit", f"slo {i}", "--max-tokens", "4").returncode == 0
        deadline = time.monotonic() + 30
        while True:
            screen = _tmux("capture-pane", "-p", "-t", "top")
            if any(line.startswith("interactive") and "drover-cli" in line for line in screen.splitlines()):
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.5)
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), screen
        assert lines[0].startswith("drover top"), screen  # the header is on screen, not scrolled away
        assert LONG_ID in screen and "sim-0" in screen and "sim-1" in screen, screen
        slo_rows = [line for line in lines if line.startswith("interactive")]
        assert any("drover-cli" in row and "100.0%" in row for row in slo_rows), screen
    finally:
        _tmux("kill-server")


# ------------------------------------------------------------------------------- 5: drover metrics, SLO series
def test_drover_metrics_serves_slo_attainment_and_only_its_paths(cluster: InProcessCluster) -> None:
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "--nats-url", cluster.url, "metrics", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for i in range(2):
            assert at(cluster, "submit", f"metrics {i}", "--max-tokens", "3").returncode == 0
        deadline = time.monotonic() + 15
        while 'drover_slo_attainment{client="drover-cli",request_class="interactive"} 1.0' not in (
            text := httpx.get(f"{url}/metrics", timeout=5).text
        ):
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
        assert "drover_slo_goodput_tokens_per_second" in text and "drover_queue_depth" in text
        assert httpx.get(f"{url}/no-such-path", timeout=5).status_code == 404
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


# --------------------------------------------------------------------------------------- 6: one trace per request
def test_a_migrated_request_is_one_trace(cluster: InProcessCluster, span_exporter: Any) -> None:
    from observability import spans

    submitted = _start_long_requests(cluster, 1)
    try:
        placed = _running_on(cluster, 1)
        source, requests = next(iter(placed.items()))
        request_id = requests[0]
        destination = next(i for i in ("sim-0", "sim-1", LONG_ID) if i != source)
        proc = at(cluster, "migrate", request_id, "--to", destination, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(1.0)
        mine = [s for s in span_exporter.get_finished_spans() if s.attributes.get(spans.REQUEST_ID) == request_id]
        names = {s.name for s in mine}
        assert spans.MIGRATION in names, names
        traces = {s.context.trace_id for s in mine}
        assert len(traces) == 1, [(s.name, f"{s.context.trace_id:x}") for s in mine]
    finally:
        for p in submitted:
            p.kill()
            p.wait()


def test_submit_records_its_submit_span(cluster: InProcessCluster, tmp_path: Path) -> None:
    from observability import spans

    traces = tmp_path / "traces.jsonl"
    env = {"DROVER_OBSERVABILITY__EXPORTER": "jsonl", "DROVER_OBSERVABILITY__JSONL_PATH": str(traces)}
    proc = at(cluster, "submit", "traced", "--max-tokens", "2", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert traces.exists() and spans.CLIENT_SUBMIT in traces.read_text()
    request_id = json.loads(proc.stdout)["request_id"]
    shown = at(cluster, "trace", request_id, "--file", str(traces))  # at 80 columns: every column readable
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout
    assert "dur ms" in shown.stdout and "timeline" in shown.stdout and spans.CLIENT_SUBMIT in shown.stdout
