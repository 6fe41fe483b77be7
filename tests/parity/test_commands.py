"""Parity (b) for dispatch and migration: each shell turns the same command sequence into the same engine actions.

The command sequence is fixed (:data:`PLACES`, :data:`MIGRATIONS`): three requests placed on two instances
(``Place`` commands of the core's dispatch loop, ``control/core/dispatch.py``), then three migrations one after
another, each with stage knobs that make the core's stage machine (``control/core/migration.py``) decide the
same whatever the timing:

* ``c0``: ``last_stage_max_blocks = -1`` (never reached), 2 stages, then stop-and-copy: committed after 2 stages;
* ``c2``: the same with ``after_max_stages = "abort"`` and 1 stage: aborted after 1 stage, it stays put;
* ``c1``: ``last_stage_max_blocks`` large: stop-and-copy after the first stage, committed.

The **live shell** is the real control plane over a real nats-server with two :class:`MigratableSimEngine`
hosts: a dispatch index that answers from the script stands in for the policy (the scheduler and its
Dispatcher carry out the ``Place`` commands as usual), and each migration is an operator's ``migrate`` under
the policy knobs set through the admin API (the MigratorActor runs the protocol, the engines the engine side).
The **simulator's shell** is :class:`ClusterSimulator` with the same scripted index and a planner that emits
the same migrations, one at a time.

Compared is what the engines did: every engine-side call of each instance's :class:`SimEngineCore` (add,
resume with KV, stop for migration, release of the outgoing blocks; reservations are left out, their count
depends on timing), the requests each instance finished and with how many tokens, the blocks each holds at
the end, the instances each request ran on, its token ids, and each migration's outcome and stage count.
Deliberately deviating simulator shells (a placement carried out on the other instance, the abort after
``max_stages`` turned into stop-and-copy as the live migrator once did, a migrated request recomputed instead of
resumed with its KV) must disagree.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.core.dispatch import Place
from control.core.migration import MigrationStages
from control.policy.dispatch import make_dispatch_policy
from control.policy.migration import InFlightMigration, MigrationDecision, MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator
from control.simulator.cluster import SimInstance
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig, SimEngineCore, SimOutput, SimRequest
from engines.sim.cost_model import DEFAULT_COST_MODEL
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import DEFAULT_KV_BYTES_PER_TOKEN, DEFAULT_TRANSFER_BYTES_PER_S, MigratableSimEngine
from engines.tokenizer import ByteTokenizer

INSTANCES = ("sim-0000", "sim-0001")  # the simulator's names for its first two instances
PROMPTS = {"c0": "a" * 120, "c1": "b" * 200, "c2": "c" * 80}
MAX_TOKENS = 400
PLACES = {"c0": "sim-0000", "c1": "sim-0001", "c2": "sim-0000"}
ENGINE = SimEngineConfig(
    block_size=32, num_blocks=512, max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=2048
)
SEED = 0  # the sim engines' token seed


@dataclass(frozen=True, slots=True)
class Migrate:
    """Command: migrate ``request_id`` from ``source`` to ``destination`` under these stage knobs."""

    request_id: str
    source: str
    destination: str
    max_stages: int
    after_max_stages: str
    last_stage_max_blocks: int

    def knobs(self) -> dict[str, str]:
        return {
            "max_stages": str(self.max_stages),
            "after_max_stages": self.after_max_stages,
            "last_stage_max_blocks": str(self.last_stage_max_blocks),
        }


MIGRATIONS = (
    Migrate("c0", "sim-0000", "sim-0001", 2, "stop_and_copy", -1),
    Migrate("c2", "sim-0000", "sim-0001", 1, "abort", -1),
    Migrate("c1", "sim-0001", "sim-0000", 8, "stop_and_copy", 10_000),
)


@dataclass
class Outcome:
    """What the engines did under one shell (see the module docstring)."""

    actions: dict[str, list[tuple[object, ...]]] = field(default_factory=lambda: defaultdict(list))
    finished: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    held_at_end: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    runs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)
    migrations: dict[str, tuple[bool, int]] = field(default_factory=dict)

    def comparable(self) -> dict[str, object]:
        return {
            "actions": {k: v for k, v in sorted(self.actions.items())},
            # requests on one instance finish in an order that depends on when each arrived there
            "finished": {k: sorted(v) for k, v in sorted(self.finished.items())},
            "held_at_end": dict(sorted(self.held_at_end.items())),
            "runs": dict(sorted(self.runs.items())),
            "tokens": dict(sorted(self.tokens.items())),
            "migrations": dict(sorted(self.migrations.items())),
        }


def differences(live: Outcome, simulated: Outcome) -> list[str]:
    a, b = live.comparable(), simulated.comparable()
    return [f"{key}: live {a[key]!r} != simulated {b[key]!r}" for key in a if a[key] != b[key]]


class RecordingCore(SimEngineCore):
    """The engine model both shells drive, noting each engine-side action it is asked for.

    ``refuse_resume``: a deviation; a migrated request cannot be resumed with its KV (the shell then recomputes)."""

    def __init__(self, instance_id: str, outcome: Outcome, *, refuse_resume: bool = False) -> None:
        super().__init__(ENGINE, DEFAULT_COST_MODEL)
        self.instance_id = instance_id
        self.outcome = outcome
        self.refuse_resume = refuse_resume

    def _note(self, *action: object) -> None:
        self.outcome.actions[self.instance_id].append(action)

    def add(self, request: SimRequest) -> None:
        super().add(request)
        self._note("add", request.request_id, request.context_len)

    def add_resumed(self, request: SimRequest, now: float, reservation_blocks: int = 0) -> bool:
        if self.refuse_resume:
            return False
        ok = super().add_resumed(request, now, reservation_blocks)
        if ok:  # its KV came with it: it holds its blocks and computes only its last token
            loaded = request.num_blocks == self.blocks_for(request.context_len)
            self._note("resume", request.request_id, loaded and request.num_computed == request.context_len - 1)
        return ok

    def remove(self, request_id: str, *, keep_blocks: bool = False) -> SimRequest | None:
        self._note("stop" if keep_blocks else "remove", request_id)
        return super().remove(request_id, keep_blocks=keep_blocks)

    def release_outgoing(self, request_id: str) -> int:
        self._note("release_outgoing", request_id)
        return super().release_outgoing(request_id)

    def finish_plan(self) -> list[SimOutput]:
        outputs = super().finish_plan()
        for out in outputs:
            if out.finished:
                self.outcome.finished[self.instance_id].append((out.request.request_id, out.request.num_output))
        return outputs

    def held(self) -> tuple[int, int, int]:
        """(blocks held by requests, reserved for incoming migrations, held for outgoing ones)."""
        return (self.allocated_blocks, self.reserved_blocks, self.outgoing_blocks)


class ScriptedIndex:
    """A dispatch index whose choices are the script's; the rest of the index protocol goes to a real one."""

    name = "scripted"

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.inner = make_dispatch_policy("least_loaded")

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        self.inner.upsert(snapshot)

    def remove(self, instance_id: str) -> None:
        self.inner.remove(instance_id)

    def choose(self, demand: RequestDemand) -> str | None:
        return self.script.get(demand.request_id)

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        self.inner.on_dispatched(instance_id, demand)


