"""Parity (b) for dispatch, migration and eviction: each shell turns the same command sequence into the same
engine actions.

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

**Eviction** (:data:`EVICTIONS`, a second live cluster: class-aware dispatch, one mixed instance of two slots,
one kept for interactive requests): a batch request runs; an interactive one takes the second slot; the next
interactive one finds the instance full, and the core's ``Place`` (``control/core/classes.py``) evicts the batch
request. The live shell stops it with an ``EngineAbort`` "evicted" and later resumes it from the tokens its
client has through the batch queue (``actors/request_classes.py``, ``actors/dispatching.py``); the simulator's
shell (:class:`control.simulator.elastic.ElasticSimulator`) removes it from the engine, re-queues it and adds it
again. The engine actions compared are the same; how many tokens the batch request had when it was stopped
depends on timing, so an add notes only whether it came with output already generated. A simulator that
places without evicting, or that restarts the evicted request from its prompt, must disagree.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from actors.local_cluster import InProcessCluster
from control.client import DroverClient, RequestStream
from control.core.dispatch import Place
from control.core.migration import MigrationStages
from control.policy.autoscaling import AutoscaleParams, LocalParams, PerRole
from control.policy.dispatch import make_dispatch_policy
from control.policy.migration import InFlightMigration, MigrationDecision, MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.settings import Settings, load_settings
from control.simulator import ClusterConfig, ClusterSimulator, ElasticConfig, ElasticSimulator
from control.simulator.cluster import SimInstance
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig, SimEngineCore, SimOutput, SimRequest
from engines.sim.cost_model import DEFAULT_COST_MODEL
from engines.sim.engine import request_seed, token_at
from engines.sim.live_migration import DEFAULT_KV_BYTES_PER_TOKEN, DEFAULT_TRANSFER_BYTES_PER_S, MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.messages import RequestClass

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

    An add notes whether the request came with output (resumed by recompute after an eviction or a migration
    that could not take its KV), not how much: that depends on when it was stopped.
    ``refuse_resume``: a deviation; a migrated request cannot be resumed with its KV (the shell then recomputes)."""

    def __init__(
        self, instance_id: str, outcome: Outcome, engine: SimEngineConfig = ENGINE, *, refuse_resume: bool = False
    ) -> None:
        super().__init__(engine, DEFAULT_COST_MODEL)
        self.instance_id = instance_id
        self.outcome = outcome
        self.refuse_resume = refuse_resume

    def _note(self, *action: object) -> None:
        self.outcome.actions[self.instance_id].append(action)

    def add(self, request: SimRequest) -> None:
        super().add(request)
        self._note("add", request.request_id, request.prompt_len, request.num_output > 0)

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
        return simulated_outcome(self.outcome, self.instances, self.ran)


def simulated_outcome(outcome: Outcome, instances: Sequence[SimInstance], ran: dict[str, list[str]]) -> Outcome:
    """What a finished simulation's engines did (``ran``: the instances each request was placed on, in order)."""
    for inst in instances:
        assert isinstance(inst.core, RecordingCore)
        outcome.held_at_end[inst.instance_id] = inst.core.held()
    for rid, placed_on in ran.items():
        outcome.runs[rid] = distinct_runs(placed_on)
    for finished in outcome.finished.values():
        for rid, num_output in finished:
            seed = request_seed(SEED, rid)
            outcome.tokens[rid] = tuple(token_at(seed, p) for p in range(num_output))
    return outcome


def distinct_runs(instances: Sequence[str]) -> tuple[str, ...]:
    """The instances a request ran on, one entry a stay (a request evicted and resumed where it was is one)."""
    return tuple(i for k, i in enumerate(instances) if k == 0 or instances[k - 1] != i)


# --------------------------------------------------------------------------------------------- the live shell
def live_settings(nats_url: str, **overrides: object) -> Settings:
    """A control plane over sim engines that migrates only when an operator asks."""
    return load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "policy": {"migration_enabled": False},  # no migrations but the operator's
            **overrides,
        }
    )


