"""A real Ray cluster on this machine for tests and benchmarks: the head node in this network namespace, worker
nodes each in a network namespace of their own (:class:`tests.netns.NetNs`), so every node has its own IP and
Ray traffic between them crosses veth links as it would cross a network.

The head listens on the veth address of the first namespace (reachable from this namespace and from that
worker's); the control plane connects as a Ray Client (``ray://HEAD:PORT``), as a Ray-free control-plane pod
does on KubeRay. Each node is a ``ray start --block`` process; killing a node kills every process in its
namespace (``ip netns pids``) with SIGKILL, which is what a machine dropping dead looks like to the rest.

Kept small for a 2-core machine: one logical CPU per node, no dashboard, a small object store, faster node
failure detection than Ray's defaults. Nothing here is killed by name: only the process ids found in a node's
namespace or under its ``ray start`` process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.netns import NetNs

ROOT = Path(__file__).resolve().parents[1]

# Ray's C++ components read RAY_<config> variables; these make the GCS declare a silent node dead in about
# 2-3 s instead of Ray's default of about 15-30 s.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}


def ray_unavailable_reason() -> str | None:
    """Why a Ray cluster cannot be started here (None: it can)."""
    if importlib.util.find_spec("ray") is None:  # not imported here: importing Ray has side effects
        return "ray is not installed (pip install 'drover[ray]')"
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None and shutil.which("ray") is None:
        return "no `ray` command next to this Python"
    return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ray_command() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


@dataclass
class RayNode:
    ip: str
    process: subprocess.Popen[bytes]
    log_path: Path
    netns: NetNs | None = None  # None: the head, in this namespace

    def pids(self) -> set[int]:
        """Every process of the node: its namespace's, or the head's process tree."""
        pids: set[int] = set()
        if self.netns is not None:
            out = subprocess.run(
                ["ip", "netns", "pids", self.netns.name], capture_output=True, text=True, check=False
            ).stdout
            pids.update(int(p) for p in out.split() if p.isdigit())
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            pids.add(root.pid)
            pids.update(child.pid for child in root.children(recursive=True))
        return pids

    def kill(self) -> None:
        """SIGKILL every process of the node (a machine lost)."""
        for _ in range(3):  # a process may fork while we kill: sweep until nothing is left
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    psutil.Process(pid).kill()
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 20.0) -> None:
        """Stop the node the orderly way (``ray start --block`` stops and reaps its processes on SIGTERM),
        then kill whatever is left."""
        if self.alive:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        self.kill()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalRayCluster:
    """Head node here, worker nodes in network namespaces; see the module docstring."""

    work_dir: Path
    head_netns: NetNs  # the head listens on this namespace's host-side address
    head_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)
    gcs_port: int = 0
    client_port: int = 0

    @property
    def head_ip(self) -> str:
        return self.head_netns.host_ip

    @property
    def client_address(self) -> str:
        return f"ray://{self.head_ip}:{self.client_port}"

    def _env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {
            **os.environ,
            "PYTHONPATH": path,  # Ray workers import Drover from this checkout
            "RAY_USAGE_STATS_ENABLED": "0",
            **FAST_FAILURE_DETECTION,
            **self.env,
        }

    def _start(self, argv: list[str], name: str, netns: NetNs | None, ip: str) -> RayNode:
        log_path = self.work_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            command = netns.command(argv) if netns is not None else argv
            process = subprocess.Popen(
                command, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return RayNode(ip, process, log_path, netns)

    def start_head(self) -> RayNode:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.gcs_port = _free_port(self.head_ip)
        self.client_port = _free_port(self.head_ip)
        argv = [
            _ray_command(),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.head_ip}",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--object-store-memory=80000000",
            f"--resources={json.dumps(self.head_resources)}",
            f"--temp-dir={self.work_dir / 'ray'}",
            "--disable-usage-stats",
        ]
        self.head = self._start(argv, "head", None, self.head_ip)
        self._wait_listening(self.head, self.head_ip, self.client_port, timeout_s=60)
        return self.head

    def add_worker(self, netns: NetNs, resources: dict[str, float], *, timeout_s: float = 60) -> RayNode:
        """Start a worker node inside ``netns`` (which must reach the head: the head's own namespace's)."""
        assert self.head is not None
        argv = [
            _ray_command(),
            "start",
            "--block",
            f"--address={self.head_ip}:{self.gcs_port}",
            f"--node-ip-address={netns.ns_ip}",
            "--num-cpus=1",
            "--object-store-memory=80000000",
            f"--resources={json.dumps(resources)}",
            "--disable-usage-stats",
        ]
        node = self._start(argv, f"worker-{netns.name}-{len(self.workers)}", netns, netns.ns_ip)
        self.workers.append(node)
        self._wait_joined(node, timeout_s)
        return node

    def _wait_listening(self, node: RayNode, host: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"ray node exited: {node.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            time.sleep(0.2)
        raise TimeoutError(f"ray head not listening on {host}:{port} after {timeout_s}s")

    def _wait_joined(self, node: RayNode, timeout_s: float) -> None:
        """Until the node's raylet has registered with the GCS (its log says so)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"ray worker exited: {node.log_path.read_text()[-2000:]}")
            if "Ray runtime started" in node.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"ray worker at {node.ip} did not join after {timeout_s}s")

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.terminate()
        self.workers.clear()
        self.head = None
