"""Failover bugs the chaos benchmark (scripts/chaos.py) found, each pinned by a test on real NATS and sim
engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg

from actors.engine_actor import Heartbeater
from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import (
    PROTOCOL_VERSION,
    EngineAdd,
    EngineFence,
    InstanceHeartbeat,
    RunningRequest,
    SamplingParams,
    decode,
    encode,
)
from transport.nats_server import EmbeddedNatsServer
from transport.output_stream import ensure_output_stream


def _cluster(nats_url: str, names: tuple[str, ...], stale_after_s: float) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": stale_after_s},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for name in names:
        cluster.add_engine(MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
    return cluster


async def test_an_engine_restarted_under_its_id_before_it_was_declared_dead_loses_nothing(nats_url: str) -> None:
    """A supervisor (systemd, the chaos script) restarts a killed engine in a second or two, well inside the
    heartbeat timeout: the scheduler must see the new incarnation (heartbeat seq restarts, new pid) and
    resume the old incarnation's requests, instead of waiting forever for them."""
    cluster = await asyncio.to_thread(_cluster, nats_url, ("rr-a", "rr-b"), 60.0)  # timeout never fires
    try:
        async with DroverClient(cluster.url, name="restart-same-id") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"restart {i}", sampling=SamplingParams(max_tokens=150, ignore_eos=True), request_id=f"rr-{i}"
                )
                for i in range(6)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 5:
                        break
            status = await client.status()
            on_a = {r.request_id for r in status.requests if r.instance_id == "rr-a"}
            assert on_a
            await asyncio.to_thread(cluster.crash_engine, "rr-a")
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("rr-a", num_blocks=256, max_model_len=1024))
            for i, stream in enumerate(streams):
                result = await asyncio.wait_for(stream.result(), 30)
                seed = request_seed(0, f"rr-{i}")
                assert result.token_ids == [token_at(seed, p) for p in range(150)]
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_submit_nobody_took_is_submitted_again_once_a_control_plane_listens() -> None:
    """While the control plane reconnects after a NATS fault nobody subscribes to the submit subject: NATS
    answers the client's inbox with a "no responders" status (an empty message). That is no reply from
    Drover; the client submits again (same request id) and the request completes."""
    server = EmbeddedNatsServer()
    url = server.start()
    cluster: InProcessCluster | None = None
    try:
        async with DroverClient(url, name="no-responders") as client:
            # JetStream's output stream exists (as a running control plane leaves it), but no control plane.
            assert await ensure_output_stream(client.nc, max_age_s=60, max_bytes=1 << 20)
            stream = await client.submit(
                "nobody listens yet", sampling=SamplingParams(max_tokens=20, ignore_eos=True), request_id="nr-1"
            )
            await asyncio.sleep(1.5)  # the 503 arrived and at least one resubmit went unanswered too
            assert not stream.finished
            cluster = await asyncio.to_thread(_cluster, url, ("nr-a",), 5.0)
            result = await asyncio.wait_for(stream.result(), 30)
            assert result.token_ids == [token_at(request_seed(0, "nr-1"), p) for p in range(20)]
            assert stream.resubmits >= 1
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        server.stop()


