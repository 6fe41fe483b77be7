"""Prefill/decode disaggregation live, on sim engines over a real nats-server with the in-process control
plane (one per test: one control plane per NATS server at a time):

* the handoff starts on the engine's first-token event, not on the prefill instance's next heartbeat;
* the migrator's reservation keeps up with a source that decodes several blocks while the destination sets
  up each reservation (the race that made vLLM-CPU's tiny model abort its handoffs at the default headroom).
"""

from __future__ import annotations

import asyncio
import uuid

import nats
from nats.aio.msg import Msg

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import EngineFirstToken, InstanceHeartbeat, Message, MigrateIn, RequestDone, TokenChunk, decode

MAX_TOKENS = 100


async def test_handoff_starts_on_the_first_token_with_the_prefill_heartbeat_stalled(nats_url: str) -> None:
    """The prefill instance stops beating once the fleet is up (its heartbeat thread is stopped before the
    request is submitted; the stale timeout is hours), so no report of it can list the request: the handoff
    can only come from the first-token event. On the wire, in order: the first token, then the decode
    instance's reservation, and no heartbeat of the prefill instance lists the request; it ends on the decode
    instance with every token sent once."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "scheduler": {"instance_stale_after_s": 7200.0},
            "pd": {"mode": "disaggregated"},
            "policy": {"migration_enabled": False},  # only handoffs move requests
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    events: list[tuple[str, Message]] = []
    tap = await nats.connect(nats_url)
    try:
        hosts = {}
        for name, phase in (("ft-p", "prefill"), ("ft-d", "decode")):
            engine = MigratableSimEngine(name, num_blocks=512, max_model_len=1024, time_scale=1.0)
            hosts[name] = cluster.add_engine(engine)
            hosts[name].heartbeater.phase = phase
        async with DroverClient(cluster.url, name="ft-client") as client:
            await client.wait_for_instances(2, timeout_s=20)
            for _ in range(400):  # both report their phase
                status = await client.status()
                if sorted(i.phase for i in status.instances) == ["decode", "prefill"]:
                    break
                await asyncio.sleep(0.05)
            assert sorted(i.phase for i in status.instances) == ["decode", "prefill"]

            async def record(msg: Msg) -> None:
                events.append((msg.subject, decode(msg.data)))

            for subject in (subjects.heartbeat("ft-p"), subjects.engine("ft-d"), subjects.ENGINE_EVENTS):
                await tap.subscribe(subject, cb=record)
            await tap.flush()
            await asyncio.to_thread(hosts["ft-p"].heartbeater.stop)  # joined: no beat is made from here on
            mark = len(events)

            stream = await client.submit("f" * 200, max_tokens=MAX_TOKENS, request_id="ft-0")
            seen: list[Message] = []

            async def inbox(msg: Msg) -> None:
                seen.append(decode(msg.data))

            assert stream._subscription is not None
            await tap.subscribe(stream._subscription.subject, cb=inbox)
            result = await stream.result()
            for _ in range(100):  # the tap's copy of the done
                if any(isinstance(m, RequestDone) for m in seen):
                    break
                await asyncio.sleep(0.05)

        after = events[mark:]
        first = next(i for i, (_, m) in enumerate(after) if isinstance(m, EngineFirstToken) and m.request_id == "ft-0")
        reserve = next(i for i, (_, m) in enumerate(after) if isinstance(m, MigrateIn) and m.op == "reserve")
        assert first < reserve
        beats = [m for _, m in events if isinstance(m, InstanceHeartbeat) and m.info.instance_id == "ft-p"]
        assert not any(r.request_id == "ft-0" for b in beats for r in b.load.running)  # no report listed it
        assert result.done is not None and result.done.instances == ["ft-p", "ft-d"]
        assert result.done.num_tokens == MAX_TOKENS
        chunks = sorted((m for m in seen if isinstance(m, TokenChunk)), key=lambda c: c.index)
        assert [c.index + k for c in chunks for k in range(len(c.token_ids))] == list(range(MAX_TOKENS))
        assert sum(isinstance(m, RequestDone) for m in seen) == 1
    finally:
        await tap.drain()
        await asyncio.to_thread(cluster.stop)


async def test_the_reservation_keeps_up_with_what_the_source_decodes_during_the_copy(nats_url: str) -> None:
    """The decode instance takes 3 modelled seconds to set up or grow a reservation (vLLM's goes through its
    worker), and the prefill instance decodes several 32-token blocks meanwhile, more than the default
    headroom of 2. The reservation grows with what the request wrote during the last round, so the copy is
    never refused: the request moves (with the old fixed headroom every try was refused and it stayed), its
    tokens reach the client once and in order, and no block leaks."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "pd": {"mode": "disaggregated"},
            "policy": {"migration_enabled": False, "max_stages": 2},  # bounded rounds: each waits for a reserve
        }
    )
    assert settings.migration.reserve_headroom_blocks == 2  # the default is what is tested
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    tap = await nats.connect(nats_url)
    try:
        for name, phase, latency in (("hr-p", "prefill", 0.0), ("hr-d", "decode", 3.0)):
            engine = MigratableSimEngine(
                name, num_blocks=512, max_model_len=2048, time_scale=0.1, reserve_latency_s=latency
            )
            cluster.add_engine(engine).heartbeater.phase = phase
        async with DroverClient(cluster.url, name="hr-client") as client:
            await client.wait_for_instances(2, timeout_s=20)
            before: dict[str, int] = {}
            for _ in range(400):  # both report their phase, idle
                status = await client.status()
                if sorted(i.phase for i in status.instances) == ["decode", "prefill"]:
                    before = {i.info.instance_id: i.load.num_free_blocks for i in status.instances}
                    break
                await asyncio.sleep(0.05)
            assert before
            seen: list[Message] = []
            stream = await client.submit("h" * 200, max_tokens=1500, request_id="hr-0")

            async def inbox(msg: Msg) -> None:
                seen.append(decode(msg.data))

            assert stream._subscription is not None
            await tap.subscribe(stream._subscription.subject, cb=inbox)
            result = await stream.result()
            assert result.done is not None and result.done.instances == ["hr-p", "hr-d"], result.done
            assert result.done.num_tokens == 1500
            for _ in range(100):
                if any(isinstance(m, RequestDone) for m in seen):
                    break
                await asyncio.sleep(0.05)
            chunks = sorted((m for m in seen if isinstance(m, TokenChunk)), key=lambda c: c.index)
            assert [c.index + k for c in chunks for k in range(len(c.token_ids))] == list(range(1500))
            for _ in range(200):  # engines report every 0.05 s: wait until both are idle again
                status = await client.status()
                after = {i.info.instance_id: i.load.num_free_blocks for i in status.instances}
                if after == before:
                    break
                await asyncio.sleep(0.05)
            assert after == before  # no block leaked on either side
    finally:
        await tap.drain()
        await asyncio.to_thread(cluster.stop)


