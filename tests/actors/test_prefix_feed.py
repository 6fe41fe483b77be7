"""Heartbeat prefix-cache reports into the kv_aware index, and prefix-aware migration destinations."""

from __future__ import annotations

from actors.prefix_feed import apply_prefix_report, prefix_aware_destinations
from control.policy.block_hash import vllm_block_hashes
from control.policy.dispatch import make_dispatch_policy
from control.policy.kv_aware import KvAwareIndex
from control.policy.migration import MigrationDecision
from control.policy.snapshots import InstanceSnapshot
from transport.messages import EngineInfo, InstanceHeartbeat, InstanceLoad, PrefixCacheReport, decode, encode


def test_reports_feed_the_index() -> None:
    policy = make_dispatch_policy("kv_aware")
    assert isinstance(policy, KvAwareIndex)
    index = policy.prefix_index
    full = PrefixCacheReport(epoch="e", seq=0, stored=[1, 2, 3], full=True, num_cached=3)
    assert apply_prefix_report(policy, "a", full, 0.0) == 3
    assert index.overlap("a", (1, 2, 3)) == 3
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=1, removed=[3], num_cached=2), 0.1)
    assert index.overlap("a", (1, 2, 3)) == 2
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=3, num_cached=2), 0.2)  # keepalive ahead
    assert index.needs_resync("a")  # batch 2 was lost
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=4, stored=[1, 2], full=True), 0.3)
    assert not index.needs_resync("a")
    assert apply_prefix_report(policy, "a", None, 0.4) == -1
    other = make_dispatch_policy("freeness")  # no index: only the count
    assert apply_prefix_report(other, "a", full, 0.0) == 3


def test_report_round_trips_in_a_heartbeat_field() -> None:
    report = PrefixCacheReport(epoch="e", seq=5, stored=[2**63 + 5], removed=[7], num_cached=1, hit_tokens=64)
    beat = InstanceHeartbeat(
        v=2,
        info=EngineInfo(
            instance_id="a",
            engine_kind="vllm",
            model="m",
            dtype="float32",
            block_size=32,
            num_blocks=8,
            max_model_len=64,
        ),
        load=InstanceLoad(num_total_blocks=8, num_free_blocks=8, num_running=0, num_waiting=0),
        seq=1,
        sent_at=0.0,
        prefix_cache=report,
    )
    decoded = decode(encode(beat))
    assert isinstance(decoded, InstanceHeartbeat) and decoded.prefix_cache == report


def test_migration_destinations_follow_the_prompt_prefix() -> None:
    policy = make_dispatch_policy("kv_aware")
    assert isinstance(policy, KvAwareIndex)
    prompt = list(range(200))
    policy.prefix_index.apply("d2", epoch="e", seq=0, stored=vllm_block_hashes(prompt, 32))
    snapshots = [InstanceSnapshot(i, 100, 100, 0, 0, block_size=32) for i in ("s1", "s2", "d1", "d2")]
    decisions = [
        MigrationDecision("s1", "d1", "r1", 7, 0, "load", 1.0, 10.0),
        MigrationDecision("s2", "d2", "r2", 7, 0, "load", 1.0, 10.0),
    ]
    prompts = {"r1": prompt, "r2": [5] * 200}
    out = prefix_aware_destinations(policy, decisions, snapshots, prompts.get)
    assert [d.destination_id for d in out] == ["d2", "d1"]
    assert prefix_aware_destinations(make_dispatch_policy("freeness"), decisions, snapshots, prompts.get) == decisions


def test_resync_requests_follow_the_index_at_most_once_a_second() -> None:
    from actors.prefix_feed import ResyncRequests

    policy = make_dispatch_policy("kv_aware")
    assert isinstance(policy, KvAwareIndex)
    resyncs = ResyncRequests(min_interval_s=1.0)
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=0, stored=[1], full=True), 0.0)
    assert not resyncs.due(policy, "a", 0.0)  # in step
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=2, stored=[2]), 0.1)  # batch 1 lost
    assert resyncs.due(policy, "a", 0.1)
    assert not resyncs.due(policy, "a", 0.5)  # asked already
    assert resyncs.due(policy, "a", 1.2)  # still out of step a second later: ask again
    apply_prefix_report(policy, "a", PrefixCacheReport(epoch="e", seq=3, stored=[1, 2], full=True), 1.3)
    assert not resyncs.due(policy, "a", 5.0)
    # a control plane that joins mid-stream (restart, reconnect) asks too
    fresh = make_dispatch_policy("kv_aware")
    fresh.upsert(InstanceSnapshot("a", 100, 100, 0, 0, block_size=32))
    apply_prefix_report(fresh, "a", PrefixCacheReport(epoch="e", seq=7), 0.0)
    assert ResyncRequests().due(fresh, "a", 0.0)
    assert not ResyncRequests().due(make_dispatch_policy("freeness"), "a", 0.0)  # no index: never
    assert resyncs.sent == 2
