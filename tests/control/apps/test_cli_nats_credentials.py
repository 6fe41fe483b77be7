"""`drover nats add-user | revoke | rotate`: credentials change on a running nats-server (config reload, no
restart): a new user connects, a revoked one is refused, a rotated one's old secret is refused."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from control.apps.cli import app
from transport.nats_auth import NatsAuth, connect_options
from transport.nats_server import find_nats_server_binary

runner = CliRunner(env={"COLUMNS": "300"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    out, port = tmp_path / "nats", _free_port()
    result = runner.invoke(
        app, ["nats", "config", "--out", str(out), "--client", "alice", "--host", "127.0.0.1", "--port", str(port)]
    )
    assert result.exit_code == 0, result.output
    server = subprocess.Popen(
        [find_nats_server_binary(), "-c", str(out / "nats-server.conf")],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield out, f"nats://127.0.0.1:{port}", server
    server.terminate()
    server.wait(timeout=10)


async def _connects(url: str, seed_file: Path) -> bool:
    try:
        nc = await nats.connect(
            url,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
            **connect_options(NatsAuth(nkey_seed_file=str(seed_file))),
        )
    except Exception:
        return False
    await nc.close()
    return True


async def _eventually(url: str, seed_file: Path, expected: bool) -> bool:
    """The reload is asynchronous (a signal): poll until the server answers as expected (or give up)."""
    for _ in range(100):
        if await _connects(url, seed_file) == expected:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_add_revoke_rotate_without_restart(
    running: tuple[Path, str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    out, url, server = running
    pid = str(server.pid)
    assert await _connects(url, out / "alice.nk")
    result = runner.invoke(app, ["nats", "add-user", "carol", "--dir", str(out), "--pid", pid])
    assert result.exit_code == 0, result.output
    assert await _eventually(url, out / "carol.nk", True)
    assert 'client_id = "carol"' in (out / "carol.toml").read_text()

    old_alice = tmp_path / "alice-old.nk"
    old_alice.write_text((out / "alice.nk").read_text())
    result = runner.invoke(app, ["nats", "rotate", "alice", "--dir", str(out), "--pid", pid])
    assert result.exit_code == 0, result.output
    assert await _eventually(url, old_alice, False)
    assert await _connects(url, out / "alice.nk")

    result = runner.invoke(app, ["nats", "revoke", "carol", "--dir", str(out), "--pid", pid])
    assert result.exit_code == 0, result.output
    assert await _eventually(url, out / "carol.nk", False)
    assert server.poll() is None  # the same server process throughout


def test_clear_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["nats", "revoke", "nobody", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "drover nats config" in result.output
    runner.invoke(app, ["nats", "config", "--out", str(tmp_path), "--client", "alice"])
    result = runner.invoke(app, ["nats", "revoke", "nobody", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "no NATS user 'nobody'" in result.output
    result = runner.invoke(app, ["nats", "add-user", "alice", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "exists" in result.output
    result = runner.invoke(app, ["nats", "add-user", "x", "--role", "wizard", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown role" in result.output
