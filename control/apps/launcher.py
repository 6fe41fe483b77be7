"""`drover up`: a local cluster (embedded NATS, a control-plane process, N engine processes), a demo
workload submitted over NATS, and a summary of what happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from control.client import DroverClient, RequestResult
from control.errors import DroverError
from control.settings import NatsSettings, Settings, dump_toml
from transport.lifetime import die_with_parent_by
from transport.nats_auth import NatsAuth, Role, SecureBundle, default_users, make_bundle
from transport.nats_server import EmbeddedNatsServer

ENGINE_STOP_S = 10.0
"""`drover up` gives its engines this long to stop (SIGINT: no drain, the whole cluster goes) before SIGKILL."""
CONTROL_STOP_S = 5.0
"""... and then the control plane this long."""
STOP_BOUND_S = ENGINE_STOP_S + CONTROL_STOP_S + 5.0
"""Upper bound of :meth:`LocalCluster.stop` (the NATS server stops in well under the 5 s slack)."""

DEMO_PROMPTS = [
    "The quick brown fox",
    "Drover moves requests between instances while they decode.",
    "Once upon a time, in a cluster far away,",
    "KV cache blocks are",
    "Explain virtual usage in one sentence:",
    "A long prompt makes a long prefill: " + "lorem ipsum dolor sit amet " * 12,
    "Hello",
    "SLOs for interactive requests are measured in",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


@dataclass
class LocalCluster:
    """Child processes of a local cluster; stopped with SIGTERM, then SIGKILL."""

    settings: Settings
    work_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nats: EmbeddedNatsServer | None = None
    secure: SecureBundle | None = None  # generated credentials (`drover up --secure`)
    ports: dict[str, int] = field(default_factory=dict)  # process name -> its /metrics, /healthz port
    on_progress: Callable[[str], None] = field(default=lambda line: None)

    @property
    def url(self) -> str:
        assert self.settings.nats.url
        return self.settings.nats.url

    def nats_for(self, user: str) -> NatsSettings:
        """The ``[nats]`` settings a component connects with: a generated user's credentials when secure."""
        if self.secure is None:
            return self.settings.nats
        auth, spec = self.secure.auth[user], self.secure.user(user)
        extra = self.secure.reply_fields() if spec.role is Role.CONTROL else {}  # its client-bound user too
        return self.settings.nats.model_copy(update={**_auth_fields(auth), "client_id": spec.client_id, **extra})

    @property
    def client_nats(self) -> NatsSettings:
        """What the demo workload (a client) connects with."""
        return self.nats_for(DEMO_CLIENT)

    def _write_config(self, name: str, user: str) -> Path:
        """Each process gets its own settings file: its role's credentials (the same file when not secure)."""
        if self.secure is None:
            return self.work_dir / "drover.toml"
        path = self.work_dir / f"{name}.toml"
        path.write_text(dump_toml(self.settings.model_copy(update={"nats": self.nats_for(user)})))
        path.chmod(0o600)
        return path

    def _spawn(
        self, name: str, args: list[str], user: str = "", env: dict[str, str] | None = None, tied: bool = True
    ) -> None:
        """``tied``: the child gets SIGINT when the calling thread exits (``drover up``'s main thread); the
        autoscaler's provisioner spawns from an actor thread that may be restarted, so its engines are not."""
        config = self._write_config(name, user)
        log_file = open(self.work_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        extra = dict(env or {})
        port = self._port_for(name)
        if port:
            key = "DROVER_METRICS__CONTROL_PORT" if name == "control" else "DROVER_METRICS__ENGINE_PORT"
            extra[key] = str(port)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "control.apps.cli", "--config", str(config), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **extra},
            # Its own session: a Ctrl-C in the terminal reaches only `drover up`, which stops the cluster in
            # order. SIGINT when `drover up` dies, even by SIGKILL: no orphans (an engine stops without draining).
            start_new_session=True,
            preexec_fn=die_with_parent_by(signal.SIGINT) if tied else None,
        )

    def _port_for(self, name: str) -> int:
        """Each process its own /metrics + /healthz port: the configured one for the control plane, and for
        engines the configured engine port plus the engine's index (one variable no longer makes the second
        engine fail on "address already in use"); a free port when none is configured."""
        metrics = self.settings.metrics
        if name == "control":
            port = metrics.control_port or _free_port(metrics.host)
        else:
            base = metrics.engine_port
            port = base + sum(1 for n in self.ports if n != "control") if base else _free_port(metrics.host)
        self.ports[name] = port
        return port

    def metrics_url(self, name: str = "control") -> str | None:
        port = self.ports.get(name)
        return f"http://{self.settings.metrics.host}:{port}" if port else None

    def spawn_engine(self, instance_id: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more `drover engine serve` process (the autoscaler's local provisioner uses this);
        ``env`` adds settings as DROVER_<SECTION>__<FIELD> variables."""
        if not (self.work_dir / "drover.toml").exists():
            (self.work_dir / "drover.toml").write_text(dump_toml(self.settings))
        self._spawn(instance_id, ["engine", "serve", "--instance-id", instance_id], env=env, tied=False)
        return self.processes[instance_id]

    def start(self, instances: int) -> None:
        engine_ids = [f"engine-{index}" for index in range(instances)]
        if not self.settings.nats.url:
            config_text = ""
            if self.settings.nats.secure:
                # one user per component, each allowed only what its role needs (transport/nats_auth.py)
                users = default_users(clients=[DEMO_CLIENT], engines=engine_ids)
                self.secure = make_bundle(self.work_dir / "nats-auth", users, mode=self.settings.nats.secure_auth)
                config_text = self.secure.config_text
            self.nats = EmbeddedNatsServer(
                host=self.settings.nats.embedded_host,
                max_payload_bytes=self.settings.nats.max_payload_bytes,
                config_text=config_text,
                die_with_parent=True,
            )
            url = self.nats.start()
            self.settings = self.settings.model_copy(
                update={"nats": self.settings.nats.model_copy(update={"url": url})}
            )
        (self.work_dir / "drover.toml").write_text(dump_toml(self.settings))
        if self.secure is not None:
            self.secure.write_settings(self.url)  # `drover --config nats-auth/operator.toml status` etc.
        self._spawn("control", ["control", "serve"], self._user(Role.CONTROL))
        for instance_id in engine_ids:
            self._spawn(instance_id, ["engine", "serve", "--instance-id", instance_id], f"engine-{instance_id}")

    def _user(self, role: Role) -> str:
        if self.secure is None:
            return ""
        return next(c.user.name for c in self.secure.credentials if c.user.role is role)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log_path = self.work_dir / f"{name}.log"
                raise ProcessExited(
                    f"{name} exited with code {process.returncode}: {_last_error(log_path)} (log: {log_path})"
                )

    def stop(self) -> None:
        """Stop every process this cluster started, engines first, within :data:`STOP_BOUND_S`, saying what
        happens through ``on_progress``."""
        engines = {n: p for n, p in self.processes.items() if n != "control"}
        control = {n: p for n, p in self.processes.items() if n == "control"}
        self._stop_group(engines, signal.SIGINT, ENGINE_STOP_S, "engines")
        self._stop_group(control, signal.SIGTERM, CONTROL_STOP_S, "control plane")
        if self.nats is not None:
            self.on_progress("stopping nats-server")
            self.nats.stop()
            self.on_progress("nats-server stopped")

    def _stop_group(
        self, group: dict[str, subprocess.Popen[bytes]], sig: signal.Signals, grace_s: float, what: str
    ) -> None:
        running = {n: p for n, p in group.items() if p.poll() is None}
        if not running:
            return
        self.on_progress(f"stopping {what} ({', '.join(running)}), at most {grace_s:g}s")
        started = time.monotonic()
        for process in running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        deadline = started + grace_s
        for name, process in running.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.05, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()
                self.on_progress(f"{name} killed after {grace_s:g}s")
            else:
                self.on_progress(f"{name} stopped ({time.monotonic() - started:.1f}s)")


class ProcessExited(DroverError):
    """A process of the local cluster exited by itself; the message is one line naming its log."""

    default_code = "process_exited"


def _last_error(log_path: Path) -> str:
    """The line of a child's log that says why it stopped (its last non-empty line, usually the exception)."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


DEMO_CLIENT = "drover-demo"
"""Client id of `drover up`'s demo workload (its NATS user when secure)."""


def _auth_fields(auth: NatsAuth) -> dict[str, str | None]:
    return {
        "user": auth.user,
        "password": auth.password,
        "nkey_seed_file": auth.nkey_seed_file,
        "creds_file": auth.creds_file,
        "tls_ca_file": auth.tls_ca_file,
        "tls_cert_file": auth.tls_cert_file,
        "tls_key_file": auth.tls_key_file,
        "tls_hostname": auth.tls_hostname,
    }


@contextlib.contextmanager
def local_cluster(
    settings: Settings,
    instances: int,
    work_dir: Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Iterator[LocalCluster]:
    directory = (work_dir or Path(tempfile.mkdtemp(prefix="drover-up-"))).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # Every process writes spans to one absolute path, so `drover trace` finds them from any directory.
    obs = settings.observability
    settings = settings.model_copy(
        update={"observability": obs.model_copy(update={"jsonl_path": str(Path(obs.jsonl_path).resolve())})}
    )
    cluster = LocalCluster(settings=settings, work_dir=directory)
    if on_progress is not None:
        cluster.on_progress = on_progress
    try:
        cluster.start(instances)
        yield cluster
    finally:
        cluster.stop()


async def wait_ready(cluster: LocalCluster, instances: int, timeout_s: float) -> None:
    async with DroverClient(cluster.url, name="drover-up", nats_settings=cluster.client_nats) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            cluster.check_alive()
            try:
                await client.wait_for_instances(instances, timeout_s=2.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


async def run_workload(
    url: str,
    requests: int,
    max_tokens: int,
    concurrency: int,
    prompts: list[str] | None = None,
    nats_settings: NatsSettings | None = None,
) -> list[RequestResult]:
    prompts = prompts or DEMO_PROMPTS
    limit = asyncio.Semaphore(concurrency)
    async with DroverClient(url, name=DEMO_CLIENT, nats_settings=nats_settings) as client:

        async def one(index: int) -> RequestResult:
            async with limit:
                return await client.generate(prompts[index % len(prompts)], max_tokens=max_tokens)

        return await asyncio.gather(*(one(i) for i in range(requests)))


@dataclass(frozen=True)
class WorkloadSummary:
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    served_by: dict[str, int]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def summarize(results: list[RequestResult], wall_s: float) -> WorkloadSummary:
    ttfts = [r.ttft_s * 1e3 for r in results if r.token_times]
    itls = [gap * 1e3 for r in results for gap in r.inter_token_s]
    served = Counter(inst for r in results for inst in (r.done.instances if r.done else []))
    return WorkloadSummary(
        requests=len(results),
        tokens=sum(len(r.token_ids) for r in results),
        wall_s=wall_s,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(itls, 50),
        itl_p99_ms=percentile(itls, 99),
        served_by=dict(sorted(served.items())),
    )
