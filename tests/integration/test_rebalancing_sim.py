"""The live scheduler's Llumnix migration loop: under an imbalanced load it migrates requests and the
imbalance shrinks; every request still completes with every token exactly once."""

from __future__ import annotations

import asyncio

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import MigratableSimEngine
from tests.integration.conftest import make_sim_cluster
from transport.messages import SamplingParams


async def test_imbalance_triggers_migrations_and_shrinks(nats_url: str) -> None:
    cluster: InProcessCluster = await asyncio.to_thread(make_sim_cluster, nats_url, 0)
    try:
        await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("imb-a", num_blocks=96, max_model_len=2048))
        async with DroverClient(cluster.url, name="imb") as client:
            await client.wait_for_instances(1, timeout_s=10)
            # All load lands on imb-a: long prompts fill its KV (freeness far below the threshold of 3).
            streams = [
                await client.submit(
                    prompt_token_ids=[3 + (i + k) % 200 for k in range(400)],
                    sampling=SamplingParams(max_tokens=400, ignore_eos=True),
                    request_id=f"imb-{i}",
                )
                for i in range(6)
            ]
            await asyncio.sleep(1.0)
            before = await client.status()
            load_a = next(i.load for i in before.instances if i.info.instance_id == "imb-a")
            assert load_a.num_running + load_a.num_waiting == 6
            await asyncio.to_thread(cluster.add_engine, MigratableSimEngine("imb-b", num_blocks=96, max_model_len=2048))
            moved = None
            for _ in range(100):
                status = await client.status()
                loads = {i.info.instance_id: i.load for i in status.instances}
                if status.migrations_completed > 0 and "imb-b" in loads and loads["imb-b"].num_running > 0:
                    moved = status
                    break
                await asyncio.sleep(0.1)
            assert moved is not None, "no migration moved load to the new instance"
            loads = {i.info.instance_id: i.load for i in moved.instances}
            # The gap in used blocks shrank: the new instance took requests with their KV.
            used_a = loads["imb-a"].num_total_blocks - loads["imb-a"].num_free_blocks
            used_b = loads["imb-b"].num_total_blocks - loads["imb-b"].num_free_blocks
            assert used_b > 0
            assert abs(used_a - used_b) < (load_a.num_total_blocks - load_a.num_free_blocks)
            for i, stream in enumerate(streams):
                result = await stream.result()
                seed = request_seed(0, f"imb-{i}")
                assert result.token_ids == [token_at(seed, p) for p in range(400)]
    finally:
        await asyncio.to_thread(cluster.stop)
