"""Parity (a), for the migration stage machine: record a live run's core decisions with their inputs (sim
engines under the real actors over a real nats-server; an instance drained while requests run, so its
requests migrate away) and replay the inputs through the stage machine as the simulator's shell builds it:
every decision (reservations, the step after each stage) is identical.

Recorded are the core's inputs, not the wire events: the replay feeds each migration's inputs in their
order to a machine from ``ClusterSimulator.stage_machine``, which is what the simulator runs in virtual time.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.core.migration import MigrationStages
from control.core.record import Decision, DecisionLog
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


async def test_a_live_drain_replays_to_the_same_migration_decisions(nats_url: str) -> None:
    settings = load_settings(
        overrides={"nats": {"url": nats_url}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
    )
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control, log)
    try:
        for name in ("rep-a", "rep-b"):
            await asyncio.to_thread(
                cluster.add_engine, MigratableSimEngine(name, num_blocks=512, max_model_len=2048, time_scale=1.0)
            )
        client = await DroverClient(cluster.url, name="replay-client").connect()
        try:
            await client.wait_for_instances(2, timeout_s=10)
            streams = [await client.submit("y" * 300, max_tokens=400, request_id=f"rep-{k}") for k in range(4)]
            for stream in streams:
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 2:
                        break
            await client.drain("rep-a")
            for _ in range(200):  # every request leaves the drained instance (migrations commit)
                status = await client.status()
                if not any(r.instance_id == "rep-a" for r in status.requests):
                    break
                await asyncio.sleep(0.1)
            for stream in streams:
                await stream.cancel()
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(cluster.stop)

    by_request: dict[str, list[Decision]] = defaultdict(list)
    for decision in log.entries():
        by_request[decision.key].append(decision)
    assert by_request and any(d.what == "after_stage" for ds in by_request.values() for d in ds)
    # The simulator's shell, configured as the live control plane was (policy and reservation headroom).
    simulator = ClusterSimulator(
        ClusterConfig(policy=settings.policy, reserve_headroom_blocks=settings.migration.reserve_headroom_blocks), []
    )
    for request_id, decisions in by_request.items():
        # A request may have migrated more than once: one machine per migration (each starts with a reservation).
        runs: list[list[Decision]] = []
        for d in decisions:
            if d.what == "first_reservation":
                runs.append([])
            runs[-1].append(d)
        for run in runs:
            assert _replay(simulator.stage_machine(request_id), run) == [d.output for d in run]
