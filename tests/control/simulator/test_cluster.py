"""Cluster simulator: determinism, conservation, migration under pressure, draining, workloads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from control.policy.params import PolicyParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot, running_totals
from control.simulator import (
    ClusterConfig,
    ClusterSimulator,
    LengthSpec,
    generate_workload,
    load_trace,
    simulate,
    views,
)
from control.simulator.runner import ObservedCluster
from control.simulator.views import instance_view
from control.simulator.workload import RequestSpec, arrival_times
from engines.sim.core import SimEngineConfig, SimRequest

SMALL_ENGINE = SimEngineConfig(
    block_size=16, num_blocks=400, max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=4096
)


def config(policy: str = "freeness", migration: bool = True, n: int = 4, **kw: object) -> ClusterConfig:
    params = PolicyParams(dispatch_policy=policy, migration_enabled=migration)
    return ClusterConfig(num_instances=n, engine=SMALL_ENGINE, policy=params, **kw)  # type: ignore[arg-type]


def workload(n: int = 400, rate: float = 40.0, seed: int = 7) -> list:
    return generate_workload(
        n,
        rate,
        prompt=LengthSpec.zipf(200, 2000),
        output=LengthSpec.zipf(150, 1500),
        seed=seed,
        cv=2.0,
        max_total_len=4096,
    )


def fingerprint(result) -> list[tuple]:
    return [
        (r.spec.request_id, r.sim.first_token_time, r.sim.finish_time, r.sim.num_preemptions, tuple(r.instances))
        for r in result.requests
    ]


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "freeness", "prefix_affinity"])
def test_deterministic_for_a_seed(policy: str) -> None:
    a = simulate(config(policy), workload())
    b = simulate(config(policy), workload())
    assert fingerprint(a) == fingerprint(b)
    assert a.completed == 400 and a.unfinished == 0


def test_different_seeds_differ() -> None:
    assert fingerprint(simulate(config(), workload(seed=1))) != fingerprint(simulate(config(), workload(seed=2)))


@pytest.mark.parametrize("migration", [False, True])
def test_blocks_conserved_and_everything_finishes(migration: bool) -> None:
    sim = ClusterSimulator(config(migration=migration), workload(rate=80.0))
    result = sim.run()
    assert result.completed == 400
    for inst in sim.instances:
        core = inst.core
        assert core.allocated_blocks == core.reserved_blocks == core.outgoing_blocks == 0
        assert core.num_free_blocks == core.config.num_blocks
        assert not core.running and not core.waiting
    for r in result.requests:
        assert r.sim is not None and r.sim.num_output == r.spec.output_len
        assert r.sim.finish_time >= r.sim.first_token_time >= r.spec.arrival


def test_migration_happens_under_pressure_and_reduces_preemption() -> None:
    base = simulate(config("freeness", migration=False), workload(rate=80.0))
    llumnix = simulate(config("freeness", migration=True), workload(rate=80.0))
    assert base.preemptions > 0
    assert llumnix.migrations_committed > 0
    assert llumnix.downtime.mean > 0
    migrated = [r for r in llumnix.requests if r.migrations]
    assert migrated and all(len(r.instances) == 1 + r.migrations for r in migrated)


def test_draining_instance_gets_no_new_requests_and_empties() -> None:
    sim = ClusterSimulator(config(drain=((2.0, 0),)), workload(rate=60.0))
    result = sim.run()
    assert result.completed == 400
    for r in result.requests:
        if r.dispatch_time > 2.0 + 0.06:  # after the drain was seen by a tick
            assert r.instances[0] != 0
    moved_off = [r for r in result.requests if r.instances[0] == 0 and len(r.instances) > 1]
    assert moved_off


def test_migration_params_change_behaviour() -> None:
    off = dataclasses.replace(config(), policy=PolicyParams(migration_enabled=False))
    assert simulate(off, workload(rate=80.0)).migrations_started == 0
    one_stage = PolicyParams(max_stages=1, last_stage_max_blocks=-1, after_max_stages="abort")
    result = simulate(dataclasses.replace(config(), policy=one_stage), workload(rate=80.0))
    assert result.migrations_started > 0 and result.migrations_committed == 0
    assert result.abort_reasons.get("stages", 0) > 0


def test_requests_that_cannot_fit_are_rejected() -> None:
    specs = generate_workload(10, 5.0, prompt=LengthSpec.fixed(5000), output=LengthSpec.fixed(10), seed=0)
    result = simulate(config(), specs)
    assert result.rejected == 10 and result.completed == 0


def test_workload_generators() -> None:
    rng = np.random.default_rng(0)
    gaps = np.diff(arrival_times(20000, 10.0, rng, cv=4.0))
    assert gaps.std() / gaps.mean() == pytest.approx(4.0, rel=0.1)
    lengths = LengthSpec.zipf(256, 6144).sample(50000, np.random.default_rng(1))
    assert lengths.mean() == pytest.approx(256, rel=0.1) and lengths.max() <= 6144 and lengths.min() >= 1
    assert generate_workload(50, 3.0, seed=5) == generate_workload(50, 3.0, seed=5)


def test_trace_replay(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("timestamp,input_tokens,output_tokens\n0.0,100,10\n2.0,5000,20\n4.0,50,5\n")
    specs = load_trace(path, time_compression=2.0, max_total_len=4096)
    assert [s.arrival for s in specs] == [0.0, 1.0, 2.0]
    assert specs[1].prompt_len == 4095 and specs[1].output_len == 1
    result = simulate(config(), specs)
    assert result.completed == 3


def test_planner_forgets_requests_when_they_finish() -> None:
    # drover's migration remembers each moved request (budget, cooldown, no-return window); the simulator
    # tells the planner when a request finishes, so nothing is left once the run is over
    from control.policy.recommended import user_policy_params

    params = user_policy_params("drover").with_updates(migration_sources="freeness")  # load moves, not only drains
    sim = ClusterSimulator(ClusterConfig(num_instances=4, engine=SMALL_ENGINE, policy=params), workload(rate=80.0))
    result = sim.run()
    assert result.completed == 400 and result.migrations_started > 0
    assert sim.planner.remembered_moves() == 0


class _EagerTicks(ObservedCluster):
    lazy_token_counts = False  # every tick materialises every decode run, as before the lazy ticks


@pytest.mark.parametrize(
    ("policy", "drain"), [("freeness", ()), ("drover", ((3.0, 1),)), ("least_loaded", ((2.0, 0), (4.0, 2)))]
)
def test_lazy_ticks_change_nothing(policy: str, drain: tuple[tuple[float, int], ...]) -> None:
    """Ticks that look only at instances touched or due a block change, and materialise a decode run only
    when it added a block, give the very results of ticks that materialise every busy instance: every
    request's times, preemptions and placements, every token gap, and the migration counters."""
    params = user_policy_params(policy) if policy == "drover" else PolicyParams(dispatch_policy=policy)
    cfg = ClusterConfig(num_instances=4, engine=SMALL_ENGINE, policy=params, drain=drain)
    runs = []
    for cls in (ObservedCluster, _EagerTicks):
        sim = cls(cfg, workload(rate=60.0))
        result = sim.run()
        runs.append(
            (
                fingerprint(result),
                [(r.sim.num_output if r.sim else -1, r.migrations) for r in result.requests],
                sim.gaps,
                sim.gap_weights,
                dataclasses.astuple(sim.counters),
                result.preemptions,
            )
        )
    lazy, eager = runs
    assert lazy == eager
    assert lazy[4][0] > 0 or policy == "least_loaded"  # migrations started (freeness: load, drover: drain)


