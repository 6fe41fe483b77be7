"""`drover nats config` and `drover up --secure`: generated configs run a real nats-server, and the users'
settings files connect each component with exactly its role's rights."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from actors.local_cluster import InProcessCluster
from control.apps.cli import app
from control.client import PERMISSION_DENIED, DroverClient, DroverError
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.nats_server import find_nats_server_binary

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """`drover nats config` output, and a nats-server started from it (as an operator would)."""
    out = tmp_path_factory.mktemp("nats-config")
    port = _free_port()
    result = runner.invoke(
        app,
        ["nats", "config", "--out", str(out), "--client", "alice", "--host", "127.0.0.1", "--port", str(port)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "alice" in result.output and "drover.v1.admin.>" in result.output
    server = subprocess.Popen(
        [find_nats_server_binary(), "-c", str(out / "nats-server.conf")],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield out, url
    server.terminate()
    server.wait(timeout=10)


def test_written_files(configured: tuple[Path, str]) -> None:
    out, url = configured
    names = {p.name for p in out.iterdir()}
    for user in ("control", "operator", "alice", "engine"):
        assert f"{user}.toml" in names and f"{user}.nk" in names
        assert (out / f"{user}.nk").stat().st_mode & 0o077 == 0
    settings = load_settings(out / "alice.toml")
    assert settings.nats.url == url and settings.nats.client_id == "alice"
    assert settings.nats.nkey_seed_file == str(out / "alice.nk")


def test_existing_credentials_are_kept_unless_forced(configured: tuple[Path, str]) -> None:
    out, _ = configured
    before = (out / "accounts.conf").read_text()
    refused = runner.invoke(app, ["nats", "config", "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.output
    node = runner.invoke(
        app, ["nats", "config", "--out", str(out), "--node-only", "--server-name", "n2", "--port", "0"]
    )
    assert node.exit_code == 0, node.output
    assert (out / "accounts.conf").read_text() == before
    assert 'server_name: "n2"' in (out / "nats-server-n2.conf").read_text()


async def test_generated_users_run_a_cluster(configured: tuple[Path, str]) -> None:
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    out, url = configured
    control = load_settings(out / "control.toml", {"engine": {"kind": "sim", "heartbeat_interval_s": 0.05}})
    cluster = InProcessCluster(
        settings=control,
        tokenizer=ByteTokenizer(),
        control_auth=control.nats.auth(),
        engine_auth=load_settings(out / "engine.toml").nats.auth(),
    )
    cluster.start_control()
    cluster.add_engine(SimEngine("sim-0", time_scale=0.2, max_model_len=1024))  # type: ignore[arg-type]
    try:
        alice = load_settings(out / "alice.toml").nats
        async with DroverClient(url, name="whatever", nats_settings=alice) as client:
            await client.wait_for_instances(1, timeout_s=15)
            result = await client.generate("configured", max_tokens=5)
            assert len(result.token_ids) == 5
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, nkeys_seed=alice.nkey_seed_file)
        await nc.publish(subjects.admin("drain"), b"x")
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        await nc.close()
        assert any("permissions violation" in e and "admin.drain" in e for e in errors), errors
        operator = load_settings(out / "operator.toml").nats
        async with DroverClient(url, nats_settings=operator) as op:
            assert (await op.drain("sim-0", undo=True)).ok
    finally:
        await asyncio.to_thread(cluster.stop)


def test_drover_up_secure_on_sim_engines(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "control.apps.cli",
            "up",
            "--kind",
            "sim",
            "--secure",
            "--requests",
            "4",
            "--max-tokens",
            "4",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "DROVER_OBSERVABILITY__EXPORTER": "none", "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "served by engine-0" in proc.stdout and "served by engine-1" in proc.stdout
    auth = tmp_path / "nats-auth"
    assert {"control.toml", "operator.toml", "drover-demo.toml", "engine-engine-0.toml"} <= {
        p.name for p in auth.iterdir()
    }
    engine = load_settings(tmp_path / "engine-0.toml").nats
    assert engine.nkey_seed_file == str(auth / "engine-engine-0.nk")
    logs = "".join((tmp_path / f"{name}.log").read_text() for name in ("control", "engine-0", "engine-1"))
    assert "permissions violation" not in logs.lower()


async def test_control_serve_with_a_secure_embedded_server(tmp_path: Path) -> None:
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    auth_dir = tmp_path / "auth"
    env = {
        **os.environ,
        "DROVER_OBSERVABILITY__EXPORTER": "none",
        "DROVER_NATS__SECURE": "true",
        "DROVER_NATS__SECURE_DIR": str(auth_dir),
        "DROVER_ENGINE__KIND": "sim",
    }
    log_path = tmp_path / "control.log"
    with open(log_path, "wb") as log_file:
        control = subprocess.Popen(
            [sys.executable, "-m", "control.apps.cli", "control", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    cluster: InProcessCluster | None = None
    try:
        deadline = time.monotonic() + 60
        while not (auth_dir / "client.toml").exists():
            assert control.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        engine_settings = load_settings(
            auth_dir / "engine.toml", {"engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
        )
        cluster = InProcessCluster(
            settings=engine_settings, tokenizer=ByteTokenizer(), engine_auth=engine_settings.nats.auth()
        )
        cluster.add_engine(SimEngine("sim-0", time_scale=0.2, max_model_len=1024))  # type: ignore[arg-type]
        client_nats = load_settings(auth_dir / "client.toml").nats
        assert client_nats.url
        async with DroverClient(client_nats.url, nats_settings=client_nats) as client:
            await client.wait_for_instances(1, timeout_s=30)
            assert len((await client.generate("secure embedded", max_tokens=3)).token_ids) == 3
        # without credentials the embedded server refuses
        with pytest.raises(Exception):  # noqa: B017 - NoServersError after the authorization violation
            await nats.connect(client_nats.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        control.terminate()
        control.wait(timeout=30)
    assert "permissions violation" not in log_path.read_text().lower()


def _start(conf: Path, port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [find_nats_server_binary(), "-c", str(conf)],
        cwd=conf.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.05)
    server.kill()
    raise AssertionError(f"nats-server with {conf} did not listen on {port}")


async def test_two_node_cluster_with_routes_keeps_permissions(tmp_path: Path) -> None:
    """Nodes from `drover nats config` (+ --node-only) with authenticated routes: a client on node 1 is served
    by a control plane and engine on node 2, and its denials hold on node 1."""
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    ports = [_free_port() for _ in range(4)]
    client_ports, route_ports = ports[:2], ports[2:]
    routes = [f"nats-route://route:pw@127.0.0.1:{p}" for p in route_ports]
    servers = []
    for index in range(2):
        args = ["nats", "config", "--out", str(tmp_path), "--client", "alice", "--host", "127.0.0.1"]
        args += ["--port", str(client_ports[index]), "--server-name", f"n{index}", "--jetstream-dir", f"./js-n{index}"]
        args += [
            "--cluster-listen",
            f"127.0.0.1:{route_ports[index]}",
            "--route-user",
            "route",
            "--route-password",
            "pw",
        ]
        args += ["--url", f"nats://127.0.0.1:{client_ports[0]}"] + [x for r in routes for x in ("--route", r)]
        if index:
            args.append("--node-only")
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    try:
        for index in range(2):
            servers.append(_start(tmp_path / f"nats-server-n{index}.conf", client_ports[index]))
        node2 = f"nats://127.0.0.1:{client_ports[1]}"
        control = load_settings(
            tmp_path / "control.toml", {"nats": {"url": node2}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
        )
        cluster = InProcessCluster(
            settings=control,
            tokenizer=ByteTokenizer(),
            control_auth=control.nats.auth(),
            engine_auth=load_settings(tmp_path / "engine.toml").nats.auth(),
        )
        try:
            cluster.start_control()
            cluster.add_engine(SimEngine("sim-0", time_scale=0.2, max_model_len=1024))  # type: ignore[arg-type]
            alice = load_settings(tmp_path / "alice.toml").nats  # node 1's URL
            assert alice.url == f"nats://127.0.0.1:{client_ports[0]}"
            async with DroverClient(alice.url, nats_settings=alice) as client:
                await client.wait_for_instances(1, timeout_s=30)
                assert len((await client.generate("across routes", max_tokens=4)).token_ids) == 4
                with pytest.raises(DroverError) as denied:
                    await client.drain("sim-0", timeout_s=1.0)
                assert denied.value.code == PERMISSION_DENIED
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
