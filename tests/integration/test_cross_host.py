"""Across hosts: engines on other hosts join over NATS.

Each engine is a `drover engine serve --kind sim` process inside a network namespace of its own (``ip netns``
plus a veth pair: the "host" it runs on), talking to a dedicated nats-server over the veth link; the control
plane and the client run on this machine. Cutting an engine's link (veth down) is an engine failure: missed
heartbeats declare it dead and its request resumes on the other engine, each token exactly once, in order.
When the link comes back, the cut-off engine's connection delivers what it had buffered (TCP retransmits:
nats-py has not even noticed a disconnect) and it keeps beating; the request is no longer its own, so the
scheduler aborts it there and nothing it sends reaches the client twice.

The module skips when network namespaces cannot be created here (checked by trying `ip netns add`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from control.client import DroverClient, RequestStream
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.tokenizer import ByteTokenizer
from tests.netns import NetNs, netns_unavailable_reason
from transport.bus import Bus, BusOptions
from transport.messages import ErrorReply, Message, RequestDone, SamplingParams, TokenChunk, decode
from transport.nats_server import EmbeddedNatsServer

_REASON = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"network namespaces unavailable: {_REASON}")

STALE_AFTER_S = 2.0  # heartbeats every 0.1 s: 20 missed beats, holds on a loaded 2-core machine
ROOT = Path(__file__).resolve().parents[2]


class EngineInNetns:
    """A `drover engine serve --kind sim` process run inside ``netns``, reaching NATS at ``nats_url``."""

    def __init__(self, netns: NetNs, nats_url: str, instance_id: str, log_path: Path) -> None:
        self.netns = netns
        self.instance_id = instance_id
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = {
            **os.environ,
            "DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.1",
            "DROVER_ENGINE__SIM_TIME_SCALE": "1.0",
            "DROVER_ENGINE__DRAIN_TIMEOUT_S": "1",
            "DROVER_MODEL__MAX_MODEL_LEN": "4096",
            "DROVER_OBSERVABILITY__EXPORTER": "none",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        argv = [sys.executable, "-m", "control.apps.cli", "--nats-url", nats_url]
        argv += ["engine", "serve", "--instance-id", instance_id, "--kind", "sim"]
        self.proc = subprocess.Popen(
            netns.command(argv), env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=15)
        self.log.close()


@dataclass
class CrossHost:
    client: DroverClient
    nats_url: str  # the server as this machine reaches it
    hosts: dict[str, NetNs]  # instance id -> the namespace its engine runs in
    engines: dict[str, EngineInNetns]


@pytest.fixture
def netns_pair() -> Iterator[tuple[NetNs, NetNs]]:
    with NetNs() as a, NetNs() as b:
        yield a, b


@pytest.fixture
async def cross_host(netns_pair: tuple[NetNs, NetNs], tmp_path: Path) -> AsyncIterator[CrossHost]:
    # A server of its own, listening on every address: the engines reach it over their veth links.
    server = EmbeddedNatsServer(host="0.0.0.0")
    await asyncio.to_thread(server.start)
    local_url = f"nats://127.0.0.1:{server.port}"
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        overrides={
            "nats": {"url": local_url},
            "scheduler": {"instance_stale_after_s": STALE_AFTER_S},
            "policy": {"migration_enabled": False},
            "ha": {"state_bucket": f"xh_state_{suffix}", "lease_bucket": f"xh_lease_{suffix}"},
        }
    )
    bus = await asyncio.to_thread(lambda: Bus(BusOptions(url=local_url, name="drover-control-xhost")).start())
    plane = await asyncio.to_thread(lambda: ControlPlane(settings, bus, ByteTokenizer()).start())
    hosts = {f"xh-{i}": ns for i, ns in enumerate(netns_pair)}
    engines = {
        iid: EngineInNetns(ns, f"nats://{ns.host_ip}:{server.port}", iid, tmp_path / f"{iid}.log")
        for iid, ns in hosts.items()
    }
    client = await DroverClient(local_url, name="xhost-test").connect()
    try:
        yield CrossHost(client, local_url, hosts, engines)
    finally:
        await client.close()
        for engine in engines.values():
            await asyncio.to_thread(engine.stop)
        await asyncio.to_thread(plane.stop)
        await asyncio.to_thread(bus.stop)
        await asyncio.to_thread(server.stop)


def _expected(request_id: str, n: int) -> list[int]:
    seed = request_seed(0, request_id)
    return [token_at(seed, p) for p in range(n)]


async def _advance(stream: RequestStream, tokens: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= tokens:
            return


async def _tap(url: str, subject: str, seen: list[Message]) -> nats.NATS:
    """A second subscriber on the client's inbox: what went over the wire, duplicates included."""

    async def on_msg(msg: Msg) -> None:
        seen.append(decode(msg.data))

    nc = await nats.connect(url)
    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return nc


