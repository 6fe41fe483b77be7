"""KunServe live: torch engines on real NATS form a group (layer drop, live KV exchange, pipelined serving)
and restore, through the control plane; a member dying while pipelined ends the group.

Every check reads the raw TokenChunks of the client's inbox: each output index arrives exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from actors.local_cluster import InProcessCluster
from actors.memory_manager import memory_params
from control.client import DroverClient, RequestStream
from control.core.record import DecisionLog
from control.settings import load_settings
from engines.tiny_model import TINY, ensure_model
from engines.tokenizer import ByteTokenizer
from engines.torch.config import LlamaConfig
from engines.torch.migration import MigratableTorchEngine
from tests.parity.replays import replay_memory
from transport.messages import SamplingParams, TokenChunk, decode
from transport.nats_server import EmbeddedNatsServer

NUM_BLOCKS = 64
BLOCK_SIZE = 32
PROMPT = "Drover is a control plane for LLM serving clusters; KunServe drops layers under bursts."
LONG = SamplingParams(max_tokens=1200, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("DROVER_TEST_MODEL_CACHE")
    return ensure_model(Path(cache) if cache else tmp_path_factory.getbasetemp() / "torch-models", TINY)


def _settings(nats_url: str, stale_after_s: float = 1.0) -> object:
    """``stale_after_s``: short where a test kills an engine; the default (5 s) where none dies, so that a
    heavily loaded machine's late heartbeats fail nothing over and each request stays where the test put it."""
    return load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": stale_after_s},
            "policy": {"migration_enabled": False},
            "memory": {"auto": False},  # the tests force every drop and restore
        }
    )


def _engine(name: str, model_dir: Path) -> MigratableTorchEngine:
    return MigratableTorchEngine(
        name, model_dir, model_name="drover-tiny", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_model_len=2048
    )


class ChunkLog:
    """Every TokenChunk sent to a client's inboxes, by request (a second connection, so nothing is deduplicated)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[TokenChunk]] = defaultdict(list)
        self._nc: nats.aio.client.Client | None = None

    async def start(self, url: str, inbox_prefix: str) -> ChunkLog:
        self._nc = await nats.connect(url)

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            message = decode(msg.data)
            if isinstance(message, TokenChunk):
                self.chunks[message.request_id].append(message)

        await self._nc.subscribe(f"{inbox_prefix}.>", cb=on_message)
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()

    async def assert_exactly_once(self, request_id: str, tokens: list[int]) -> set[str]:
        """Chunk indices tile [0, len(tokens)) with no overlap and carry these tokens; returns the instances.
        First waits (a while) for the last chunk: this connection may see it after the client's does."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not any(
            c.index + len(c.token_ids) >= len(tokens) for c in self.chunks[request_id]
        ):
            await asyncio.sleep(0.02)
        covered: list[int | None] = [None] * len(tokens)
        for chunk in self.chunks[request_id]:
            for offset, token in enumerate(chunk.token_ids):
                index = chunk.index + offset
                assert index < len(tokens), f"{request_id}: token index {index} beyond {len(tokens)}"
                assert covered[index] is None, f"{request_id}: token index {index} delivered twice"
                covered[index] = token
        assert covered == tokens, f"{request_id}: a gap or a wrong token"
        return {c.instance_id for c in self.chunks[request_id]}


