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

* the dispatcher's queues (third test): more requests than slots from two clients (the fair queue), a batch
  request (class routing, the global batch queue); every event of the scheduler's
  :class:`~control.core.dispatch.Dispatcher` (submissions, retries at ticks, batch releases, ends) with the
  answers its view of the tables gave, into the dispatcher the simulator builds with the same configuration:
  the same ``Place`` commands in the same order.

* PD handoffs (second test): a prefill and a decode instance, adaptive disaggregation; every call of the
  scheduler's :class:`~control.core.pd.PdCore` (phases reported, requests dispatched and ended, each round of
  handoffs with the shell's answers, the split's rebalancing, each handoff's end) and of its phase-aware
  dispatch index, into a :class:`~control.simulator.pd.PdClusterSimulator`'s.

Recorded are the core's inputs, not the wire events: timing on a loaded machine changes what happens in the
live run, never whether the replay agrees with it. Each replay is also run deliberately wrong once (a state
update skipped, a threshold flipped) and must then disagree. Scale plans and KunServe group changes are
replayed where their live runs already are (``tests/parity/replays.py`` says where).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import defaultdict

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, ReplyError
from control.core.dispatch import Place
from control.core.migration import MigrationStages
from control.core.record import Decision, DecisionLog
from control.policy.pd import PdParams
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator, ElasticConfig
from control.simulator.elastic import ElasticSimulator
from control.simulator.pd import PdClusterSimulator
from engines.sim.engine import SimEngine
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from tests.parity.replays import SCHEDULER_CALLS, replay_queues, replay_scheduler
from transport.messages import RequestClass


def _replay(machine: MigrationStages, decisions: list[Decision]) -> list[object]:
    outputs: list[object] = []
    for d in decisions:
        if d.what == "first_reservation":
            machine.max_blocks = d.inputs[2]  # type: ignore[assignment]  # the request's cap: the shell's input
            outputs.append(machine.first_reservation(d.inputs[0]))  # type: ignore[arg-type]
        elif d.what == "grow_reservation":
            outputs.append(machine.grow_reservation(d.inputs[0]))  # type: ignore[arg-type]
        else:
            assert d.what == "after_stage" and d.inputs[0] == machine.stages + 1
            outputs.append(machine.after_stage(d.inputs[1]))  # type: ignore[arg-type]
    return outputs


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
    assert replay_scheduler(simulator, scheduler_calls) == []
    # the comparison catches a shell that deviates: an index that does not learn of its dispatches
    fresh = ClusterSimulator(ClusterConfig(policy=settings.policy), [])
    assert replay_scheduler(fresh, scheduler_calls, "skip_dispatched")

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


async def test_a_live_pd_run_replays_to_the_same_handoffs(nats_url: str) -> None:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": {"migration_enabled": False, "dispatch_policy": "least_loaded"},  # only handoffs move
            # long prompts are prefilled on the prefill instance and handed off, short ones go to decode
            "pd": {"mode": "adaptive", "adaptive_min_prompt_tokens": 150, "rebalance_period_s": 0.2},
        }
    )
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control, log)
    try:
        for name, phase in (("rp-p", "prefill"), ("rp-d", "decode")):
            host = await asyncio.to_thread(
                cluster.add_engine, MigratableSimEngine(name, num_blocks=512, max_model_len=1024, time_scale=1.0)
            )
            host.heartbeater.phase = phase  # reported by the engine itself
        client = await DroverClient(cluster.url, name="replay-pd").connect()
        try:
            await client.wait_for_instances(2, timeout_s=10)
            for _ in range(200):  # the first beats may predate the phases
                status = await client.status()
                if sorted(i.phase for i in status.instances) == ["decode", "prefill"]:
                    break
                await asyncio.sleep(0.05)
            prompts = ["s" * 60, "p" * 200, "s" * 60, "p" * 200]  # ByteTokenizer: a token a character
            streams = [
                await client.submit(prompt, max_tokens=120, request_id=f"rp-{k}") for k, prompt in enumerate(prompts)
            ]
            results = [await stream.result() for stream in streams]
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(cluster.stop)

    assert all(r.done is not None for r in results)
    entries = log.entries()
    kinds = {d.what for d in entries}
    assert {"pd_report", "pd_request", "pd_handoffs", "pd_handoff_ended", "pd_rebalance", "choose"} <= kinds, kinds
    # handoffs start on the engine's first-token event (and at a heartbeat, for a retry after an abort)
    assert {"pd_wants_first_token", "pd_first_token_handoffs"} <= kinds, kinds
    handoff_calls = ("pd_handoffs", "pd_first_token_handoffs")
    assert any(d.output for d in entries if d.what in handoff_calls), "no handoff planned"

    def simulator(pd: PdParams) -> PdClusterSimulator:
        return PdClusterSimulator(ClusterConfig(num_instances=1, policy=settings.policy), [], ("both",), pd)

    assert replay_scheduler(simulator(settings.pd), entries) == []
    # a replay that deviates is caught: a state update skipped, a threshold flipped
    assert replay_scheduler(simulator(settings.pd), entries, "skip_pd_request")
    flipped = dataclasses.replace(settings.pd, decode_headroom_blocks=100_000)
    assert replay_scheduler(simulator(flipped), entries)