@asynccontextmanager
async def recording_cluster(
    settings: Settings, instance_ids: Sequence[str], engine: SimEngineConfig, outcome: Outcome, name: str
) -> AsyncIterator[tuple[InProcessCluster, DroverClient]]:
    """A control plane and a sim engine host per instance, each over a :class:`RecordingCore` noting into
    ``outcome``, and a client once every instance has joined; at the end, the blocks each engine still holds."""
    cores: list[RecordingCore] = []
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    try:
        for instance_id in instance_ids:
            live_engine = MigratableSimEngine(
                instance_id,
                block_size=engine.block_size,
                num_blocks=engine.num_blocks,
                max_num_seqs=engine.max_num_seqs,
                max_num_batched_tokens=engine.max_num_batched_tokens,
                max_model_len=engine.max_model_len,
                time_scale=1.0,
                seed=SEED,
            )
            live_engine.core = core = RecordingCore(instance_id, outcome, engine)  # before the engine starts
            cores.append(core)
            await asyncio.to_thread(cluster.add_engine, live_engine)
        async with DroverClient(cluster.url, name=name) as client:
            await client.wait_for_instances(len(instance_ids), timeout_s=30)
            yield cluster, client
    finally:
        await asyncio.to_thread(cluster.stop)
    for core in cores:
        outcome.held_at_end[core.instance_id] = core.held()


async def decoded(stream: RequestStream, n: int) -> None:
    """Wait until the request has streamed ``n`` tokens (it runs where it was placed)."""
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= n:
            return


async def note_results(streams: dict[str, RequestStream], outcome: Outcome) -> None:
    """Each request ran to its length: its token ids and the instances it ran on."""
    for rid, stream in streams.items():
        result = await asyncio.wait_for(stream.result(), 120)
        assert result.done is not None and result.done.finish_reason == "length", (rid, result.done)
        outcome.tokens[rid] = tuple(result.token_ids)
        outcome.runs[rid] = distinct_runs(result.instances)


async def _live(nats_url: str) -> Outcome:
    outcome = Outcome()
    async with recording_cluster(live_settings(nats_url), INSTANCES, ENGINE, outcome, "command-parity") as (
        cluster,
        client,
    ):
        assert cluster.control is not None and cluster.control.scheduler is not None
        scheduler = cluster.control.scheduler.ref
        assert scheduler is not None
        # the scheduler's dispatch loop places by the script from now on (set on the actor's own thread)
        await asyncio.to_thread(setattr, scheduler.proxy(), "policy", ScriptedIndex(PLACES))
        streams = {
            rid: await client.submit(PROMPTS[rid], max_tokens=MAX_TOKENS, request_id=rid) for rid in sorted(PROMPTS)
        }
        for stream in streams.values():  # each has decoded (and streamed) tokens where it was placed
            await decoded(stream, 2)
        for m in MIGRATIONS:
            await client.policy(m.knobs())
            reply = await client.migrate(m.request_id, m.destination)
            outcome.migrations[m.request_id] = (reply.ok, int(reply.details["stages"]))
        await note_results(streams, outcome)
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


# --------------------------------------------------------------------------------------------- eviction
EVICT_ENGINE = dataclasses.replace(ENGINE, max_num_seqs=2)
# two slots per instance in both shells (no local autoscaler: the live shell counts initial_batch, the simulator
# the engine's max_num_seqs); the mixed reserve (ceil(0.1 * 2) = 1) keeps one of them for interactive requests
EVICT_PARAMS = AutoscaleParams(local=LocalParams(min_batch=1, initial_batch=2, max_batch=2))
EVICT_INSTANCE = INSTANCES[0]


@dataclass(frozen=True, slots=True)
class Submit:
    """A request of the eviction script, in submission order; each waits for the one before to stream."""

    request_id: str
    request_class: RequestClass
    prompt: str
    max_tokens: int


