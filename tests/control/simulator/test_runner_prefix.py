"""``drover sim run`` on a trace with prefix hashes: every policy runs with simulated prefix caching, and
``drover``'s prefix-aware dispatch is fed the engines' cache events."""

from __future__ import annotations

from control.simulator.presets import get_preset
from control.simulator.runner import (
    ROW_KEYS,
    ObservedCluster,
    ObservedPrefixCluster,
    RunOptions,
    fixed_simulator,
    run_policy,
)
from control.simulator.workload import RequestSpec


def shared_prefix_workload(n: int = 48) -> list[RequestSpec]:
    """Four conversations of 2,048-token prompts (4 trace blocks of 512): 3 shared blocks each, 1 unique."""
    specs = []
    for i in range(n):
        group = i % 4
        hashes = (group * 100, group * 100 + 1, group * 100 + 2, 10_000 + i)
        specs.append(RequestSpec(f"r{i}", 0.25 * i, 2048, 32, prefix_hashes=hashes, prefix_block_tokens=512))
    return specs


def test_a_hashed_trace_runs_with_prefix_caching_for_every_policy() -> None:
    options = RunOptions(preset=get_preset("llama7b-a10"), instances=4)
    rows = {name: run_policy(name, shared_prefix_workload(), options).row for name in ("least_loaded", "drover")}
    for row in rows.values():
        assert set(ROW_KEYS) <= set(row)
        assert row["completed"] == row["submitted"] == 48
        assert row["prefix_hit_rate"] > 0  # engines cache whatever the policy
    # drover sends a conversation back to the instance caching its prefix: a higher hit rate than INFaaS++'s
    assert rows["drover"]["prefix_hit_rate"] > rows["least_loaded"]["prefix_hit_rate"]


def test_a_workload_without_hashes_runs_the_plain_simulator() -> None:
    cluster = get_preset("llama7b-a10").cluster_config(2)
    plain = [RequestSpec("a", 0.0, 100, 10)]
    assert type(fixed_simulator(cluster, plain)) is ObservedCluster
    assert isinstance(fixed_simulator(cluster, shared_prefix_workload(2)), ObservedPrefixCluster)
