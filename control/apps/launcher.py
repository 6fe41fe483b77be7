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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from control.client import DroverClient, RequestResult
from control.settings import NatsSettings, Settings, dump_toml
from transport.nats_auth import NatsAuth, Role, SecureBundle, default_users, make_bundle
from transport.nats_server import EmbeddedNatsServer

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

    def _spawn(self, name: str, args: list[str], user: str = "", env: dict[str, str] | None = None) -> None:
        config = self._write_config(name, user)
        log_file = open(self.work_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "control.apps.cli", "--config", str(config), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def spawn_engine(self, instance_id: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more `drover engine serve` process (the autoscaler's local provisioner uses this);
        ``env`` adds settings as DROVER_<SECTION>__<FIELD> variables."""
        if not (self.work_dir / "drover.toml").exists():
            (self.work_dir / "drover.toml").write_text(dump_toml(self.settings))
        self._spawn(instance_id, ["engine", "serve", "--instance-id", instance_id], env=env)
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
                tail = (self.work_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.nats is not None:
            self.nats.stop()


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
def local_cluster(settings: Settings, instances: int, work_dir: Path | None = None) -> Iterator[LocalCluster]:
    directory = work_dir or Path(tempfile.mkdtemp(prefix="drover-up-"))
    directory.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(settings=settings, work_dir=directory)
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
