"""Prefill/decode disaggregation live: the prefill:decode split follows each pool's queue ([pd]
rebalance_period_s) on sim engines over a real nats-server. Its own module: one control plane per NATS server
at a time (the other PD tests keep a module-scoped cluster)."""

from __future__ import annotations

import asyncio

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer


async def test_the_split_follows_a_queue_on_the_prefill_pool(nats_url: str) -> None:
    """[pd] rebalance_period_s live: prompts queue on the one prefill instance (it runs one request at a
    time) while two decode instances idle; the scheduler's tick moves a decode instance to the prefill pool."""
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "pd": {"mode": "disaggregated", "rebalance_period_s": 0.5},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    try:
        for name, phase, seqs in (("rb-p", "prefill", 1), ("rb-d0", "decode", 16), ("rb-d1", "decode", 16)):
            engine = MigratableSimEngine(name, max_num_seqs=seqs, max_model_len=1024, time_scale=1.0)
            cluster.add_engine(engine).heartbeater.phase = phase
        async with DroverClient(cluster.url, name="rb-client") as client:
            await client.wait_for_instances(3, timeout_s=20)
            for _ in range(200):  # every instance reports its phase
                status = await client.status()
                if sorted(i.phase for i in status.instances) == ["decode", "decode", "prefill"]:
                    break
                await asyncio.sleep(0.05)
            streams = [
                await client.submit("q" * 600, max_tokens=200, request_id=f"rb-{i}") for i in range(12)
            ]  # all dispatched to rb-p, the only prefill instance; 11 wait there
            phases: list[str] = []
            for _ in range(300):
                status = await client.status()
                phases = sorted(i.phase for i in status.instances)
                if phases.count("prefill") >= 2:
                    break
                await asyncio.sleep(0.05)
            assert phases.count("prefill") >= 2 and phases.count("decode") >= 1, phases
            assert len(streams) == 12  # left running: the cluster stops next
    finally:
        await asyncio.to_thread(cluster.stop)