async def test_a_live_run_replays_to_the_same_queue_order(nats_url: str) -> None:
    """The dispatcher's queues: more requests than slots, two clients (the fair queue), a batch request (class
    routing and the global batch queue). Every placement comes out of the simulator's dispatcher, configured as
    the live one, in the same order."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": {"migration_enabled": False},
            "scheduler": {"fairness": True, "fairness_quantum_tokens": 200, "fairness_max_waiting": 1},
            "autoscaler": {"class_dispatch": True},
        }
    )
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control, log)
    try:
        for name in ("rq-a", "rq-b"):  # two slots each
            await asyncio.to_thread(cluster.add_engine, SimEngine(name, max_num_seqs=2, time_scale=1.0))
        async with (
            DroverClient(cluster.url, name="flood") as flood,
            DroverClient(cluster.url, name="other") as other,
        ):
            await flood.wait_for_instances(2, timeout_s=10)
            streams = [await flood.submit("f" * 60, max_tokens=100, request_id=f"rq-f{k}") for k in range(8)]
            streams.append(
                await other.submit(
                    "b" * 40, max_tokens=20, request_id="rq-batch", request_class=RequestClass.BATCH, deadline_s=60
                )
            )
            streams += [await other.submit("o" * 60, max_tokens=100, request_id=f"rq-o{k}") for k in range(2)]
            results = [await asyncio.wait_for(stream.result(), 120) for stream in streams]
    finally:
        await asyncio.to_thread(cluster.stop)
    assert all(r.done is not None and r.done.finish_reason == "length" for r in results)

    entries = log.entries()
    places = [d.output for d in entries if d.what == "queue_place"]
    assert all(isinstance(p, Place) for p in places)
    events = {d.inputs[0] for d in entries if d.what == "queue_event"}
    assert {"submit", "retry", "release_batch", "forget"} <= events, events
    placed = [p.request_id for p in places if isinstance(p, Place)]
    assert sorted(placed) == sorted(r.request_id for r in results), "each request placed once"
    # queueing happened: requests placed later than their submission (a tick's retry of the fair queue), the
    # batch request by a release of the batch queue
    placed_by: dict[str, str] = {}
    event = ""
    for d in entries:
        if d.what == "queue_event":
            event = str(d.inputs[0])
        elif d.what == "queue_place":
            placed_by[d.key] = event
    assert "retry" in placed_by.values() and placed_by["rq-batch"] == "release_batch", placed_by
    # and the fair queue let the other client's first request overtake flood requests queued before it (a
    # round of deficit round robin serves each client once: with two or more of the flood's still waiting when
    # it arrived, it goes before the last of them)
    order = [p.request_id for p in places if isinstance(p, Place)]
    submitted = next(k for k, d in enumerate(entries) if d.what == "queue_event" and d.key == "rq-o0")
    placed_before = {d.key for d in entries[:submitted] if d.what == "queue_place"}
    flood_waiting = [f"rq-f{k}" for k in range(8) if f"rq-f{k}" not in placed_before]
    if len(flood_waiting) >= 2:
        assert order.index("rq-o0") < max(order.index(rid) for rid in flood_waiting), order

    def simulator(quantum: int | None = settings.scheduler.fairness_quantum_tokens) -> ElasticSimulator:
        sched = settings.scheduler
        cluster_config = ClusterConfig(
            num_instances=0,
            policy=settings.policy,
            fair_quantum_tokens=quantum,
            fair_max_waiting=sched.fairness_max_waiting,
        )
        return ElasticSimulator(ElasticConfig(cluster=cluster_config, autoscale=settings.autoscaling), [])

    assert replay_queues(simulator().dispatcher, entries) == []
    # a dispatcher that deviates is caught: one without the fair queue between the clients
    assert replay_queues(simulator(None).dispatcher, entries)
