"""Prefill/decode disaggregation in the simulator (control/simulator/pd.py): dispatch to prefill instances,
a handoff after the first token, transfer time from the bandwidth, and "stay" when decode cannot take it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from control.policy.params import PolicyParams
from control.policy.pd import PdParams, Phase
from control.simulator import ClusterConfig, LengthSpec, generate_workload
from control.simulator.pd import PdClusterSimulator, split_phases
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig

ENGINE = SimEngineConfig(
    block_size=16, num_blocks=400, max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=4096
)


def config(n: int = 4, **kw: object) -> ClusterConfig:
    params = PolicyParams(dispatch_policy="least_loaded", migration_enabled=False)
    return ClusterConfig(num_instances=n, engine=ENGINE, policy=params, **kw)  # type: ignore[arg-type]


def workload(n: int = 200, rate: float = 20.0, seed: int = 3) -> list[RequestSpec]:
    return generate_workload(
        n, rate, prompt=LengthSpec.zipf(300, 2000), output=LengthSpec.uniform(8, 64), seed=seed, max_total_len=4096
    )


def run(phases: Sequence[Phase], pd: PdParams, cfg: ClusterConfig | None = None) -> tuple[PdClusterSimulator, Any]:
    sim = PdClusterSimulator(cfg or config(len(phases)), workload(), phases, pd)
    result = sim.run()
    for r in result.requests:  # every token produced, once
        assert r.sim is not None and r.sim.num_output == r.spec.output_len
    for inst in sim.instances:  # no block leaked on either side of a handoff
        core = inst.core
        assert core.allocated_blocks == core.reserved_blocks == core.outgoing_blocks == 0
    return sim, result


def test_requests_start_on_prefill_instances_and_decode_on_decode_instances() -> None:
    sim, result = run(split_phases(4, 2), PdParams(mode="disaggregated"))
    assert result.completed == 200 and result.unfinished == 0
    moved = 0
    for record in result.requests:
        assert record.instances[0] in (0, 1)  # dispatched to a prefill instance
        if len(record.instances) > 1:
            assert record.instances[1] in (2, 3)  # handed off to a decode instance, once
            assert len(record.instances) == 2
            moved += 1
    assert moved == sim.pd.handoffs_committed > 100
    assert all(core.num_free_blocks == ENGINE.num_blocks for core in (i.core for i in sim.instances))


def test_no_decode_room_means_the_request_stays_and_completes() -> None:
    sim, result = run(split_phases(4, 2), PdParams(mode="disaggregated", decode_headroom_blocks=10_000))
    assert result.completed == 200
    assert sim.pd.handoffs_committed == 0 and sim.pd.handoffs_stayed > 0
    assert all(r.instances == [r.instances[0]] and r.instances[0] in (0, 1) for r in result.requests)
    prefill_only, result = run(("prefill",) * 4, PdParams(mode="disaggregated"))  # no decode instance at all
    assert result.completed == 200 and prefill_only.pd.handoffs_started == 0


def test_adaptive_disaggregates_only_long_prompts() -> None:
    _, result = run(split_phases(4, 2), PdParams(mode="adaptive", adaptive_min_prompt_tokens=400))
    for record in result.requests:
        if record.spec.prompt_len < 400:
            assert record.instances == [record.instances[0]] and record.instances[0] in (2, 3)
        else:
            assert record.instances[0] in (0, 1)


def test_transfer_time_follows_the_bandwidth() -> None:
    fast, _ = run(split_phases(4, 2), PdParams(mode="disaggregated"), config(4, migration_bandwidth=1e12))
    slow, _ = run(split_phases(4, 2), PdParams(mode="disaggregated"), config(4, migration_bandwidth=2e8))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(slow.counters.migration_durations) > 3 * mean(fast.counters.migration_durations)


def test_off_is_the_colocated_baseline_and_runs_are_deterministic() -> None:
    def key(result: Any) -> list[tuple[Any, ...]]:
        return [(r.spec.request_id, r.sim.finish_time, tuple(r.instances)) for r in result.requests]

    a, ra = run(("both",) * 4, PdParams())
    _, rb = run(split_phases(4, 2), PdParams())  # phases are ignored when the mode is off
    assert key(ra) == key(rb) and a.pd.handoffs_started == 0
    _, rc = run(split_phases(4, 2), PdParams(mode="disaggregated"))
    _, rd = run(split_phases(4, 2), PdParams(mode="disaggregated"))
    assert key(rc) == key(rd) != key(ra)


def test_rebalancing_moves_decode_instances_to_a_starved_prefill_pool() -> None:
    long_prompts = generate_workload(
        150, 30.0, prompt=LengthSpec.uniform(1500, 2500), output=LengthSpec.uniform(4, 16), seed=5, max_total_len=4096
    )

    def run_split(period: float) -> tuple[PdClusterSimulator, float]:
        pd = PdParams(mode="disaggregated", rebalance_period_s=period)
        sim = PdClusterSimulator(config(4), long_prompts, split_phases(4, 1), pd)
        result = sim.run()
        assert result.completed == 150
        return sim, result.prefill.mean

    fixed, fixed_ttft = run_split(0.0)
    moved, moved_ttft = run_split(0.5)
    assert fixed.pd.phase_changes == 0 and moved.pd.phase_changes >= 1
    assert sum(moved.pd.phase_of(i.instance_id) == "prefill" for i in moved.instances) >= 2
    assert moved_ttft < fixed_ttft  # virtual time: more prefill instances drain the prompt queue sooner


def test_load_balancing_migration_never_moves_a_request_onto_a_prefill_instance() -> None:
    params = PolicyParams(dispatch_policy="least_loaded", migration_enabled=True)
    cfg = ClusterConfig(num_instances=5, engine=ENGINE, policy=params)
    busy = generate_workload(
        300, 100.0, prompt=LengthSpec.zipf(300, 2000), output=LengthSpec.zipf(800, 3000), seed=9, max_total_len=4096
    )
    sim = PdClusterSimulator(cfg, busy, split_phases(5, 2), PdParams(mode="disaggregated"))
    result = sim.run()
    assert result.completed == 300
    # the planner runs beside the handoffs (without the pool filter it moved 89 of these onto prefill instances)
    assert result.migrations_committed >= sim.pd.handoffs_committed > 0
    for record in result.requests:
        assert all(index >= 2 for index in record.instances[1:]), record.instances


def test_per_phase_autoscaler_starts_prefill_instances_for_a_prompt_queue_and_gives_back_idle_decode() -> None:
    """1 prefill + 3 decode instances, long prompts and short outputs: the prefill pool's queue is over its
    TTFT budget, so the autoscaler (the live AutoscalerActor's core decision) starts prefill instances; the
    decode pool sits near empty, so it gives back decode instances, never its last one."""
    long_prompts = generate_workload(
        150, 30.0, prompt=LengthSpec.uniform(1500, 2500), output=LengthSpec.uniform(4, 16), seed=5, max_total_len=4096
    )

    def run_scaled(period: float) -> tuple[PdClusterSimulator, float]:
        pd = PdParams(
            mode="disaggregated",
            autoscale_period_s=period,
            autoscale_ttft_target_s=0.5,
            autoscale_prefill_tokens_per_s=8000.0,
            autoscale_max_instances=8,
        )
        sim = PdClusterSimulator(config(4), long_prompts, split_phases(4, 1), pd, startup_s=0.5)
        result = sim.run()
        assert result.completed == 150
        for inst in sim.instances:  # nothing leaked on instances started or stopped on the way
            assert inst.core.allocated_blocks == inst.core.reserved_blocks == inst.core.outgoing_blocks == 0
        return sim, result.prefill.mean

    fixed, fixed_ttft = run_scaled(0.0)
    scaled, scaled_ttft = run_scaled(0.5)
    assert fixed.scaled_out == fixed.scaled_in == 0 and len(fixed.instances) == 4
    assert scaled.scaled_out >= 1 and scaled.scaled_in >= 1
    started = scaled.instances[4:]
    assert started and all(scaled.pd.phase_of(i.instance_id) == "prefill" for i in started)
    decode_left = [
        i for i in scaled.instances if scaled.pd.phase_of(i.instance_id) == "decode" and i.state != "stopped"
    ]
    assert len(decode_left) >= 1  # a pool keeps one instance
    assert len(scaled.instances) <= 4 + 8
    assert scaled_ttft < fixed_ttft  # virtual time: more prefill instances drain the prompt queue sooner
