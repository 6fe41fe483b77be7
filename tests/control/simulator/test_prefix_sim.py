"""Prefix caching in the cluster simulator: trace hashes reach the engines, engine events feed the kv_aware
index, and routing by it finds more cached prefix than round-robin."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from control.policy.params import PolicyParams
from control.simulator.cluster import ClusterConfig
from control.simulator.prefix import PrefixClusterSimulator, load_prefix_trace
from engines.sim.core import SimEngineConfig


def write_trace(path: Path, n: int = 240, seed: int = 3) -> Path:
    """Conversations that share a long system prefix per 'tenant' and grow turn by turn."""
    rng = random.Random(seed)
    rows = ["timestamp,input_tokens,output_tokens,hash_ids"]
    next_id = 10_000
    tenants = [list(range(t * 100, t * 100 + 6)) for t in range(8)]
    for i in range(n):
        ids = list(tenants[rng.randrange(len(tenants))])
        for _ in range(rng.randrange(1, 4)):
            ids.append(next_id)
            next_id += 1
        rows.append(
            f"{i * 0.05:.3f},{len(ids) * 512 - rng.randrange(200)},{rng.randrange(2, 20)},{' '.join(map(str, ids))}"
        )
    path.write_text("\n".join(rows) + "\n")
    return path


def run(policy: str, trace_path: Path) -> PrefixClusterSimulator:
    config = ClusterConfig(
        num_instances=8,
        engine=SimEngineConfig(block_size=16, num_blocks=2048, max_num_seqs=64, max_model_len=16384),
        policy=PolicyParams(dispatch_policy=policy, migration_enabled=False),
    )
    sim = PrefixClusterSimulator(config, load_prefix_trace(trace_path))
    result = sim.run()
    assert result.completed == 240
    return sim


def test_kv_aware_finds_more_cached_prefix_than_round_robin(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv")
    rr = run("round_robin", trace).prefix_summary()
    kv_sim = run("kv_aware", trace)
    kv = kv_sim.prefix_summary()
    assert kv.index_batches > 0 and kv.index_entries > 0
    assert kv.hit_rate > rr.hit_rate + 0.1
    assert kv.prefill_tokens_saved > rr.prefill_tokens_saved


def test_trace_without_hashes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("timestamp,input_tokens,output_tokens\n0,10,2\n")
    with pytest.raises(ValueError, match="hash_ids"):
        load_prefix_trace(path)
