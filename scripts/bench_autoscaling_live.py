"""Live autoscaling run: the AutoscalerActor adds an instance under load, then drains and removes it.

    python -m scripts.bench_autoscaling_live [--kind vllm|sim] [--in-flight 4] [--max-tokens 64] [--after 20]

A control plane (in this process) whose autoscaler starts ``drover engine serve`` processes through the
LocalProcessProvisioner, on an embedded nats-server: 1..2 interactive instances, local batch limit =
``--max-seqs`` (2), decisions every second, 4 s scale-in window and cooldown (short, so the run takes a
minute or two, not ten). The load keeps ``--in-flight`` requests in flight until the added instance has
served a token and ``--after`` seconds more, then stops; the run ends when the autoscaler has drained one
instance and stopped it. Prints the timeline (instances asked for / registered / serving, the scheduler's
queue, requests in flight), every scale event with its reason, the start-up times measured, and TTFT p50/p99
of requests submitted while one instance served vs after the added one served (same run). Every TokenChunk
the client receives is recorded raw and checked: no token lost, none duplicated.

The same cycle is the live test (tests/integration/test_autoscaling_live_sim.py, test_vllm_live_autoscaling.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from control.apps.cli_autoscale import request_admin
from control.apps.provisioning import LocalProcessProvisioner
from control.client import DroverClient, RequestResult
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.settings import Settings, load_settings
from engines.tokenizer import ByteTokenizer, Tokenizer
from transport.bus import Bus, BusOptions
from transport.messages import AutoscaleStatusQuery, AutoscaleStatusReply, SamplingParams, TokenChunk, decode
from transport.nats_server import EmbeddedNatsServer


def cycle_settings(
    nats_url: str, kind: str, *, max_num_seqs: int = 2, extra: dict[str, dict[str, object]] | None = None
) -> Settings:
    """Autoscaler on, 1..2 interactive instances of ``kind``, short periods and windows (seconds, not minutes)."""
    suffix = uuid.uuid4().hex[:8]  # control state of its own on a shared server (tests)
    overrides: dict[str, dict[str, object]] = {
        "nats": {"url": nats_url},
        "ha": {"state_bucket": f"cycle_state_{suffix}", "lease_bucket": f"cycle_lease_{suffix}"},
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
    provisioned: int  # instances the provisioner started and has not seen exit (starting ones included)
    instances: int  # instances the scheduler knows (heartbeating)
    serving: int  # of those, serving (not draining)
    queued: int  # requests the scheduler holds (no instance with room)
    in_flight: int  # requests the scheduler knows


@dataclass
class CycleResult:
    results: list[RequestResult]
    chunks: dict[str, list[TokenChunk]]
    timeline: list[TimelinePoint]
    events: list[tuple[float, str, str, str]]  # (seconds since begin, action, instance, reason)
    startup_samples: list[float]
    added: str
    added_served_at: float  # seconds since begin: the added instance's first token
    begin_perf: float  # time.perf_counter() at begin (RequestResult.submitted_at's clock)


async def record_chunks(url: str, inbox_prefix: str, into: dict[str, list[TokenChunk]]) -> NatsClient:
    """Subscribe to a client's inboxes and keep every TokenChunk, as it arrives (duplicates included)."""
    nc = await nats.connect(url, name="chunk-recorder")

    async def on_message(msg: Msg) -> None:
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
    after_added_s: float = 0.0,
    tokenizer: Tokenizer | None = None,
) -> CycleResult:
    """Run the whole cycle; raises AssertionError (with the timeline) when a phase times out."""
    assert settings.nats.url
    url = settings.nats.url
    provisioner = LocalProcessProvisioner(settings, work_dir)
    bus = Bus(BusOptions(url=url, name="drover-control")).start()
    plane = ControlPlane(settings, bus, tokenizer or ByteTokenizer(), provisioner=provisioner).start()
    begin, begin_perf = time.monotonic(), time.perf_counter()
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
                    TimelinePoint(
                        time.monotonic() - begin,
                        len(provisioner.instances()),
                        len(own),
                        len(serving),
                        status.queued,
                        len(status.requests),
                    )
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
            added, added_at = "", 0.0
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
                if served_by_new and not added:
                    added, added_at = sorted(served_by_new)[0], time.monotonic() - begin
                    deadline = time.monotonic() + after_added_s
                if added and time.monotonic() >= deadline:
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
            added_served_at=added_at,
            begin_perf=begin_perf,
        )
    finally:
        await asyncio.to_thread(plane.stop)
        await asyncio.to_thread(bus.stop)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(cycle: CycleResult, kind: str, max_tokens: int) -> None:
    """Print the timeline, the events, start-up times and TTFT by phase; check every stream."""
    print(f"\nLive autoscaling, {kind} engines as processes (1..2 interactive instances)\n")
    print(f"{'t (s)':>7} {'asked':>5} {'regist.':>7} {'serving':>7} {'max queued':>10} {'max in flight':>13}")
    last_key: tuple[int, int, int] | None = None
    last_at, queued, in_flight = -math.inf, 0, 0
    for point in cycle.timeline:  # a row when the instance counts change, else every 10 s (maxima in between)
        queued, in_flight = max(queued, point.queued), max(in_flight, point.in_flight)
        key = (point.provisioned, point.instances, point.serving)
        if key != last_key or point.at - last_at >= 10.0 or point is cycle.timeline[-1]:
            print(f"{point.at:7.1f} {key[0]:5d} {key[1]:7d} {key[2]:7d} {queued:10d} {in_flight:13d}")
            last_key, last_at, queued, in_flight = key, point.at, 0, 0
    print("\nscale events")
    for at, action, iid, reason in cycle.events:
        print(f"{at:7.1f}  {action:9s} {iid:24s} {reason}")
    samples = ", ".join(f"{s:.1f}" for s in cycle.startup_samples)
    print(f"\nstart-up measured (ask to first heartbeat): {samples} s")
    print(f"added instance {cycle.added} served its first token at t = {cycle.added_served_at:.1f} s")
    before: list[float] = []
    after: list[float] = []
    for result in cycle.results:
        submitted = result.submitted_at - cycle.begin_perf
        (before if submitted < cycle.added_served_at else after).append(result.ttft_s * 1e3)
    print(f"\n{'phase':36s} {'requests':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for name, values in (
        ("one instance (before the added one)", before),
        ("two instances (after it served)", after),
        ("all", before + after),
    ):
        print(f"{name:36s} {len(values):8d} {percentile(values, 50):12.1f} {percentile(values, 99):12.1f}")
    broken = 0
    for result in cycle.results:
        try:
            check_exactly_once(cycle.chunks[result.request_id], max_tokens)
        except AssertionError:
            broken += 1
    lost = sum(1 for r in cycle.results if r.done is None or r.done.num_tokens != max_tokens)
    print(f"\nstreams checked: {len(cycle.results)}; lost or short: {lost}; index gaps/duplicates: {broken}")
    p50_ratio = percentile(after, 50) / percentile(before, 50) if before and after else float("nan")
    print(
        f"summary: added under load after {cycle.startup_samples[-1] if cycle.startup_samples else float('nan'):.1f} s "
        f"start-up, drained and stopped after; TTFT p50 two instances / one = {p50_ratio:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-seqs", type=int, default=2, help="engine max_num_seqs = local batch limit")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load after the added one served")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = EmbeddedNatsServer()
    url = server.start()
    try:
        settings = cycle_settings(
            url, args.kind, max_num_seqs=args.max_seqs, extra={"autoscaler": {"instance_prefix": "bench"}}
        )
        with tempfile.TemporaryDirectory(prefix="drover-bench-autoscale-") as work:
            cycle = asyncio.run(
                run_cycle(
                    settings,
                    Path(work),
                    in_flight=args.in_flight,
                    max_tokens=args.max_tokens,
                    ready_timeout_s=args.timeout,
                    load_timeout_s=args.timeout,
                    after_added_s=args.after,
                )
            )
        report(cycle, args.kind, args.max_tokens)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
