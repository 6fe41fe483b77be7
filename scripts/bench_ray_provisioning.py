"""Ray provisioning: scale-out latency (decision -> first heartbeat), local processes vs Ray actors, and the
failover time when a Ray node is lost.

    python -m scripts.bench_ray_provisioning [--starts 5] [--failovers 3] [--stale-after 2.0]

Needs root (network namespaces) and Ray (``pip install 'drover[ray]'``). One Ray cluster for the run: the head
node in this namespace, a worker node in a network namespace of its own (tests/raycluster.py), two
``drover_engine`` slots each; NATS on the head's veth address. Simulated engines; a control plane in this
process per phase, its autoscaler acting through the provisioner under test.

* Scale-out: ``--starts`` times, ``drover scale mixed 1`` then, once it heartbeats, ``scale mixed 0`` (drain,
  stop). The sample is the autoscaler's own start-up measurement: provisioner asked -> first heartbeat at the
  scheduler. Local: ``drover engine serve`` processes (LocalProcessProvisioner); Ray: a Ray actor placed by
  SPREAD on either node (RayProvisioner over Ray Client).
* Failover: ``--failovers`` times, two instances (one per node, min_instances = 2), four 3000-token requests,
  then every process of the worker node is SIGKILLed. Measured from the kill: the scheduler declares the
  instance dead (missed heartbeats, ``--stale-after``), the first token of an affected request from another
  instance reaches the client, Ray reports the actor dead, the replacement's first heartbeat. Each affected
  stream is checked: every token once, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from control.apps.cli_autoscale import request_admin
from control.apps.provisioning import make_provisioner
from control.client import DroverClient, RequestStream
from control.core.provisioner import Provisioner
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.settings import Settings, load_settings
from engines.sim.engine import request_seed, token_at
from engines.tokenizer import ByteTokenizer
from tests.netns import NetNs
from tests.raycluster import LocalRayCluster
from transport.bus import Bus, BusOptions
from transport.messages import AutoscaleStatusQuery, AutoscaleStatusReply, SamplingParams, ScaleCommand, TokenChunk
from transport.messages import decode as decode_message
from transport.nats_server import EmbeddedNatsServer

SLOTS = {"drover_engine": 2.0}
SHAPE = {"num_cpus": 0.0, "resources": {"drover_engine": 1.0}}


def bench_settings(
    nats_url: str, kind: str, ray_address: str, work_dir: Path, *, stale_after_s: float, min_interactive: int
) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "ha": {"state_bucket": f"rb_state_{suffix}", "lease_bucket": f"rb_lease_{suffix}"},
            "scheduler": {"instance_stale_after_s": stale_after_s},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.1, "max_num_seqs": 4, "drain_timeout_s": 5.0},
            "model": {"max_model_len": 4096},
            "observability": {"exporter": "none"},
            "autoscaler": {
                "enabled": min_interactive > 0,
                "stop_timeout_s": 10.0,
                "instance_prefix": f"rb{suffix[:4]}",
                "work_dir": str(work_dir / "local"),
            },
            "provisioner": {
                "kind": kind,
                "ray_address": ray_address,
                "ray_namespace": f"drover-bench-{suffix}",
                "ray_shapes": {role: SHAPE for role in ("interactive", "mixed", "batch")},
            },
        }
    )
    params = AutoscaleParams(
        local=LocalParams(min_batch=1, initial_batch=4, max_batch=4, period_s=0.5),
        period_s=0.5,
        startup_s=5.0,
        min_instances=PerRole(min_interactive, 0, 0),
        max_instances=PerRole(min_interactive, 1, 0),
        max_total=4,
        mixed_share=0.0,
    )
    return settings.model_copy(update={"autoscaling": params})


@dataclass
class Plane:
    control: ControlPlane
    bus: Bus
    provisioner: Provisioner
    client: DroverClient
    url: str

    async def close(self) -> None:
        await self.client.close()
        await asyncio.to_thread(self.control.stop)
        await asyncio.to_thread(self.bus.stop)


async def start_plane(settings: Settings) -> Plane:
    assert settings.nats.url
    url = settings.nats.url
    provisioner = make_provisioner(settings)
    bus = await asyncio.to_thread(lambda: Bus(BusOptions(url=url, name="drover-control-bench")).start())
    control = await asyncio.to_thread(
        lambda: ControlPlane(settings, bus, ByteTokenizer(), provisioner=provisioner).start()
    )
    client = await DroverClient(url, name="ray-bench").connect()
    return Plane(control, bus, provisioner, client, url)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str, step: float = 0.05) -> float:
    """Poll until true; returns time.monotonic() when it was first seen true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(step)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


