"""AutoscalerActor on a real nats-server with simulated engines started in-process by the provisioner:
scale-out under load, drain + scale-in after, never below min or above max, manual `scale`, bad input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from control.apps.cli_autoscale import request_admin
from control.client import DroverClient, DroverError
from control.policy.autoscaling import AutoscaleParams, InstanceRole, LocalParams, PerRole, total
from control.settings import Settings, load_settings
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from tests.actors.planes import Plane, own_state, started_plane
from tests.parity.replays import replay_scaling
from tests.waiting import wait_for
from transport.messages import (
    AdminReply,
    AutoscaleStatusQuery,
    AutoscaleStatusReply,
    RequestClass,
    SamplingParams,
    ScaleCommand,
)

MAX_SEQS = 2


def autoscale_settings(nats_url: str, *, enabled: bool, class_dispatch: bool | None = None) -> Settings:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "ha": own_state("as"),
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05, "max_num_seqs": MAX_SEQS},
            "autoscaler": {"enabled": enabled, "class_dispatch": class_dispatch, "stop_timeout_s": 30.0},
        }
    )
    params = AutoscaleParams(
        local=LocalParams(min_batch=1, initial_batch=MAX_SEQS, max_batch=MAX_SEQS, period_s=0.5),
        period_s=0.5,
        startup_s=1.0,
        min_instances=PerRole(1, 0, 0),
        max_instances=PerRole(3, 0, 1),
        max_total=3,
        mixed_share=0.0,
        scale_in_window_s=2.0,
        scale_in_cooldown_s=2.0,
    )
    return settings.model_copy(update={"autoscaling": params})


def make_engine(instance_id: str, role: InstanceRole) -> MigratableSimEngine:
    return MigratableSimEngine(instance_id, num_blocks=256, max_num_seqs=MAX_SEQS, time_scale=1.0)


@pytest.fixture
def plane(request: pytest.FixtureRequest, nats_url: str) -> Iterator[Plane]:
    enabled, class_dispatch = getattr(request, "param", (True, None))
    with started_plane(autoscale_settings(nats_url, enabled=enabled, class_dispatch=class_dispatch), make_engine) as p:
        yield p


async def autoscale_status(url: str) -> AutoscaleStatusReply:
    reply = await request_admin(url, "autoscale", AutoscaleStatusQuery())
    assert isinstance(reply, AutoscaleStatusReply)
    return reply


async def serving(client: DroverClient, prefix: str) -> list[str]:
    status = await client.status()
    return [i.info.instance_id for i in status.instances if i.info.instance_id.startswith(prefix)]


async def test_scale_out_under_load_then_drain_and_scale_in(plane: Plane) -> None:
    prefix = plane.prefix
    counts: list[int] = []
    async with DroverClient(plane.url, name="autoscale-test") as client:

        async def count_is(n: int) -> bool:
            ids = await serving(client, prefix)
            counts.append(len(ids))
            return len(ids) == n

        await wait_for(lambda: count_is(1), 30, "the autoscaler to start min_instances (1)")
        ids = [f"as-{i}" for i in range(8)]
        streams = [
            await client.submit(f"load {i}", sampling=SamplingParams(max_tokens=400, ignore_eos=True), request_id=rid)
            for i, rid in enumerate(ids)
        ]
        await wait_for(lambda: count_is(3), 30, "scale-out to max_instances (3) under load")
        results = [await s.result() for s in streams]
        for rid, result in zip(ids, results, strict=True):
            assert result.done is not None and result.done.finish_reason == "length"
            assert result.token_ids == [token_at(request_seed(0, rid), p) for p in range(400)], rid
        served = {inst for r in results if r.done for inst in r.done.instances}
        assert len(served) >= 2, f"load stayed on {served}"
        await wait_for(lambda: count_is(1), 60, "scale-in to min_instances (1) after the load")
        status = await autoscale_status(plane.url)
    assert max(counts) <= 3 and min(counts[counts.index(1) :]) >= 1
    actions = [e.action for e in status.events]
    assert "start" in actions and "ready" in actions and "drain" in actions and "stop" in actions
    assert status.startup_samples, "start-up was not measured"
    assert status.startup_estimate_s > 0
    assert status.last_reason
    # Parity (a): the autoscaler's clock and plans, replayed through the elastic simulator's, are identical
    # (tests/parity/replays.py); a replay that deviates is caught.
    entries = plane.decisions.entries()
    plans = [d.output for d in entries if d.what == "scale_plan"]
    assert any(p.acts and total(p.start) for p in plans) and any(p.drain for p in plans)  # type: ignore[attr-defined]
    assert any(d.output for d in entries if d.what == "stop_reason"), "a drained instance was stopped"
    autoscale = plane.control.settings.autoscaling
    assert replay_scaling(entries, autoscale) == []
    for deviation in ("plan_at_start", "skip_drain"):
        assert replay_scaling(entries, autoscale, deviation), deviation


@pytest.mark.parametrize("plane", [(False, None)], indirect=True)
async def test_manual_scale_starts_and_drains(plane: Plane) -> None:
    prefix = plane.prefix
    async with DroverClient(plane.url, name="autoscale-manual") as client:
        assert await serving(client, prefix) == []  # disabled: nothing starts by itself
        reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=2))
        assert isinstance(reply, AdminReply) and reply.ok and len(reply.details["started"]) == 2

        async def count(n: int) -> bool:
            return len(await serving(client, prefix)) == n

        await wait_for(lambda: count(2), 30, "two instances after `scale interactive 2`")
        status = await autoscale_status(plane.url)
        interactive = next(r for r in status.roles if r.role == "interactive")
        assert interactive.pinned and interactive.min_instances == interactive.max_instances == 2
        reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=1))
        assert isinstance(reply, AdminReply) and len(reply.details["draining"]) == 1
        await wait_for(lambda: count(1), 30, "one instance after `scale interactive 1`")
        with pytest.raises(DroverError) as bad_role:
            await request_admin(plane.url, "scale", ScaleCommand(role="gpu", count=1))
        assert "unknown role" in bad_role.value.message
        with pytest.raises(DroverError):
            await request_admin(plane.url, "scale", ScaleCommand(role="batch", count=-1))
        reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", auto=True))
        assert isinstance(reply, AdminReply) and reply.ok


@pytest.mark.parametrize("plane", [(False, True)], indirect=True)
async def test_batch_requests_wait_in_the_global_queue_and_run_on_batch_instances(plane: Plane) -> None:
    """Class dispatch (on here with the autoscaler off): batch requests go to the batch instance through the
    global batch queue, interactive ones to the interactive instance."""
    prefix = plane.prefix
    async with DroverClient(plane.url, name="autoscale-classes") as client:
        for role in ("interactive", "batch"):
            await request_admin(plane.url, "scale", ScaleCommand(role=role, count=1))

        async def two() -> bool:
            status = await client.status()
            return sum(1 for i in status.instances if i.info.instance_id.startswith(prefix)) == 2

        await wait_for(two, 30, "an interactive and a batch instance")
        sampling = SamplingParams(max_tokens=20, ignore_eos=True)
        batch = [
            await client.submit(f"batch {i}", sampling=sampling, request_class=RequestClass.BATCH, deadline_s=600.0)
            for i in range(5)
        ]
        interactive = [await client.submit(f"chat {i}", sampling=sampling) for i in range(3)]
        for stream in batch:
            result = await stream.result()
            assert result.done is not None and result.done.instances == [f"{prefix}-batch-2"]
        for stream in interactive:
            result = await stream.result()
            assert result.done is not None and result.done.instances == [f"{prefix}-interactive-1"]


@pytest.mark.parametrize("plane", [(False, None)], indirect=True)
async def test_scale_in_drains_running_requests_by_migration_before_stopping(plane: Plane) -> None:
    """`scale interactive 1` with requests running on both instances: the victim's requests move to the
    survivor (live migration), and the victim stops only once empty; every token arrives exactly once."""
    prefix = plane.prefix
    async with DroverClient(plane.url, name="autoscale-drain") as client:
        await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=2))

        async def count(n: int) -> bool:
            return len(await serving(client, prefix)) == n

        await wait_for(lambda: count(2), 30, "two instances")
        ids = [f"dr-{i}" for i in range(4)]
        streams = [
            await client.submit(f"drain {i}", sampling=SamplingParams(max_tokens=300, ignore_eos=True), request_id=rid)
            for i, rid in enumerate(ids)
        ]
        for stream in streams:  # every request decoding before the scale-in
            async for _ in stream.events():
                if len(stream.result_data.token_ids) >= 3:
                    break
        status = await client.status()
        busy = {r.instance_id for r in status.requests if r.instance_id}
        assert len(busy) == 2, f"requests all on {busy}"
        reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=1))
        assert isinstance(reply, AdminReply)
        [victim] = reply.details["draining"]
        await wait_for(lambda: count(1), 60, "the drained instance to stop")
        results = [await s.result() for s in streams]
        events = [(e.action, e.reason) for e in (await autoscale_status(plane.url)).events if e.instance_id == victim]
    assert [a for a, _ in events][-2:] == ["drain", "stop"] and events[-1][1] == "drained", events
    moved = [r for r in results if r.done is not None and len(r.done.instances) > 1]
    assert moved, "no request moved off the drained instance"
    for rid, result in zip(ids, results, strict=True):
        assert result.done is not None and result.done.finish_reason == "length"
        assert result.token_ids == [token_at(request_seed(0, rid), p) for p in range(300)], rid
        assert result.done.instances[-1] != victim


@pytest.mark.parametrize("plane", [(False, None)], indirect=True)
async def test_an_engine_told_its_new_role_reports_it(plane: Plane) -> None:
    """The relabel message the autoscaler sends an engine after a RoleChange: the heartbeat follows it."""
    import nats

    from transport import subjects
    from transport.messages import SetInstanceRole, encode

    await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=1))

    prefix = plane.prefix

    async def role_is(role: str) -> bool:
        status = await autoscale_status(plane.url)
        return [i.role for i in status.instances if i.instance_id.startswith(prefix)] == [role]

    await wait_for(lambda: role_is("mixed"), 30, "a mixed instance")
    [iid] = [i.instance_id for i in (await autoscale_status(plane.url)).instances if i.instance_id.startswith(prefix)]
    nc = await nats.connect(plane.url)
    await nc.publish(subjects.engine(iid), encode(SetInstanceRole(role="batch")))
    await nc.publish(subjects.engine(iid), encode(SetInstanceRole(role="no-such-role")))  # ignored
    await nc.drain()
    await wait_for(lambda: role_is("batch"), 20, "the heartbeat to report role batch")


@pytest.mark.parametrize("plane", [(False, True)], indirect=True)
async def test_interactive_requests_evict_batch_ones_on_a_full_mixed_instance(plane: Plane) -> None:
    """Chiron's preemption, live: a mixed instance full with a batch request and an interactive one; the next
    interactive request evicts the batch request, which goes back to the global batch queue and resumes from
    the tokens its client has. Every token exactly once."""
    await request_admin(plane.url, "scale", ScaleCommand(role="mixed", count=1))
    async with DroverClient(plane.url, name="autoscale-evict") as client:
        await wait_for(lambda: _serving_count(client, plane.prefix, 1), 30, "a mixed instance")
        long = SamplingParams(max_tokens=300, ignore_eos=True)
        batch = await client.submit("batch", sampling=long, request_class=RequestClass.BATCH, request_id="ev-b")
        async for _ in batch.events():
            if len(batch.result_data.token_ids) >= 5:
                break
        chats = [await client.submit(f"chat {i}", sampling=long, request_id=f"ev-i{i}") for i in range(2)]
        results = {r.request_id: r for r in [await s.result() for s in [*chats, batch]]}
    for rid, result in results.items():
        assert result.done is not None and result.done.finish_reason == "length", rid
        assert result.token_ids == [token_at(request_seed(0, rid), p) for p in range(300)], rid
    assert len(results["ev-b"].done.instances) == 2, "the batch request was not evicted and resumed"  # type: ignore[union-attr]


async def _serving_count(client: DroverClient, prefix: str, n: int) -> bool:
    return len(await serving(client, prefix)) == n


def _scale_events(role: str, direction: str) -> float:
    """drover.autoscaler.scale_events{role, direction} from this process's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    from observability.metrics import metrics

    for family in text_string_to_metric_families(metrics().render().decode()):
        for sample in family.samples:
            if sample.name == "drover_autoscaler_scale_events_total" and sample.labels == {
                "role": role,
                "direction": direction,
            }:
                return float(sample.value)
    return 0.0


