"""SchedulerActor: admits client requests, tokenizes them, dispatches them to instances by policy, and
keeps the cluster's instance and request tables (from heartbeats and engine events).

It never blocks: every input is a message (an ``Envelope`` from the bus or an internal tick), every output
a non-blocking publish. Dispatch decisions come from ``control.policy.dispatch`` (pure, shared with the
simulator).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pykka
from opentelemetry import trace

from actors.client_replies import ClientReplies, owner_of
from actors.control_state import ControlState, restore_into
from actors.dispatching import SchedulerView
from actors.failover import Recovered, read_delivered
from actors.memory_manager import MemoryManager
from actors.migrator import MigrationEnded, StartMigration
from actors.prefix_feed import ResyncRequests, apply_prefix_report, prefix_aware_destinations
from actors.request_classes import RequestClasses, class_dispatch_enabled
from actors.request_lifecycle import RequestLifecycle
from actors.supervisor import SupervisedActor
from control.core.admission import decide, max_prompt_tokens, validate
from control.core.dispatch import Dispatcher, Place
from control.core.pd import PdPools, PdPoolsQuery, make_dispatch, make_pd_core
from control.core.record import DecisionLog
from control.core.requests import (
    Drop,
    Fail,
    InstanceRecord,
    Redispatch,
    RequestRecord,
    RequestTable,
    Resume,
    expired_instances,
    fail_over,
    on_recovered,
)
from control.policy.block_hash import vllm_block_hashes
from control.policy.dispatch import DispatchIndex, prefix_block_hashes, reads_engine_block_hashes
from control.policy.migration import InFlightMigration, MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.pd import parse_phase, phase_or_both
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot
from control.settings import Settings
from engines.tokenizer import Tokenizer
from observability import spans
from observability.metrics import InstanceGauges, metrics
from observability.tracing import extract_context, inject_headers, tracer
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    SUPPORTED_VERSIONS,
    Accepted,
    AdminReply,
    Cancel,
    CancelAck,
    DrainCommand,
    EngineAbort,
    EngineAdd,
    EngineFirstToken,
    EngineInfo,
    EngineRequestEnded,
    ErrorCode,
    InstanceHeartbeat,
    InstanceLoad,
    InstanceStatus,
    MemoryCommand,
    MigrateCommand,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    PrefixResync,
    RequestDone,
    RequestStatus,
    StatusQuery,
    StatusReply,
    SubmitRequest,
    Usage,
    encode,
    peer_version,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic housekeeping: expire stale instances, retry queued requests."""


@dataclass(frozen=True, slots=True)
class _Acknowledged:
    """A submission's record is stored and its Accepted sent: it may be dispatched."""

    request_id: str


@dataclass(frozen=True, slots=True)
class _Handed:
    """A request a member joining a KunServe group handed over (``MemoryManager.on_handed``)."""

    request_id: str
    source: str
    destination: str | None
    outputs: list[int]


