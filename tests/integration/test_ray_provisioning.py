"""Engines provisioned by Ray, on a real Ray cluster: the head node here, a worker node in a network namespace.

One Ray cluster for the whole module (Ray takes ~5 s and ~1 GB to start; two cores are shared): a head node in
this namespace listening on a veth address, a worker node inside the namespace at the other end. Each node has
two ``drover_engine`` slots; instances ask for one each, and the provisioner spreads them (Ray's SPREAD).
The control plane runs in this process and reaches Ray as a Ray Client, NATS as everyone else does; the
engines are simulated (``kind = "sim"``) inside Ray actors and speak only NATS.

* Scale out lands on both nodes (the worker included), a request is served, scale-in drains by migration,
  and the drained instance's Ray actor is gone.
* The worker node is killed (SIGKILL of every process in its namespace) mid-stream: its engine's requests
  resume on the head's engine, every token reaches the client exactly once and in order, Ray reports the
  actor dead, and the autoscaler starts a replacement on the node left.

Skips when network namespaces or Ray are unavailable here.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from control.apps.cli_autoscale import request_admin
from control.apps.ray_provisioner import RayProvisioner
from control.client import DroverClient, RequestStream
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.settings import RayShape, Settings, load_settings
from engines.sim.engine import request_seed, token_at
from engines.tokenizer import ByteTokenizer
from tests.netns import NetNs, netns_unavailable_reason
from tests.raycluster import LocalRayCluster, ray_unavailable_reason
from tests.waiting import wait_for
from transport.bus import Bus, BusOptions
from transport.messages import AdminReply, ErrorReply, Message, RequestDone, SamplingParams, ScaleCommand, TokenChunk
from transport.messages import decode as decode_message
from transport.nats_server import EmbeddedNatsServer

_REASON = netns_unavailable_reason() or ray_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"Ray cluster unavailable: {_REASON}"),
    pytest.mark.slow,
]

SLOTS = {"drover_engine": 2.0}  # per node: two instances
SHAPE = {"num_cpus": 0.0, "resources": {"drover_engine": 1.0}}
STALE_AFTER_S = 2.0  # heartbeats every 0.1 s


@dataclass
class RayEnv:
    cluster: LocalRayCluster
    netns: NetNs
    nats_url: str  # the server, as this machine and both nodes reach it
    work_dir: Path

    @property
    def worker_ip(self) -> str:
        return self.netns.ns_ip

    @property
    def head_ip(self) -> str:
        return self.netns.host_ip

    def ensure_worker(self) -> None:
        """A live worker node (a test that killed it leaves a new one for the next)."""
        if not any(w.alive for w in self.cluster.workers):
            self.cluster.add_worker(self.netns, SLOTS)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayEnv]:
    work_dir = tmp_path_factory.mktemp("ray")
    with NetNs() as netns:
        # NATS listens on the head's veth address only: this machine and the worker's namespace reach it there.
        server = EmbeddedNatsServer(host=netns.host_ip)
        server.start()
        cluster = LocalRayCluster(work_dir, netns, head_resources=SLOTS)
        try:
            cluster.start_head()
            cluster.add_worker(netns, SLOTS)
            yield RayEnv(cluster, netns, f"nats://{netns.host_ip}:{server.port}", work_dir)
        finally:
            cluster.stop()
            server.stop()


def ray_settings(env: RayEnv, *, enabled: bool, interactive: int) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        overrides={
            "nats": {"url": env.nats_url},
            "ha": {"state_bucket": f"ray_state_{suffix}", "lease_bucket": f"ray_lease_{suffix}"},
            "scheduler": {"instance_stale_after_s": STALE_AFTER_S},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.1, "max_num_seqs": 4, "drain_timeout_s": 5.0},
            "model": {"max_model_len": 4096},
            "observability": {"exporter": "none"},
            "autoscaler": {"enabled": enabled, "stop_timeout_s": 10.0, "instance_prefix": f"ray{suffix[:4]}"},
            "provisioner": {
                "kind": "ray",
                "ray_address": env.cluster.client_address,
                "ray_namespace": f"drover-test-{suffix}",
                "ray_scheduling": "spread",
                "ray_shapes": {role: SHAPE for role in ("interactive", "mixed", "batch")},
            },
        }
    )
    params = AutoscaleParams(
        local=LocalParams(min_batch=1, initial_batch=4, max_batch=4, period_s=0.5),
        period_s=0.5,
        startup_s=5.0,
        min_instances=PerRole(interactive, 0, 0),
        max_instances=PerRole(interactive, 0, 0),
        max_total=4,
        mixed_share=0.0,
        scale_in_window_s=2.0,
        scale_in_cooldown_s=2.0,
    )
    return settings.model_copy(update={"autoscaling": params})


@dataclass
class Plane:
    control: ControlPlane
    provisioner: RayProvisioner
    client: DroverClient
    bus: Bus
    url: str
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.client.close()
        await asyncio.to_thread(self.control.stop)  # closes the provisioner: its Ray actors are stopped
        await asyncio.to_thread(self.bus.stop)


@pytest.fixture
async def plane_factory(ray_env: RayEnv) -> AsyncIterator[Callable[[Settings], Awaitable[Plane]]]:
    made: list[Plane] = []
    ray_env.ensure_worker()

    async def make(settings: Settings) -> Plane:
        provisioner = RayProvisioner(settings)
        bus = await asyncio.to_thread(lambda: Bus(BusOptions(url=ray_env.nats_url, name="drover-control")).start())
        control = await asyncio.to_thread(
            lambda: ControlPlane(settings, bus, ByteTokenizer(), provisioner=provisioner).start()
        )
        client = await DroverClient(ray_env.nats_url, name="ray-test").connect()
        made.append(Plane(control, provisioner, client, bus, ray_env.nats_url))
        return made[-1]

    yield make
    for plane in made:
        await plane.close()


async def serving(plane: Plane) -> list[str]:
    status = await plane.client.status()
    prefix = plane.provisioner.prefix
    return sorted(i.info.instance_id for i in status.instances if i.info.instance_id.startswith(prefix))


def expected(request_id: str, n: int) -> list[int]:
    seed = request_seed(0, request_id)
    return [token_at(seed, p) for p in range(n)]


async def placed(plane: Plane, ids: list[str]) -> dict[str, str]:
    """Instance id -> IP of the Ray node it runs on, once every one is known."""

    async def known() -> bool:
        return all(plane.provisioner.node_of(i) for i in ids)

    await wait_for(known, 30, f"Ray placements of {ids}")
    return {i: plane.provisioner.node_of(i) or "" for i in ids}


def actor_exists(plane: Plane, instance_id: str) -> bool:
    """Through the plane's provisioner's Ray connection (the process has one; never a new local Ray)."""
    import ray
    from ray.util.client import ray as client

    assert client.is_connected() and not plane.closed
    try:
        ray.get_actor(instance_id, namespace=plane.provisioner.prov.ray_namespace)
    except ValueError:
        return False
    return True


async def test_scale_out_onto_the_worker_node_then_drain_and_scale_in(
    ray_env: RayEnv, plane_factory: Callable[[Settings], Awaitable[Plane]]
) -> None:
    plane = await plane_factory(ray_settings(ray_env, enabled=False, interactive=0))
    assert await serving(plane) == []
    reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=2))
    assert isinstance(reply, AdminReply) and reply.ok and len(reply.details["started"]) == 2

    async def count(n: int) -> bool:
        return len(await serving(plane)) == n

    await wait_for(lambda: count(2), 90, "two Ray-provisioned instances heartbeating")
    ids = await serving(plane)
    nodes = await placed(plane, ids)
    assert set(nodes.values()) == {ray_env.head_ip, ray_env.worker_ip}, f"not spread over both nodes: {nodes}"
    on_worker = next(i for i, ip in nodes.items() if ip == ray_env.worker_ip)

    # Served over NATS by engines in Ray actors, the worker node's included.
    sampling = SamplingParams(max_tokens=64, ignore_eos=True)
    streams = [await plane.client.submit(f"ray {i}", sampling=sampling, request_id=f"ray-r{i}") for i in range(4)]
    served: set[str] = set()
    for i, stream in enumerate(streams):
        result = await stream.result()
        assert result.token_ids == expected(f"ray-r{i}", 64)
        assert result.done is not None
        served.update(result.done.instances)
    assert on_worker in served, f"nothing served by the worker node's instance {on_worker}: {served}"

    status = await plane.client.autoscale_status()
    assert status.provisioner == "ray"
    assert len(status.startup_samples) == 2 and all(s > 0 for s in status.startup_samples)

    # Scale in: one instance is drained by migration, then its actor drained, shut down and killed.
    reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=1))
    assert isinstance(reply, AdminReply) and len(reply.details["draining"]) == 1
    gone = reply.details["draining"][0]
    await wait_for(lambda: count(1), 60, "one instance after `scale interactive 1`")

    async def stopped() -> bool:
        return gone not in {p.instance_id for p in plane.provisioner.instances()}

    await wait_for(stopped, 60, f"the provisioner to stop {gone}")
    assert not await asyncio.to_thread(actor_exists, plane, gone), f"Ray actor {gone} still exists"
    kept = (await serving(plane))[0]
    assert await asyncio.to_thread(actor_exists, plane, kept)
    events = [(e.action, e.instance_id) for e in (await plane.client.autoscale_status()).events]
    assert ("drain", gone) in events and ("stop", gone) in events


async def _tap(url: str, subject: str, seen: list[Message]) -> nats.NATS:
    """A second subscriber on a client's inbox: what went over the wire, duplicates included."""

    async def on_msg(msg: Msg) -> None:
        seen.append(decode_message(msg.data))

    nc = await nats.connect(url)
    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return nc