async def autoscale_status(url: str) -> AutoscaleStatusReply:
    reply = await request_admin(url, "autoscale", AutoscaleStatusQuery())
    assert isinstance(reply, AutoscaleStatusReply)
    return reply


async def serving(plane: Plane, prefix: str) -> list[str]:
    status = await plane.client.status()
    return sorted(i.info.instance_id for i in status.instances if i.info.instance_id.startswith(prefix))


# ----------------------------------------------------------------------------------------------- scale-out
async def scale_out_samples(settings: Settings, starts: int) -> tuple[list[float], list[str]]:
    """Start-up samples (s) of ``starts`` sequential cold starts, and where each ran (Ray: node IP)."""
    plane = await start_plane(settings)
    prefix = settings.autoscaler.instance_prefix
    where: list[str] = []
    try:
        for n in range(1, starts + 1):
            await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=1))

            async def measured(n: int = n) -> bool:
                return len((await autoscale_status(plane.url)).startup_samples) >= n

            await wait_for(measured, 120, f"start {n} to heartbeat", step=0.1)
            ids = await serving(plane, prefix)
            node_of = getattr(plane.provisioner, "node_of", None)
            await asyncio.sleep(0.6)  # the provisioner's thread has polled the placement by now
            where.append(", ".join(str(node_of(i) if node_of else "local") for i in ids))
            await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=0))

            async def empty() -> bool:
                return not plane.provisioner.instances() and not await serving(plane, prefix)

            await wait_for(empty, 120, f"start {n} to be stopped", step=0.1)
        samples = (await autoscale_status(plane.url)).startup_samples
    finally:
        await plane.close()
    return list(samples), where


# ----------------------------------------------------------------------------------------------- failover
@dataclass
class Failover:
    declared_dead_s: float
    first_token_elsewhere_s: float
    ray_dead_s: float
    replacement_ready_s: float
    affected: int
    exact: bool
    replacement_node: str


@dataclass
class Tap:
    arrivals: list[tuple[float, TokenChunk]] = field(default_factory=list)
    nc: nats.NATS | None = None


async def tap(url: str, subject: str) -> Tap:
    record = Tap()

    async def on_msg(msg: Msg) -> None:
        message = decode_message(msg.data)
        if isinstance(message, TokenChunk):
            record.arrivals.append((time.monotonic(), message))

    record.nc = await nats.connect(url)
    await record.nc.subscribe(subject, cb=on_msg)
    await record.nc.flush()
    return record


async def one_failover(settings: Settings, cluster: LocalRayCluster, netns: NetNs) -> Failover:
    from control.apps.ray_provisioner import RayProvisioner

    plane = await start_plane(settings)
    provisioner = plane.provisioner
    assert isinstance(provisioner, RayProvisioner)
    prefix = settings.autoscaler.instance_prefix
    max_tokens = 3000
    taps: dict[str, Tap] = {}
    try:

        async def two() -> bool:
            ids = await serving(plane, prefix)
            return len(ids) == 2 and all(provisioner.node_of(i) for i in ids)

        await wait_for(two, 120, "two instances placed and heartbeating", step=0.1)
        ids = await serving(plane, prefix)
        victims = [i for i in ids if provisioner.node_of(i) == netns.ns_ip]
        if len(victims) != 1:
            raise RuntimeError(
                f"expected one instance on the worker node: {[(i, provisioner.node_of(i)) for i in ids]}"
            )
        victim = victims[0]
        streams: dict[str, RequestStream] = {}
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        for k in range(4):
            rid = f"rb-{uuid.uuid4().hex[:6]}-{k}"
            stream = await plane.client.submit(f"failover {rid}", sampling=sampling, request_id=rid)
            taps[rid] = await tap(plane.url, stream.inbox)  # the subject the stream subscribes to
            streams[rid] = stream
        await asyncio.sleep(1.0)
        status = await plane.client.status()
        affected = [r.request_id for r in status.requests if r.instance_id == victim and r.request_id in streams]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.workers[-1].kill)

        async def declared() -> bool:
            return victim not in {i.info.instance_id for i in (await plane.client.status()).instances}

        async def ray_dead() -> bool:
            return victim not in {p.instance_id for p in provisioner.instances()}

        async def replaced() -> bool:
            ids_now = await serving(plane, prefix)
            return len(ids_now) == 2 and victim not in ids_now

        dead_at, ray_at, ready_at = await asyncio.gather(
            wait_for(declared, 60, "declared dead"),
            wait_for(ray_dead, 120, "Ray to report the actor dead"),
            wait_for(replaced, 120, "a replacement heartbeating"),
        )
        results = {rid: await s.result() for rid, s in streams.items()}
        exact = all(
            r.token_ids == [token_at(request_seed(0, rid), p) for p in range(max_tokens)] for rid, r in results.items()
        )
        elsewhere = [
            at for rid in affected for at, chunk in taps[rid].arrivals if at > killed_at and chunk.instance_id != victim
        ]
        new = [i for i in await serving(plane, prefix) if i not in ids]
        return Failover(
            declared_dead_s=dead_at - killed_at,
            first_token_elsewhere_s=(min(elsewhere) - killed_at) if elsewhere else float("nan"),
            ray_dead_s=ray_at - killed_at,
            replacement_ready_s=ready_at - killed_at,
            affected=len(affected),
            exact=exact,
            replacement_node=provisioner.node_of(new[0]) or "?" if new else "?",
        )
    finally:
        for record in taps.values():
            if record.nc is not None:
                await record.nc.drain()
        await plane.close()