async def test_failover_waits_for_an_output_stream_that_is_briefly_unavailable(nats_url: str) -> None:
    """A NATS node loss can leave the output stream without a leader for a few seconds, right when the
    scheduler reads a dead engine's delivered tokens: it retries instead of failing the request."""
    cluster = await asyncio.to_thread(_cluster, nats_url, ("ou-a", "ou-b"), 0.6)
    try:
        async with DroverClient(cluster.url, name="output-unavailable") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"unavailable {i}", sampling=SamplingParams(max_tokens=150, ignore_eos=True), request_id=f"ou-{i}"
                )
                for i in range(4)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 5:
                        break
            await client.nc.jetstream().delete_stream(subjects.OUTPUT_STREAM)
            await asyncio.to_thread(cluster.crash_engine, "ou-a")
            await asyncio.sleep(2.0)  # declared dead after 0.6 s: the reads fail meanwhile
            assert cluster.control is not None and cluster.control_bus is not None
            assert await asyncio.wrap_future(cluster.control_bus.run(cluster.control._ensure_output_stream()))
            for i, stream in enumerate(streams):
                result = await asyncio.wait_for(stream.result(), 30)
                assert result.token_ids == [token_at(request_seed(0, f"ou-{i}"), p) for p in range(150)]
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_an_engine_add_nobody_received_is_sent_again(nats_url: str) -> None:
    """The scheduler dispatches to an instance whose EngineAdd is lost (here: its heartbeats arrive but its
    engine subject has no subscriber yet, as while it resubscribes after a NATS fault). Without an
    acknowledgement the scheduler sends it again, and the request completes once the engine listens."""
    cluster = await asyncio.to_thread(_cluster, nats_url, (), 60.0)
    engine = MigratableSimEngine("ghost", num_blocks=256, max_model_len=1024)
    await engine.start()
    stop_beats = asyncio.Event()
    try:
        async with DroverClient(cluster.url, name="lost-add") as client:

            async def beats() -> None:  # the instance's heartbeats, before its engine subject is subscribed
                while not stop_beats.is_set():
                    # as the engine actor sends it: advertising the protocol this code speaks
                    info = msgspec.structs.replace(engine.info, protocol_version=PROTOCOL_VERSION)
                    beat = InstanceHeartbeat(info=info, load=engine.load(), seq=0, sent_at=time.time())
                    await client.nc.publish(subjects.heartbeat("ghost"), encode(beat))
                    await asyncio.sleep(0.05)

            beating = asyncio.get_running_loop().create_task(beats())
            await client.wait_for_instances(1, timeout_s=10)
            stream = await client.submit(
                "lost add", sampling=SamplingParams(max_tokens=30, ignore_eos=True), request_id="la-1"
            )
            await asyncio.sleep(0.5)  # the first EngineAdd went nowhere
            await engine.shutdown()
            # one heartbeat source at a time: this stand-in's beats (seq 0) after the real engine's read as a
            # restart of a live instance (test_a_false_restart_signal_of_a_live_instance_duplicates_nothing)
            stop_beats.set()
            await beating
            await asyncio.to_thread(
                cluster.add_engine, MigratableSimEngine("ghost", num_blocks=256, max_model_len=1024)
            )
            result = await asyncio.wait_for(stream.result(), 30)
            assert result.token_ids == [token_at(request_seed(0, "la-1"), p) for p in range(30)]
    finally:
        stop_beats.set()
        await asyncio.to_thread(cluster.stop)