async def _advance(stream: RequestStream, tokens: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= tokens:
            return


async def test_a_lost_worker_node_fails_over_exactly_once_and_capacity_is_replaced(
    ray_env: RayEnv, plane_factory: Callable[[Settings], Awaitable[Plane]]
) -> None:
    plane = await plane_factory(ray_settings(ray_env, enabled=True, interactive=2))

    async def count(n: int) -> bool:
        return len(await serving(plane)) == n

    await wait_for(lambda: count(2), 90, "the autoscaler's two instances (min_instances) heartbeating")
    ids = await serving(plane)
    nodes = await placed(plane, ids)
    assert set(nodes.values()) == {ray_env.head_ip, ray_env.worker_ip}, f"not spread over both nodes: {nodes}"
    victim = next(i for i, ip in nodes.items() if ip == ray_env.worker_ip)

    max_tokens = 1500
    request_ids = [f"ray-lost-{i}" for i in range(4)]
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seen: dict[str, list[Message]] = {}
    taps: list[nats.NATS] = []
    streams: dict[str, RequestStream] = {}
    for rid in request_ids:
        stream = await plane.client.submit(f"lost node {rid}", sampling=sampling, request_id=rid)
        assert stream._subscription is not None
        seen[rid] = []
        taps.append(await _tap(plane.url, stream._subscription.subject, seen[rid]))
        streams[rid] = stream
    try:
        for stream in streams.values():
            await _advance(stream, 16)
        status = await plane.client.status()
        on_victim = [r.request_id for r in status.requests if r.instance_id == victim and r.request_id in streams]
        assert on_victim, f"no request running on the worker node's {victim}"
        killed_at = time.monotonic()
        cut = {rid: len(streams[rid].result_data.token_ids) for rid in on_victim}
        await asyncio.to_thread(ray_env.cluster.workers[-1].kill)

        results = {rid: await stream.result() for rid, stream in streams.items()}
        for rid, result in results.items():
            assert result.token_ids == expected(rid, max_tokens), rid  # each token once, in order
            assert result.done is not None and result.done.num_tokens == max_tokens
        for rid in on_victim:
            done = results[rid].done
            assert done is not None and done.instances[0] == victim and done.instances[-1] != victim, done
            assert cut[rid] < max_tokens  # the node died mid-stream

        await asyncio.sleep(0.5)  # anything still on its way has arrived
        for rid in request_ids:
            chunks = [m for m in seen[rid] if isinstance(m, TokenChunk)]
            indices = collections.Counter(m.index + k for m in chunks for k in range(len(m.token_ids)))
            assert sorted(indices) == list(range(max_tokens)), f"{rid}: tokens missing on the wire"
            duplicated = [i for i, n in indices.items() if n > 1]
            assert not duplicated, f"{rid}: {len(duplicated)} token indices sent twice, first {duplicated[:5]}"
            assert sum(isinstance(m, RequestDone) for m in seen[rid]) == 1
            assert not [m for m in seen[rid] if isinstance(m, ErrorReply)]
            spans = sorted((m.index, m.index + len(m.token_ids)) for m in chunks)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert start == end, f"{rid}: gap or overlap at {end}"
    finally:
        for tap in taps:
            await tap.drain()

    # Ray reports the actor dead; the autoscaler replaces the capacity on the node left (the head).
    async def victim_gone() -> bool:
        return victim not in {p.instance_id for p in plane.provisioner.instances()}

    await wait_for(victim_gone, 60, f"Ray to report {victim}'s actor dead")

    async def replaced() -> bool:
        ids_now = await serving(plane)
        return len(ids_now) == 2 and victim not in ids_now

    await wait_for(replaced, 90, "a replacement instance heartbeating")
    new = [i for i in await serving(plane) if i not in ids]
    assert len(new) == 1
    assert (await placed(plane, new))[new[0]] == ray_env.head_ip
    events = [(e.action, e.instance_id) for e in (await plane.client.autoscale_status()).events]
    assert ("start", new[0]) in events and ("ready", new[0]) in events
    print(f"worker node killed; replacement {new[0]} ready {time.monotonic() - killed_at:.1f}s later")


async def test_a_new_control_plane_adopts_the_instances_of_the_previous_one(
    ray_env: RayEnv, plane_factory: Callable[[Settings], Awaitable[Plane]]
) -> None:
    settings = ray_settings(ray_env, enabled=False, interactive=0)
    settings = settings.model_copy(
        update={"provisioner": settings.provisioner.model_copy(update={"ray_stop_on_close": False})}
    )
    first = await plane_factory(settings)
    reply = await request_admin(first.url, "scale", ScaleCommand(role="mixed", count=1))
    assert isinstance(reply, AdminReply) and len(reply.details["started"]) == 1
    instance = reply.details["started"][0]

    async def serving_it(plane: Plane) -> bool:
        return await serving(plane) == [instance]

    await wait_for(lambda: serving_it(first), 90, f"{instance} heartbeating")
    await first.close()  # a rolling update: this control plane goes, the engine keeps serving

    second = await plane_factory(settings)

    async def adopted() -> bool:
        return instance in {p.instance_id for p in second.provisioner.instances()}

    await wait_for(adopted, 30, f"the new control plane to adopt {instance}")
    await wait_for(lambda: serving_it(second), 30, f"{instance} serving under the new control plane")
    stream = await second.client.submit("adopted", sampling=SamplingParams(max_tokens=32, ignore_eos=True))
    result = await stream.result()
    assert result.done is not None and result.done.instances == [instance]
    status = await second.client.autoscale_status()
    assert [i.owned for i in status.instances if i.instance_id == instance] == [True]

    # Owned, so the new leader scales it in: drained, stopped, its actor gone.
    reply = await request_admin(second.url, "scale", ScaleCommand(role="mixed", count=0))
    assert isinstance(reply, AdminReply) and reply.details["draining"] == [instance]

    async def stopped() -> bool:
        return not second.provisioner.instances() and not await serving(second)

    await wait_for(stopped, 60, f"{instance} stopped by the new control plane")
    assert not await asyncio.to_thread(actor_exists, second, instance)


async def test_an_instance_ray_cannot_place_stays_starting_until_scaled_in(
    ray_env: RayEnv, plane_factory: Callable[[Settings], Awaitable[Plane]]
) -> None:
    settings = ray_settings(ray_env, enabled=False, interactive=0)
    unplaceable = RayShape(num_cpus=0.0, resources={"drover_engine": 1.0, "no_such_node_label": 1.0})
    shapes = {**settings.provisioner.ray_shapes, "mixed": unplaceable}
    settings = settings.model_copy(
        update={"provisioner": settings.provisioner.model_copy(update={"ray_shapes": shapes})}
    )
    plane = await plane_factory(settings)
    reply = await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=1))
    assert isinstance(reply, AdminReply) and len(reply.details["started"]) == 1
    pending = reply.details["started"][0]

    async def starting() -> bool:
        status = await plane.client.autoscale_status()
        return [i.state for i in status.instances if i.instance_id == pending] == ["starting"]

    await wait_for(starting, 30, f"{pending} listed as starting")
    await asyncio.sleep(2.0)  # Ray keeps it pending: no node has the label
    assert await starting() and plane.provisioner.node_of(pending) is None

    reply = await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=0))
    assert isinstance(reply, AdminReply) and reply.details["draining"] == [pending]

    async def gone() -> bool:
        return not plane.provisioner.instances()

    await wait_for(gone, 30, f"{pending} stopped")
    events = [(e.action, e.instance_id, e.reason) for e in (await plane.client.autoscale_status()).events]
    assert any(a == "stop" and i == pending and "before it started" in r for a, i, r in events), events
