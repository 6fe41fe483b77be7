"""The live scale-out / drain / scale-in cycle, shared by the sim-process and vLLM-process tests and the live
benchmark: a control plane whose autoscaler starts ``drover engine serve`` processes through the
LocalProcessProvisioner, a load that keeps requests in flight until the added instance has served, then
quiet until the autoscaler drained and stopped it. Every TokenChunk the client's inbox receives is recorded
raw, so callers check indices (no token lost, none duplicated)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from actors.control_plane import ControlPlane
from control.cli_autoscale import request_admin
from control.client import DroverClient, RequestResult
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.provisioning import LocalProcessProvisioner
from control.settings import Settings, load_settings
from engines.tokenizer import ByteTokenizer, Tokenizer
from transport.bus import Bus, BusOptions
from transport.messages import AutoscaleStatusQuery, AutoscaleStatusReply, SamplingParams, TokenChunk, decode


def cycle_settings(
    nats_url: str, kind: str, *, max_num_seqs: int = 2, extra: dict[str, dict[str, object]] | None = None
) -> Settings:
    """Autoscaler on, 1..2 interactive instances of ``kind``, short periods and windows (seconds, not minutes)."""
    overrides: dict[str, dict[str, object]] = {
        "nats": {"url": nats_url},
        "engine": {"kind": kind, "heartbeat_interval_s": 0.1, "max_num_seqs": max_num_seqs},
        "autoscaler": {"enabled": True, "stop_timeout_s": 60.0},
        "observability": {"exporter": "none"},
    }
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    settings = load_settings(overrides=overrides)
    params = AutoscaleParams(
        local=LocalParams(min_batch=1, initial_batch=max_num_seqs, max_batch=max_num_seqs, period_s=1.0),
        period_s=1.0,
        startup_s=5.0,
        min_instances=PerRole(1, 0, 0),
        max_instances=PerRole(2, 0, 0),
        max_total=2,
        mixed_share=0.0,
        scale_in_window_s=4.0,
        scale_in_cooldown_s=4.0,
    )
    return settings.model_copy(update={"autoscaling": params})


@dataclass
class TimelinePoint:
    at: float  # seconds since the cycle began
    instances: int
    serving: int
    queued: int
    in_flight: int


@dataclass
class CycleResult:
    results: list[RequestResult]
    chunks: dict[str, list[TokenChunk]]
    timeline: list[TimelinePoint]
    events: list[tuple[float, str, str, str]]  # (seconds since begin, action, instance, reason)
    startup_samples: list[float]
    added: str
    counts_seen: list[int] = field(default_factory=list)


async def record_chunks(url: str, inbox_prefix: str, into: dict[str, list[TokenChunk]]) -> nats.aio.client.Client:
    """Subscribe to a client's inboxes and keep every TokenChunk, as it arrives (duplicates included)."""
    nc = await nats.connect(url, name="chunk-recorder")

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        message = decode(msg.data)
        if isinstance(message, TokenChunk):
            into.setdefault(message.request_id, []).append(message)

    await nc.subscribe(f"{inbox_prefix}.>", cb=on_message)
    await nc.flush()
    return nc


def check_exactly_once(chunks: list[TokenChunk], expected_tokens: int) -> None:
    """The chunks' index ranges tile 0..expected_tokens-1 exactly: no gap, no overlap."""
    ordered = sorted(chunks, key=lambda c: c.index)
    position = 0
    for chunk in ordered:
        assert chunk.index == position, f"chunk at {chunk.index}, expected {position} (gap or duplicate)"
        position += len(chunk.token_ids)
    assert position == expected_tokens, f"{position} tokens streamed, expected {expected_tokens}"


async def run_cycle(
    settings: Settings,
    work_dir: Path,
    *,
    in_flight: int,
    max_tokens: int,
    ready_timeout_s: float,
    load_timeout_s: float,
    tokenizer: Tokenizer | None = None,
) -> CycleResult:
    """Run the whole cycle; raises AssertionError (with the timeline) when a phase times out."""
    assert settings.nats.url
    url = settings.nats.url
    provisioner = LocalProcessProvisioner(settings, work_dir)
    bus = Bus(BusOptions(url=url, name="drover-control")).start()
    plane = ControlPlane(settings, bus, tokenizer or ByteTokenizer(), provisioner=provisioner).start()
    begin = time.monotonic()
    timeline: list[TimelinePoint] = []
    chunks: dict[str, list[TokenChunk]] = {}
    results: list[RequestResult] = []
    prefix = settings.autoscaler.instance_prefix
    try:
        async with DroverClient(url, name=f"cycle-{int(time.time())}") as client:
            recorder = await record_chunks(url, client.inbox_prefix, chunks)

            async def sample() -> tuple[int, int]:
                status = await client.status()
                own = [i for i in status.instances if i.info.instance_id.startswith(prefix)]
                serving = [i for i in own if i.state == "serving"]
                timeline.append(
                    TimelinePoint(time.monotonic() - begin, len(own), len(serving), status.queued, len(status.requests))
                )
                return len(own), len(serving)

            async def wait(what: str, timeout_s: float, done: object) -> None:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    counts = await sample()
                    if done(*counts):  # type: ignore[operator]
                        return
                    await asyncio.sleep(0.25)
                raise AssertionError(f"timed out: {what}; timeline {timeline[-5:]}")

            await wait("the first instance (min_instances)", ready_timeout_s, lambda n, s: s == 1)
            first_ids = {i.instance_id for i in provisioner.instances()}

            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            pending: set[asyncio.Task[RequestResult]] = set()
            counter = 0
            added = ""
            deadline = time.monotonic() + load_timeout_s
            while time.monotonic() < deadline:
                while len(pending) < in_flight:
                    counter += 1
                    stream = await client.submit(f"cycle request {counter}", sampling=sampling)
                    pending.add(asyncio.create_task(stream.result()))
                finished, pending = await asyncio.wait(pending, timeout=0.25)
                results.extend(t.result() for t in finished)
                await sample()
                served_by_new = {c.instance_id for cs in chunks.values() for c in cs if c.instance_id not in first_ids}
                if served_by_new:
                    added = sorted(served_by_new)[0]
                    break
            if not added:
                raise AssertionError(f"no added instance served within {load_timeout_s:.0f} s; {timeline[-5:]}")
            if pending:
                results.extend(await asyncio.gather(*pending))
            await wait("drain and scale-in back to one instance", ready_timeout_s, lambda n, s: n == 1 and s == 1)
            await recorder.drain()
            reply = await request_admin(url, "autoscale", AutoscaleStatusQuery())
            assert isinstance(reply, AutoscaleStatusReply)
        offset = time.time() - (time.monotonic() - begin)  # wall time of the cycle's start
        events = [(e.at - offset, e.action, e.instance_id, e.reason) for e in reply.events]
        return CycleResult(
            results=results,
            chunks=chunks,
            timeline=timeline,
            events=events,
            startup_samples=provisioner.startup_samples(),
            added=added,
        )
    finally:
        await asyncio.to_thread(plane.stop)
        await asyncio.to_thread(bus.stop)
