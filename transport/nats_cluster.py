"""A real NATS cluster on loopback: ``size`` ``nats-server`` processes joined by routes, JetStream clustered
(each node its own store dir), for tests, the chaos benchmark and ``drover`` deployments that want the
supported production shape (3 nodes) on one machine.

Every node gets fixed free ports (client and route) chosen up front, so a node that is stopped, killed or
restarted comes back on the same URL and rejoins the cluster. ``url`` lists every node's client URL,
comma-separated: what ``nats.url`` takes and what the Bus and the client library connect to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from transport.nats_server import EmbeddedNatsServer, NatsServerError

log = logging.getLogger(__name__)


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free TCP ports on ``host`` (held open together while picking, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EmbeddedNatsCluster:
    """``size`` nats-server nodes with full-mesh routes and clustered JetStream.

    Nodes are :class:`EmbeddedNatsServer` instances (same config writer, start, stop); this class only adds
    the ``cluster {}`` block, fixed ports and per-node fault injection (stop, kill -9, SIGSTOP, restart).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        name: str = "drover",
        jetstream: bool = True,
        max_payload_bytes: int = 8 * 1024 * 1024,
        work_dir: str | None = None,
        config_text: str = "",
    ) -> None:
        """``config_text``: extra nats-server config for every node (accounts and permissions)."""
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.size = size
        self.host = host
        self.name = name
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="drover-nats-cluster-"))
        ports = free_ports(host, 2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        routes = ", ".join(f"nats-route://{host}:{p}" for p in self.route_ports)
        self.nodes: list[EmbeddedNatsServer] = []
        for index in range(size):
            node_dir = self.work_dir / f"n{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            cluster_block = (
                f'cluster {{ name: "{name}", listen: "{host}:{self.route_ports[index]}", routes: [{routes}] }}'
                if size > 1
                else ""
            )
            self.nodes.append(
                EmbeddedNatsServer(
                    host=host,
                    port=self.client_ports[index],
                    jetstream=jetstream,
                    max_payload_bytes=max_payload_bytes,
                    store_dir=str(node_dir),
                    config_text=f"{cluster_block}\n{config_text}" if config_text else cluster_block,
                    server_name=f"{name}-n{index}",
                )
            )

    @property
    def urls(self) -> list[str]:
        return [f"nats://{self.host}:{port}" for port in self.client_ports]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (``nats.url``)."""
        return ",".join(self.urls)

    def start(self, timeout_s: float = 30.0) -> str:
        for node in self.nodes:
            node.start()
        if self.size > 1:
            self.wait_jetstream_ready(timeout_s)
        log.info("nats cluster of %d nodes at %s", self.size, self.url)
        return self.url

    def wait_jetstream_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the JetStream meta group has a leader and every running node answers."""
        asyncio.run(self._await_ready(timeout_s))

    async def _await_ready(self, timeout_s: float) -> None:
        import nats

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        for index, node in enumerate(self.nodes):
            if not node.is_running():
                continue
            while True:
                try:
                    nc = await nats.connect(self.urls[index], connect_timeout=2, max_reconnect_attempts=0)
                    try:
                        await nc.jetstream(timeout=2).account_info()
                    finally:
                        await nc.close()
                    break
                except Exception as exc:
                    last = exc
                    if time.monotonic() > deadline:
                        raise NatsServerError(f"JetStream not ready on node {index}: {last!r}") from exc
                    await asyncio.sleep(0.2)

    # ------------------------------------------------------------------------------------------ faults
    def stop_node(self, index: int) -> None:
        """Stop one node cleanly (SIGTERM); its store dir stays for :meth:`start_node`."""
        self.nodes[index].kill(signal.SIGTERM)

    def kill_node(self, index: int) -> None:
        """kill -9 one node (a crash); its store dir stays for :meth:`start_node`."""
        self.nodes[index].kill(signal.SIGKILL)

    def pause_node(self, index: int) -> None:
        """SIGSTOP one node (hung: connections stay open, nothing moves)."""
        pid = self.nodes[index].pid
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume_node(self, index: int) -> None:
        pid = self.nodes[index].pid
        if pid is not None and self.nodes[index].is_running():
            os.kill(pid, signal.SIGCONT)

    def start_node(self, index: int, timeout_s: float = 10.0) -> str:
        """Start a stopped or killed node again on its old ports and store dir; it rejoins the routes."""
        return self.nodes[index].start(timeout_s)

    def restart_node(self, index: int, *, graceful: bool = True, timeout_s: float = 10.0) -> str:
        return self.nodes[index].restart(timeout_s, graceful=graceful)

    def pids(self) -> dict[str, int]:
        return {node.server_name or str(i): node.pid for i, node in enumerate(self.nodes) if node.pid is not None}

    def stop(self) -> None:
        for index in range(self.size):
            self.resume_node(index)  # a SIGSTOPped node cannot act on SIGTERM
        for node in self.nodes:
            node.stop()
        if self._own_dir and os.environ.get("DROVER_KEEP_NATS_DIR") != "1":
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
