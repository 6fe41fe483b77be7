"""SchedulerActor: the live shell around the control core's scheduling. It turns what reaches it (bus
messages, timer ticks, other actors' answers) into the core's events and carries out the core's commands as
bus messages, state writes and replies.

Each job has its own module, which the actor wires together:

- ``actors/scheduler_clients.py``: submissions (checked, admitted, acknowledged) and cancels;
- ``actors/dispatching.py``: the core's dispatch loop run over the scheduler's tables, its placements sent
  to engines;
- ``actors/scheduler_instances.py``: the instance registry, each instance's snapshot, the dispatch index;
- ``actors/scheduler_migration.py``: moves in flight, periodic plans, ``drover migrate``, prefill/decode
  handoffs (the MigratorActor runs them);
- ``actors/scheduler_admin.py``: operators' drain, phase, policy and status;
- ``actors/scheduler_failover.py``: the core's failover decisions about a lost instance's requests;
- ``actors/scheduler_ends.py``: the ends of requests (an engine's end event, a KunServe member's hand-over),
  and the one place a request that is over is forgotten;
- here: heartbeats and the housekeeping tick (dead instances, the prefill:decode split, the queues).

It never blocks: every input is a message (an ``Envelope`` from the bus or an internal tick), every output
a non-blocking publish. Every method runs on the actor's own thread unless its docstring says otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pykka

from actors.client_replies import ClientReplies
from actors.control_state import ControlState, restore_into
from actors.dispatching import AddUnacked, Placements
from actors.failover import Recovered
from actors.memory_manager import MemoryManager
from actors.migrator import MigrationEnded
from actors.prefix_feed import ResyncRequests, apply_prefix_report
from actors.request_classes import RequestClasses, class_dispatch_enabled
from actors.request_lifecycle import RequestLifecycle
from actors.scheduler_admin import SchedulerAdmin
from actors.scheduler_clients import Acknowledged, ClientRequests
from actors.scheduler_ends import Handed, RequestEnds
from actors.scheduler_failover import Failovers
from actors.scheduler_instances import InstanceRegistry, instance_state
from actors.scheduler_migration import SchedulerMigrations
from actors.supervisor import SupervisedActor
from control.core.dispatch import Dispatcher
from control.core.pd import PdPools, PdPoolsQuery, make_dispatch, make_pd_core
from control.core.record import DecisionLog
from control.core.requests import InstanceRecord, RequestRecord, RequestTable, expired_instances
from control.policy.dispatch import DispatchIndex
from control.policy.params import PolicyParams
from control.policy.pd import phase_or_both
from control.settings import Settings
from engines.tokenizer import Tokenizer
from observability.metrics import InstanceGauges, metrics
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    SUPPORTED_VERSIONS,
    Cancel,
    DrainCommand,
    EngineAbort,
    EngineFirstToken,
    EngineRequestEnded,
    ErrorCode,
    InstanceHeartbeat,
    MemoryCommand,
    MigrateCommand,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    PrefixResync,
    StatusQuery,
    StatusReply,
    SubmitRequest,
    peer_version,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic housekeeping: expire stale instances, retry queued requests."""


@dataclass(frozen=True, slots=True)
class MigrationTick:
    """Every ``policy.migration_period_s``: plan migrations (Llumnix pairing) and start them."""


