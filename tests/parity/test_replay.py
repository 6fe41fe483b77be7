"""Parity (a): record a live run's control-core calls with their inputs (sim engines under the real actors
over a real nats-server: requests dispatched, an engine killed so its requests fail over, an instance drained
so its requests migrate away) and replay the inputs through the core objects as the simulator's shell builds
them: every output is identical.

* dispatch targets: every heartbeat snapshot, removal, ``choose`` and ``on_dispatched`` of the scheduler's
  dispatch index, replayed in order into ``ClusterSimulator.index``;
* migration pairs: every planning round (snapshots, migrations in flight, ``now``) into
  ``ClusterSimulator.planner``;
* migration stages: each migration's reservations and the step after each stage, into a machine from
  ``ClusterSimulator.stage_machine``;
* failover: the request table as it was and the dead instance, into :func:`control.core.requests.fail_over`
  (the simulator has no instance failures; this is the function any shell calls).

Recorded are the core's inputs, not the wire events: timing on a loaded machine changes what happens in the
live run, never whether the replay agrees with it. Scale plans are not covered here (the autoscaler's timing
rule is held by ``test_divergences.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import msgspec

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, ReplyError
from control.core.migration import MigrationStages
from control.core.record import Decision, DecisionLog
from control.core.requests import fail_over
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer


def _replay(machine: MigrationStages, decisions: list[Decision]) -> list[object]:
    outputs: list[object] = []
    for d in decisions:
        if d.what == "first_reservation":
            outputs.append(machine.first_reservation(d.inputs[0]))  # type: ignore[arg-type]
        elif d.what == "grow_reservation":
            outputs.append(machine.grow_reservation(d.inputs[0]))  # type: ignore[arg-type]
        else:
            assert d.what == "after_stage" and d.inputs[0] == machine.stages + 1
            outputs.append(machine.after_stage(d.inputs[1]))  # type: ignore[arg-type]
    return outputs


def _replay_scheduler(simulator: ClusterSimulator, decisions: list[Decision]) -> list[tuple[str, object, object]]:
    """Feed the scheduler's recorded core calls to the simulator's core objects; the disagreements."""
    index, planner = simulator.index, simulator.planner
    wrong: list[tuple[str, object, object]] = []
    for d in decisions:
        got: object = None
        if d.what == "upsert":
            index.upsert(d.inputs[0])  # type: ignore[arg-type]
        elif d.what == "remove":
            index.remove(d.key)
        elif d.what == "choose":
            got = index.choose(d.inputs[0])  # type: ignore[arg-type]
        elif d.what == "dispatched":
            index.on_dispatched(d.inputs[0], d.inputs[1])  # type: ignore[arg-type]
        elif d.what == "migration_plan":
            snapshots, in_flight, now = d.inputs
            planner.sync(list(snapshots))  # type: ignore[call-overload]
            got = tuple(planner.plan(list(in_flight), now=now))  # type: ignore[call-overload, arg-type]
        elif d.what == "fail_over":
            records, max_attempts = d.inputs
            table = [msgspec.structs.replace(r) for r in records]  # type: ignore[attr-defined]
            got = tuple(fail_over(table, d.key, max_attempts))  # type: ignore[arg-type]
        else:
            continue
        if got != d.output:
            wrong.append((d.what, d.output, got))
    return wrong


SCHEDULER_CALLS = {"upsert", "remove", "choose", "dispatched", "migration_plan", "fail_over"}


async def test_a_live_run_replays_to_the_same_core_decisions(nats_url: str) -> None:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
        }
    )
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control, log)
    names = ("rep-a", "rep-b", "rep-c")
    try:
        for name in names:
            await asyncio.to_thread(
                cluster.add_engine, MigratableSimEngine(name, num_blocks=512, max_model_len=2048, time_scale=1.0)
            )
        client = await DroverClient(cluster.url, name="replay-client").connect()
        try:
            await client.wait_for_instances(3, timeout_s=10)
            # prompts of different sizes: the dispatch policy's choice depends on each instance's free memory
            streams = [
                await client.submit("y" * (100 + 90 * k), max_tokens=1400, request_id=f"rep-{k}") for k in range(6)
            ]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 2:
                        break
            # kill an instance that runs something: its requests fail over
            status = await client.status()
            victim = next(name for name in names if name in {r.instance_id for r in status.requests})
            await asyncio.to_thread(cluster.crash_engine, victim)
            for _ in range(300):  # declared dead, and every request it ran resumed (dispatched) elsewhere
                status = await client.status()
                gone = not any(i.info.instance_id == victim for i in status.instances)
                if gone and all(r.instance_id not in (None, victim) for r in status.requests):
                    break
                await asyncio.sleep(0.1)
            # drain a survivor that runs something: its requests migrate to the other one
            hosting = {r.instance_id for r in status.requests}
            drained = next(name for name in names if name != victim and name in hosting)
            await client.drain(drained)
            for _ in range(300):  # every request leaves the drained instance (migrations commit)
                status = await client.status()
                if not any(r.instance_id == drained for r in status.requests):
                    break
                await asyncio.sleep(0.1)
            for stream in streams:
                with contextlib.suppress(ReplyError):  # one may have ended meanwhile (finished, or failed)
                    await stream.cancel()
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(cluster.stop)

    entries = log.entries()
    # The simulator's shell, configured as the live control plane was (policy and reservation headroom).
    simulator = ClusterSimulator(
        ClusterConfig(
            policy=settings.policy,
            reserve_headroom_blocks=settings.migration.reserve_headroom_blocks,
            reserve_decoded_factor=settings.migration.reserve_decoded_factor,
        ),
        [],
    )
    scheduler_calls = [d for d in entries if d.what in SCHEDULER_CALLS]
    kinds = {d.what for d in scheduler_calls}
    assert {"upsert", "choose", "dispatched", "fail_over", "migration_plan"} <= kinds, kinds
    assert any(d.output for d in scheduler_calls if d.what == "fail_over"), "the victim's requests failed over"
    assert any(d.output for d in scheduler_calls if d.what == "migration_plan"), "the drain planned migrations"
    assert _replay_scheduler(simulator, scheduler_calls) == []

    by_request: dict[str, list[Decision]] = defaultdict(list)
    for decision in entries:
        if decision.what in ("first_reservation", "grow_reservation", "after_stage"):
            by_request[decision.key].append(decision)
    assert by_request and any(d.what == "after_stage" for ds in by_request.values() for d in ds)
    for request_id, decisions in by_request.items():
        # A request may have migrated more than once: one machine per migration (each starts with a reservation).
        runs: list[list[Decision]] = []
        for d in decisions:
            if d.what == "first_reservation":
                runs.append([])
            runs[-1].append(d)
        for run in runs:
            assert _replay(simulator.stage_machine(request_id), run) == [d.output for d in run]