async def _until_tokens(stream: RequestStream, count: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= count:
            return


async def _until(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


# ------------------------------------------------------------------------------------------ drop and restore
@pytest.fixture(scope="module")
def cluster(nats_url: str, model_dir: Path) -> Iterator[InProcessCluster]:
    c = InProcessCluster(settings=_settings(nats_url, 5.0), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    c.start_control()
    for name in ("ks-a", "ks-b"):
        c.add_engine(_engine(name, model_dir))
    yield c
    c.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    drover = await DroverClient(cluster.url, name="kunserve-live").connect()
    await drover.wait_for_instances(2, timeout_s=30)
    yield drover
    await drover.close()


async def test_stream_across_forced_drop_and_restore_is_exact(
    cluster: InProcessCluster, client: DroverClient, span_exporter: object
) -> None:
    expected = (await client.generate(PROMPT, sampling=LONG)).token_ids  # saw neither drop nor restore
    log = await ChunkLog().start(cluster.url, client.inbox_prefix)
    try:
        stream = await client.submit(PROMPT, sampling=LONG, request_id="ks-live")
        await _until_tokens(stream, 20)
        status = await client.status()
        leader = next(r.instance_id for r in status.requests if r.request_id == "ks-live")
        assert leader is not None
        member = "ks-b" if leader == "ks-a" else "ks-a"

        dropped = await client.memory("drop", f"{leader},{member}")
        assert dropped.ok, dropped.message
        assert dropped.details["moved_requests"] >= 1  # the running request's KV crossed: live exchange
        assert dropped.details["moved_kv_bytes"] > 0
        assert dropped.details["kv_blocks_after"] > dropped.details["kv_blocks_before"]
        group_id = dropped.details["group_id"]

        async def group_visible() -> bool:
            st = await client.status()
            return any(g.group_id == group_id and g.extra_kv_blocks > 0 for g in st.groups)

        await _until(group_visible)
        st = await client.status()
        (group,) = st.groups
        assert group.members == [leader, member] and group.layer_ranges == [[0, 2], [2, 4]]
        assert group.state == "pipelined"
        leader_engine = cluster.hosts[leader].engine
        assert isinstance(leader_engine, MigratableTorchEngine)
        assert leader_engine.role == "leader" and leader_engine.stage.layer_range == (0, 2)

        before_restore = len(stream.result_data.token_ids)
        await _until_tokens(stream, before_restore + 30)  # decoding as a pipeline
        restored = await client.memory("restore", group_id)
        assert restored.ok, restored.message
        assert restored.details["moved_requests"] >= 1  # KV of layers 2-3 came back to the leader
        assert not (await client.status()).groups

        result = await stream.result()
        assert result.token_ids == expected
        assert await log.assert_exactly_once("ks-live", result.token_ids) == {leader}
        assert result.done is not None and result.done.instances == [leader]

        # No KV block leaked: both engines are whole again, every block free, pools at their home size.
        for name in (leader, member):
            engine = cluster.hosts[name].engine
            assert isinstance(engine, MigratableTorchEngine)
            await _until(_idle(engine))
            assert engine.role == "standalone" and engine.stage.layer_range == (0, 4)
            assert engine.allocator.num_blocks == NUM_BLOCKS == engine.allocator.num_free
            assert engine.stage.num_blocks == NUM_BLOCKS
        from observability.metrics import metrics

        exposition = metrics().render().decode()
        for name in ("drover_memory_events", "drover_memory_exchange_bytes", "drover_memory_freed_weight_bytes"):
            assert name in exposition
        names = {s.name for s in span_exporter.get_finished_spans()}
        assert {"drover.memory.drop", "drover.memory.restore", "drover.memory.exchange"} <= names
        assert {"drover.memory.group.join", "drover.memory.group.lead", "drover.memory.group.dissolve"} <= names
    finally:
        await log.close()


def _idle(engine: MigratableTorchEngine) -> object:
    async def check() -> bool:
        return not engine.scheduler.has_work

    return check


async def test_a_joining_members_request_keeps_its_kv_as_in_the_simulator(
    cluster: InProcessCluster, client: DroverClient
) -> None:
    """Parity (b) for the join: one request decoding on each instance, then "form a group, ks-a leads". The
    member's request moves into the group with its KV (parked at ``join``, taken in at ``lead``) and goes on
    there: nothing recomputed or preempted, the tokens of a solo run, each once. The memory simulator's shell,
    given the same commands, makes the same decision (``tests/parity/join.py``)."""
    from tests.parity.join import simulated_join

    expected = (await client.generate(PROMPT, sampling=LONG)).token_ids
    log = await ChunkLog().start(cluster.url, client.inbox_prefix)
    leader, member = "ks-a", "ks-b"
    engines: dict[str, MigratableTorchEngine] = {}
    for name in (leader, member):
        engine = cluster.hosts[name].engine
        assert isinstance(engine, MigratableTorchEngine)
        engines[name] = engine
    preemptions = {name: e.scheduler.num_preemptions for name, e in engines.items()}
    counters = dict(engines[leader].group_counters)
    try:
        streams = []
        for i, other in enumerate((member, leader)):
            await client.drain(other)  # pins the request to the other instance
            streams.append(await client.submit(PROMPT, sampling=LONG, request_id=f"ks-join-{i}"))
            await _until_tokens(streams[-1], 10)
            await client.drain(other, undo=True)
        status = await client.status()
        assert {r.request_id: r.instance_id for r in status.requests} == {"ks-join-0": leader, "ks-join-1": member}
        dropped = await client.memory("drop", f"{leader},{member}")
        assert dropped.ok, dropped.message
        assert dropped.details["evicted"] == []
        assert dropped.details["handed"] == dropped.details["kept"] == ["ks-join-1"]
        assert dropped.details["moved_requests"] == 1 and dropped.details["adopted_requests"] == 1
        where = {r.request_id: r.instance_id for r in (await client.status()).requests}
        results = [await s.result() for s in streams]
        assert [r.token_ids for r in results] == [expected, expected]
        assert await log.assert_exactly_once("ks-join-0", results[0].token_ids) == {leader}
        assert await log.assert_exactly_once("ks-join-1", results[1].token_ids) == {member, leader}
        assert results[1].done is not None and results[1].done.instances == [member, leader]
        adopted = engines[leader].group_counters["kv_adopted"] - counters["kv_adopted"]
        recomputed = engines[leader].group_counters["kv_recomputed"] - counters["kv_recomputed"]
        preempted = {n: e.scheduler.num_preemptions - preemptions[n] for n, e in engines.items()}
        assert (adopted, recomputed, preempted) == (1, 0, {leader: 0, member: 0})
        live = {
            "leader": ("group" if where["ks-join-0"] == leader else "elsewhere", preempted[leader] == 0),
            "member": ("group" if where["ks-join-1"] == leader else "elsewhere", adopted == 1 and recomputed == 0),
        }
        assert live == simulated_join()
        restored = await client.memory("restore", dropped.details["group_id"])
        assert restored.ok, restored.message
        for engine in engines.values():
            assert isinstance(engine, MigratableTorchEngine)
            await _until(_idle(engine))
            assert (
                engine.role == "standalone" and engine.allocator.num_blocks == NUM_BLOCKS == engine.allocator.num_free
            )
    finally:
        await log.close()


async def test_bad_memory_commands_get_clear_errors(client: DroverClient) -> None:
    from control.client import DroverError

    with pytest.raises(DroverError, match="not a live torch instance"):
        await client.memory("drop", "no-such-instance")
    with pytest.raises(DroverError, match="no group"):
        await client.memory("restore", "g-nothing")
    with pytest.raises(DroverError, match="unknown memory op"):
        await client.memory("shrink", "ks-a")


def test_drover_memory_cli_drops_shows_and_restores(cluster: InProcessCluster) -> None:
    from typer.testing import CliRunner

    from control.apps.cli import app

    def drover(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["--nats-url", cluster.url, *args])
        return result.exit_code, result.output

    # The memory manager sees groups through heartbeats: right after the previous test's restore, the last
    # beat may still show the group for a moment (eventually consistent), so wait for a fresh one.
    deadline = time.monotonic() + 10
    code, out = drover("memory", "drop", "ks-a")  # one id: it leads, the freest compatible instance joins
    while code != 0 and "already in a group or draining" in out and time.monotonic() < deadline:
        time.sleep(0.25)
        code, out = drover("memory", "drop", "ks-a")
    assert code == 0, out
    assert "2-stage pipeline" in out and "ks-b" in out
    code, out = drover("status")
    assert code == 0, out
    assert "memory groups" in out and "pipelined" in out and "[0,2)" in out and "[2,4)" in out
    code, out = drover("memory", "drop", "ks-b")
    assert code == 1 and "already in a group" in out
    code, out = drover("memory", "restore", "ks-b")  # any member names its group
    assert code == 0, out
    assert "restored" in out
    code, out = drover("memory", "restore", "ks-b")
    assert code == 1 and "no group" in out


# ------------------------------------------------------------------------------------------ member failure
def _spawn_member(nats_url: str, model_dir: Path, name: str) -> subprocess.Popen[bytes]:
    """A torch engine in its own process (`drover engine serve --kind torch`), same pool as the others."""
    config = LlamaConfig.from_model_dir(model_dir)
    gib = NUM_BLOCKS * config.kv_block_bytes(config.num_layers, BLOCK_SIZE, 4) / 2**30
    env = {
        **os.environ,
        "DROVER_MODEL__PATH": str(model_dir),
        "DROVER_ENGINE__KV_CACHE_GIB": repr(gib),
        "DROVER_ENGINE__BLOCK_SIZE": str(BLOCK_SIZE),
        "DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.05",
        "DROVER_OBSERVABILITY__EXPORTER": "none",
    }
    command = [sys.executable, "-m", "control.apps.cli", "--nats-url", nats_url, "engine", "serve"]
    return subprocess.Popen([*command, "--instance-id", name, "--kind", "torch"], env=env)


@pytest.fixture
def own_nats() -> Iterator[str]:
    """A server of its own: this module's other cluster would share the control-plane queue group."""
    server = EmbeddedNatsServer()
    server.start()
    yield server.url
    server.stop()


async def test_member_process_dying_while_pipelined_ends_the_group(own_nats: str, model_dir: Path) -> None:
    nats_url = own_nats
    c = InProcessCluster(settings=_settings(nats_url), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    await asyncio.to_thread(c.start_control)
    member = _spawn_member(nats_url, model_dir, "ks-proc")
    drover = await DroverClient(c.url, name="kunserve-fail").connect()
    log = await ChunkLog().start(c.url, drover.inbox_prefix)
    try:
        await drover.wait_for_instances(1, timeout_s=60)  # the process first: it takes no request before the drop
        await asyncio.to_thread(c.add_engine, _engine("ks-lead", model_dir))
        await drover.wait_for_instances(2, timeout_s=30)
        expected = (await drover.generate(PROMPT, sampling=LONG)).token_ids
        await drover.drain("ks-proc")  # every request starts on the in-process leader
        streams = [await drover.submit(PROMPT, sampling=LONG, request_id=f"ks-f-{i}") for i in range(2)]
        for stream in streams:
            await _until_tokens(stream, 10)
        await drover.drain("ks-proc", undo=True)
        dropped = await drover.memory("drop", "ks-lead,ks-proc")
        assert dropped.ok, dropped.message
        assert dropped.details["moved_requests"] == 2, dropped.details
        await _until_tokens(streams[0], len(streams[0].result_data.token_ids) + 20)  # pipelined across processes

        member.send_signal(signal.SIGKILL)  # the member dies mid-pipeline
        await asyncio.to_thread(member.wait, 10)
        results = [await s.result() for s in streams]
        for i, result in enumerate(results):
            assert result.token_ids == expected
            assert await log.assert_exactly_once(f"ks-f-{i}", result.token_ids) == {"ks-lead"}
            assert result.done is not None and result.done.instances == ["ks-lead", "ks-lead"]  # evicted, resumed

        async def ended() -> bool:
            st = await drover.status()
            return not st.groups and {i.info.instance_id for i in st.instances} == {"ks-lead"}

        await _until(ended)
        leader = c.hosts["ks-lead"].engine
        assert isinstance(leader, MigratableTorchEngine)
        assert leader.role == "standalone" and leader.stage.layer_range == (0, 4)
        assert leader.allocator.num_blocks == NUM_BLOCKS == leader.allocator.num_free
    finally:
        await log.close()
        await drover.close()
        if member.poll() is None:
            member.kill()
            member.wait(10)
        await asyncio.to_thread(c.stop)


async def test_leader_process_dying_while_pipelined_fails_over_to_the_member(own_nats: str, model_dir: Path) -> None:
    """The leader (another process) dies: its requests fail over (read back from the output stream, resumed
    after the delivered tokens) to the member, which restores its layers once the group is declared over."""
    c = InProcessCluster(settings=_settings(own_nats), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    await asyncio.to_thread(c.start_control)
    leader = _spawn_member(own_nats, model_dir, "ks-plead")
    drover = await DroverClient(c.url, name="kunserve-lead-fail").connect()
    log = await ChunkLog().start(c.url, drover.inbox_prefix)
    try:
        await drover.wait_for_instances(1, timeout_s=60)
        await asyncio.to_thread(c.add_engine, _engine("ks-mem", model_dir))
        await drover.wait_for_instances(2, timeout_s=30)
        expected = (await drover.generate(PROMPT, sampling=LONG)).token_ids
        await drover.drain("ks-mem")  # every request starts on the leader process
        streams = [await drover.submit(PROMPT, sampling=LONG, request_id=f"ks-l-{i}") for i in range(2)]
        for stream in streams:
            await _until_tokens(stream, 10)
        await drover.drain("ks-mem", undo=True)
        dropped = await drover.memory("drop", "ks-plead,ks-mem")
        assert dropped.ok, dropped.message
        await _until_tokens(streams[0], len(streams[0].result_data.token_ids) + 20)

        leader.send_signal(signal.SIGKILL)
        await asyncio.to_thread(leader.wait, 10)
        results = [await s.result() for s in streams]
        for i, result in enumerate(results):
            assert result.token_ids == expected
            assert await log.assert_exactly_once(f"ks-l-{i}", result.token_ids) == {"ks-plead", "ks-mem"}
            assert result.done is not None and result.done.instances == ["ks-plead", "ks-mem"]

        async def ended() -> bool:
            st = await drover.status()
            return not st.groups and {i.info.instance_id for i in st.instances} == {"ks-mem"}

        await _until(ended)
        member = c.hosts["ks-mem"].engine
        assert isinstance(member, MigratableTorchEngine)
        await _until(_idle(member))
        assert member.role == "standalone" and member.stage.layer_range == (0, 4)
        assert member.allocator.num_blocks == NUM_BLOCKS == member.allocator.num_free
    finally:
        await log.close()
        await drover.close()
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)
        await asyncio.to_thread(c.stop)


# ------------------------------------------------------------------------------------------ automatic
async def test_burst_triggers_a_drop_and_the_group_restores_when_it_is_over(own_nats: str, model_dir: Path) -> None:
    """memory.auto: the scheduler's memory manager sees the trigger (KV use >= 95 %, queue >= free blocks),
    forms a group by itself, and restores once the burst is served; every stream is exact and whole."""
    settings = load_settings(
        overrides={
            "nats": {"url": own_nats},
            "engine": {"heartbeat_interval_s": 0.05},
            "policy": {"migration_enabled": False},
            "memory": {"auto": True, "max_group_size": 2, "min_group_s": 0.5, "cooldown_s": 60.0},
        }
    )
    c = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    decisions = DecisionLog()
    await asyncio.to_thread(c.start_control, decisions)
    small = 12  # blocks of 32 tokens: a 290-token request takes 10
    for name in ("ks-x", "ks-y"):
        engine = MigratableTorchEngine(
            name, model_dir, model_name="drover-tiny", block_size=BLOCK_SIZE, num_blocks=small, max_model_len=2048
        )
        await asyncio.to_thread(c.add_engine, engine)
    drover = await DroverClient(c.url, name="kunserve-auto").connect()
    log = await ChunkLog().start(c.url, drover.inbox_prefix)
    try:
        await drover.wait_for_instances(2, timeout_s=30)
        sampling = SamplingParams(max_tokens=200, ignore_eos=True)
        texts = [PROMPT, PROMPT[::-1]]
        expected = [(await drover.generate(text, sampling=sampling)).token_ids for text in texts]  # alone: no drop
        assert not (await drover.status()).groups
        streams = [await drover.submit(texts[i % 2], sampling=sampling, request_id=f"ks-auto-{i}") for i in range(8)]
        seen_groups: list[list[str]] = []

        async def watch() -> None:
            while True:
                st = await drover.status()
                seen_groups.extend(g.members for g in st.groups if g.state == "pipelined")
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        results = [await s.result() for s in streams]
        for i, result in enumerate(results):
            assert result.token_ids == expected[i % 2]
            await log.assert_exactly_once(f"ks-auto-{i}", result.token_ids)

        async def restored() -> bool:
            return not (await drover.status()).groups

        await _until(restored)
        watcher.cancel()
        assert seen_groups, "no group formed under the burst"
        assert sorted(seen_groups[0]) == ["ks-x", "ks-y"]
        for name in ("ks-x", "ks-y"):
            engine = c.hosts[name].engine
            assert isinstance(engine, MigratableTorchEngine)
            await _until(_idle(engine))
            assert engine.role == "standalone" and engine.stage.layer_range == (0, 4)
            assert engine.allocator.num_blocks == small == engine.allocator.num_free
        # Parity (a): the memory manager's polls and group lifetimes, replayed through the memory simulator's
        # hysteresis (tests/parity/replays.py), order the same drops and restores; deviating replays are caught.
        entries = decisions.entries()
        commands = [d.output for d in entries if d.what == "memory_poll"]
        assert any(c.drops for c in commands) and any(c.restores for c in commands)
        params = memory_params(settings.memory)
        assert replay_memory(entries, params) == []
        assert replay_memory(entries, params, "skip_formed")
        assert replay_memory(entries, dataclasses.replace(params, min_group_s=1e9))  # a flipped threshold
    finally:
        await log.close()
        await drover.close()
        await asyncio.to_thread(c.stop)


def test_status_shows_groups_with_layer_ranges_and_extra_blocks() -> None:
    from rich.console import Console

    from control.apps.cli_memory import groups_table
    from transport.messages import GroupStatus, StatusReply

    st = StatusReply(
        instances=[],
        requests=[],
        queued=0,
        dispatch_policy="freeness",
        groups=[
            GroupStatus(
                group_id="g-1", members=["a", "b"], layer_ranges=[[0, 2], [2, 4]], state="pipelined", extra_kv_blocks=37
            )
        ],
    )
    console = Console(width=200, record=True)
    console.print(groups_table(st))
    text = console.export_text()
    assert "g-1" in text and "a:[0,2) b:[2,4)" in text and "37" in text and "pipelined" in text
