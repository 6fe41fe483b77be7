"""kv_aware on a live simulated cluster (real NATS, real actors): sim engines model vLLM's prefix caching and
report it in heartbeats like vLLM's KV events, so a repeated long prefix goes to the instance holding it; a
control plane that lost track of an engine's cache (here: restarted) asks for a full listing and gets it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from observability.metrics import metrics
from transport.messages import SamplingParams
from transport.nats_server import EmbeddedNatsServer

PREFIX_CHARS = 1500  # ByteTokenizer: one token a character; 93 full blocks of 16
BLOCK = 16


KV_AWARE = {"migration_enabled": False, "dispatch_policy": "kv_aware"}
# what ``drover`` means for dispatch (control/policy/recommended.py): predictive, late binding, prefix-aware
DROVER_DISPATCH = {
    "migration_enabled": False,
    "dispatch_policy": "predictive",
    "predict_hold": True,
    "predict_prefix": True,
}


def _cluster(
    nats_url: str,
    instances: int,
    policy: dict[str, Any] = KV_AWARE,
    *,
    num_blocks: int = 1024,
    max_model_len: int = 4096,
) -> InProcessCluster:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": dict(policy),
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for index in range(instances):
        engine = MigratableSimEngine(
            f"kvsim-{index}",
            block_size=BLOCK,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            time_scale=0.05,
            prefix_caching=True,
            prefix_full_every_s=3600.0,  # no periodic listing: only a resync request can repair the index
        )
        cluster.add_engine(engine)
    return cluster


async def _eventually(check: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


def _scheduler(cluster: InProcessCluster) -> Any:
    assert cluster.control is not None and cluster.control.scheduler is not None
    ref = cluster.control.scheduler.ref
    assert ref is not None
    return ref.proxy()


def _indexed_blocks(cluster: InProcessCluster, instance_id: str) -> int:
    """Blocks the control plane's index has for the instance (0 while a new control plane is not leading yet)."""
    control = cluster.control
    if control is None or control.scheduler is None or control.scheduler.ref is None:
        return 0
    policy = control.scheduler.ref.proxy().policy.get(timeout=5)
    count: int = policy.prefix_index.num_blocks(instance_id)
    return count


async def test_repeated_long_prefix_goes_to_its_holder_and_resyncs_after_restart(nats_url: str) -> None:
    cluster = _cluster(nats_url, 3)
    try:
        rng = random.Random(19)
        prefix = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PREFIX_CHARS))
        sampling = SamplingParams(max_tokens=4, ignore_eos=True)
        full_blocks = PREFIX_CHARS // BLOCK
        async with DroverClient(cluster.url, name="kv-sim") as client:
            await client.wait_for_instances(3, timeout_s=15)
            first = await client.generate(prefix + " first question?", sampling=sampling)
            assert first.done is not None
            holder = first.done.instances[0]
            # the holder's events reached the control plane's index (not only its reported count)
            await _eventually(lambda: _indexed_blocks(cluster, holder) >= full_blocks)
            _, hits_before, _ = metrics().prefix_cache_totals()
            for k in range(3):
                result = await client.generate(prefix + f" follow-up {k}?", sampling=sampling)
                assert result.done is not None
                assert result.done.instances[0] == holder, f"follow-up {k} went to {result.done.instances[0]}"
            # the sim engine's own counters (in heartbeats): each follow-up found the prefix cached there
            expected_hits = 3 * full_blocks * BLOCK

            def hits() -> bool:
                return metrics().prefix_cache_totals()[1] - hits_before >= expected_hits

            await _eventually(hits)
            status = await client.status()
            cached = {i.info.instance_id: i.cached_blocks for i in status.instances}
            assert cached[holder] >= full_blocks
            assert all(cached[i] == 0 for i in cached if i != holder), cached

        # A new control plane knows nothing of the caches; the engines' reports continue mid-stream (no
        # periodic listing in this test), so only its resync request can fill the index.
        await asyncio.to_thread(cluster.restart_control)
        await _eventually(lambda: _indexed_blocks(cluster, holder) >= full_blocks)
        sent = _scheduler(cluster).prefix_resyncs.get(timeout=5).sent
        assert sent >= 1
        async with DroverClient(cluster.url, name="kv-sim-2") as client:
            await client.wait_for_instances(3, timeout_s=15)
            again = await client.generate(prefix + " after the restart?", sampling=sampling)
            assert again.done is not None and again.done.instances[0] == holder
    finally:
        cluster.stop()


async def test_drover_sends_a_repeated_prefix_to_its_holder_live(nats_url: str) -> None:
    """The live scheduler gives ``drover``'s predictive index the prompt's vLLM block hashes (as for
    kv_aware), so its prefix awareness works outside the simulator too."""
    cluster = _cluster(nats_url, 3, DROVER_DISPATCH)
    try:
        rng = random.Random(24)
        prefix = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(PREFIX_CHARS))
        sampling = SamplingParams(max_tokens=4, ignore_eos=True)
        async with DroverClient(cluster.url, name="drover-prefix") as client:
            await client.wait_for_instances(3, timeout_s=15)
            first = await client.generate(prefix + " first question?", sampling=sampling)
            assert first.done is not None
            holder = first.done.instances[0]
            await _eventually(lambda: _indexed_blocks(cluster, holder) >= PREFIX_CHARS // BLOCK)
            for k in range(3):
                result = await client.generate(prefix + f" follow-up {k}?", sampling=sampling)
                assert result.done is not None
                assert result.done.instances[0] == holder, f"follow-up {k} went to {result.done.instances[0]}"
    finally:
        cluster.stop()


async def test_a_listing_bigger_than_max_payload_arrives_in_chunks() -> None:
    """A server with a 16 KiB max_payload: a listing of ~2,000 blocks (~18 KB) cannot go in one heartbeat, so
    the engine sends it in chunks sized from the server's max_payload, and a restarted control plane's index
    assembles them (it could only learn these blocks from the listing: the events were sent before it)."""
    server = EmbeddedNatsServer(max_payload_bytes=16 * 1024)
    server.start()
    cluster = _cluster(server.url, 1, num_blocks=4096, max_model_len=4096)
    try:
        rng = random.Random(23)
        sampling = SamplingParams(max_tokens=2, ignore_eos=True)
        async with DroverClient(cluster.url, name="kv-chunks") as client:
            await client.wait_for_instances(1, timeout_s=15)
            for k in range(16):  # 16 distinct 2,000-token prompts: 125 full blocks each
                prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2000))
                result = await client.generate(prompt, sampling=sampling)
                assert result.done is not None, k
        expected = 16 * (2000 // BLOCK)
        await _eventually(lambda: _indexed_blocks(cluster, "kvsim-0") >= expected)
        await asyncio.to_thread(cluster.restart_control)
        await _eventually(lambda: _indexed_blocks(cluster, "kvsim-0") >= expected, timeout_s=30.0)
        index = _scheduler(cluster).policy.get(timeout=5).prefix_index
        assert index.stats.resyncs >= 1 and not index.needs_resync("kvsim-0")
    finally:
        cluster.stop()
        server.stop()