async def test_a_scale_decision_is_a_span_and_moves_the_scale_events_counter(span_exporter, plane: Plane) -> None:  # type: ignore[no-untyped-def]
    """The first plan starts min_instances (1 interactive): one `drover.autoscale.decision` span says why, with
    the role counts before and after; `drover scale` up and down moves the scale-out and scale-in counters."""
    async with DroverClient(plane.url, name="autoscale-span") as client:
        await wait_for(lambda: _serving_is(client, plane.prefix, 1), 30, "the autoscaler to start min_instances")
    decisions = [s for s in span_exporter.get_finished_spans() if s.name == "drover.autoscale.decision"]
    ours = [s for s in decisions if (s.attributes or {}).get("drover.autoscale.start.interactive", 0) >= 1]
    assert ours, [dict(s.attributes or {}) for s in decisions]
    attributes = dict(ours[-1].attributes or {})
    assert attributes["drover.autoscale.before.interactive"] == 0
    assert attributes["drover.autoscale.after.interactive"] == 1
    assert attributes["drover.autoscale.reason"]  # the plan's reason, as `drover autoscale` shows it
    assert "drover.autoscale.input.interactive_rate" in attributes

    out_before, in_before = _scale_events("interactive", "out"), _scale_events("interactive", "in")
    reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=2))
    assert isinstance(reply, AdminReply) and reply.ok, reply
    assert _scale_events("interactive", "out") - out_before == 1
    reply = await request_admin(plane.url, "scale", ScaleCommand(role="interactive", count=1))
    assert isinstance(reply, AdminReply) and reply.ok, reply
    assert _scale_events("interactive", "in") - in_before == 1


async def _serving_is(client: DroverClient, prefix: str, n: int) -> bool:
    return len(await serving(client, prefix)) == n