# --------------------------------------------------------------------------------------------- the simulator
class ScriptedPlanner(MigrationPlanner):
    """The simulator's migration rounds emit :data:`MIGRATIONS`, one at a time: each once the one before has
    ended and its request runs at its source with a token decoded (as the live run waits for streamed tokens)."""

    def __init__(self, params: PolicyParams, prompt_lens: dict[str, int]) -> None:
        super().__init__(params)
        self.prompt_lens = prompt_lens
        self.next = 0
        self.seen: dict[str, InstanceSnapshot] = {}

    def sync(self, snapshots: Sequence[InstanceSnapshot]) -> None:
        self.seen = {s.instance_id: s for s in snapshots}

    def forget(self, request_id: str) -> None:
        pass

    def plan(self, in_flight: Collection[InFlightMigration], *, now: float | None = None) -> list[MigrationDecision]:
        if in_flight or self.next >= len(MIGRATIONS):
            return []
        m = MIGRATIONS[self.next]
        source = self.seen.get(m.source)
        running = next((r for r in source.running if r.request_id == m.request_id), None) if source else None
        if running is None or running.num_tokens <= self.prompt_lens[m.request_id] + 1:
            return []
        self.next += 1
        return [MigrationDecision(m.source, m.destination, m.request_id, running.num_blocks, 0, "operator", 0.0, 0.0)]