class SchedulerActor(SupervisedActor):
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        tokenizer: Tokenizer,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "scheduler",
        peers: dict[str, Any] | None = None,
        state: ControlState | None = None,
        replies: ClientReplies | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        """Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__(supervisor, name)
        # what goes to clients: checked targets, over the client-bound connection (actors/client_replies.py)
        self.replies = replies or ClientReplies(bus)
        # The control core's calls with their inputs and outputs (dispatch index, migration pairing, failover),
        # for the replay parity test (tests/parity/test_replay.py); None: nothing is kept.
        self.decision_log = decision_log
        self.state = state or ControlState()  # durable request table and registry (actors/control_state.py)
        self.bus = bus
        self.settings = settings
        self.tokenizer = tokenizer
        self.peers = peers if peers is not None else {}  # "migrator" -> its ActorSlot
        # Finished requests leave at once; their ids are remembered for lifecycle.finished_retention_s.
        self.requests: RequestTable[RequestRecord] = RequestTable(settings.lifecycle, clock=time.monotonic)
        self.lifecycle = RequestLifecycle(bus, settings.lifecycle)  # deadlines, clients that went away
        self.params: PolicyParams = settings.policy  # in force; an operator may change them (scheduler_admin.py)
        # prefill/decode disaggregation ([pd]): phases, phase-aware dispatch, handoffs (control/core/pd.py)
        self.pd = make_pd_core(settings.pd, decision_log)  # records its calls when given a log (parity tests)
        # The control core's dispatch loop (control/core/dispatch.py), the simulator's too: the dispatch index,
        # the waiting queue, the fair queue between clients (scheduler.fairness), class routing and the global
        # batch queue. This actor carries out its placements (actors/dispatching.py).
        sched = settings.scheduler
        self.dispatch = Dispatcher(
            make_dispatch(self.params.dispatch_policy, self.params.dispatch_params(), self.pd),
            classes=settings.autoscaling if class_dispatch_enabled(settings) else None,
            fair_quantum_tokens=sched.fairness_quantum_tokens if sched.fairness else None,
            fair_max_waiting=sched.fairness_max_waiting,
            log=decision_log,
        )
        self.prefix_resyncs = ResyncRequests()  # PrefixResync requests to engines whose cache the index lost
        # KunServe groups; an instance it groups or releases is re-read into the dispatch index
        self.memory = MemoryManager(
            bus,
            settings.memory,
            lambda i: self.registry.refresh(i),
            decision_log,
            on_handed=lambda *handed: self.tell_self(Handed(*handed)),
        )
        self.registry = InstanceRegistry(self.dispatch, self.pd, self.memory.blocks_dispatch, decision_log)
        self.instances = self.registry.records  # one dict: the state store's restore and the lifecycle read it
        # request classes and roles; the batch queue it reports is the dispatcher's
        self.classes = RequestClasses(settings, lambda i, r: self.placements.evict(i, r), self.dispatch.batch)

        def params() -> PolicyParams:
            return self.params

        self.placements = Placements(
            bus,
            settings.nats.request_timeout_s,
            self.dispatch,
            self.registry,
            self.requests,
            self.classes,
            self.pd,
            self.state,
            params,
            self.tell_self,
        )
        self.migrations = SchedulerMigrations(
            bus, self.peers, self.registry, self.requests, self.dispatch, self.pd, self.state, params, decision_log
        )
        self.ends = RequestEnds(
            self.requests,
            self.state,
            self.migrations,
            self.classes,
            self.dispatch,
            self.pd,
            self.placements,
            lambda commands: self.failovers.carry_out(commands),
        )
        self.clients = ClientRequests(
            bus,
            self.replies,
            settings,
            tokenizer,
            self.requests,
            self.registry,
            self.dispatch,
            self.placements,
            self.state,
            self.ends,
            self.tell_self,
        )
        self.failovers = Failovers(
            bus,
            settings.reliability,
            self.requests,
            self.state,
            self.replies,
            self.migrations,
            self.placements,
            self.ends,
            self.tell_self,
            decision_log,
            self.instances,
        )
        self.admin = SchedulerAdmin(
            bus,
            self.registry,
            self.requests,
            self.dispatch,
            self.pd,
            self.state,
            self.memory,
            self.migrations,
            params,
            self.adopt,
        )

    @property
    def policy(self) -> DispatchIndex:
        """The dispatch index (the core's dispatcher holds it).

        Thread: the scheduler actor's thread."""
        return self.dispatch.index

    @policy.setter
    def policy(self, index: DispatchIndex) -> None:
        """Thread: the scheduler actor's thread."""
        self.dispatch.index = index

    def adopt(self, params: PolicyParams) -> None:
        """Put new policy parameters in force (an operator's ``drover policy set``, ``scheduler_admin.py``).

        Thread: the scheduler actor's thread."""
        self.params = params

    def tell_self(self, message: object) -> None:
        """Hand a message to this actor (nothing once it has stopped).

        Thread: any (the bus loop, mostly: a pykka tell is thread-safe)."""
        if self.actor_ref.is_alive():
            self.actor_ref.tell(message)

    def on_start(self) -> None:
        """Thread: the scheduler actor's thread."""
        restore_into(self)  # a restarted control plane (or scheduler) picks up where the last one left off

    # ------------------------------------------------------------------------------------------- wiring
    def on_receive(self, message: Any) -> Any:
        """Thread: the scheduler actor's thread."""
        if isinstance(message, Envelope):
            return self._on_envelope(message)
        if isinstance(message, Tick):
            self._tick()
        elif isinstance(message, MigrationTick):
            self.migrations.plan(time.monotonic())  # the core's clock is passed in
        elif isinstance(message, MigrationEnded):
            self.migrations.on_ended(message)
        elif isinstance(message, Recovered):
            self.failovers.on_recovered(message, time.monotonic())
        elif isinstance(message, Acknowledged):
            self.placements.on_acknowledged(message.request_id, time.monotonic())
        elif self.classes.handles(message):
            self.classes.on_message(message, self.instances, self.requests, len(self.dispatch.pending))
        elif isinstance(message, AddUnacked):
            self.placements.on_add_unacked(message)
        elif isinstance(message, Handed):
            self.ends.on_handed(message)
        elif isinstance(message, PdPoolsQuery):  # the per-phase autoscaler's input
            pools = tuple(
                (self.registry.snapshot(r), self.pd.phase_of(r.info.instance_id)) for r in self.registry.serving()
            )
            message.reply_to.tell(PdPools(pools))
        return None

    def _on_envelope(self, envelope: Envelope) -> None:
        """Thread: the scheduler actor's thread."""
        message = envelope.message
        if isinstance(message, InstanceHeartbeat):
            self._on_heartbeat(message)
        elif isinstance(message, SubmitRequest):
            self.clients.on_submit(message, envelope)
        elif isinstance(message, EngineRequestEnded):
            self.ends.on_engine_ended(message)
        elif isinstance(message, EngineFirstToken):
            self.migrations.on_first_token(message)
        elif isinstance(message, Cancel):
            self.clients.on_cancel(message, envelope)
        elif isinstance(message, StatusQuery):
            identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
            self.replies.publish(identity, envelope.reply, self.status(), "status")
        elif isinstance(message, MigrateCommand):
            self.migrations.on_command(message, envelope.reply)
        elif isinstance(message, DrainCommand):
            self.admin.on_drain(message, envelope.reply)
        elif isinstance(message, PhaseCommand):
            self.admin.on_phase(message, envelope.reply)
        elif isinstance(message, PolicyQuery | PolicyUpdate):
            self.admin.on_policy(message, envelope.reply)
        elif isinstance(message, MemoryCommand):
            self.memory.on_command(message, envelope.reply)
        else:
            self.bus.reply_error(
                envelope.reply,
                ErrorCode.INVALID_REQUEST,
                f"{type(message).__name__} is not accepted on {envelope.subject}",
                getattr(message, "request_id", None),
            )

    def status(self) -> StatusReply:
        """What ``drover status`` shows (``actors/scheduler_admin.py``).

        Thread: the scheduler actor's thread."""
        return self.admin.status()

    # ------------------------------------------------------------------------------------------- instances
    def _on_heartbeat(self, beat: InstanceHeartbeat) -> None:
        """Thread: the scheduler actor's thread."""
        instance_id = beat.info.instance_id
        if beat.info.protocol_version not in SUPPORTED_VERSIONS:  # never dispatched to (rolling upgrades)
            if instance_id not in self.instances:
                log.warning("instance %s speaks protocol %d: ignored", instance_id, beat.info.protocol_version)
            return
        record = self.instances.get(instance_id)
        is_new = record is None
        if record is None:
            record = InstanceRecord(info=beat.info, load=beat.load, last_seen=time.monotonic())
            self.instances[instance_id] = record
            log.info("instance %s joined (%s, %d blocks)", instance_id, beat.info.engine_kind, beat.info.num_blocks)
        elif beat.seq < record.seq or (beat.info.pid and record.info.pid and beat.info.pid != record.info.pid):
            # Restarted under the same id faster than it could be declared dead: what ran there is gone.
            log.warning("instance %s restarted (heartbeat seq %d -> %d)", instance_id, record.seq, beat.seq)
            self.failovers.fail_over(instance_id)
        record.seq = beat.seq
        save = is_new or record.state == "restored" or record.info != beat.info
        record.info, record.load, record.last_seen = beat.info, beat.load, time.monotonic()
        record.state, record.draining, record.can_migrate = beat.state, beat.draining, beat.can_migrate
        if save:
            self.state.save_instance(record)
        self.memory.on_heartbeat(beat)
        self.classes.on_heartbeat(beat)
        self.pd.on_report(instance_id, phase_or_both(beat.phase))
        self.registry.upsert(record)
        holds = self.failovers.holds
        if holds:  # failed-over requests wait for their old copy here to go (control/core/requests.py)
            running = {r.request_id for r in beat.load.running}
            self.failovers.resume_held(holds.on_heartbeat(instance_id, running), time.monotonic())
        now = time.monotonic()
        record.cached_blocks = apply_prefix_report(self.policy, instance_id, beat.prefix_cache, now)
        if beat.prefix_cache is not None:
            if self.prefix_resyncs.due(self.policy, instance_id, now):  # the index lost track: ask for all of it
                log.info("instance %s: prefix index out of step, asking for a full cache listing", instance_id)
                self.bus.publish(subjects.engine(instance_id), PrefixResync(reason="gap"))
            cache = beat.prefix_cache
            metrics().set_prefix_cache(instance_id, cache.num_cached, cache.query_tokens, cache.hit_tokens)
        self.state.on_heartbeat(self, beat)  # confirms restored requests first: they are not superseded
        self._stop_superseded(instance_id, beat)
        self.migrations.hand_off(self.registry.snapshot(record))
        load = beat.load
        metrics().update_instance(
            InstanceGauges(
                instance_id,
                instance_state(record),
                load.num_free_blocks,
                load.num_total_blocks,
                load.num_running,
                load.num_waiting,
                record.dispatched,
            )
        )
        if is_new:
            self.placements.retry(time.monotonic())

    def _stop_superseded(self, instance_id: str, beat: InstanceHeartbeat) -> None:
        """An instance taken for dead (SIGSTOP, a cut link) that comes back still runs what failed over
        elsewhere meanwhile: stop those copies without a word to their clients.
        Thread: the scheduler actor's thread."""
        for running in beat.load.running:
            record = self.requests.get(running.request_id)
            if (
                record is None
                or record.instance_id == instance_id
                or running.request_id in self.migrations
                or running.request_id in self.state.unconfirmed
            ):
                continue
            log.info("stopping %s on %s: it runs elsewhere since a failover", running.request_id, instance_id)
            version = peer_version(beat.info.protocol_version)
            self.bus.publish(
                subjects.engine(instance_id),
                EngineAbort(request_id=running.request_id, reason="superseded", v=version),
            )

    def _tick(self) -> None:
        """Thread: the scheduler actor's thread."""
        now = time.monotonic()
        stale_after = self.settings.scheduler.instance_stale_after_s
        for instance_id in expired_instances(self.instances, now, stale_after):
            record = self.instances[instance_id]
            if record.state != "stopping":
                log.warning(
                    "instance %s missed heartbeats for %.1fs: declared dead", instance_id, now - record.last_seen
                )
            self.registry.remove(instance_id)
            self.state.drop_instance(instance_id)
            self.state.drop_phase(instance_id)
            self.failovers.fail_over(instance_id)
            self.failovers.resume_held(self.failovers.holds.on_instance_gone(instance_id), time.monotonic())
            self.memory.on_instance_dead(instance_id)
        self.failovers.resume_held(self.failovers.holds.expired(now, stale_after), time.monotonic())
        self.lifecycle.tick(self)
        self.requests.forget_expired(now)
        self.memory.tick({i for i, r in self.instances.items() if r.state == "serving"})
        self._rebalance_phases()
        self.placements.retry(time.monotonic())
        self.placements.release_batch(now)
        metrics().set_scheduler(queued=len(self.dispatch.pending), in_flight=len(self.requests))
        migrations = self.migrations
        metrics().set_migrations(migrations.done, migrations.aborted, len(migrations.in_flight))

    def _rebalance_phases(self) -> None:
        """The prefill:decode split follows each pool's pressure ([pd] rebalance_period_s; the core decides).

        Thread: the scheduler actor's thread."""
        serving = self.registry.serving()
        change = self.pd.rebalance((self.registry.snapshot(r) for r in serving), time.monotonic())
        if change is not None and change.instance_id in self.instances:
            log.info("pd split: %s now serves %s (%s)", change.instance_id, change.phase, change.reason)
            self.state.save_phase(change.instance_id, change.phase)
            self.registry.upsert(self.instances[change.instance_id])  # re-filed in its pool (recorded, as every upsert)
