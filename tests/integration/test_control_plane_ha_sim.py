"""Control-plane failure, on a real nats-server with JetStream and simulated engines.

- A restarted control plane restores its request table and instance registry from the state bucket: streams
  go on (tokens flow engine -> client directly), a retry with the same request id is deduplicated, and an
  engine that died while no control plane ran is still failed over.
- Two control planes (processes): one leads by a KV lease, the other stands by; SIGKILL the leader and the
  standby takes over once the lease lapses: new requests complete, and a dead engine's requests still fail
  over. SIGTERM on the leader hands over at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from actors.control_state import REQUEST_NS, decode_request
from actors.leadership import LEASE_KEY, LeaseRecord
from actors.local_cluster import InProcessCluster
from control.client import DroverClient, DroverError, RequestStream
from control.settings import load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from tests.waiting import wait_for
from transport import subjects
from transport.kv_store import kv_key
from transport.messages import (
    PROTOCOL_VERSION,
    Accepted,
    EngineAbort,
    EngineAdd,
    EngineFence,
    ErrorCode,
    ErrorReply,
    InstanceHeartbeat,
    RequestDone,
    RunningRequest,
    SamplingParams,
    SubmitRequest,
    TokenChunk,
    decode,
    encode,
)


def expected(request_id: str, n: int) -> list[int]:
    seed = request_seed(0, request_id)
    return [token_at(seed, p) for p in range(n)]


def _cluster(nats_url: str, *, control: bool = True, stale_after_s: float = 1.0) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": stale_after_s},
            "policy": {"migration_enabled": False},
            "ha": {"lease_ttl_s": 1.5, "renew_period_s": 0.3},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    if control:
        cluster.start_control()
    return cluster


class InboxTap:
    """Every message a request's inbox receives, seen by a second subscriber (what went over the wire)."""

    def __init__(self) -> None:
        self.messages: list[object] = []

    async def attach(self, nc: nats.NATS, inbox: str) -> None:
        async def on_message(msg: nats.aio.msg.Msg) -> None:
            self.messages.append(decode(msg.data))

        await nc.subscribe(inbox, cb=on_message)

    def of(self, kind: type) -> list[object]:
        return [m for m in self.messages if isinstance(m, kind)]


def inbox_of(stream: RequestStream) -> str:
    assert stream._subscription is not None
    return str(stream._subscription.subject)


