"""The actors' metric hooks: a real request path (sim engines, real NATS) moves the process's series."""

from __future__ import annotations

import asyncio
import contextlib
import re

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, DroverError
from observability.metrics import metrics
from tests.integration.conftest import make_sim_cluster


def _value(text: str, series: str) -> float:
    match = re.search("^" + re.escape(series) + r" (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_request_path_records_requests_latency_and_instances(nats_url: str) -> None:
    cluster: InProcessCluster = make_sim_cluster(nats_url, 2, time_scale=0.2, max_model_len=1024)
    try:
        before = metrics().render().decode()
        async with DroverClient(cluster.url, name="metrics-hooks") as client:
            await client.wait_for_instances(2, timeout_s=10)
            await asyncio.gather(*(client.generate(f"m {i}", max_tokens=5) for i in range(4)))
            stream = await client.submit("x" * 5000)
            with contextlib.suppress(DroverError):
                await stream.result()  # prompt_too_long
        await asyncio.sleep(0.3)  # a heartbeat and a scheduler tick
        after = metrics().render().decode()
    finally:
        cluster.stop()
    done = 'drover_requests_total{outcome="length",request_class="interactive"}'
    assert _value(after, done) - _value(before, done) == 4
    too_long = 'drover_requests_total{outcome="prompt_too_long",request_class="interactive"}'
    assert _value(after, too_long) - _value(before, too_long) == 1
    assert _value(after, 'drover_ttft_seconds_count{request_class="interactive"}') >= 4
    assert _value(after, 'drover_inter_token_seconds_count{request_class="interactive"}') >= 16
    assert 'drover_instance_total_blocks{instance="sim-0"}' in after