@pytest.mark.parametrize("slot_by_slot", [True, False])
def test_instance_view_reports_the_core(slot_by_slot: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulators' heartbeat (built slot by slot for speed, or with the constructors when the snapshot
    classes' fields change) has every field where a keyword call puts it."""
    if not slot_by_slot:
        monkeypatch.setattr(views, "_INSTANCE_SETTERS", None)
        monkeypatch.setattr(views, "_RUNNING_SETTERS", None)
    sim = ClusterSimulator(config("freeness", migration=False, n=1), workload(n=40, rate=400.0))
    core = sim.instances[0].core
    for spec in sim.requests[:40]:
        core.add(SimRequest(spec.request_id, spec.prompt_len, spec.output_len, priority=len(spec.request_id) % 2))
    core.plan(0.0)
    core.finish_plan()
    assert core.running and core.waiting
    view = instance_view("sim-0000", core, model="m", draining=True, num_preempted=2, running=core.running)
    running = tuple(
        RunningSnapshot(
            r.request_id,
            r.context_len,
            r.num_blocks,
            r.priority,
            r.num_output > 0 and r.num_computed >= r.context_len - 1,
        )
        for r in core.running
    )
    assert any(not r.decoding for r in running)  # a prefill left to count
    expected = InstanceSnapshot(
        instance_id="sim-0000",
        num_total_blocks=core.config.num_blocks,
        num_free_blocks=core.num_free_blocks,
        num_running=len(core.running),
        num_waiting=len(core.waiting),
        waiting_blocks=core.waiting_blocks,
        head_waiting_blocks=core.head_waiting_blocks(),
        num_preempted=2,
        draining=True,
        model="m",
        block_size=core.config.block_size,
        running=running,
        high_priority_count=sum(1 for r in core.running if r.priority > 0),
        running_totals=running_totals(running, core.config.block_size),  # summed by the builder, as a heartbeat's
    )
    assert view == expected
    assert [hash(r) for r in view.running] == [hash(r) for r in expected.running]
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.running[0].num_blocks = 0  # type: ignore[misc]  # built slot by slot, still frozen


def test_the_fair_queue_lets_another_client_past_a_flood() -> None:
    """``fair_quantum_tokens`` runs the core's fair queue (as ``[scheduler] fairness`` does live): a flood's
    backlog waits in the control plane, not in the engines' queues, so another client's request starts almost
    at once instead of after the whole flood."""
    engine = SimEngineConfig(max_num_seqs=2)
    requests = [RequestSpec(f"f{k}", 0.0, 60, 100, client="flood") for k in range(12)]
    requests.append(RequestSpec("o0", 0.01, 60, 100, client="other"))

    def started_before_other(quantum: int | None) -> int:
        result = simulate(ClusterConfig(num_instances=2, engine=engine, fair_quantum_tokens=quantum), requests)
        assert result.completed == len(requests)
        times = {r.spec.request_id: r.sim.first_token_time for r in result.requests if r.sim is not None}
        return sum(1 for rid, t in times.items() if t < times["o0"])

    assert started_before_other(None) == 12  # first come, first served in the engines' queues
    assert started_before_other(200) <= 4  # the running batches (2 x 2) at most
