"""Parity (a) for local batch sizes: record the local autoscaler of a live engine host (Chiron's lower level, a
sim engine over a real nats-server) and replay each window's observation through the local autoscaler the
elastic simulator builds for an instance: every batch-size decision is identical.

The run: one instance whose engine runs at most 4 requests, its local limit starting at 2 and decided every
0.25 s; more requests than that arrive at once, so the limit binds and grows. (Under class-aware dispatch the
control plane keeps the backlog itself and the local limit never binds, so this run dispatches by the index.)
"""

from __future__ import annotations

import asyncio
import dataclasses

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.core.record import DecisionLog
from control.policy.autoscaling import LocalDecision, LocalObservation
from control.settings import load_settings
from control.simulator import ClusterConfig, ElasticConfig
from control.simulator.elastic import ElasticSimulator
from engines.sim.core import SimEngineConfig
from engines.sim.engine import SimEngine
from engines.tokenizer import ByteTokenizer
from tests.parity.replays import replay_local

MAX_SEQS = 4


async def test_a_live_run_replays_to_the_same_local_batch_sizes(nats_url: str) -> None:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {
                "kind": "sim",
                "heartbeat_interval_s": 0.05,
                "local_autoscaler": True,
                "max_num_seqs": MAX_SEQS,  # what the engine host clamps its limits to
            },
            "policy": {"migration_enabled": False},
        }
    )
    local = dataclasses.replace(settings.autoscaling.local, min_batch=1, initial_batch=2, period_s=0.25)
    settings = settings.model_copy(update={"autoscaling": dataclasses.replace(settings.autoscaling, local=local)})
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    try:
        engine = SimEngine("lb-0", max_num_seqs=MAX_SEQS, time_scale=1.0)
        await asyncio.to_thread(cluster.add_engine, engine, None, log)
        async with DroverClient(cluster.url, name="local-replay") as client:
            await client.wait_for_instances(1, timeout_s=10)
            streams = [await client.submit("l" * 50, max_tokens=120, request_id=f"lb-{k}") for k in range(10)]
            results = [await asyncio.wait_for(stream.result(), 120) for stream in streams]
            assert all(r.done is not None and r.done.finish_reason == "length" for r in results)
            # a few windows more, with nothing to do
            await asyncio.sleep(3 * local.period_s)
    finally:
        await asyncio.to_thread(cluster.stop)

    decisions = [d for d in log.entries() if d.what == "local_batch"]
    limits = [d.output.batch_limit for d in decisions if isinstance(d.output, LocalDecision)]
    assert len(limits) == len(decisions) >= 3
    observations = [d.inputs[0] for d in decisions if isinstance(d.inputs[0], LocalObservation)]
    assert observations[0].batch_limit == 2 and any(o.num_waiting > 0 for o in observations), observations
    assert max(limits) == MAX_SEQS, limits  # the limit bound and grew, as far as the engine goes

    # The simulator's shell configured as the live one: its engines' max_num_seqs, the autoscaling parameters.
    config = ElasticConfig(
        cluster=ClusterConfig(num_instances=0, engine=SimEngineConfig(max_num_seqs=MAX_SEQS)),
        autoscale=settings.autoscaling,
    )
    assert replay_local(ElasticSimulator(config, []), decisions) == []
    # a simulator whose limits are not clamped to its engines' max_num_seqs (as before the core held them) is caught
    assert replay_local(ElasticSimulator(config, []), decisions, "unclamped")
