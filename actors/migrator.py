"""MigratorActor: runs Llumnix's multi-stage live-migration protocol between two engine instances.

The actor owns the table of migrations in flight (for concurrency caps and status); each migration runs as
a coroutine on the bus loop, talking request/reply to the two EngineActors, and reports its end to the
actor (and to the scheduler) as a message. The KV data itself moves engine to engine over the data plane,
never through the control plane.

Protocol, per migration (see engines/migration.py for the engine side):
  1. reserve on the destination (blocks the request holds + headroom) -> data-plane address
  2. begin on the source (the request keeps decoding)
  3. stages: each copies the blocks filled since the last; after each, grow the reservation; once at most
     ``last_stage_max_blocks`` remain go on (after ``max_stages`` stages, ``after_max_stages`` says: go on,
     or abort). The control core's :class:`control.core.migration.MigrationStages` makes these decisions,
     the same object the simulator drives
  4. stop on the source: the request stops, the remaining blocks are copied, the exact token state returns
     (the source streams any sampled-but-unsent tokens to the client itself)
  5. resume on the destination (prompt + generated tokens, KV loaded, not recomputed)
  6. commit on the source (its blocks are freed)
Any failure before 5 aborts: the source keeps the request (or, if already stopped, resumes it), and the
destination's reservation is released. A failed commit (6) does not abort (the request runs at the
destination): the source is told to abort its side instead, which frees its blocks without resuming.
``migration.fault_stage`` injects an abort at a chosen stage (tests, chaos benchmark). Tokens reach the
client exactly once because every chunk carries its index and the client drops what it already has.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pykka
from opentelemetry import trace

from actors.supervisor import SupervisedActor
from control.core.migration import MigrationStages, StageStep
from control.core.record import DecisionLog
from control.errors import DroverError
from control.policy.params import PolicyParams
from control.settings import MigrationSettings
from observability import spans
from observability.metrics import metrics
from observability.tracing import extract_context, inject_headers, tracer
from transport import subjects
from transport.bus import Bus
from transport.messages import (
    AdminReply,
    EngineAdd,
    Message,
    MigrateIn,
    MigrateInReply,
    MigrateOut,
    MigrateOutReply,
)

log = logging.getLogger(__name__)


class MigrationFailed(DroverError):
    """A migration could not be started or finished (the request stays where it was)."""

    default_code = "migration_failed"


@dataclass(frozen=True, slots=True)
class StartMigration:
    """Scheduler -> migrator."""

    request_id: str
    source: str
    destination: str
    num_blocks: int
    params: PolicyParams  # the scheduler's policy at decision time: caps and stage knobs
    reason: str = "policy"
    reply_to: str = ""  # operator inbox for an AdminReply
    headers: dict[str, str] | None = None  # the request's trace context: its migration joins its trace
    max_blocks: int = 0  # the most blocks the request can ever hold: caps the reservation (0: unknown)


@dataclass(frozen=True, slots=True)
class MigrationEnded:
    """Migrator coroutine -> migrator actor, and migrator -> scheduler."""

    migration_id: str
    request_id: str
    source: str
    destination: str
    ok: bool
    reason: str
    downtime_s: float = 0.0
    stages: int = 0
    copied_blocks: int = 0
    copied_bytes: int = 0
    resumed_on_source: bool = False
    reply_to: str = ""  # the operator's inbox: the scheduler answers there once its table has the outcome
    reply: AdminReply | None = None


class MigratorActor(SupervisedActor):
    def __init__(
        self,
        bus: Bus,
        settings: MigrationSettings,
        scheduler: Any,  # an ActorSlot or ActorRef: .tell(MigrationEnded)
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "migrator",
        state: Any = None,  # actors.control_state.ControlState: migrations in flight survive a leader's death
        decision_log: DecisionLog | None = None,
    ) -> None:
        """Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__(supervisor, name)
        self.state = state
        self.bus = bus
        self.settings = settings
        self.scheduler = scheduler
        self.in_flight: dict[str, StartMigration] = {}  # migration id -> its start (caps, duplicates)
        self.decision_log = decision_log  # the core's decisions with their inputs (parity tests); None: off

    # ------------------------------------------------------------------------------------------- actor side
    def busy_instances(self) -> dict[str, int]:
        """Thread: the migrator actor's thread."""
        counts: dict[str, int] = {}
        for m in self.in_flight.values():
            for instance in (m.source, m.destination):
                counts[instance] = counts.get(instance, 0) + 1
        return counts

    def on_receive(self, message: Any) -> Any:
        """Thread: the migrator actor's thread."""
        if isinstance(message, StartMigration):
            return self._start(message)
        if isinstance(message, MigrationEnded):
            self.in_flight.pop(message.migration_id, None)
            if self.state is not None and message.migration_id:
                self.state.drop_migration(message.migration_id)
            self.scheduler.tell(message)
        return None

    def _start(self, start: StartMigration) -> str | None:
        """Begin a migration unless a cap forbids it; returns its id, or None when refused.

        Thread: the migrator actor's thread."""
        busy = self.busy_instances()
        cap = start.params.max_migrations_per_instance
        if any(m.request_id == start.request_id for m in self.in_flight.values()):
            self._refuse(start, f"request {start.request_id} is already migrating")
            return None
        if busy.get(start.source, 0) >= cap or busy.get(start.destination, 0) >= cap:
            self._refuse(start, "an instance already takes part in its maximum of concurrent migrations")
            return None
        if 0 < start.params.max_migrations_total <= len(self.in_flight):
            self._refuse(start, "the cluster-wide cap of concurrent migrations is reached")
            return None
        migration_id = uuid.uuid4().hex[:16]
        self.in_flight[migration_id] = start
        if self.state is not None:
            self.state.save_migration(migration_id, start.request_id, start.source, start.destination)
        self.bus.run(self._run(start, migration_id))
        return migration_id

    def _refuse(self, start: StartMigration, why: str) -> None:
        """Thread: the migrator actor's thread."""
        log.info("migration of %s refused: %s", start.request_id, why)
        if start.reply_to:
            self.bus.publish(start.reply_to, AdminReply(ok=False, message=why))
        self.scheduler.tell(MigrationEnded("", start.request_id, start.source, start.destination, False, why))

    # ------------------------------------------------------------------------------------------- protocol
    def _inject(self, stage: str) -> None:
        """The fault-injection hook: abort here when ``migration.fault_stage`` names this stage.

        Thread: the bus loop (inside a migration's coroutine)."""
        if self.settings.fault_stage == stage and random.random() < self.settings.fault_rate:
            raise MigrationFailed(f"injected fault at {stage}")

    async def _ask(self, instance_id: str, message: Message, headers: dict[str, str] | None = None) -> Message:
        """Thread: the bus loop."""
        try:
            return await self.bus.arequest(
                subjects.engine(instance_id), message, timeout_s=self.settings.op_timeout_s, headers=headers
            )
        except Exception as exc:  # timeout, no responders (a dead instance), transport errors
            raise MigrationFailed(f"{type(message).__name__} to {instance_id}: {exc!r}") from exc

    async def _out(self, instance_id: str, **kwargs: Any) -> MigrateOutReply:
        """Thread: the bus loop."""
        reply = await self._ask(instance_id, MigrateOut(**kwargs))
        if not isinstance(reply, MigrateOutReply):
            raise MigrationFailed(f"{instance_id} answered {type(reply).__name__}: {getattr(reply, 'message', '')}")
        if not reply.ok:
            raise MigrationFailed(f"{instance_id}: {reply.error}")
        return reply

    async def _reserve(self, destination: str, migration_id: str, num_blocks: int) -> str:
        """Thread: the bus loop."""
        reply = await self._ask(destination, MigrateIn(op="reserve", migration_id=migration_id, num_blocks=num_blocks))
        if not isinstance(reply, MigrateInReply) or not reply.ok:
            raise MigrationFailed(f"{destination} cannot reserve {num_blocks} blocks: {getattr(reply, 'error', reply)}")
        return reply.address

    async def _run(self, start: StartMigration, migration_id: str) -> None:
        """Thread: the bus loop."""
        src, dst, rid = start.source, start.destination, start.request_id
        headroom = self.settings.reserve_headroom_blocks
        stopped: MigrateOutReply | None = None
        begun = False
        stages = copied_blocks = copied_bytes = 0
        downtime = 0.0
        outcome = "ok"
        with tracer().start_as_current_span(
            spans.MIGRATION,
            context=extract_context(start.headers) if start.headers else None,
            kind=trace.SpanKind.INTERNAL,
            attributes={
                spans.REQUEST_ID: rid,
                spans.MIGRATION_ID: migration_id,
                "drover.migration.source": src,
                "drover.migration.destination": dst,
                "drover.migration.reason": start.reason,
            },
        ) as span:
            try:
                self._inject("before_reserve")
                machine = MigrationStages(
                    start.params,
                    headroom,
                    log=self.decision_log,
                    key=rid,
                    decoded_factor=self.settings.reserve_decoded_factor,
                    max_blocks=start.max_blocks,
                )
                address = await self._reserve(dst, migration_id, machine.first_reservation(start.num_blocks))
                begin = await self._out(
                    src,
                    op="begin",
                    migration_id=migration_id,
                    request_id=rid,
                    destination_instance=dst,
                    destination_address=address,
                )
                begun = True
                step = StageStep.COPY
                while step is StageStep.COPY:
                    grown = machine.grow_reservation(begin.total_blocks)
                    if grown is not None:
                        await self._reserve(dst, migration_id, grown)
                    with tracer().start_as_current_span(spans.MIGRATION_STAGE) as stage_span:
                        reply = await self._out(src, op="stage", migration_id=migration_id)
                        info = reply.stage
                        assert info is not None
                        stage_span.set_attributes(
                            {
                                spans.MIGRATION_STAGE_INDEX: machine.stages,
                                spans.MIGRATION_BLOCKS: info.copied_blocks,
                                spans.MIGRATION_BYTES: info.copied_bytes,
                                "drover.migration.remaining_blocks": info.remaining_blocks,
                            }
                        )
                    stages += 1
                    copied_blocks += info.copied_blocks
                    copied_bytes += info.copied_bytes
                    if info.request_finished:
                        raise MigrationFailed("the request finished during migration")
                    self._inject("mid_copy")
                    begin = reply
                    step = machine.after_stage(info.remaining_blocks)
                if step is StageStep.ABORT:
                    raise MigrationFailed(f"{machine.stages} stages did not reach stop-and-copy")
                grown = machine.grow_reservation(begin.total_blocks)
                if grown is not None:
                    await self._reserve(dst, migration_id, grown)
                stop_started = time.perf_counter()
                with tracer().start_as_current_span(spans.MIGRATION_STOP_AND_COPY) as stop_span:
                    stopped = await self._out(src, op="stop", migration_id=migration_id)
                    if stopped.stage is not None:
                        stop_span.set_attributes(
                            {
                                spans.MIGRATION_BLOCKS: stopped.stage.copied_blocks,
                                spans.MIGRATION_BYTES: stopped.stage.copied_bytes,
                            }
                        )
                        copied_blocks += stopped.stage.copied_blocks
                        copied_bytes += stopped.stage.copied_bytes
                    if stopped.stage is not None and stopped.stage.request_finished:
                        raise MigrationFailed("the request finished before it stopped")
                    self._inject("stop_and_copy")
                with tracer().start_as_current_span(spans.MIGRATION_RESUME):
                    await self._resume(dst, stopped, src)
                downtime = time.perf_counter() - stop_started
                try:
                    self._inject("commit")
                    await self._out(src, op="commit", migration_id=migration_id)
                except MigrationFailed as exc:  # the request runs on the destination: that is success
                    log.warning("commit on %s failed (%s): aborting its side to free its blocks", src, exc)
                    await self._release_source(src, migration_id)
            except Exception as exc:
                outcome = str(exc)
                log.warning("migration %s of %s (%s -> %s) aborted: %s", migration_id, rid, src, dst, exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
            resumed_on_source = False
            if outcome != "ok":
                resumed_on_source = await self._clean_up(src, dst, migration_id, begun, stopped)
            span.set_attributes(
                {
                    "drover.migration.stages": stages,
                    spans.MIGRATION_BLOCKS: copied_blocks,
                    spans.MIGRATION_BYTES: copied_bytes,
                    "drover.migration.downtime_s": downtime,
                    "drover.migration.outcome": outcome,
                }
            )
        metrics().migration_finished("committed" if outcome == "ok" else "aborted", copied_bytes, downtime)
        ended = MigrationEnded(
            migration_id=migration_id,
            request_id=rid,
            source=src,
            destination=dst,
            ok=outcome == "ok",
            reason=outcome,
            downtime_s=downtime,
            stages=stages,
            copied_blocks=copied_blocks,
            copied_bytes=copied_bytes,
            resumed_on_source=resumed_on_source,
            # Not published here: an operator who reads `drover status` right after "migrated" must see the
            # request at its destination (CI once read the source), so the scheduler answers after moving it.
            reply_to=start.reply_to,
            reply=AdminReply(
                ok=outcome == "ok",
                message="migrated" if outcome == "ok" else f"aborted: {outcome}",
                details={
                    "migration_id": migration_id,
                    "downtime_ms": round(downtime * 1e3, 3),
                    "stages": stages,
                    "copied_blocks": copied_blocks,
                    "copied_bytes": copied_bytes,
                },
            ),
        )
        if self.actor_ref.is_alive():
            self.actor_ref.tell(ended)
        else:
            self.scheduler.tell(ended)

    async def _resume(self, instance_id: str, state: MigrateOutReply, source: str, *, load_kv: bool = True) -> None:
        """Thread: the bus loop."""
        if state.sampling is None or not state.request_id:
            raise MigrationFailed("source returned no request state")
        add = EngineAdd(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            sampling=state.sampling,
            reply_to=state.reply_to,
            priority=state.priority,
            output_token_ids=state.output_token_ids,
            served_by=state.served_by or [source],
            kv_transfer=state.kv_transfer if load_kv else None,
            arrival_time=time.time(),  # timings on the destination count from the resume
            request_class=state.request_class,
            client_id=state.client_id,
        )
        reply = await self._ask(instance_id, add, headers=inject_headers())  # the destination's span joins the trace
        if not isinstance(reply, AdminReply) or not reply.ok:
            raise MigrationFailed(f"{instance_id} did not resume: {getattr(reply, 'message', reply)}")

    async def _release_source(self, src: str, migration_id: str) -> None:
        """After a failed commit: the source drops its stopped copy (frees its blocks) and resumes nothing.

        Thread: the bus loop."""
        try:
            await self._ask(src, MigrateOut(op="abort", migration_id=migration_id))
        except MigrationFailed as exc:
            log.error("source %s keeps the blocks of migration %s: %s", src, migration_id, exc)

    async def _clean_up(
        self, src: str, dst: str, migration_id: str, begun: bool, stopped: MigrateOutReply | None
    ) -> bool:
        """Release the destination; let the source keep the request, or re-take it if it had stopped.

        Returns True when the request was re-added on the source (by recompute: its KV may be gone).

        Thread: the bus loop."""
        try:
            await self._ask(dst, MigrateIn(op="release", migration_id=migration_id))
        except MigrationFailed as exc:
            log.warning("release on %s failed (it frees on its own timeout): %s", dst, exc)
        if not begun:
            return False
        try:
            reply: Message | None = await self._ask(src, MigrateOut(op="abort", migration_id=migration_id))
        except MigrationFailed as exc:
            log.warning("abort on %s failed: %s", src, exc)
            reply = None
        # An abort after the stop hands back the frozen state (also when our stop call itself timed out).
        frozen = stopped
        if frozen is None and isinstance(reply, MigrateOutReply) and reply.request_id:
            frozen = reply
        if frozen is None:
            return False  # the request never stopped: it goes on decoding at the source
        try:
            await self._resume(src, frozen, src, load_kv=False)
            return True
        except MigrationFailed as exc:
            log.error("request %s could not be resumed on its source %s: %s", frozen.request_id, src, exc)
            return False