async def test_an_engine_taken_for_dead_that_comes_back_stops_what_failed_over(nats_url: str) -> None:
    """SIGSTOP past the heartbeat timeout, then SIGCONT: the instance's requests failed over meanwhile, but
    its engine still runs them. When its heartbeats come back the scheduler stops those copies quietly (no
    RequestDone from the zombie); the clients get every token once, from the instance that took over."""
    cluster = await asyncio.to_thread(_cluster, nats_url, ("zb-a", "zb-b"), 0.6)
    try:
        async with DroverClient(cluster.url, name="zombie") as client:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [
                await client.submit(
                    f"zombie {i}", sampling=SamplingParams(max_tokens=900, ignore_eos=True), request_id=f"zb-{i}"
                )
                for i in range(6)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 5:
                        break
            host = cluster.hosts["zb-a"]
            host.heartbeater.stop()  # taken for dead; its engine keeps generating (a zombie)
            status = await client.status()
            while "zb-a" in {i.info.instance_id for i in status.instances}:
                await asyncio.sleep(0.1)
                status = await client.status()
            await asyncio.sleep(0.5)  # its requests fail over to zb-b
            # Its actor still answers on the bus, so the failover fenced each request there first (a host cut
            # off the network cannot be fenced: tests/integration/test_cross_host.py covers the superseded
            # abort when it comes back). Either way no copy may remain once its heartbeats return.
            host.heartbeater = Heartbeater(host.bus, host.engine, 0.05)  # heartbeats come back
            host.heartbeater.start()
            deadline = time.monotonic() + 3
            while host.engine.load().num_running > 0:
                assert time.monotonic() < deadline, "the zombie still runs requests that failed over"
                await asyncio.sleep(0.1)
            assert (await client.status()).requests  # stopped, not finished: they still run on zb-b
            for i, stream in enumerate(streams):
                result = await asyncio.wait_for(stream.result(), 60)
                assert result.token_ids == [token_at(request_seed(0, f"zb-{i}"), p) for p in range(900)]
                assert result.done is not None and result.done.finish_reason != "abort"
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_false_restart_signal_of_a_live_instance_duplicates_nothing(nats_url: str) -> None:
    """A heartbeat whose seq goes back while the instance is alive (a stray or second process under its id)
    reads as a restart: its request is fenced and resumes on the same, live instance, the only one. The fenced
    copy left the engine only at the end of the step under way; the resumed copy must not run beside it (it
    did: 113 tokens for 60, two generators interleaved in one stream)."""
    cluster = await asyncio.to_thread(_cluster, nats_url, (), 60.0)
    # paced (about 25 s for these tokens) until the resume is seen, so the request still runs when the stray
    # heartbeat arrives even on a starved core; then at full speed
    engine = MigratableSimEngine("twin", num_blocks=256, max_model_len=2048, time_scale=1.0)
    max_tokens = 1000
    try:
        await asyncio.to_thread(cluster.add_engine, engine)
        async with DroverClient(cluster.url, name="false-restart") as client:
            await client.wait_for_instances(1, timeout_s=10)
            to_engine: list[object] = []  # what the scheduler sends the instance (a second subscriber)

            async def watch(msg: Msg) -> None:
                to_engine.append(decode(msg.data))

            await client.nc.subscribe(subjects.engine("twin"), cb=watch)
            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            stream = await client.submit("false restart", sampling=sampling, request_id="fr-1")
            async for _ in stream.events():
                if len(stream.result_data.token_ids) >= 5:
                    break
            other = MigratableSimEngine("twin-2", num_blocks=256, max_model_len=1024)
            info = msgspec.structs.replace(other.info, instance_id="twin", protocol_version=PROTOCOL_VERSION)
            beat = InstanceHeartbeat(info=info, load=other.load(), seq=0, sent_at=time.time())
            await client.nc.publish(subjects.heartbeat("twin"), encode(beat))  # seq back to 0: "restarted"

            def resumed() -> bool:
                return any(isinstance(m, EngineAdd) and m.output_token_ids for m in to_engine)

            deadline = time.monotonic() + 30
            while not resumed():
                assert time.monotonic() < deadline, "the request was not failed over onto its instance"
                await asyncio.sleep(0.05)
            assert any(isinstance(m, EngineFence) for m in to_engine)
            engine.time_scale = 0.0
            result = await asyncio.wait_for(stream.result(), 60)
            assert result.token_ids == [token_at(request_seed(0, "fr-1"), p) for p in range(max_tokens)]
            assert result.done is not None and result.done.instances == ["twin", "twin"]
            assert not engine.core.requests
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_request_failed_over_from_an_instance_that_may_still_hold_it_waits_for_it_to_let_go(
    nats_url: str,
) -> None:
    """A restart signal from an instance that does not answer the fence (it hangs, or the answer is lost)
    while its heartbeats still list the request: the request is not resumed (there or anywhere) until that
    instance's heartbeat no longer lists it; then it resumes and completes exactly once."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": 60.0},
            "reliability": {"failover_fence_timeout_s": 0.3},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    stand_in = MigratableSimEngine("mute", num_blocks=256, max_model_len=1024)
    info = msgspec.structs.replace(stand_in.info, protocol_version=PROTOCOL_VERSION)
    to_engine: list[object] = []
    lists: list[str] = []  # what the stand-in's heartbeats say its engine runs
    stop_beats = asyncio.Event()
    try:
        async with DroverClient(cluster.url, name="mute") as client:

            async def watch(msg: Msg) -> None:  # takes the instance's messages and never answers
                to_engine.append(decode(msg.data))

            await client.nc.subscribe(subjects.engine("mute"), cb=watch)
            seq = iter(range(1, 1_000_000))

            async def beats() -> None:
                while not stop_beats.is_set():
                    load = msgspec.structs.replace(
                        stand_in.load(),
                        running=[RunningRequest(request_id=r, num_tokens=40, num_blocks=2) for r in lists],
                    )
                    beat = InstanceHeartbeat(info=info, load=load, seq=next(seq), sent_at=time.time())
                    await client.nc.publish(subjects.heartbeat("mute"), encode(beat))
                    await asyncio.sleep(0.05)

            beating = asyncio.get_running_loop().create_task(beats())
            await client.wait_for_instances(1, timeout_s=10)
            stream = await client.submit(
                "mute", sampling=SamplingParams(max_tokens=30, ignore_eos=True), request_id="mu-1"
            )

            async def until(condition: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 30
                while not condition():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.02)

            def adds() -> list[EngineAdd]:
                return [m for m in to_engine if isinstance(m, EngineAdd)]

            await until(lambda: bool(adds()), "mu-1 was not dispatched to the instance")
            lists.append("mu-1")  # its engine runs it (as far as its heartbeats say)
            seq = iter(range(0, 1_000_000))  # seq back to 0: "restarted"
            await until(lambda: any(isinstance(m, EngineFence) for m in to_engine), "no failover")
            first_adds = {m.served_by == [] for m in adds()}
            assert first_adds == {True}
            await asyncio.sleep(2.0)  # the fence timed out and the read-back finished long since
            assert all(m.served_by == [] for m in adds()), "resumed while the instance may still run it"
            stop_beats.set()  # the real engine takes over the id: its heartbeats do not list mu-1
            await beating
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("mute", num_blocks=256, max_model_len=1024))
            result = await asyncio.wait_for(stream.result(), 30)
            assert result.token_ids == [token_at(request_seed(0, "mu-1"), p) for p in range(30)]
    finally:
        stop_beats.set()
        await asyncio.to_thread(cluster.stop)