async def test_engines_in_other_netns_serve_requests(cross_host: CrossHost) -> None:
    client = cross_host.client
    await client.wait_for_instances(2, timeout_s=60)
    status = await client.status()
    assert {i.info.instance_id for i in status.instances} == set(cross_host.engines)

    sampling = SamplingParams(max_tokens=64, ignore_eos=True)
    streams = [await client.submit(f"across hosts {i}", sampling=sampling, request_id=f"xh-r{i}") for i in range(4)]
    served_by = set()
    for i, stream in enumerate(streams):
        result = await stream.result()
        assert result.token_ids == _expected(f"xh-r{i}", 64)
        assert result.done is not None and result.done.num_tokens == 64
        served_by.update(result.done.instances)
    assert served_by <= set(cross_host.engines) and served_by  # every token came over a veth link


async def test_cut_link_fails_over_exactly_once_and_the_returning_engine_duplicates_nothing(
    cross_host: CrossHost,
) -> None:
    client = cross_host.client
    await client.wait_for_instances(2, timeout_s=60)
    max_tokens = 1500
    request_id = "xh-cut-1"
    stream = await client.submit(
        "a host drops off the network",
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        request_id=request_id,
    )
    assert stream._subscription is not None
    seen: list[Message] = []
    tap = await _tap(cross_host.nats_url, stream._subscription.subject, seen)
    try:
        await _advance(stream, 16)
        status = await client.status()
        victim = next(r.instance_id for r in status.requests if r.request_id == request_id)
        assert victim in cross_host.hosts
        netns = cross_host.hosts[victim]
        await asyncio.to_thread(netns.link_down)
        cut_at = len(stream.result_data.token_ids)

        # Declared dead after missed heartbeats; the request resumes on the other engine.
        for _ in range(600):
            status = await client.status()
            if victim not in {i.info.instance_id for i in status.instances}:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"{victim} was never declared dead after its link was cut")
        await _advance(stream, cut_at + 16)
        # The link comes back mid-stream: the old engine's connection flushes and it beats again.
        await asyncio.to_thread(netns.link_up)

        # The returning engine rejoins, and the request it lost is no longer running there (fenced).
        for _ in range(200):
            status = await client.status()
            back = next((i for i in status.instances if i.info.instance_id == victim), None)
            if back is not None and all(r.request_id != request_id for r in back.load.running):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"{victim} did not rejoin, or still runs {request_id} after its link came back")
        fenced_at = time.time()
        owner = next((r.instance_id for r in status.requests if r.request_id == request_id), None)
        assert owner is not None and owner != victim  # fenced while the survivor still streams it

        result = await stream.result()
        assert cut_at < max_tokens  # the cut landed mid-stream
        assert result.token_ids == _expected(request_id, max_tokens)  # each once, in order
        assert result.done is not None and result.done.num_tokens == max_tokens
        assert result.done.instances[0] == victim and result.done.instances[-1] != victim

        await asyncio.sleep(1.0)  # anything still on its way from the old engine has arrived by now

        assert sum(isinstance(m, RequestDone) for m in seen) == 1
        assert not [m for m in seen if isinstance(m, ErrorReply)]
        survivor = result.done.instances[-1]
        mine = sorted(
            (m.index, m.index + len(m.token_ids))
            for m in seen
            if isinstance(m, TokenChunk) and m.instance_id == survivor
        )
        assert mine and mine[-1][1] == max_tokens
        for (_, end), (start, _) in itertools.pairwise(mine):
            assert start == end  # the survivor streamed only what the client did not have, without gaps
        # What the old engine produced while cut off reaches the inbox when the link returns (its TCP connection
        # never broke); the client drops it by index. Once fenced it produces nothing more.
        late = [m for m in seen if isinstance(m, TokenChunk) and m.instance_id == victim and m.produced_at > fenced_at]
        assert not late, f"the cut-off engine streamed {len(late)} chunks after it was fenced"
    finally:
        await tap.drain()
