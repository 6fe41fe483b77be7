"""Parity (a) for ``drover``'s prefill-backlog hold (``predict_hold_prefill_tokens``, 2,048 in the recommended
keys): a live run under ``drover`` (sim engines under the real actors over a real nats-server) with a burst of
long prompts, so that the hold keeps requests in the cluster queue; every dispatch-index call replays through
the simulator's shell configured as the live control plane was to the same decisions.

The other parity runs use the default dispatch (``freeness``), where the hold never acts. The replay is also
run once with the hold off in the simulator: it must then disagree on a ``choose`` the live hold answered with
None (held), which proves the hold decided something in this run.
"""

from __future__ import annotations

import asyncio
import dataclasses

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.core.record import DecisionLog
from control.policy.recommended import user_policy_params
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator
from engines.sim.engine import SimEngine
from engines.tokenizer import ByteTokenizer
from tests.parity.replays import SCHEDULER_CALLS, replay_scheduler

PROMPT_TOKENS = 3000  # past the hold's 2,048: one such prompt queued on an instance closes it to the next
BURST = 8
# modelled time runs 3x slower than the wall: a loaded host submitting the burst slowly still finds the first
# prompts' prefill queued (the hold's decisions never depend on timing for the replay; this only keeps it acting)


async def test_a_live_drover_run_with_a_burst_of_long_prompts_replays_to_the_same_holds(nats_url: str) -> None:
    drover = user_policy_params("drover")
    assert drover.predict_hold_prefill_tokens == 2048
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": dataclasses.asdict(drover),
        }
    )
    log = DecisionLog()
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control, log)
    try:
        for name in ("hold-a", "hold-b"):
            await asyncio.to_thread(
                cluster.add_engine, SimEngine(name, num_blocks=1024, max_model_len=4096, time_scale=3.0)
            )
        client = await DroverClient(cluster.url, name="hold-client").connect()
        try:
            await client.wait_for_instances(2, timeout_s=10)
            streams = await asyncio.gather(
                *(client.submit("y" * PROMPT_TOKENS, max_tokens=4, request_id=f"hold-{k}") for k in range(BURST))
            )
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), timeout=120)
            assert all(len(r.token_ids) == 4 for r in results), [len(r.token_ids) for r in results]
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(cluster.stop)

    calls = [d for d in log.entries() if d.what in SCHEDULER_CALLS]
    chosen = [d for d in calls if d.what == "choose"]
    assert len({d.inputs[0].request_id for d in chosen}) == BURST  # type: ignore[attr-defined]

    def simulator(hold: int) -> ClusterSimulator:
        policy = dataclasses.replace(settings.policy, predict_hold_prefill_tokens=hold)
        return ClusterSimulator(
            ClusterConfig(
                policy=policy,
                reserve_headroom_blocks=settings.migration.reserve_headroom_blocks,
                reserve_decoded_factor=settings.migration.reserve_decoded_factor,
            ),
            [],
        )

    assert replay_scheduler(simulator(2048), calls) == []
    # without the hold the simulator places what the live hold kept in the cluster queue
    wrong = replay_scheduler(simulator(0), calls)
    assert any(what == "choose" and live is None and got is not None for what, _, live, got in wrong), wrong