async def test_phase_overrides_outlive_a_control_plane_restart(nats_url: str) -> None:
    """Both engines report `both`; an operator sets prefill and decode; a fresh control plane (the old one
    stopped) reads them back from the state bucket, and a request is handed off as before the restart."""
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "pd": {"mode": "disaggregated"},
            "policy": {"migration_enabled": False},
            "ha": {"state_bucket": f"pd_state_{suffix}", "lease_bucket": f"pd_lease_{suffix}"},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    try:
        for name in ("ph-a", "ph-b"):
            cluster.add_engine(MigratableSimEngine(name, num_blocks=512, max_model_len=1024, time_scale=1.0))
        async with DroverClient(cluster.url, name="ph-client") as client:
            await client.wait_for_instances(2, timeout_s=20)
            assert (await client.set_phase("ph-a", "prefill")).ok
            assert (await client.set_phase("ph-b", "decode")).ok
        await asyncio.to_thread(cluster.restart_control)
        async with DroverClient(cluster.url, name="ph-client-2") as client:
            await client.wait_for_instances(2, timeout_s=20)
            phases: dict[str, str] = {}
            for _ in range(200):  # both heartbeat to the new control plane
                status = await client.status()
                phases = {i.info.instance_id: i.phase for i in status.instances if i.state == "serving"}
                if len(phases) == 2:
                    break
                await asyncio.sleep(0.05)
            assert phases == {"ph-a": "prefill", "ph-b": "decode"}
            result = await client.generate("r" * 200, max_tokens=MAX_TOKENS, request_id="ph-0")
            assert result.done is not None and result.done.instances == ["ph-a", "ph-b"]
    finally:
        await asyncio.to_thread(cluster.stop)