async def wait_tokens(stream: RequestStream, count: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= count:
            return


@pytest.fixture
async def tap_nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.drain()


async def test_restart_keeps_streams_and_deduplicates_retries(nats_url: str, tap_nc: nats.NATS) -> None:
    cluster = await asyncio.to_thread(_cluster, nats_url)
    try:
        for name in ("ha-a", "ha-b"):
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
        async with DroverClient(cluster.url, name="ha-restart") as client:
            await client.wait_for_instances(2, timeout_s=10)
            n = 300
            streams = {
                f"ha-r{i}": await client.submit(
                    f"restart {i}", sampling=SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"ha-r{i}"
                )
                for i in range(3)
            }
            taps = {rid: InboxTap() for rid in streams}
            for rid, stream in streams.items():
                await taps[rid].attach(tap_nc, inbox_of(stream))
            for stream in streams.values():
                await wait_tokens(stream, 5)
            accepted = {rid: (await s.accepted).cancel_token for rid, s in streams.items()}

            await asyncio.to_thread(cluster.restart_control)

            status = await client.status()  # the new control plane knows every running request
            known = {r.request_id: r.instance_id for r in status.requests}
            assert set(streams) <= set(known)
            assert all(known[rid] in ("ha-a", "ha-b") for rid in streams)
            for stream in streams.values():  # still streaming
                assert len(stream.result_data.token_ids) < n

            # A client retry with the same id and inbox is acknowledged again (same token) and runs once.
            # The tap joined after the submit, so it may or may not have seen the first Accepted: count from here.
            # The retry goes out on the tap's own connection, behind its SUBs, so the tap sees what answers it.
            first = "ha-r0"
            acks_before = len(taps[first].of(Accepted))
            await tap_nc.publish(
                subjects.SUBMIT,
                encode(
                    SubmitRequest(
                        reply_to=inbox_of(streams[first]),
                        request_id=first,
                        prompt="restart 0",
                        sampling=SamplingParams(max_tokens=n, ignore_eos=True),
                    )
                ),
            )
            # The same id from another inbox is refused.
            with pytest.raises(DroverError) as dup:
                await client.generate("someone else", max_tokens=4, request_id=first)
            assert dup.value.code == ErrorCode.DUPLICATE_REQUEST

            for rid, stream in streams.items():
                result = await stream.result()
                assert result.token_ids == expected(rid, n)  # every token once, in order
                assert result.done is not None and len(result.done.instances) == 1  # never re-run
            await asyncio.sleep(0.5)  # anything late would arrive now
            acks = taps[first].of(Accepted)
            assert len(acks) == acks_before + 1, [type(m).__name__ for m in taps[first].messages]  # the retry's
            assert {a.cancel_token for a in acks} == {accepted[first]}  # type: ignore[attr-defined]
            for tap in taps.values():
                assert len(tap.of(RequestDone)) == 1
                assert not tap.of(ErrorReply)
                sent = sorted((c.index, len(c.token_ids)) for c in tap.of(TokenChunk))  # type: ignore[attr-defined]
                position = sent[0][0]  # the tap joined after the first chunks
                for index, length in sent:  # no chunk was sent twice, none overlaps another
                    assert index == position
                    position += length
                assert position == n
            fresh = await client.generate("after restart", max_tokens=8, request_id="ha-fresh")
            assert fresh.token_ids == expected("ha-fresh", 8)
            assert not (await client.status()).requests  # finished requests left the table
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_engine_that_dies_while_no_control_plane_runs_is_failed_over(nats_url: str) -> None:
    cluster = await asyncio.to_thread(_cluster, nats_url)
    try:
        for name in ("hd-a", "hd-b"):
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
        async with DroverClient(cluster.url, name="ha-dead") as client:
            await client.wait_for_instances(2, timeout_s=10)
            n = 200
            streams = {
                f"hd-{i}": await client.submit(
                    f"dead {i}", sampling=SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"hd-{i}"
                )
                for i in range(4)
            }
            for stream in streams.values():
                await wait_tokens(stream, 5)
            status = await client.status()
            victim = status.requests[0].instance_id
            assert victim is not None
            on_victim = {r.request_id for r in status.requests if r.instance_id == victim}

            # The control plane goes away; meanwhile an engine dies; then a control plane starts again.
            assert cluster.control is not None and cluster.control_bus is not None
            await asyncio.to_thread(cluster.control.stop)
            await asyncio.to_thread(cluster.control_bus.stop)
            await asyncio.to_thread(cluster.crash_engine, victim)
            await asyncio.to_thread(cluster.start_control)

            for rid, stream in streams.items():
                result = await stream.result()
                assert result.token_ids == expected(rid, n)
                assert result.done is not None
                if rid in on_victim:
                    assert result.done.instances[0] == victim and result.done.instances[-1] != victim
            assert victim not in {i.info.instance_id for i in (await client.status()).instances}
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_request_that_ends_while_no_control_plane_runs_leaves_the_table(nats_url: str) -> None:
    cluster = await asyncio.to_thread(_cluster, nats_url)
    try:
        await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("he-a", num_blocks=256, max_model_len=1024))
        async with DroverClient(cluster.url, name="ha-ended") as client:
            await client.wait_for_instances(1, timeout_s=10)
            stream = await client.submit(
                "ends", sampling=SamplingParams(max_tokens=40, ignore_eos=True), request_id="he"
            )
            await wait_tokens(stream, 3)
            assert cluster.control is not None and cluster.control_bus is not None
            await asyncio.to_thread(cluster.control.stop)
            await asyncio.to_thread(cluster.control_bus.stop)
            result = await stream.result()  # the stream ends without a control plane (engine -> client)
            assert result.token_ids == expected("he", 40)
            await asyncio.to_thread(cluster.start_control)
            # Restored from the bucket as running on he-a; he-a's heartbeat does not list it, and the output
            # stream shows it finished: it leaves the table instead of staying there forever.
            for _ in range(100):
                if not (await client.status()).requests:
                    break
                await asyncio.sleep(0.05)
            assert not (await client.status()).requests
            again = await client.generate("next", max_tokens=4, request_id="he-next")
            assert again.token_ids == expected("he-next", 4)
    finally:
        await asyncio.to_thread(cluster.stop)


