"""Parity (c): each place where the live control plane and the simulator used to disagree, now one behaviour
because both shells run the control core. Each test here failed on the code before the core existed."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator

import pytest

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.core.memory import GroupHysteresis, restore_snapshot
from control.core.migration import MigrationStages
from control.core.record import Decision
from control.policy.autoscaling import PerRole
from control.policy.memory import MemoryParams, should_restore
from control.policy.params import PolicyParams
from control.simulator import ClusterConfig, ElasticConfig, LengthSpec, generate_workload, simulate, simulate_elastic
from control.simulator.memory import MemorySimulator, MemSimConfig, MemSimResult, Unit
from control.simulator.memory import simulate as simulate_memory
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig, SimRequest
from engines.sim.live_migration import MigratableSimEngine
from tests.integration.conftest import make_sim_cluster

# A migration that can never reach stop-and-copy by the block threshold: only after_max_stages decides.
ONE_STAGE = {"max_stages": "1", "last_stage_max_blocks": "-1"}


@pytest.fixture(scope="module")
def cluster(nats_url: str) -> Iterator[InProcessCluster]:
    cluster = make_sim_cluster(nats_url, 0)
    for name in ("par-a", "par-b"):
        cluster.add_engine(MigratableSimEngine(name, num_blocks=512, max_model_len=1024, time_scale=1.0))
    yield cluster
    cluster.stop()


@pytest.fixture
async def client(cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(cluster.url, name="parity-client").connect()
    await c.wait_for_instances(2, timeout_s=10)
    await c.policy({"migration_enabled": "false", **ONE_STAGE})
    yield c
    await c.close()


async def _migrate_once(client: DroverClient, request_id: str) -> tuple[bool, str]:
    stream = await client.submit("x" * 100, max_tokens=300, request_id=request_id)
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= 2:
            break
    status = await client.status()
    source = next(r.instance_id for r in status.requests if r.request_id == request_id)
    destination = "par-b" if source == "par-a" else "par-a"
    reply = await client.migrate(request_id, destination)
    await stream.cancel()
    return reply.ok, reply.message


def _simulate_one_stage(after: str) -> tuple[int, int]:
    params = PolicyParams(max_stages=1, last_stage_max_blocks=-1, after_max_stages=after)  # type: ignore[arg-type]
    engine = SimEngineConfig(block_size=16, num_blocks=400, max_num_seqs=64, max_num_batched_tokens=1024)
    requests = generate_workload(
        400,
        80.0,
        prompt=LengthSpec.zipf(200, 2000),
        output=LengthSpec.zipf(150, 1500),
        seed=7,
        cv=2.0,
        max_total_len=4096,
    )
    result = simulate(ClusterConfig(num_instances=4, engine=engine, policy=params), requests)
    return result.migrations_committed, result.abort_reasons.get("stages", 0)


@pytest.mark.parametrize("after", ["stop_and_copy", "abort"])
async def test_after_max_stages_is_one_behaviour(client: DroverClient, after: str) -> None:
    """Before: live went on to stop-and-copy after max_stages, the simulator aborted. Now both do what
    ``after_max_stages`` says."""
    await client.policy({"after_max_stages": after})
    ok, message = await _migrate_once(client, f"parity-stages-{after}")
    committed, aborted_by_stages = _simulate_one_stage(after)
    if after == "stop_and_copy":
        assert ok, message
        assert committed > 0 and aborted_by_stages == 0
    else:
        assert not ok and "stop-and-copy" in message
        assert committed == 0 and aborted_by_stages > 0


def test_an_overflowing_interactive_request_is_held_back_in_the_simulator() -> None:
    """Before: live held an interactive request back when it would overflow onto a full instance with no
    batch request to evict, the simulator placed it anyway (it queued inside the engine)."""
    engine = SimEngineConfig(block_size=16, num_blocks=400, max_num_seqs=2, max_num_batched_tokens=1024)
    config = ElasticConfig(
        cluster=ClusterConfig(engine=engine),
        scaling="none",
        initial=PerRole(0, 1, 0),
        local_autoscaler=False,
    )
    requests = [RequestSpec(f"r{i}", 0.001 * i, 100, 200) for i in range(3)]
    result = simulate_elastic(config, requests)
    dispatched = {r.spec.request_id: r.dispatch_time for r in result.sim.requests}
    assert dispatched["r0"] == pytest.approx(0.0) and dispatched["r1"] == pytest.approx(0.001)
    # r2 waits in the scheduler's queue until a slot frees (r0 or r1 finishes after 200 tokens).
    assert dispatched["r2"] > 1.0
    assert result.sim.completed == 3


def _kunserve(min_group_s: float = 1.0, cooldown_s: float = 2.0) -> MemSimResult:
    from tests.control.simulator.test_memory import burst

    memory = MemoryParams(min_group_s=min_group_s, cooldown_s=cooldown_s)
    return simulate_memory(MemSimConfig(mode="kunserve", num_instances=2, memory=memory), burst())


def test_kunserve_groups_have_the_live_hysteresis_in_the_simulator() -> None:
    """Before: the live MemoryManager kept a group at least min_group_s, restored an idle group and cooled
    members down after a group; the memory simulator did none of it."""
    quick = _kunserve(min_group_s=0.0, cooldown_s=0.0)
    assert quick.drops >= 1 and quick.restores >= 1
    # A group that must live longer than the run is never restored automatically.
    assert _kunserve(min_group_s=1e9).restores == 0
    # After a restore the members cool down (here for longer than the run) before they may group again.
    from tests.control.simulator.test_memory import burst

    sim = MemorySimulator(
        MemSimConfig(mode="kunserve", num_instances=2, memory=MemoryParams(min_group_s=0.0, cooldown_s=1e9)), burst()
    )
    assert sim.run().restores >= 1
    assert not sim.hysteresis.may_group("0", now=1e6) and not sim.hysteresis.may_group("1", now=1e6)


def test_one_kunserve_block_total() -> None:
    """Before: live compared what a group holds with the leader's own pool, the simulator with the members'
    pools summed. Both now use control.core.memory.restore_snapshot (the leader's pool)."""
    snap = restore_snapshot("g", num_total_blocks=300, num_free_blocks=150, num_waiting=0, leader_pool_blocks=100)
    assert snap.used_blocks == 150 and not should_restore(snap, MemoryParams(), previous_memory_use=1.0)
    hysteresis = GroupHysteresis(MemoryParams(min_group_s=1.0, cooldown_s=2.0))
    hysteresis.formed("g", now=10.0)
    idle = restore_snapshot("g", 300, 300, 0, 100)
    assert not hysteresis.restore_due(idle, now=10.5) and hysteresis.restore_due(idle, now=11.0)
    hysteresis.ended("g", ["a", "b"], now=11.0)
    assert not hysteresis.may_group("a", now=12.9) and hysteresis.may_group("a", now=13.0)


def test_the_first_autoscaling_plan_is_one_period_in_for_both_shells() -> None:
    """Before: the live AutoscalerActor planned at its first tick (t ~ 0, on rate counters covering nothing),
    the elastic simulator one period in. One rule now (control/core/scaling.py): one whole period in."""
    import dataclasses
    import time

    from actors.autoscaler import AutoscalerActor, _Tick
    from control.policy.autoscaling import AutoscaleParams
    from control.settings import load_settings
    from control.simulator.elastic import ElasticSimulator

    period_s = 60.0  # far longer than this test: every live tick below falls in the first period
    params = AutoscaleParams(period_s=period_s)

    class Scheduler:  # stands in for the scheduler actor: records which views the autoscaler asks for
        def __init__(self) -> None:
            self.asked: list[str] = []

        def tell(self, message: object) -> None:
            self.asked.append(message.purpose)  # type: ignore[attr-defined]

    settings = load_settings(overrides={"autoscaler": {"enabled": True}})
    settings = settings.model_copy(update={"autoscaling": params})
    scheduler = Scheduler()
    started = time.monotonic()
    live = AutoscalerActor(None, settings, scheduler, None)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            live.on_receive(_Tick())
    finally:
        live.on_stop()  # cancels the tick timer the first tick armed
    assert scheduler.asked == ["watch"] * 3  # before: "plan" at the very first tick
    assert started + period_s <= live.clock.next_plan_at <= time.monotonic() + period_s

    workload = generate_workload(40, 2.0, prompt=LengthSpec.zipf(64, 256), output=LengthSpec.zipf(64, 256), seed=0)
    elastic = ElasticConfig(autoscale=dataclasses.replace(params, period_s=5.0))
    sim = ElasticSimulator(elastic, workload)
    due_at: list[float] = []
    plan_due = sim.scaling_clock.plan_due

    def recording(now: float) -> bool:
        due = plan_due(now)
        if due:
            due_at.append(now)
        return due

    sim.scaling_clock.plan_due = recording  # type: ignore[method-assign]
    sim.run_elastic()
    assert due_at and due_at[0] == 5.0


def _imported_names(package: str) -> dict[str, set[str]]:
    """module path -> names it imports from the project (``from x import name``)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out: dict[str, set[str]] = {}
    for path in sorted((root / package).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names.update(alias.name for alias in node.names)
        out[str(path.relative_to(root))] = names
    return out


def test_one_dispatch_loop_for_both_shells() -> None:
    """Before: the queue in front of the dispatch index, class routing and the batch-release loop were written
    in the scheduler (actors/scheduler.py, actors/request_classes.py) and again in the simulator
    (control/simulator/cluster.py, elastic.py). Now both shells carry out the placements of one
    control.core.dispatch.Dispatcher, and no shell module uses the loop's parts itself."""
    parts = {"place_by_class", "BatchQueue", "FairQueue", "dispatch_room"}
    for package in ("actors", "control/simulator"):
        for module, names in _imported_names(package).items():
            assert not names & parts, f"{module} runs its own dispatch loop ({sorted(names & parts)})"

    from control.core.dispatch import Dispatcher
    from control.simulator.elastic import ElasticSimulator

    sim = ElasticSimulator(ElasticConfig(scaling="none"), [])
    assert isinstance(sim.dispatcher, Dispatcher) and sim.dispatcher.classes is not None
    assert "Dispatcher" in _imported_names("actors")["actors/scheduler.py"]


def test_one_snapshot_builder_in_the_simulator() -> None:
    """Before: snapshots were built from SimEngineCore in four places (cluster, elastic, memory simulator,
    runner), and they could drift apart. Now control/simulator/views.py is the only one."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "control" / "simulator"
    builders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InstanceSnapshot":
                builders.append(path.name)
    assert builders == ["views.py"]


def test_prefix_affinity_is_simulated() -> None:
    """Before: the simulator never put prefix block hashes into a request's demand, so prefix_affinity
    dispatched by freeness alone. Now a request that shares a prefix follows it to the instance that holds it,
    although that instance is the busiest."""
    engine = SimEngineConfig(block_size=16, num_blocks=400, max_num_seqs=16, max_num_batched_tokens=1024)
    shared = tuple(range(1, 33))
    requests = [
        RequestSpec("first", 0.0, 512, 400, prefix_hashes=shared, prefix_block_tokens=16),
        RequestSpec("other", 0.05, 512, 400, prefix_hashes=tuple(range(100, 132)), prefix_block_tokens=16),
        RequestSpec("again", 0.5, 512, 50, prefix_hashes=shared, prefix_block_tokens=16),
    ]
    params = PolicyParams(dispatch_policy="prefix_affinity", migration_enabled=False)
    result = simulate(ClusterConfig(num_instances=4, engine=engine, policy=params), requests)
    placed = {r.spec.request_id: r.instances[0] for r in result.requests}
    assert placed["again"] == placed["first"] and placed["other"] != placed["first"]


def test_the_memory_simulator_dispatches_and_pairs_migrations_through_the_core() -> None:
    """Before: control/memsim had its own migration pairing (sorted by freeness, its own threshold), and after
    the merge the memory simulator still picked its own dispatch target (a loop over its units' freeness).
    Now it carries out the placements of the control core's Dispatcher over the live ``freeness`` index and
    pairs with a kept MigrationPlanner, one view per unit (a group counts once, with its pooled blocks): its
    recorded calls, replayed through the cluster simulator's index and planner, give the same choices (and
    under another dispatch policy they would not)."""
    import ast
    from pathlib import Path

    from control.core.dispatch import Dispatcher
    from control.core.record import DecisionLog
    from control.simulator import ClusterSimulator
    from tests.control.simulator.test_memory import burst
    from tests.parity.replays import replay_scheduler

    source = Path(__file__).resolve().parents[2] / "control" / "simulator" / "memory.py"
    own = {"dispatch_freeness", "migration_freeness", "plan_migrations", "physical_usage"}
    used = {
        n.id if isinstance(n, ast.Name) else n.name
        for n in ast.walk(ast.parse(source.read_text()))
        if isinstance(n, ast.Name | ast.alias)
    }
    assert not used & own, f"control/simulator/memory.py ranks units itself ({sorted(used & own)})"

    for config in (
        MemSimConfig(mode="llumnix", num_instances=2),
        MemSimConfig(mode="kunserve", num_instances=2),
    ):
        log = DecisionLog()
        sim = MemorySimulator(config, burst(), decision_log=log)
        assert isinstance(sim.dispatcher, Dispatcher)
        result = sim.run()
        entries = log.entries()
        choices = [d for d in entries if d.what == "choose"]
        assert len(choices) >= len(burst()), "an arrival was placed without the core"
        assert replay_scheduler(ClusterSimulator(ClusterConfig(num_instances=0, policy=sim.params), []), entries) == []
        other = sim.params.with_updates(dispatch_policy="least_loaded")
        assert replay_scheduler(ClusterSimulator(ClusterConfig(num_instances=0, policy=other), []), entries)
        if config.mode == "llumnix":
            assert result.migrations > 0 and any(d.what == "migration_plan" and d.output for d in entries)
        else:
            # a group is one view with the pooled blocks, and requests go to it
            pooled = config.hardware.group_blocks(2)
            groups = {d.key for d in entries if d.what == "upsert" and d.inputs[0].num_total_blocks == pooled}  # type: ignore[attr-defined]
            assert result.drops >= 1 and groups & {d.output for d in choices}


class _SplitWatch(MemorySimulator):
    """Records, at each restore, the requests each former member holds right after it (a test probe)."""

    held: list[tuple[int, ...]]

    def _split(self, group: Unit, now: float) -> None:
        before = {r.request_id for r in (*group.core.running, *group.core.waiting)}
        super()._split(group, now)
        singles = {u.members[0]: u for u in self.units.values() if u.size == 1}
        self.held = getattr(self, "held", [])
        self.held.append(tuple(len(singles[m].core.running) + len(singles[m].core.waiting) for m in group.members))
        assert sum(self.held[-1]) == len(before)


def test_a_restored_group_leaves_its_requests_on_the_leader() -> None:
    """Live, the leader ``dissolve``s: it takes the KV back and serves every request of the group alone (the
    restore decision counts them against its own pool); the members restore with nothing to run. Before, the
    memory simulator spread the group's requests over the members (the freest first)."""
    from tests.control.simulator.test_memory import burst

    sim = _SplitWatch(MemSimConfig(mode="kunserve", num_instances=2, memory=MemoryParams(min_group_s=0.0)), burst())
    assert sim.run().restores >= 1
    assert any(held[0] > 0 for held in sim.held), "no group still had requests when it restored"
    assert all(all(n == 0 for n in held[1:]) for held in sim.held), sim.held


class _FormWatch(MemorySimulator):
    """Records, at each drop, whether any of the leader's or the members' decoding requests was recomputed."""

    recomputed: list[tuple[bool, bool]]  # (a leader's request recomputed, a member's request recomputed)

    def _form(self, unit_ids: list[int], members: tuple[int, ...], now: float) -> None:
        def running(uid: int) -> dict[str, tuple[SimRequest, int]]:
            return {r.request_id: (r, r.recomputed_tokens) for r in self.units[uid].core.running if r.num_output}

        leader = running(unit_ids[0])
        joining = {k: v for uid in unit_ids[1:] for k, v in running(uid).items()}
        super()._form(unit_ids, members, now)
        self.recomputed = getattr(self, "recomputed", [])
        if leader and joining:
            self.recomputed.append(
                (
                    any(r.recomputed_tokens > before for r, before in leader.values()),
                    any(r.recomputed_tokens > before for r, before in joining.values()),
                )
            )


def test_a_joining_members_requests_keep_their_kv_in_both_shells() -> None:
    """One join behaviour: a member's decoding requests move into the group with their KV, as the leader's do
    (the KunServe paper). Live, the member parks their KV at ``join`` and the leader takes it in at ``lead``
    (tests/integration/test_kunserve_live.py checks the same outcome on torch engines); before, live evicted
    them (recomputed) while the simulator kept them. Under the burst's automatic drops none is recomputed,
    and the forced join of the live test gives the live test's outcome."""
    from tests.control.simulator.test_memory import burst
    from tests.parity.join import simulated_join

    sim = _FormWatch(MemSimConfig(mode="kunserve", num_instances=2), burst())
    assert sim.run().drops >= 1
    assert sim.recomputed, "no drop found requests running on both instances"
    assert all(not leader and not members for leader, members in sim.recomputed), sim.recomputed
    assert simulated_join() == {"leader": ("group", True), "member": ("group", True)}


def test_local_batch_limits_stop_at_the_engines_max_num_seqs_in_the_simulator() -> None:
    """Live, an engine host clamps its local autoscaler's limits to the engine's ``max_num_seqs``; the elastic
    simulator used to start every instance at ``initial_batch`` (64) and raise its engine's ``max_num_seqs`` to
    whatever the limit said, past what the engine runs. Both now hold the control core's ``LocalSizer``."""
    from control.simulator.elastic import ElasticSimulator

    engine = SimEngineConfig(max_num_seqs=8)
    config = ElasticConfig(cluster=ClusterConfig(engine=engine), scaling="none", initial=PerRole(0, 2, 0))
    simulator = ElasticSimulator(config, [])
    assert [i.core.config.max_num_seqs for i in simulator.instances] == [8, 8]
    sizer = simulator.local_sizer()
    assert (sizer.limit, sizer.params.local.max_batch) == (8, 8)


def _stage_runs(entries: list[Decision]) -> list[list[Decision]]:
    """The stage machine's decisions, one list per migration (each opens with its first reservation)."""
    runs: dict[str, list[list[Decision]]] = {}
    for d in entries:
        if d.what == "first_reservation":
            runs.setdefault(d.key, []).append([d])
        elif d.what in ("grow_reservation", "after_stage"):
            runs[d.key][-1].append(d)
    return [run for per_request in runs.values() for run in per_request]


def _replayed(machine: MigrationStages, run: list[Decision]) -> list[object]:
    """One migration's recorded decisions asked afresh of ``machine`` (a new one)."""
    outputs: list[object] = []
    for d in run:
        if d.what == "first_reservation":
            machine.max_blocks = d.inputs[2]  # type: ignore[assignment]  # the request's cap: the shell's input
            outputs.append(machine.first_reservation(d.inputs[0]))  # type: ignore[arg-type]
        elif d.what == "grow_reservation":
            outputs.append(machine.grow_reservation(d.inputs[0]))  # type: ignore[arg-type]
        else:
            outputs.append(machine.after_stage(d.inputs[1]))  # type: ignore[arg-type]
    return outputs


@pytest.mark.parametrize("after", ["stop_and_copy", "abort"])
def test_the_memory_simulator_migrates_through_the_cores_stage_machine(after: str) -> None:
    """Before: the memory simulator carried out a Llumnix migration as one copy (the request switched at the
    source's next step boundary, with no downtime), while the cluster simulator and the live migrator ran the
    control core's stage machine. Now it runs the same machine through the helper the cluster simulator uses
    (``control/simulator/staged_copy.py``): over a slow link (0.2 GB/s) a migration takes a second stage, each
    stop-and-copy costs a downtime, and with ``max_stages=1`` and ``abort`` the core's ABORT leaves the request
    at its source. Every decision replays to the same answer from the stage machine the cluster simulator's
    shell builds for the same migration (``ClusterSimulator.stage_machine``, same parameters)."""
    from control.core.migration import StageStep
    from control.core.record import DecisionLog
    from control.simulator import ClusterSimulator
    from control.simulator.hardware import DEFAULT_HARDWARE
    from tests.control.simulator.test_memory import burst

    hardware = dataclasses.replace(DEFAULT_HARDWARE, interconnect_bytes_per_s=2e8)
    config = MemSimConfig(mode="llumnix", num_instances=2, hardware=hardware)
    log = DecisionLog()
    sim = MemorySimulator(config, burst(), decision_log=log)
    if after == "abort":
        sim.params = sim.params.with_updates(max_stages=1, after_max_stages="abort")
    result = sim.run()
    assert result.completed == len(burst())

    runs = _stage_runs(log.entries())
    assert runs, "no migration ran through the stage machine"
    cluster = ClusterSimulator(ClusterConfig(num_instances=0, policy=sim.params), [])
    for run in runs:
        assert _replayed(cluster.stage_machine(run[0].key), run) == [d.output for d in run], run
    steps = [[d.output for d in run if d.what == "after_stage"] for run in runs]
    ended = [s[-1] for s in steps if s]
    if after == "abort":
        assert StageStep.ABORT in ended  # the core gave up after one stage: the request stayed at its source
        assert result.migration_aborts >= ended.count(StageStep.ABORT)
    else:
        assert any(len(s) > 1 for s in steps), steps  # a migration took more than one copy stage
        assert result.migration_stages > result.migrations
    # each stop-and-copy committed (nothing finished meanwhile in this run), with its stages and a downtime
    assert result.migrations == ended.count(StageStep.STOP_AND_COPY) > 0
    assert result.migration_stages == sum(len(s) for s in steps if s[-1] is StageStep.STOP_AND_COPY)
    assert result.migration_downtime_s >= result.migrations * config.resume_overhead_s