class ScriptedCluster(ClusterSimulator):
    """The simulator's shell under the command script; ``deviation`` makes it carry the commands out wrongly."""

    def __init__(self, deviation: str = "") -> None:
        tokenizer = ByteTokenizer()
        prompt_lens = {rid: len(tokenizer.encode(prompt)) for rid, prompt in PROMPTS.items()}
        config = ClusterConfig(
            num_instances=len(INSTANCES),
            engine=ENGINE,
            cost_model=DEFAULT_COST_MODEL,
            kv_bytes_per_token=DEFAULT_KV_BYTES_PER_TOKEN,
            migration_bandwidth=DEFAULT_TRANSFER_BYTES_PER_S,
            policy=PolicyParams(migration_enabled=True),
        )
        requests = [RequestSpec(rid, 0.001 * k, prompt_lens[rid], MAX_TOKENS) for k, rid in enumerate(sorted(PROMPTS))]
        super().__init__(config, requests)
        self.deviation = deviation
        self.outcome = Outcome()
        for inst in self.instances:
            inst.core = RecordingCore(inst.instance_id, self.outcome, refuse_resume=deviation == "recompute")
        self.index = ScriptedIndex(PLACES)
        self.planner = ScriptedPlanner(config.policy, prompt_lens)
        self.machines: dict[str, MigrationStages] = {}
        self.ran: dict[str, list[str]] = defaultdict(list)

    def stage_machine(self, request_id: str) -> MigrationStages:
        m = next(m for m in MIGRATIONS if m.request_id == request_id)
        after = m.after_max_stages
        if self.deviation == "no_abort" and after == "abort":
            after = "stop_and_copy"
        knobs = {**m.knobs(), "after_max_stages": after}
        machine = MigrationStages(self.params.with_updates(**knobs), self.config.reserve_headroom_blocks)
        self.machines[request_id] = machine
        return machine

    def _run_placement(self, place: Place) -> None:
        if self.deviation == "elsewhere":
            other = next(i for i in INSTANCES if i != place.instance_id)
            place = Place(place.request_id, other, place.evict)
        super()._run_placement(place)

    def _on_placed(self, inst: SimInstance, request: SimRequest) -> None:
        self.ran[request.request_id].append(inst.instance_id)

    def _on_moved(self, request: SimRequest, src: SimInstance, dst: SimInstance) -> None:
        self.ran[request.request_id].append(dst.instance_id)
        self.outcome.migrations[request.request_id] = (True, self.machines[request.request_id].stages)

    def _on_aborted(self, request: SimRequest, reason: str) -> None:
        self.outcome.migrations[request.request_id] = (False, self.machines[request.request_id].stages)

    def simulate(self) -> Outcome:
        result = self.run()
        assert result.completed == len(PROMPTS)
        outcome = self.outcome
        for inst in self.instances:
            assert isinstance(inst.core, RecordingCore)
            outcome.held_at_end[inst.instance_id] = inst.core.held()
        for rid, instances in self.ran.items():
            outcome.runs[rid] = tuple(instances)
        for finished in outcome.finished.values():
            for rid, num_output in finished:
                seed = request_seed(SEED, rid)
                outcome.tokens[rid] = tuple(token_at(seed, p) for p in range(num_output))
        return outcome


# --------------------------------------------------------------------------------------------- the live shell
async def _live(nats_url: str) -> Outcome:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": {"migration_enabled": False},  # no migrations but the operator's
        }
    )
    outcome = Outcome()
    cores: list[RecordingCore] = []
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    try:
        for instance_id in INSTANCES:
            engine = MigratableSimEngine(
                instance_id,
                block_size=ENGINE.block_size,
                num_blocks=ENGINE.num_blocks,
                max_num_seqs=ENGINE.max_num_seqs,
                max_num_batched_tokens=ENGINE.max_num_batched_tokens,
                max_model_len=ENGINE.max_model_len,
                time_scale=1.0,
                seed=SEED,
            )
            engine.core = core = RecordingCore(instance_id, outcome)  # before the engine starts
            cores.append(core)
            await asyncio.to_thread(cluster.add_engine, engine)
        async with DroverClient(cluster.url, name="command-parity") as client:
            await client.wait_for_instances(len(INSTANCES), timeout_s=30)
            assert cluster.control is not None and cluster.control.scheduler is not None
            scheduler = cluster.control.scheduler.ref
            assert scheduler is not None
            # the scheduler's dispatch loop places by the script from now on (set on the actor's own thread)
            await asyncio.to_thread(setattr, scheduler.proxy(), "policy", ScriptedIndex(PLACES))
            streams = {
                rid: await client.submit(PROMPTS[rid], max_tokens=MAX_TOKENS, request_id=rid) for rid in sorted(PROMPTS)
            }
            for stream in streams.values():  # each has decoded (and streamed) tokens where it was placed
                async for _ in stream.events():
                    if len(stream.result_data.token_ids) >= 2:
                        break
            for m in MIGRATIONS:
                await client.policy(m.knobs())
                reply = await client.migrate(m.request_id, m.destination)
                outcome.migrations[m.request_id] = (reply.ok, int(reply.details["stages"]))
            for rid, stream in streams.items():
                result = await asyncio.wait_for(stream.result(), 120)
                assert result.done is not None and result.done.finish_reason == "length", (rid, result.done)
                outcome.tokens[rid] = tuple(result.token_ids)
                ran = [i for k, i in enumerate(result.instances) if k == 0 or result.instances[k - 1] != i]
                outcome.runs[rid] = tuple(ran)
    finally:
        await asyncio.to_thread(cluster.stop)
    for core in cores:
        outcome.held_at_end[core.instance_id] = core.held()
    return outcome


async def test_both_shells_carry_out_the_same_placements_and_migrations_alike(nats_url: str) -> None:
    live = await _live(nats_url)
    assert differences(live, ScriptedCluster().simulate()) == []
    # and both did what the script says (else the comparison compared something else)
    assert live.migrations == {"c0": (True, 2), "c2": (False, 1), "c1": (True, 1)}, live.migrations
    # a shell that carries the commands out differently is caught
    for deviation, what in (("elsewhere", "actions"), ("no_abort", "migrations"), ("recompute", "actions")):
        found = differences(live, ScriptedCluster(deviation).simulate())
        assert any(line.startswith(what) for line in found), (deviation, found)