# ---------------------------------------------------------------------------------------------- failover holds
async def scheduler_holds(cluster: InProcessCluster) -> dict[str, str] | None:
    """The running scheduler's failover holds (request id -> instance), read from the control core's
    ``FailoverHolds``; None while no scheduler runs (a control plane still starting)."""
    control = cluster.control
    ref = None if control is None or control.scheduler is None else control.scheduler.ref
    if ref is None or not ref.is_alive():
        return None
    failovers = await asyncio.to_thread(lambda: ref.proxy().failovers.get(timeout=5))
    return failovers.holds.held()


class HungInstance:
    """An instance that hangs with a request (a test double of an engine, as in the chaos tests): its
    heartbeats go on and list what its engine runs, it answers nothing (fence, add, abort). ``sent`` records
    every message the control plane sends it and the ``spare`` instance, as ``(instance, message)``."""

    def __init__(self, nc: nats.NATS, instance_id: str) -> None:
        self.nc, self.instance_id = nc, instance_id
        engine = MigratableSimEngine(instance_id, num_blocks=256, max_model_len=1024)
        self.engine, self.info = engine, msgspec.structs.replace(engine.info, protocol_version=PROTOCOL_VERSION)
        self.sent: list[tuple[str, object]] = []
        self.lists: list[str] = []
        self.seq = iter(range(1, 1_000_000))
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, spare: str) -> None:
        for instance_id in (self.instance_id, spare):
            await self.nc.subscribe(subjects.engine(instance_id), cb=self._watch(instance_id))
        self.task = asyncio.get_running_loop().create_task(self._beats())

    def _watch(self, instance_id: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_message(msg: Msg) -> None:  # taken, never answered
            self.sent.append((instance_id, decode(msg.data)))

        return on_message

    async def _beats(self) -> None:
        while not self.stopped.is_set():
            running = [RunningRequest(request_id=r, num_tokens=40, num_blocks=2) for r in self.lists]
            load = msgspec.structs.replace(self.engine.load(), running=running)
            beat = InstanceHeartbeat(info=self.info, load=load, seq=next(self.seq), sent_at=time.time())
            await self.nc.publish(subjects.heartbeat(self.instance_id), encode(beat))
            await asyncio.sleep(0.05)

    def restart_signal(self) -> None:
        """Its heartbeat seq goes back to 0: read as a restart, so its requests fail over (fenced first)."""
        self.seq = iter(range(0, 1_000_000))

    async def stop(self) -> None:
        self.stopped.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    def of(self, kind: type, since: int = 0) -> list[object]:
        return [m for _, m in self.sent[since:] if isinstance(m, kind)]

    def resumed(self) -> list[EngineAdd]:
        """EngineAdds of a request that ran before (a failover's resume), to either instance."""
        return [m for m in self.of(EngineAdd) if isinstance(m, EngineAdd) and m.served_by]


async def held_restart(nats_url: str, tap_nc: nats.NATS, *, hold_first: bool) -> None:
    """A request failed over from an instance that may still hold a copy (it never answers the fence, its
    heartbeats still list the request) must not resume beside that copy, and the control plane restarts:
    after it held the request (``hold_first``) or while the fence was still unanswered. The restarted control
    plane derives the hold again from the stored ``recovering`` record (it fences that instance again, which
    stays silent) and holds it in the core, resumes it once that instance lets go, and every token reaches the
    client once."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": 60.0},  # never declared dead: only its heartbeats release it
            # restarted mid-fence: the first control plane's fence outlasts the test
            "reliability": {"failover_fence_timeout_s": 0.3 if hold_first else 60.0},
            "policy": {"migration_enabled": False},
            "ha": {"lease_ttl_s": 1.5, "renew_period_s": 0.3},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    rid, n, before = "hold-1", 30, 5
    hung = HungInstance(tap_nc, "held")
    first = expected(rid, n)[:before]
    try:
        await hung.start(spare="spare")
        bucket = await tap_nc.jetstream().key_value(cluster.settings.ha.state_bucket)

        async def stored_held() -> bool:  # what a held request's record says: recovering, the tokens read back
            entry = await bucket.get(kv_key(REQUEST_NS, rid))
            assert entry.value is not None
            record = decode_request(entry.value)
            return (record.state, record.instance_id, record.served_by, record.resume_tokens) == (
                "recovering",
                None,
                ["held"],
                first,
            )

        async with DroverClient(cluster.url, name="ha-hold") as client:
            await client.wait_for_instances(1, timeout_s=10)
            stream = await client.submit("held", sampling=SamplingParams(max_tokens=n, ignore_eos=True), request_id=rid)
            tap = InboxTap()
            await tap.attach(tap_nc, inbox_of(stream))

            async def dispatched() -> bool:
                return bool(hung.of(EngineAdd))

            await wait_for(dispatched, 30, f"{rid} dispatched to the hung instance")
            # Its engine runs it and streams the first tokens (as an engine would), then hangs.
            hung.lists.append(rid)
            await tap_nc.publish(inbox_of(stream), encode(TokenChunk(request_id=rid, index=0, token_ids=first)))
            await wait_tokens(stream, before)
            await asyncio.to_thread(
                cluster.add_engine, MigratableSimEngine("spare", num_blocks=256, max_model_len=1024)
            )
            await client.wait_for_instances(2, timeout_s=10)
            hung.restart_signal()

            async def held_by_first() -> bool:
                return await scheduler_holds(cluster) == {rid: "held"} and await stored_held()

            async def fenced_by_first() -> bool:  # the failover stored it (tokens not read back yet) and fences
                entry = await bucket.get(kv_key(REQUEST_NS, rid))
                assert entry.value is not None
                return bool(hung.of(EngineFence)) and decode_request(entry.value).state == "recovering"

            if hold_first:
                await wait_for(held_by_first, 30, "the first control plane's hold (its record stored recovering)")
            else:
                await wait_for(fenced_by_first, 30, "the first control plane's fence")
                cluster.settings = cluster.settings.model_copy(deep=True)  # the next one's fence times out soon
                cluster.settings.reliability.failover_fence_timeout_s = 0.3
                assert await scheduler_holds(cluster) == {}  # not held yet: the fence has not answered

            seen = len(hung.sent)  # the first control plane's fence is in already (waited for above)
            await asyncio.to_thread(cluster.restart_control)

            async def holding() -> bool:
                return await scheduler_holds(cluster) == {rid: "held"} or bool(hung.resumed())

            await wait_for(holding, 30, "the restarted scheduler's hold")
            assert not hung.resumed(), "resumed while the instance may still run it"
            assert await scheduler_holds(cluster) == {rid: "held"}  # the core holds it again
            assert hung.of(EngineFence, since=seen)  # decided again: the instance was fenced again
            await wait_for(stored_held, 30, "the held request's record")
            holding_since = len(hung.sent)

            async def superseded() -> bool:  # the new scheduler read beats that still list it (or resumed it)
                aborts = [m for m in hung.of(EngineAbort, since=holding_since) if isinstance(m, EngineAbort)]
                return sum(m.request_id == rid for m in aborts) >= 5 or bool(hung.resumed())

            await wait_for(superseded, 30, "the restarted scheduler reading the hung instance's beats")
            await asyncio.sleep(1.0)  # a resume would have been dispatched long since
            assert not hung.resumed(), "resumed while the instance may still run it"
            assert await scheduler_holds(cluster) == {rid: "held"}
            assert stream.result_data.token_ids == first

            # The instance lets go: the real engine takes over its id, and its heartbeats do not list the request.
            await hung.stop()
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("held", num_blocks=256, max_model_len=1024))
            result = await asyncio.wait_for(stream.result(), 30)
            assert result.token_ids == expected(rid, n)
            again = {(i, tuple(m.output_token_ids), tuple(m.served_by)) for i, m in hung.sent if m in hung.resumed()}
            assert len(again) == 1  # one resume (an unacknowledged add may be sent again as it was)
            assert {(tokens, served) for _, tokens, served in again} == {(tuple(first), ("held",))}
            assert await scheduler_holds(cluster) == {}
            await asyncio.sleep(0.5)  # anything late would arrive now
            sent = sorted((c.index, len(c.token_ids)) for c in tap.of(TokenChunk))  # type: ignore[attr-defined]
            position = 0
            for index, length in sent:  # each index once: no chunk twice, none overlapping another
                assert index == position
                position += length
            assert position == n
            assert len(tap.of(RequestDone)) == 1 and not tap.of(ErrorReply)
    finally:
        await hung.stop()
        await asyncio.to_thread(cluster.stop)


async def test_a_restarted_control_plane_keeps_a_failover_hold(nats_url: str, tap_nc: nats.NATS) -> None:
    """Restarted while the request was held: the hold is derived again (fence, silence, hold)."""
    await held_restart(nats_url, tap_nc, hold_first=True)


async def test_a_control_plane_restarted_mid_fence_fences_again_and_holds(nats_url: str, tap_nc: nats.NATS) -> None:
    """Stored ``recovering`` before the fence answered: the restarted control plane fences the instance again
    (it resumed at once before, beside the copy that instance may still run) and holds the request."""
    await held_restart(nats_url, tap_nc, hold_first=False)


# ---------------------------------------------------------------------------------------------- two processes
class ControlProcess:
    """``drover control serve`` as a real process (SIGKILL is a real crash: its connection drops)."""

    def __init__(self, nats_url: str, env: dict[str, str], log_path: str) -> None:
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control.apps.cli", "--nats-url", nats_url, "control", "serve"],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


async def lease_holder(nc: nats.NATS, bucket: str) -> LeaseRecord | None:
    kv = await nc.jetstream().key_value(bucket)
    try:
        entry = await kv.get(LEASE_KEY)
    except KeyNotFoundError:
        return None
    assert entry.value is not None
    return msgspec.msgpack.decode(entry.value, type=LeaseRecord)


async def wait_until_served(client: DroverClient, timeout_s: float = 30.0) -> None:
    """Until a leader answers on the control subjects (between taking the lease and subscribing, nobody does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await client.status(timeout_s=1.0)
            return
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def wait_for_leader(nc: nats.NATS, bucket: str, pids: set[int], timeout_s: float = 60.0, not_pid: int = 0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            record = await lease_holder(nc, bucket)
        except Exception:  # bucket not created yet
            record = None
        if record is not None and record.pid in pids and record.pid != not_pid:
            return record.pid
        await asyncio.sleep(0.1)
    raise AssertionError(f"no leader among {pids} in {timeout_s}s")


def _control_env(suffix: str) -> dict[str, str]:
    return {
        "DROVER_ENGINE__KIND": "sim",
        "DROVER_OBSERVABILITY__EXPORTER": "none",
        "DROVER_SCHEDULER__INSTANCE_STALE_AFTER_S": "1.0",
        "DROVER_POLICY__MIGRATION_ENABLED": "false",
        "DROVER_HA__STATE_BUCKET": f"ha2_state_{suffix}",
        "DROVER_HA__LEASE_BUCKET": f"ha2_lease_{suffix}",
        "DROVER_HA__LEASE_TTL_S": "2.0",
        "DROVER_HA__RENEW_PERIOD_S": "0.4",
        "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture
async def two_control_planes(nats_url: str, tmp_path: object) -> AsyncIterator[tuple[InProcessCluster, dict]]:
    suffix = uuid.uuid4().hex[:8]
    cluster = await asyncio.to_thread(_cluster, nats_url, control=False, stale_after_s=1.0)
    env = _control_env(suffix)
    procs = {
        name: ControlProcess(nats_url, env, f"{tmp_path}/control-{name}.log")  # type: ignore[str-bytes-safe]
        for name in ("one", "two")
    }
    info = {"procs": procs, "lease_bucket": env["DROVER_HA__LEASE_BUCKET"]}
    try:
        yield cluster, info
    finally:
        for proc in procs.values():
            await asyncio.to_thread(proc.stop, signal.SIGKILL)
        await asyncio.to_thread(cluster.stop)


async def test_standby_takes_over_when_the_leader_is_killed(
    two_control_planes: tuple[InProcessCluster, dict], tap_nc: nats.NATS
) -> None:
    cluster, info = two_control_planes
    procs: dict[str, ControlProcess] = info["procs"]
    by_pid = {p.proc.pid: p for p in procs.values()}
    for name in ("h2-a", "h2-b", "h2-c"):
        await asyncio.to_thread(cluster.add_engine, MigratableSimEngine(name, num_blocks=256, max_model_len=1024))
    leader_pid = await wait_for_leader(tap_nc, info["lease_bucket"], set(by_pid))
    async with DroverClient(cluster.url, name="ha-two") as client:
        await client.wait_for_instances(3, timeout_s=60)
        n = 300
        streams = {
            f"h2-{i}": await client.submit(
                f"two {i}", sampling=SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"h2-{i}"
            )
            for i in range(3)
        }
        for stream in streams.values():
            await wait_tokens(stream, 5)
        before = await client.status()
        assert {r.request_id for r in before.requests} == set(streams)

        by_pid[leader_pid].proc.send_signal(signal.SIGKILL)  # no lease release, no state flush
        await asyncio.to_thread(by_pid[leader_pid].proc.wait, 10)
        await asyncio.sleep(0.3)  # the server has seen the connection go
        # Submitted while nobody leads: NATS answers "no responders" and the client sends it again.
        during = await client.submit("during takeover", max_tokens=8, request_id="h2-during")
        new_pid = await wait_for_leader(tap_nc, info["lease_bucket"], set(by_pid), not_pid=leader_pid)
        assert by_pid[new_pid].proc.poll() is None
        await wait_until_served(client)

        # The new leader serves new requests and knows the running ones.
        fresh = await client.generate("after takeover", max_tokens=8, request_id="h2-fresh")
        assert fresh.token_ids == expected("h2-fresh", 8)
        assert (await during.result()).token_ids == expected("h2-during", 8)
        after = await client.status()
        running = {r.request_id: r.instance_id for r in after.requests}
        unfinished = [rid for rid, s in streams.items() if len(s.result_data.token_ids) < n]
        assert set(unfinished) <= set(running)

        # Failover of a dead engine still works under the new leader.
        victim = next(running[rid] for rid in unfinished if running.get(rid))
        assert victim is not None
        on_victim = {rid for rid, inst in running.items() if inst == victim}
        await asyncio.to_thread(cluster.crash_engine, victim)
        for rid, stream in streams.items():
            result = await stream.result()
            assert result.token_ids == expected(rid, n)
            assert result.done is not None
            if rid in on_victim:
                assert result.done.instances[-1] != victim


async def test_sigterm_on_the_leader_hands_over(
    two_control_planes: tuple[InProcessCluster, dict], tap_nc: nats.NATS
) -> None:
    cluster, info = two_control_planes
    procs: dict[str, ControlProcess] = info["procs"]
    by_pid = {p.proc.pid: p for p in procs.values()}
    await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("h3-a", num_blocks=256, max_model_len=1024))
    leader_pid = await wait_for_leader(tap_nc, info["lease_bucket"], set(by_pid))
    async with DroverClient(cluster.url, name="ha-term") as client:
        await client.wait_for_instances(1, timeout_s=60)
        stream = await client.submit("term", sampling=SamplingParams(max_tokens=200, ignore_eos=True), request_id="h3")
        await wait_tokens(stream, 5)
        leader = by_pid[leader_pid]
        await asyncio.to_thread(leader.stop, signal.SIGTERM)
        assert leader.proc.returncode == 0  # a clean exit
        new_pid = await wait_for_leader(tap_nc, info["lease_bucket"], set(by_pid), not_pid=leader_pid)
        assert by_pid[new_pid].proc.poll() is None
        await wait_until_served(client)
        status = await client.status()
        assert "h3" in {r.request_id for r in status.requests} or stream.result_data.done is not None
        result = await stream.result()
        assert result.token_ids == expected("h3", 200)
        fresh = await client.generate("after handover", max_tokens=4, request_id="h3-fresh")
        assert fresh.token_ids == expected("h3-fresh", 4)


async def test_migration_in_flight_when_the_leader_dies_is_released(
    nats_url: str, tmp_path: object, tap_nc: nats.NATS
) -> None:
    """SIGKILL the control plane mid-copy: the next leader releases the destination's reservation and the
    source's side; the request goes on where it was, exactly once, and no block is leaked."""
    env = _control_env(uuid.uuid4().hex[:8])
    cluster = await asyncio.to_thread(_cluster, nats_url, control=False)
    first = ControlProcess(nats_url, env, f"{tmp_path}/control-first.log")  # type: ignore[str-bytes-safe]
    second: ControlProcess | None = None
    try:
        for name in ("hm-a", "hm-b"):  # a slow modelled link: the first copy stage takes seconds
            engine = MigratableSimEngine(name, num_blocks=256, max_model_len=2048, transfer_bytes_per_s=2e8)
            await asyncio.to_thread(cluster.add_engine, engine)
        await wait_for_leader(tap_nc, env["DROVER_HA__LEASE_BUCKET"], {first.proc.pid})
        async with DroverClient(cluster.url, name="ha-mig") as client:
            await client.wait_for_instances(2, timeout_s=60)
            idle = {i.info.instance_id: i.load.num_free_blocks for i in (await client.status()).instances}
            n = 300
            stream = await client.submit(
                "m" * 1500, sampling=SamplingParams(max_tokens=n, ignore_eos=True), request_id="hm"
            )
            await wait_tokens(stream, 3)
            source = next(r.instance_id for r in (await client.status()).requests if r.request_id == "hm")
            destination = "hm-b" if source == "hm-a" else "hm-a"
            migrate = asyncio.create_task(client.migrate("hm", destination, timeout_s=30))
            for _ in range(100):  # until the destination holds the reservation
                status = await client.status()
                dst = next(i for i in status.instances if i.info.instance_id == destination)
                if dst.load.num_free_blocks < idle[destination]:
                    break
                await asyncio.sleep(0.05)
            assert dst.load.num_free_blocks < idle[destination]
            first.proc.send_signal(signal.SIGKILL)
            migrate.cancel()
            second = ControlProcess(nats_url, env, f"{tmp_path}/control-second.log")  # type: ignore[str-bytes-safe]
            await wait_for_leader(tap_nc, env["DROVER_HA__LEASE_BUCKET"], {second.proc.pid})
            await wait_until_served(client)
            result = await stream.result()
            assert result.token_ids == expected("hm", n)  # every token once, in order
            assert result.done is not None and result.done.instances == [source]  # never moved, never re-run
            for _ in range(100):
                status = await client.status()
                free = {i.info.instance_id: i.load.num_free_blocks for i in status.instances}
                if free == idle and not status.requests:
                    break
                await asyncio.sleep(0.1)
            assert free == idle  # the reservation and the source's copy state are gone
            assert not status.requests
    finally:
        for proc in (first, second):
            if proc is not None:
                await asyncio.to_thread(proc.stop, signal.SIGKILL)
        await asyncio.to_thread(cluster.stop)