@dataclass(frozen=True, slots=True)
class _AddUnacked:
    """An EngineAdd got no acknowledgement (lost with a NATS node, or nobody subscribed yet)."""

    instance_id: str
    add: EngineAdd
    headers: dict[str, str]
    attempt: int


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
        self.instances: dict[str, InstanceRecord] = {}
        # Finished requests leave at once; their ids are remembered for lifecycle.finished_retention_s.
        self.requests: RequestTable[RequestRecord] = RequestTable(settings.lifecycle, clock=time.monotonic)
        self.lifecycle = RequestLifecycle(bus, settings.lifecycle)  # deadlines, clients that went away
        self.params: PolicyParams = settings.policy
        # prefill/decode disaggregation ([pd]): phases, phase-aware dispatch, handoffs (control/core/pd.py)
        self.pd = make_pd_core(settings.pd, decision_log)  # records its calls when given a log (parity tests)
        # The control core's dispatch loop (control/core/dispatch.py), the simulator's too: the dispatch index,
        # the waiting queue, the fair queue between clients (scheduler.fairness), class routing and the global
        # batch queue. This actor carries out its placements.
        sched = settings.scheduler
        self.dispatch = Dispatcher(
            make_dispatch(self.params.dispatch_policy, self.params.dispatch_params(), self.pd),
            classes=settings.autoscaling if class_dispatch_enabled(settings) else None,
            fair_quantum_tokens=sched.fairness_quantum_tokens if sched.fairness else None,
            fair_max_waiting=sched.fairness_max_waiting,
            log=decision_log,
        )
        self.prefix_resyncs = ResyncRequests()  # PrefixResync requests to engines whose cache the index lost
        self.migrations: dict[str, InFlightMigration] = {}  # request id -> migration in flight
        self.planner = MigrationPlanner(self.params)  # remembers its moves: per-request budget, cooldown
        # instance id -> (load, info, draining, snapshot) it was built from: migration planning asks for every
        # instance's snapshot each period, and a fresh object per instance made the incremental planner
        # re-rate all of them (O(instances) snapshot builds 20 times a second)
        self._snapshot_of: dict[str, tuple[InstanceLoad, EngineInfo, object, InstanceSnapshot]] = {}
        self.migrations_done = 0
        self.migrations_aborted = 0
        self.memory = MemoryManager(  # KunServe groups
            bus,
            settings.memory,
            self._refresh_instance,
            decision_log,
            on_handed=lambda *handed: self.actor_ref.tell(_Handed(*handed)),
        )
        # request classes and roles; the batch queue it reports is the dispatcher's
        self.classes = RequestClasses(settings, self._evict, self.dispatch.batch)

    @property
    def policy(self) -> DispatchIndex:
        """The dispatch index (the core's dispatcher holds it).

        Thread: the scheduler actor's thread."""
        return self.dispatch.index

    @policy.setter
    def policy(self, index: DispatchIndex) -> None:
        """Thread: the scheduler actor's thread."""
        self.dispatch.index = index

    def on_start(self) -> None:
        """Thread: the scheduler actor's thread."""
        restore_into(self)  # a restarted control plane (or scheduler) picks up where the last one left off

    # ------------------------------------------------------------------------------------------- dispatching
    def on_receive(self, message: Any) -> Any:
        """Thread: the scheduler actor's thread."""
        if isinstance(message, Envelope):
            return self._on_envelope(message)
        if isinstance(message, Tick):
            self._tick()
        elif isinstance(message, MigrationTick):
            self._plan_migrations()
        elif isinstance(message, MigrationEnded):
            self._on_migration_ended(message)
        elif isinstance(message, Recovered):
            self._on_recovered(message)
        elif isinstance(message, _Acknowledged):
            self._on_acknowledged(message.request_id)
        elif self.classes.handles(message):
            self.classes.on_message(message, self.instances, self.requests, len(self.dispatch.pending))
        elif isinstance(message, _AddUnacked):
            self._on_add_unacked(message)
        elif isinstance(message, _Handed):
            self._on_handed(message)
        elif isinstance(message, PdPoolsQuery):  # the per-phase autoscaler's input
            serving = [r for r in self.instances.values() if r.state == "serving"]
            pools = tuple((self._snapshot(r), self.pd.phase_of(r.info.instance_id)) for r in serving)
            message.reply_to.tell(PdPools(pools))
        return None

    def _on_envelope(self, envelope: Envelope) -> None:
        """Thread: the scheduler actor's thread."""
        message = envelope.message
        if isinstance(message, InstanceHeartbeat):
            self._on_heartbeat(message)
        elif isinstance(message, SubmitRequest):
            self._on_submit(message, envelope)
        elif isinstance(message, EngineRequestEnded):
            self._on_request_ended(message)
        elif isinstance(message, EngineFirstToken):
            self._on_first_token(message)
        elif isinstance(message, Cancel):
            self._on_cancel(message, envelope)
        elif isinstance(message, StatusQuery):
            identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
            self.replies.publish(identity, envelope.reply, self.status(), "status")
        elif isinstance(message, MigrateCommand):
            self._on_migrate_command(message, envelope.reply)
        elif isinstance(message, DrainCommand):
            self._on_drain(message, envelope.reply)
        elif isinstance(message, PhaseCommand):
            self._on_phase(message, envelope.reply)
        elif isinstance(message, PolicyQuery | PolicyUpdate):
            self._on_policy(message, envelope.reply)
        elif isinstance(message, MemoryCommand):
            self.memory.on_command(message, envelope.reply)
        else:
            self.bus.reply_error(
                envelope.reply,
                ErrorCode.INVALID_REQUEST,
                f"{type(message).__name__} is not accepted on {envelope.subject}",
                getattr(message, "request_id", None),
            )

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
            self._fail_over(instance_id)
        record.seq = beat.seq
        save = is_new or record.state == "restored" or record.info != beat.info
        record.info, record.load, record.last_seen = beat.info, beat.load, time.monotonic()
        record.state, record.draining, record.can_migrate = beat.state, beat.draining, beat.can_migrate
        if save:
            self.state.save_instance(record)
        self.memory.on_heartbeat(beat)
        self.classes.on_heartbeat(beat)
        self.pd.on_report(instance_id, phase_or_both(beat.phase))
        self._upsert(record)
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
        self._hand_off(self._snapshot(record))
        load = beat.load
        metrics().update_instance(
            InstanceGauges(
                instance_id,
                _instance_state(record),
                load.num_free_blocks,
                load.num_total_blocks,
                load.num_running,
                load.num_waiting,
                record.dispatched,
            )
        )
        if is_new:
            self._drain_queue()

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

    def _record(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        """Log one core call for the replay parity test (nothing without a log).

        Thread: the scheduler actor's thread."""
        if self.decision_log is not None:
            self.decision_log.add(what, key, inputs, output)

    def _upsert(self, record: InstanceRecord) -> None:
        """Give the dispatch index an instance's fresh snapshot.

        Thread: the scheduler actor's thread."""
        snapshot = self._snapshot(record)
        self.policy.upsert(snapshot)
        self._record("upsert", record.info.instance_id, (snapshot,), None)

    def _snapshot(self, record: InstanceRecord) -> InstanceSnapshot:
        """The instance's snapshot; the same object while its heartbeat, info and draining view are (a
        heartbeat's load is a fresh object, never changed in place).

        Thread: the scheduler actor's thread."""
        load = record.load
        info = record.info
        draining = (
            record.draining
            or record.drain_requested
            or record.state != "serving"
            or self.memory.blocks_dispatch(info.instance_id)
        )
        cached = self._snapshot_of.get(info.instance_id)
        if cached is not None and cached[0] is load and cached[1] is info and cached[2] == draining:
            return cached[3]
        snapshot = InstanceSnapshot(
            instance_id=record.info.instance_id,
            num_total_blocks=load.num_total_blocks,
            num_free_blocks=load.num_free_blocks,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            waiting_blocks=load.waiting_blocks,
            head_waiting_blocks=load.head_waiting_blocks,
            num_preempted=load.num_preempted,
            draining=draining,
            model=record.info.model,
            block_size=record.info.block_size,
            running=tuple(
                RunningSnapshot(
                    request_id=r.request_id,
                    num_tokens=r.num_tokens,
                    num_blocks=r.num_blocks,
                    priority=r.priority,
                    decoding=r.decoding,
                )
                for r in load.running
            ),
        )
        self._snapshot_of[info.instance_id] = (load, info, draining, snapshot)
        return snapshot

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
            self.instances.pop(instance_id)
            self._snapshot_of.pop(instance_id, None)
            self.policy.remove(instance_id)
            self.pd.forget_instance(instance_id)
            self._record("remove", instance_id, (), None)
            metrics().remove_instance(instance_id)
            self.state.drop_instance(instance_id)
            self.state.drop_phase(instance_id)
            self._fail_over(instance_id)
            self.memory.on_instance_dead(instance_id)
        self.lifecycle.tick(self)
        self.requests.forget_expired(now)
        self.memory.tick({i for i, r in self.instances.items() if r.state == "serving"})
        self._rebalance_phases()
        self._drain_queue()
        self._run_placements(self.dispatch.release_batch(self._view(now)))
        metrics().set_scheduler(queued=len(self.dispatch.pending), in_flight=len(self.requests))
        metrics().set_migrations(self.migrations_done, self.migrations_aborted, len(self.migrations))

    # ------------------------------------------------------------------------------------------- failover
    def _fail_over(self, dead_instance: str) -> None:
        """Resume every request of a dead instance elsewhere, from the tokens its client already
        has (the decision: :func:`control.core.requests.fail_over`).
        Thread: the scheduler actor's thread."""
        max_attempts = self.settings.reliability.failover_max_attempts
        before = [msgspec.structs.replace(r) for r in self.requests.values()] if self.decision_log else []
        commands = fail_over(self.requests.values(), dead_instance, max_attempts)
        self._record("fail_over", dead_instance, (tuple(before), max_attempts), tuple(commands))
        for command in commands:
            self.migrations.pop(command.request_id, None)
        self.carry_out(commands)

    def carry_out(self, commands: list[Resume | Fail]) -> None:
        """Carry out the core's failover commands (``control/core/requests.py``): a
        :class:`Fail` ends the request with ``engine_failed``; a :class:`Resume` stores the (now
        ``recovering``) record and reads back, on the bus loop, what its client has (fencing the old instance
        first where one is named); the answer comes back to this actor as a ``Recovered`` message. Also used
        by ``actors/control_state.py`` for requests restored after a restart.
        Thread: the scheduler actor's thread."""
        for command in commands:
            record = self.requests.get(command.request_id)
            if record is None:
                continue
            if isinstance(command, Fail):
                self.fail_request(record, command.why)
                continue
            self.state.save_request(record)
            self.bus.run(self._read_delivered(record.request_id, record.submit.reply_to, fence_on=command.fence_on))

    async def _read_delivered(self, request_id: str, reply_to: str, fence_on: str = "") -> None:
        """Read back what the client of ``request_id`` has (``actors/failover.py``) and tell this actor.

        Thread: the bus loop."""
        result = await read_delivered(self.bus, self.settings.reliability, request_id, reply_to, fence_on)
        if self.actor_ref.is_alive():
            self.actor_ref.tell(result)

    def _on_recovered(self, recovered: Recovered) -> None:
        """What a recovering request's client had: the core decides (``on_recovered``).

        Thread: the scheduler actor's thread."""
        record = self.requests.get(recovered.request_id)
        command = on_recovered(record, recovered.tokens, recovered.finished, recovered.error)
        if record is None or command is None:
            return
        if isinstance(command, Fail):
            self.fail_request(record, command.why)
        elif isinstance(command, Drop):
            self.requests.pop(recovered.request_id)
            self.state.drop_request(recovered.request_id)
            self.planner.forget(recovered.request_id)  # the planner's move record of it is moot now
        elif isinstance(command, Redispatch):
            log.info("request %s fails over after %d delivered tokens", recovered.request_id, len(recovered.tokens))
            self._dispatch_or_wait(record)

    def fail_request(self, record: RequestRecord, why: str) -> None:
        """End a request with ``engine_failed`` (its client is told why) and drop it from the
        request table and the state store.
        Thread: the scheduler actor's thread."""
        self.requests.pop(record.request_id, None)
        self.state.drop_request(record.request_id)
        self.planner.forget(record.request_id)  # the planner's move record of it is moot now
        self.replies.error(
            owner_of(record.submit.reply_to),
            record.submit.reply_to,
            ErrorCode.ENGINE_FAILED,
            why,
            record.request_id,
            "error",
        )

    # ------------------------------------------------------------------------------------------- submission
    def _max_prompt_tokens(self, model: str) -> int:
        """The core's rule (``control/core/admission.py``) over the instances serving ``model``.

        Thread: the scheduler actor's thread."""
        lengths = [r.info.max_model_len for r in self.instances.values() if not model or r.info.model == model]
        return max_prompt_tokens(self.settings.limits.max_prompt_tokens, lengths, self.settings.model.max_model_len)

    def _on_submit(self, submit: SubmitRequest, envelope: Envelope) -> None:
        # Who sent it is what the NATS server authenticated (the subject it let through), not client_id.
        """Thread: the scheduler actor's thread."""
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        reply_to = submit.reply_to or envelope.reply
        if not reply_to:
            log.warning("submit without reply subject dropped")
            return
        # Only targets under the sender's own inbox are ever published to (refusals logged and counted).
        targets = self.replies.first_allowed(identity, [reply_to, envelope.reply], "submit")

        def refuse(code: ErrorCode, text: str, request_id: str | None) -> None:
            # Errors go to the reply_to inbox and, when the sender used NATS request/reply, to that too.
            for target in targets:
                self.replies.error(identity, target, code, text, request_id, "submit")

        if reply_to not in targets:
            where = f"{subjects.INBOX_ROOT}.{identity}." if identity != subjects.ANONYMOUS else subjects.INBOX_ROOT
            refuse(ErrorCode.INVALID_REQUEST, f"reply_to must lie under your own inbox {where}", submit.request_id)
            return
        if identity != subjects.ANONYMOUS and submit.client_id != identity:
            submit = msgspec.structs.replace(submit, client_id=identity)  # limits count the server's identity

        reason = validate(submit)  # the core: control/core/admission.py
        if reason is not None:
            metrics().request_finished(ErrorCode.INVALID_REQUEST, str(submit.request_class))
            refuse(ErrorCode.INVALID_REQUEST, reason, submit.request_id)
            return
        request_id = submit.request_id or uuid.uuid4().hex
        finished = self.requests.finished.get(request_id)
        if finished is not None and finished.reply_to == reply_to:  # a retry (same inbox) of a finished request
            refuse(
                ErrorCode.DUPLICATE_REQUEST,
                f"request {request_id} already ran; its output stays in the "
                "output stream for reliability.output_retention_s (resume_from)",
                request_id,
            )
            return
        existing = self.requests.get(request_id)
        if existing is not None:
            if existing.submit.reply_to == reply_to:  # a client retry: acknowledge again, run once
                self.replies.publish(
                    identity,
                    reply_to,
                    Accepted(
                        request_id=request_id,
                        cancel_token=existing.cancel_token,
                        prompt_tokens=len(existing.prompt_token_ids),
                        v=peer_version(submit.v),
                    ),
                    "submit",
                )
            else:
                refuse(ErrorCode.DUPLICATE_REQUEST, f"request id {request_id} is in use", request_id)
            return
        token_ids = (
            list(submit.prompt_token_ids)
            if submit.prompt_token_ids is not None
            else self.tokenizer.encode(submit.prompt or "")
        )
        decision = decide(  # the limits: control/core/admission.py
            self.settings,
            self.requests,
            self.dispatch.pending,
            submit,
            reply_to,
            len(token_ids),
            max_prompt_tokens=self._max_prompt_tokens(submit.model or ""),
            no_room=lambda: self._no_room(request_id, token_ids, submit),
        )
        if not decision.admitted:
            code = ErrorCode(decision.verdict.value)
            metrics().request_finished(code, str(submit.request_class))
            refuse(code, decision.reason, request_id)
            return
        record = RequestRecord(
            submit=submit,
            request_id=request_id,
            cancel_token=secrets.token_urlsafe(16),
            prompt_token_ids=token_ids,
            arrival=time.time(),
            headers=envelope.headers,
        )
        self.requests[request_id] = record
        accepted = Accepted(
            request_id=request_id,
            cancel_token=record.cancel_token,
            prompt_tokens=len(token_ids),
            v=peer_version(submit.v),
        )
        self.state.save_request(record)  # acknowledged once stored: a retry after a restart is still deduplicated

        def acknowledge() -> None:
            # Accepted goes out before the request is dispatched, so no token can reach the client before it.
            self.replies.publish(identity, reply_to, accepted, "submit")
            self.actor_ref.tell(_Acknowledged(request_id))

        self.state.after_writes(acknowledge)

    def _on_acknowledged(self, request_id: str) -> None:
        """The submission is stored and acknowledged: dispatch it now, or queue it.

        Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        if record is None or record.state != "queued" or record.instance_id is not None:
            return  # cancelled (or ended by its deadline) meanwhile
        now = time.monotonic()
        self.classes.hold(record, now)  # its class's counters; a batch request's deadline
        self._run_placements(self.dispatch.submit(request_id, self._view(now), now))

    def _no_room(self, request_id: str, token_ids: list[int], submit: SubmitRequest) -> bool:
        """Thread: the scheduler actor's thread."""
        return not self.dispatch.fits_now(self._demand(request_id, token_ids, submit))

    def _demand(self, request_id: str, token_ids: list[int], submit: SubmitRequest) -> RequestDemand:
        """Thread: the scheduler actor's thread."""
        block_size = next(iter(self.instances.values())).info.block_size if self.instances else 32
        return RequestDemand(
            request_id=request_id,
            num_prompt_tokens=len(token_ids),
            num_blocks=-(-len(token_ids) // block_size),
            priority=submit.priority,
            model=submit.model or "",
            prefix_block_hashes=prefix_block_hashes(token_ids, block_size)
            if self.params.dispatch_policy == "prefix_affinity"
            else vllm_block_hashes(token_ids, block_size)  # kv_aware and drover index vLLM's own hashes
            if reads_engine_block_hashes(self.params.dispatch_params(), self.params.dispatch_policy)
            else (),
        )

    def _view(self, now: float) -> SchedulerView:
        """The scheduler's tables as the core's dispatch loop reads them.

        Thread: the scheduler actor's thread."""
        return SchedulerView(
            self.instances,
            self.requests,
            self.classes,
            lambda r: self._demand(r.request_id, r.prompt_token_ids, r.submit),
            now,
        )

    def _dispatch_or_wait(self, record: RequestRecord) -> None:
        """Run a request again (failover, a KunServe group handed it back): the core places it now, or it
        waits (and is stored as waiting).

        Thread: the scheduler actor's thread."""
        now = time.monotonic()
        place = self.dispatch.dispatch_or_wait(record.request_id, self._view(now), now)
        if place is not None:
            self._run_placement(place)
        else:
            self.state.save_request(record)

    def _run_placements(self, places: Iterator[Place]) -> None:
        """Carry out the core's placements one by one (it reads the tables again between them).

        Thread: the scheduler actor's thread."""
        for place in places:
            self._run_placement(place)

    def _run_placement(self, place: Place) -> None:
        """Start a request where the core placed it: evict first what it names, then send the EngineAdd (the
        index has counted the placement already).

        Thread: the scheduler actor's thread."""
        record = self.requests[place.request_id]
        instance_id = place.instance_id
        if place.evict:
            self.classes.evicting_for(instance_id, place.evict, record.request_id)
        instance = self.instances[instance_id]
        submit = record.submit
        with tracer().start_as_current_span(
            spans.SCHEDULER_DISPATCH,
            context=extract_context(record.headers),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                spans.REQUEST_ID: record.request_id,
                spans.INSTANCE_ID: instance_id,
                spans.DISPATCH_POLICY: self.policy.name,
                spans.PRIORITY: submit.priority,
                spans.REQUEST_CLASS: str(submit.request_class),
                spans.GEN_AI_USAGE_INPUT_TOKENS: len(record.prompt_token_ids),
                spans.MESSAGING_SYSTEM: "nats",
                "drover.queue_s": time.time() - record.arrival,
            },
        ):
            headers = inject_headers()
        if "traceparent" not in record.headers and "traceparent" in headers:
            # the client sent no trace context: the first dispatch roots the request's one trace, which a
            # later move (migration, failover) joins
            record.headers = dict(headers)
        self._send_add(
            instance_id,
            EngineAdd(
                v=peer_version(instance.info.protocol_version),
                client_v=peer_version(submit.v),
                request_id=record.request_id,
                prompt_token_ids=record.prompt_token_ids,
                sampling=submit.sampling,
                reply_to=submit.reply_to,
                priority=submit.priority,
                request_class=submit.request_class,
                arrival_time=record.arrival,
                stream_text=submit.stream_text,
                output_token_ids=record.resume_tokens,
                served_by=list(record.served_by),
                client_id=submit.client_id or "",
                report_first_token=self.pd.wants_first_token(instance_id, len(record.prompt_token_ids)),
            ),
            headers,
        )
        self.pd.on_request(record.request_id, len(record.prompt_token_ids))
        instance.dispatched += 1
        record.instance_id, record.state = instance_id, "running"
        record.served_by.append(instance_id)
        self.state.save_request(record)
        self.classes.on_dispatched(record, instance_id)

    # An EngineAdd is acknowledged by the engine; one that is not (lost on the way with a NATS node that
    # died, or sent while the instance was resubscribing) is sent again, a few times, while the request is
    # still meant to run there. The engine ignores a copy of what it already runs.
    ADD_ATTEMPTS = 6

    def _send_add(self, instance_id: str, add: EngineAdd, headers: dict[str, str], attempt: int = 1) -> None:
        """Thread: the scheduler actor's thread."""
        self.bus.run(self._request_add(instance_id, add, headers, attempt))

    async def _request_add(self, instance_id: str, add: EngineAdd, headers: dict[str, str], attempt: int) -> None:
        """Thread: the bus loop."""
        try:
            await self.bus.nc.request(
                subjects.engine(instance_id),
                encode(add),
                timeout=self.settings.nats.request_timeout_s,
                headers=headers or None,
            )
        except Exception as exc:  # timeout, no responders, reconnecting
            log.info("engine_add of %s to %s unacknowledged (%s)", add.request_id, instance_id, type(exc).__name__)
            await asyncio.sleep(min(2.0, 0.25 * 2**attempt))  # "no responders" comes back at once: back off
            if self.actor_ref.is_alive():
                self.actor_ref.tell(_AddUnacked(instance_id, add, headers, attempt))

    def _on_add_unacked(self, unacked: _AddUnacked) -> None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(unacked.add.request_id)
        if record is None or record.instance_id != unacked.instance_id or record.state != "running":
            return  # ended, failed over or migrated meanwhile
        if unacked.attempt >= self.ADD_ATTEMPTS or unacked.instance_id not in self.instances:
            return  # the heartbeat timeout decides whether the instance is gone
        self._send_add(unacked.instance_id, unacked.add, unacked.headers, unacked.attempt + 1)

    def _drain_queue(self) -> None:
        """The core retries what waits (fair queue, then the queue from its head).

        Thread: the scheduler actor's thread."""
        now = time.monotonic()
        self._run_placements(self.dispatch.retry(self._view(now), now))

    def _evict(self, instance_id: str, request_id: str) -> None:
        """Stop a batch request so an interactive one gets its slot (it resumes from the batch queue).

        Thread: the scheduler actor's thread."""
        instance = self.instances.get(instance_id)
        version = peer_version(instance.info.protocol_version if instance else 1)
        self.bus.publish(subjects.engine(instance_id), EngineAbort(request_id=request_id, reason="evicted", v=version))

    # ------------------------------------------------------------------------------------------- lifecycle
    def _on_request_ended(self, ended: EngineRequestEnded) -> None:
        """Thread: the scheduler actor's thread."""
        if ended.finish_reason == "migrated":
            return  # it lives on at the destination; MigrationEnded moves the record
        record = self.requests.get(ended.request_id)
        if record is None or record.instance_id != ended.instance_id:
            return  # a late or duplicate event (e.g. after migration): the current owner reports again
        if ended.finish_reason == "evicted" and self.classes.on_evicted(ended.request_id):
            # preempted for an interactive request (Chiron): back to the batch queue from what the client has
            record.state, record.instance_id = "recovering", None
            self.carry_out([Resume(record.request_id)])
            return
        if ended.finish_reason == "evicted":  # a KunServe group step handed it back: resume after its outputs
            self._resume_after(record, ended.output_token_ids)
            return
        self.requests.pop(ended.request_id)
        self.state.drop_request(ended.request_id)
        self.planner.forget(ended.request_id)  # the planner's move record of it is moot now
        self.classes.on_ended(ended.request_id)
        self.dispatch.forget(ended.request_id)
        self.pd.on_request_ended(ended.request_id)

    def _resume_after(self, record: RequestRecord, outputs: list[int]) -> None:
        """Run a request again after the output tokens its client has (recomputed where it lands).

        Thread: the scheduler actor's thread."""
        record.resume_tokens, record.state, record.instance_id = list(outputs), "queued", None
        self.state.save_request(record)
        self._dispatch_or_wait(record)

    def _on_handed(self, handed: _Handed) -> None:
        """A member joining a KunServe group handed its request over: it is being added to the group's leader
        (``destination``; on its KV, as a migrated request), or (None: it was not) resumes after its outputs.

        Thread: the scheduler actor's thread."""
        record = self.requests.get(handed.request_id)
        if record is None or record.instance_id != handed.source:
            return  # ended (or moved) meanwhile
        if handed.destination is None:
            self._resume_after(record, handed.outputs)
            return
        record.instance_id = handed.destination
        record.served_by.append(handed.destination)
        self.state.save_request(record)

    def _refresh_instance(self, instance_id: str) -> None:
        """Re-read whether an instance takes dispatches (the memory manager grouped or released it).

        Thread: the scheduler actor's thread."""
        record = self.instances.get(instance_id)
        if record is not None:
            self._upsert(record)

    # ------------------------------------------------------------------------------------------- migration
    def _start_migration(
        self, request_id: str, source: str, destination: str, num_blocks: int, reason: str, reply_to: str = ""
    ) -> bool:
        """Thread: the scheduler actor's thread."""
        migrator = self.peers.get("migrator")
        if migrator is None:
            self.bus.reply_error(reply_to, ErrorCode.MIGRATION_FAILED, "no migrator runs in this control plane")
            return False
        self.migrations[request_id] = InFlightMigration(source, destination, request_id)
        record = self.requests.get(request_id)
        headers = record.headers if record is not None else None  # the migration joins the request's trace
        migrator.tell(
            StartMigration(request_id, source, destination, num_blocks, self.params, reason, reply_to, headers)
        )
        return True

    def _prompt_of(self, request_id: str) -> list[int] | None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        return record.prompt_token_ids if record is not None else None

    def _migratable_snapshots(self) -> list[InstanceSnapshot]:
        """Thread: the scheduler actor's thread."""
        return self.pd.balancing_pool([self._snapshot(r) for r in self.instances.values() if r.can_migrate])

    def _plan_migrations(self) -> None:
        """Thread: the scheduler actor's thread."""
        if not self.params.migration_enabled:
            return
        snapshots = self._migratable_snapshots()
        self.planner.sync(snapshots)
        in_flight, now = list(self.migrations.values()), time.monotonic()  # the core's clock is passed in
        decisions = self.planner.plan(in_flight, now=now)
        self._record("migration_plan", "", (tuple(snapshots), tuple(in_flight), now), tuple(decisions))
        decisions = prefix_aware_destinations(self.policy, decisions, snapshots, self._prompt_of)
        for d in decisions:
            record = self.requests.get(d.request_id)
            if record is None or record.instance_id != d.source_id:
                # A heartbeat older than a committed move (or the request's end) still lists it at the source:
                # the request table knows better; moving it would only abort with "no request ... on <source>".
                continue
            self._start_migration(d.request_id, d.source_id, d.destination_id, d.num_blocks, d.reason)

    def _on_migration_ended(self, ended: MigrationEnded) -> None:
        """Thread: the scheduler actor's thread."""
        self.migrations.pop(ended.request_id, None)
        self.pd.on_handoff_ended(ended.request_id, ended.ok)
        if ended.ok:
            self.migrations_done += 1
        else:
            self.migrations_aborted += 1
        record = self.requests.get(ended.request_id)
        if record is not None and ended.ok:
            record.instance_id = ended.destination
            record.served_by.append(ended.destination)
            self.state.save_request(record)

    def _on_migrate_command(self, command: MigrateCommand, reply: str) -> None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(command.request_id)
        if record is None or record.instance_id is None:
            self.bus.reply_error(
                reply, ErrorCode.UNKNOWN_REQUEST, f"no running request {command.request_id}", command.request_id
            )
            return
        source = self.instances.get(record.instance_id)
        if source is None or not source.can_migrate:
            self.bus.reply_error(
                reply,
                ErrorCode.MIGRATION_FAILED,
                f"instance {record.instance_id} cannot migrate requests",
                command.request_id,
            )
            return
        destination = command.destination or self._pick_destination(source) or ""
        target = self.instances.get(destination)
        if target is None:
            self.bus.reply_error(
                reply,
                ErrorCode.UNKNOWN_INSTANCE,
                f"no instance {command.destination or '(any compatible)'} to migrate to",
            )
            return
        if (
            destination == source.info.instance_id
            or not target.can_migrate
            or not target.info.compatible_with(source.info)
        ):
            self.bus.reply_error(
                reply,
                ErrorCode.MIGRATION_FAILED,
                f"{destination} is not a compatible migration destination for {source.info.instance_id}",
            )
            return
        if command.request_id in self.migrations:
            self.bus.reply_error(reply, ErrorCode.MIGRATION_FAILED, f"{command.request_id} is already migrating")
            return
        blocks = next(
            (r.num_blocks for r in source.load.running if r.request_id == command.request_id),
            -(-len(record.prompt_token_ids) // source.info.block_size),
        )
        self._start_migration(command.request_id, source.info.instance_id, destination, blocks, command.reason, reply)

    def _pick_destination(self, source: InstanceRecord) -> str | None:
        """Thread: the scheduler actor's thread."""
        candidates = [
            r
            for r in self.instances.values()
            if r is not source and r.can_migrate and not r.drain_requested and r.info.compatible_with(source.info)
        ]
        best = max(candidates, key=lambda r: r.load.num_free_blocks, default=None)
        return best.info.instance_id if best else None

    def _on_drain(self, command: DrainCommand, reply: str) -> None:
        """Thread: the scheduler actor's thread."""
        record = self.instances.get(command.instance_id)
        if record is None:
            self.bus.reply_error(reply, ErrorCode.UNKNOWN_INSTANCE, f"no instance {command.instance_id}")
            return
        record.drain_requested = not command.undo
        self.state.save_instance(record)
        self._upsert(record)  # no new dispatches from now on (or again, on undo)
        running = [r.request_id for r in record.load.running]
        if command.undo:
            self.bus.publish(reply, AdminReply(ok=True, message=f"{command.instance_id} is back in service"))
        elif reply:
            self.bus.publish(
                reply,
                AdminReply(
                    ok=True,
                    message=f"draining {command.instance_id}: {len(running)} requests to move",
                    details={"running": running, "can_migrate": record.can_migrate},
                ),
            )

    # ------------------------------------------------------------------------------------------- prefill/decode
    def _on_first_token(self, event: EngineFirstToken) -> None:
        """A request's first token is out: hand it off now, not at its prefill instance's next heartbeat.

        Thread: the scheduler actor's thread."""
        record = self.instances.get(event.instance_id)
        if record is not None:
            self._hand_off(self._snapshot(record), event)

    def _hand_off(self, report: InstanceSnapshot, first_token: EngineFirstToken | None = None) -> None:
        """A prefill instance reported requests past their first token (or ``first_token`` says one is): move
        each to a decode instance the core picks (a live migration); one no decode instance can take stays
        where it is.

        Thread: the scheduler actor's thread."""
        if not self.pd.enabled or "migrator" not in self.peers:
            return
        source = self.instances.get(report.instance_id)
        if source is None or not source.can_migrate:
            return
        decode = (  # built only when the report has candidates
            self._snapshot(r)
            for r in self.instances.values()
            if r.can_migrate
            and r.info.compatible_with(source.info)
            and self.pd.phase_of(r.info.instance_id) == "decode"
        )

        def busy(request_id: str) -> bool:
            record = self.requests.get(request_id)
            return request_id in self.migrations or record is None or record.instance_id != report.instance_id

        index = getattr(self.policy, "prefix_index", None)
        overlap = index.overlap if index is not None else None
        block_size = source.info.block_size

        def prefix_of(request_id: str) -> tuple[int, ...]:
            prompt = self._prompt_of(request_id)
            return tuple(vllm_block_hashes(prompt, block_size)) if prompt else ()

        prefixes = prefix_of if overlap is not None else None
        if first_token is None:
            planned = self.pd.handoffs([report], decode, busy, overlap, prefixes)
        else:
            blocks = -(-first_token.num_tokens // block_size)
            planned = self.pd.first_token_handoffs(
                first_token.request_id, report, blocks, decode, busy, overlap, prefixes
            )
        for h in planned:
            log.info("pd handoff: %s %s -> %s", h.request_id, h.source_id, h.destination_id)
            self._start_migration(h.request_id, h.source_id, h.destination_id, h.num_blocks, h.reason)

    def _rebalance_phases(self) -> None:
        """The prefill:decode split follows each pool's pressure ([pd] rebalance_period_s; the core decides).

        Thread: the scheduler actor's thread."""
        serving = [r for r in self.instances.values() if r.state == "serving"]
        change = self.pd.rebalance((self._snapshot(r) for r in serving), time.monotonic())
        if change is not None and change.instance_id in self.instances:
            log.info("pd split: %s now serves %s (%s)", change.instance_id, change.phase, change.reason)
            self.state.save_phase(change.instance_id, change.phase)
            self._upsert(self.instances[change.instance_id])  # re-filed in its pool (recorded, as every upsert)

    def _on_phase(self, command: PhaseCommand, reply: str) -> None:
        """An operator sets an instance's phase (audited by the control plane before it gets here).

        Thread: the scheduler actor's thread."""
        record = self.instances.get(command.instance_id)
        if record is None:
            self.bus.reply_error(reply, ErrorCode.UNKNOWN_INSTANCE, f"no instance {command.instance_id}")
            return
        try:
            phase = parse_phase(command.phase)
        except ValueError as exc:
            self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, str(exc))
            return
        self.pd.set_phase(command.instance_id, phase)
        self.state.save_phase(command.instance_id, phase)  # it outlives a control-plane restart
        self._upsert(record)  # it changes dispatch pools at once
        log.info("instance %s now serves phase %s (operator %s)", command.instance_id, phase, command.operator or "-")
        note = "" if self.pd.enabled else " (pd.mode is off: phases take effect once it is on)"
        if reply:
            self.bus.publish(reply, AdminReply(ok=True, message=f"{command.instance_id} serves {phase}{note}"))

    def _on_policy(self, message: PolicyQuery | PolicyUpdate, reply: str) -> None:
        """Thread: the scheduler actor's thread."""
        if isinstance(message, PolicyUpdate):
            try:
                params = self.params.with_updates(**message.changes)
            except ValueError as exc:
                self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, str(exc))
                return
            if (
                params.dispatch_policy != self.params.dispatch_policy
                or params.dispatch_params() != self.params.dispatch_params()
            ):
                self.policy = make_dispatch(params.dispatch_policy, params.dispatch_params(), self.pd)
                for record in self.instances.values():
                    self._upsert(record)
            self.params = params
            self.planner.set_params(params)
            log.info("policy updated: %s", message.changes)
        if reply:
            self.bus.publish(reply, AdminReply(ok=True, message="policy", details=self.params.as_dict()))

    def _on_cancel(self, cancel: Cancel, envelope: Envelope) -> None:
        """Thread: the scheduler actor's thread."""
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        target = cancel.reply_to or envelope.reply
        if target and not self.replies.allowed(identity, target, "cancel"):
            # nothing is published there; the sender hears why on its NATS reply subject when that one is its own
            if envelope.reply != target:
                self.replies.error(
                    identity,
                    envelope.reply,
                    ErrorCode.INVALID_REQUEST,
                    "reply_to must lie under your own inbox",
                    cancel.request_id,
                    "cancel",
                )
            return
        record = self.requests.get(cancel.request_id)
        # A wrong token, or another identity's request, gets the same answer as an unknown id: ids of other
        # clients reveal nothing.
        foreign = (
            record is not None
            and identity != subjects.ANONYMOUS
            and subjects.inbox_owner(record.submit.reply_to) != identity
        )
        if record is None or foreign or not hmac.compare_digest(record.cancel_token, cancel.cancel_token):
            self.replies.error(
                identity,
                target,
                ErrorCode.UNKNOWN_REQUEST,
                f"no request {cancel.request_id} to cancel",
                cancel.request_id,
                "cancel",
            )
            return
        assert record is not None
        if record.state == "queued":
            self.requests.pop(cancel.request_id)
            self.state.drop_request(cancel.request_id)
            self.planner.forget(cancel.request_id)  # the planner's move record of it is moot now
            self.replies.to_owner(
                record.submit.reply_to,
                RequestDone(
                    request_id=cancel.request_id,
                    finish_reason="abort",
                    usage=Usage(prompt_tokens=len(record.prompt_token_ids), completion_tokens=0),
                    v=peer_version(record.submit.v),
                ),
                "cancel",
            )
        elif record.instance_id is not None:
            instance = self.instances.get(record.instance_id)
            version = peer_version(instance.info.protocol_version if instance else 1)
            self.bus.publish(subjects.engine(record.instance_id), EngineAbort(request_id=cancel.request_id, v=version))
        if target:
            self.replies.publish(
                identity, target, CancelAck(request_id=cancel.request_id, v=peer_version(cancel.v)), "cancel"
            )

    # ------------------------------------------------------------------------------------------- status
    def status(self) -> StatusReply:
        """Thread: the scheduler actor's thread."""
        now_mono, now = time.monotonic(), time.time()
        return StatusReply(
            instances=[
                InstanceStatus(
                    info=r.info,
                    load=r.load,
                    age_s=now_mono - r.last_seen,
                    state=_instance_state(r),
                    dispatched=r.dispatched,
                    cached_blocks=r.cached_blocks,
                    phase=self.pd.phase_of(r.info.instance_id),
                )
                for r in sorted(self.instances.values(), key=lambda r: r.info.instance_id)
            ],
            requests=[
                RequestStatus(
                    request_id=r.request_id,
                    instance_id=r.instance_id,
                    state=r.state,
                    prompt_tokens=len(r.prompt_token_ids),
                    age_s=now - r.arrival,
                    priority=r.submit.priority,
                    request_class=r.submit.request_class,
                )
                for r in self.requests.values()
            ],
            queued=self.dispatch.num_queued,
            dispatch_policy=self.policy.name,
            migrations_completed=self.migrations_done,
            migrations_aborted=self.migrations_aborted,
            migrations_in_flight=sorted(self.migrations),
            groups=self.memory.status(),
        )


def _instance_state(record: InstanceRecord) -> str:
    if record.drain_requested or record.draining:
        return "drained" if record.load.num_running == 0 and record.load.num_waiting == 0 else "draining"
    return record.state