# ----------------------------------------------------------------------------------------------- main
def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):5.2f}  min {min(values):5.2f}  max {max(values):5.2f}"


async def run(starts: int, failovers: int, stale_after_s: float) -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="drover-ray-bench-"))
    with NetNs() as netns:
        server = EmbeddedNatsServer(host=netns.host_ip)
        server.start()
        url = f"nats://{netns.host_ip}:{server.port}"
        cluster = LocalRayCluster(work_dir, netns, head_resources=SLOTS)
        try:
            t0 = time.monotonic()
            cluster.start_head()
            head_s = time.monotonic() - t0
            t0 = time.monotonic()
            cluster.add_worker(netns, SLOTS)
            worker_s = time.monotonic() - t0
            print(
                f"Ray cluster: head {netns.host_ip} up in {head_s:.1f}s, worker {netns.ns_ip} joined in {worker_s:.1f}s"
            )

            def settings(kind: str, min_interactive: int = 0) -> Settings:
                return bench_settings(
                    url,
                    kind,
                    cluster.client_address,
                    work_dir,
                    stale_after_s=stale_after_s,
                    min_interactive=min_interactive,
                )

            local, _ = await scale_out_samples(settings("local"), starts)
            ray_samples, ray_where = await scale_out_samples(settings("ray"), starts)
            print(f"\nScale-out latency, decision -> first heartbeat (s), {starts} sequential cold starts each")
            print(f"{'start':>5} {'local process':>14} {'Ray actor':>10}  Ray node")
            for k in range(max(len(local), len(ray_samples))):
                lo = f"{local[k]:14.2f}" if k < len(local) else f"{'-':>14}"
                ra = f"{ray_samples[k]:10.2f}" if k < len(ray_samples) else f"{'-':>10}"
                print(f"{k + 1:5d} {lo} {ra}  {ray_where[k] if k < len(ray_where) else ''}")
            print(f"local: {summary(local)}\nray:   {summary(ray_samples)}")

            outcomes: list[Failover] = []
            for _ in range(failovers):
                if not any(w.alive for w in cluster.workers):
                    cluster.add_worker(netns, SLOTS)
                outcomes.append(await one_failover(settings("ray", min_interactive=2), cluster, netns))
            print(f"\nFailover on a lost Ray node (s after SIGKILL of the worker node), stale after {stale_after_s}s")
            header = ("run", "declared dead", "token elsewhere", "Ray: actor dead", "replacement up")
            print(f"{header[0]:>3} {header[1]:>13} {header[2]:>15} {header[3]:>15} {header[4]:>14}  exact")
            for k, f in enumerate(outcomes):
                print(
                    f"{k + 1:3d} {f.declared_dead_s:13.2f} {f.first_token_elsewhere_s:15.2f} {f.ray_dead_s:15.2f} "
                    f"{f.replacement_ready_s:14.2f}  {f.exact} ({f.affected} affected requests, "
                    f"replacement on {f.replacement_node})"
                )
            elsewhere = statistics.median([f.first_token_elsewhere_s for f in outcomes]) if outcomes else float("nan")
            replaced = statistics.median([f.replacement_ready_s for f in outcomes]) if outcomes else float("nan")
            if local and ray_samples:
                print(
                    f"\nsummary: scale-out median local {statistics.median(local):.2f}s vs Ray "
                    f"{statistics.median(ray_samples):.2f}s; lost node -> token elsewhere median {elsewhere:.2f}s, "
                    f"-> replacement up {replaced:.2f}s; all streams exact: {all(f.exact for f in outcomes)}"
                )
        finally:
            cluster.stop()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="Sequential cold starts per provisioner.")
    parser.add_argument("--failovers", type=int, default=3, help="Worker-node kills.")
    parser.add_argument("--stale-after", type=float, default=2.0, help="[scheduler] instance_stale_after_s.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.starts, args.failovers, args.stale_after))


if __name__ == "__main__":
    main()