# e-b0 and e-i0 run long enough (about 3 s of 12.5 ms steps) that both still run when e-i1 is placed, however
# slowly a loaded machine carries the submissions
EVICTIONS = (
    Submit("e-b0", RequestClass.BATCH, "d" * 100, 260),  # released from the batch queue into the spare slot
    Submit("e-i0", RequestClass.INTERACTIVE, "e" * 60, 240),  # the second slot: nothing evicted
    Submit("e-i1", RequestClass.INTERACTIVE, "f" * 70, 40),  # full: Place evicts e-b0
)
# what both shells must do on the one instance: e-b0 stopped for e-i1, and once both interactive requests have
# left (the batch queue's spare slot again), added with the output it had
# (prompt tokens: the byte tokenizer's, BOS included)
EVICTION_ACTIONS = [
    ("add", "e-b0", 101, False),
    ("add", "e-i0", 61, False),
    ("remove", "e-b0"),
    ("add", "e-i1", 71, False),
    ("add", "e-b0", 101, True),
]


class EvictingCluster(ElasticSimulator):
    """The simulator's shell under the eviction script; ``deviation`` makes it carry the commands out wrongly:
    ``keep`` places without evicting, ``restart`` adds the evicted request again from its prompt."""

    def __init__(self, deviation: str = "") -> None:
        config = ElasticConfig(
            cluster=ClusterConfig(engine=EVICT_ENGINE, cost_model=DEFAULT_COST_MODEL),
            scaling="none",
            initial=PerRole(0, 1, 0),  # one mixed instance
            local_autoscaler=False,
            autoscale=EVICT_PARAMS,
        )
        # each arrives once the one before runs (as the live script waits for streamed tokens)
        tokenizer = ByteTokenizer()
        requests = [
            RequestSpec(
                s.request_id,
                0.05 * k,
                len(tokenizer.encode(s.prompt)),
                s.max_tokens,
                request_class=s.request_class.value,
            )
            for k, s in enumerate(EVICTIONS)
        ]
        super().__init__(config, requests)
        self.deviation = deviation
        self.outcome = Outcome()
        for inst in self.instances:
            inst.core = RecordingCore(inst.instance_id, self.outcome, EVICT_ENGINE)
        self.ran: dict[str, list[str]] = defaultdict(list)

    def _run_placement(self, place: Place) -> None:
        if self.deviation == "keep":
            place = Place(place.request_id, place.instance_id)
        super()._run_placement(place)

    def _requeue(self, inst: SimInstance, request: SimRequest, *, evicted: bool = True) -> None:
        if self.deviation == "restart":
            request.num_output = 0
        super()._requeue(inst, request, evicted=evicted)

    def _on_placed(self, inst: SimInstance, request: SimRequest) -> None:
        super()._on_placed(inst, request)
        self.ran[request.request_id].append(inst.instance_id)

    def simulate(self) -> Outcome:
        result = self.run_elastic()
        assert result.sim.completed == len(EVICTIONS)
        return simulated_outcome(self.outcome, self.instances, self.ran)


async def _live_eviction(nats_url: str) -> Outcome:
    settings = live_settings(nats_url, autoscaler={"class_dispatch": True})
    settings = settings.model_copy(update={"autoscaling": EVICT_PARAMS})
    outcome = Outcome()
    async with recording_cluster(settings, [EVICT_INSTANCE], EVICT_ENGINE, outcome, "eviction-parity") as (_, client):
        streams: dict[str, RequestStream] = {}
        for s in EVICTIONS:
            streams[s.request_id] = stream = await client.submit(
                s.prompt, max_tokens=s.max_tokens, request_id=s.request_id, request_class=s.request_class
            )
            if s is not EVICTIONS[-1]:
                await decoded(stream, 2)
        await note_results(streams, outcome)
    return outcome


async def test_both_shells_carry_out_the_same_eviction_alike(nats_url: str) -> None:
    live = await _live_eviction(nats_url)
    assert differences(live, EvictingCluster().simulate()) == []
    # the script did evict (else the comparison compared something else)
    assert live.actions == {EVICT_INSTANCE: EVICTION_ACTIONS}, live.actions
    # a shell that carries the eviction out differently is caught
    for deviation in ("keep", "restart"):
        found = differences(live, EvictingCluster(deviation).simulate())
        assert any(line.startswith("actions") for line in found), (deviation, found)
