"""The control-plane process: bus, SupervisorActor and its children, wired to their NATS subjects.

With ``ha.enabled`` (the default) several control planes may run: one leads (a JetStream KV lease,
``actors/leadership.py``), the others stand by. Only the leader runs the scheduler and migrator and
subscribes to the control subjects (submit, cancel, admin, heartbeats, engine events); a standby holds
nothing but its lease poller, and on election starts the actors (the scheduler restores the request table
and registry from the state bucket, ``actors/control_state.py``) and subscribes. A leader that loses its
lease unsubscribes and stops its actors; a message that reaches it meanwhile is published again (once) for
the new leader instead of being handled. ``stop`` (SIGTERM) releases the lease: a standby, which watches the
lease key, takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pykka

from actors.audit import AdminAuditor
from actors.autoscaler import AutoscalerActor
from actors.client_replies import ClientReplies
from actors.control_state import ControlState
from actors.leadership import Leadership
from actors.migrator import MigratorActor
from actors.scheduler import MigrationTick, SchedulerActor, Tick
from actors.span_receiver import SpanBudget
from actors.supervisor import ActorSlot, GetStatus, SupervisorActor
from control import gc_tuning
from control.core.provisioner import NoProvisioner, Provisioner
from control.core.record import DecisionLog
from control.errors import ConfigError
from control.settings import Settings
from engines.tokenizer import Tokenizer
from observability.audit import AuditLog
from observability.tracing import append_span_dicts
from transport import subjects
from transport.bus import Bus, Envelope
from transport.kv_store import KvWriter, open_bucket
from transport.messages import (
    AutoscaleStatusQuery,
    Cancel,
    DrainCommand,
    EngineFirstToken,
    EngineRequestEnded,
    ErrorCode,
    InstanceHeartbeat,
    MemoryCommand,
    MigrateCommand,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    ReplayReply,
    ReplayRequest,
    ScaleCommand,
    SpanBatch,
    StatusQuery,
    StatusReply,
    SubmitRequest,
)
from transport.output_stream import ensure_output_stream, read_subject

log = logging.getLogger(__name__)

REPLAY_PAGE_BYTES = 512 * 1024  # one ReplayReply stays well under NATS max_payload (1 MiB by default)
FORWARDED_HEADER = "Drover-Forwarded"  # set on a control message a stepping-down leader passes on


class ControlPlane:
    """Starts and stops the control plane's actors; bus handlers only hand envelopes to actor slots."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        tokenizer: Tokenizer,
        *,
        tick_interval_s: float = 0.25,
        provisioner: Provisioner | None = None,
        provisioner_factory: Callable[[Settings], Provisioner] | None = None,
        decision_log: DecisionLog | None = None,
        reply_bus: Bus | None = None,
    ) -> None:
        """``reply_bus``: the client-bound connection (secure mode: a user that may publish only to client
        inboxes, ``control-reply``); None: replies go over ``bus``."""
        self.settings = settings
        self.replies = ClientReplies(reply_bus or bus)
        self.span_budget = SpanBudget()
        # None: ``provisioner_factory`` makes one when leading (the app passes the one ``[autoscaler]
        # provisioner`` names; actors cannot import the apps that spawn processes).
        self.provisioner = provisioner
        self.provisioner_factory = provisioner_factory
        self.decision_log = decision_log  # the control core's decisions, recorded (parity tests); None: off
        if provisioner is None and provisioner_factory is None and settings.autoscaler.enabled:
            raise ConfigError(
                "the autoscaler is enabled but this control plane was given no provisioner", code="no_provisioner"
            )
        self.bus = bus
        self.tokenizer = tokenizer
        self.tick_interval_s = tick_interval_s
        self.audit = AdminAuditor(bus, AuditLog(settings.audit.path), settings.audit.reply_timeout_s)
        self.supervisor: pykka.ActorRef[Any] | None = None
        self.scheduler: ActorSlot | None = None
        self.migrator: ActorSlot | None = None
        self.autoscaler: ActorSlot | None = None
        self.peers: dict[str, ActorSlot] = {}
        self.output_stream = False
        self.leadership: Leadership | None = None
        self.state: ControlState | None = None
        self._state_kv: Any = None
        self._subscriptions: list[Any] = []
        self._leading = threading.Event()
        self._roles: queue.Queue[str] = queue.Queue()
        self._role_thread = threading.Thread(target=self._role_loop, name="control-role", daemon=True)
        self._role_lock = threading.Lock()
        self._stop = threading.Event()
        self._gc_tuned = False  # whether start() took control/gc_tuning.py's process-wide setting
        self._ticker = threading.Thread(target=self._tick_loop, name="control-tick", daemon=True)
        self._migration_ticker = threading.Thread(target=self._migration_tick_loop, name="migration-tick", daemon=True)

    def _make_provisioner(self) -> Provisioner:
        """The provisioner the factory makes; a fixed fleet when there is none (autoscaler off)."""
        if self.provisioner_factory is not None:
            return self.provisioner_factory(self.settings)
        return NoProvisioner()

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def start(self) -> ControlPlane:
        self.output_stream = self.bus.run(self._ensure_output_stream()).result(timeout=15)
        # A restarted single NATS node may come back without the (memory) stream: declare it again (leader or
        # standby: whoever leads next needs it too).
        self.bus.on_reconnect(self._redeclare_output_stream)
        ha = self.settings.ha
        state_kv: Any = None
        if ha.enabled:
            leadership = Leadership(
                self.bus.nc,
                ha.lease_bucket,
                ttl_s=ha.lease_ttl_s,
                renew_period_s=ha.renew_period_s,
                replicas=ha.replicas,
                on_elected=lambda: self._roles.put("elected"),
                on_lost=lambda: self._roles.put("lost"),
            )
            try:
                self.bus.run(leadership.open()).result(timeout=15)
                state_kv = self.bus.run(
                    open_bucket(self.bus.nc, ha.state_bucket, memory=ha.state_memory, replicas=ha.replicas)
                ).result(timeout=15)
                self.leadership = leadership
            except Exception as exc:  # no JetStream (or no permission): one control plane, state in memory
                log.error("control-plane HA unavailable (%r): running alone with in-memory state", exc)
        if self.leadership is None:
            self._promote(None)
        else:
            self._state_kv = state_kv
            if self.bus.run(self.leadership.try_acquire()).result(timeout=15):
                self._promote(state_kv)
            else:
                log.info("control plane standing by: another control plane holds the lease")
            self._role_thread.start()
            self.leadership.start(self.bus.loop)
            if ha.wait_for_leadership_s > 0:
                self._leading.wait(ha.wait_for_leadership_s)
        self._ticker.start()
        self._migration_ticker.start()
        # start-up is over: what is alive now lives as long as the process, so the collector stops walking it,
        # and young collections (a pause in whatever dispatch decision they land on) come 14x less often
        # (control/gc_tuning.py; given back in stop())
        if not self._gc_tuned:
            gc_tuning.tune_for_service()
            self._gc_tuned = True
        log.info("control plane started (%s, %s)", "leader" if self.leading else "standby", gc_tuning.describe())
        return self

    def _role_loop(self) -> None:
        """Promote on election, demote on a lost lease (off the bus loop: both block on actors)."""
        while not self._stop.is_set():
            try:
                event = self._roles.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if event == "elected" and not self.leading:
                    self._promote(self._state_kv)
                elif event == "lost" and self.leading:
                    self._demote()
            except Exception:
                log.exception("control plane: %s handling failed", event)

    def _promote(self, state_kv: Any) -> None:
        """Become the leader: start the actors (the scheduler restores the state) and take the subjects."""
        with self._role_lock:
            if self._stop.is_set():
                return
            started = time.perf_counter()
            writer: KvWriter | None = None
            if state_kv is not None:
                leadership = self.leadership
                writer = KvWriter(
                    self.bus.loop,
                    state_kv,
                    nc=self.bus.nc,
                    bucket=self.settings.ha.state_bucket,
                    fence=leadership.is_leader if leadership else (lambda: True),
                )
                self.bus.call_soon(writer.start)
            self.state = ControlState(writer)
            sup = self.settings.supervisor
            self.supervisor = SupervisorActor.start(
                backoff_initial_s=sup.restart_backoff_initial_s,
                backoff_max_s=sup.restart_backoff_max_s,
                max_restarts=sup.max_restarts,
                restart_window_s=sup.restart_window_s,
            )
            peers = self.peers
            state = self.state

            def make_scheduler(parent: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
                return SchedulerActor.start(
                    self.bus,
                    self.settings,
                    self.tokenizer,
                    parent,
                    name,
                    peers,
                    state,
                    replies=self.replies,
                    decision_log=self.decision_log,
                )

            def make_migrator(parent: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
                return MigratorActor.start(
                    self.bus, self.settings.migration, peers["scheduler"], parent, name, state, self.decision_log
                )

            self.scheduler = self.supervisor.proxy().start_child("scheduler", make_scheduler).get(timeout=30)
            peers["scheduler"] = self.scheduler
            self.migrator = self.supervisor.proxy().start_child("migrator", make_migrator).get(timeout=10)
            peers["migrator"] = self.migrator
            provisioner = self.provisioner = self.provisioner or self._make_provisioner()

            def make_autoscaler(parent: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
                return AutoscalerActor.start(
                    self.bus, self.settings, peers["scheduler"], provisioner, parent, name, self.decision_log
                )

            self.autoscaler = self.supervisor.proxy().start_child("autoscaler", make_autoscaler).get(timeout=10)
            peers["autoscaler"] = self.autoscaler
            scheduler = self.scheduler
            routes: list[tuple[str, tuple[type, ...], str]] = [
                (subjects.SUBMIT, (SubmitRequest,), subjects.CONTROL_QUEUE),  # v2: ANONYMOUS
                (subjects.CANCEL, (Cancel,), subjects.CONTROL_QUEUE),
                (subjects.SUBMIT + ".*", (SubmitRequest,), subjects.CONTROL_QUEUE),  # v3: per identity
                (subjects.CANCEL + ".*", (Cancel,), subjects.CONTROL_QUEUE),
                (subjects.heartbeat("*"), (InstanceHeartbeat,), ""),
                (subjects.ENGINE_EVENTS, (EngineRequestEnded, EngineFirstToken), ""),
                (subjects.admin("migrate"), (MigrateCommand,), subjects.CONTROL_QUEUE),
                (subjects.admin("drain"), (DrainCommand,), subjects.CONTROL_QUEUE),
                (subjects.admin("phase"), (PhaseCommand,), subjects.CONTROL_QUEUE),
                (subjects.admin("policy"), (PolicyQuery, PolicyUpdate), subjects.CONTROL_QUEUE),
                (subjects.admin("memory"), (MemoryCommand,), subjects.CONTROL_QUEUE),
            ]
            subs = [
                self.bus.run(self.bus.asubscribe(subject, self._only(kinds, scheduler), queue=queue))
                for subject, kinds, queue in routes
            ]
            subs += [
                self.bus.run(
                    self.bus.asubscribe(subject, self._only((StatusQuery,), None), queue=subjects.CONTROL_QUEUE)
                )
                for subject in (subjects.STATUS, subjects.STATUS + ".*")
            ]
            # v3: clients replay their inboxes through us (they may create no JetStream consumers)
            subs.append(
                self.bus.run(self.bus.asubscribe(subjects.REPLAY + ".*", self._on_replay, queue=subjects.CONTROL_QUEUE))
            )
            # spans other processes ship (observability.ship_to_control): one leader appends each batch
            subs.append(self.bus.run(self.bus.asubscribe(subjects.SPANS, self._on_spans, queue=subjects.CONTROL_QUEUE)))
            autoscaler_routes: list[tuple[str, tuple[type, ...]]] = [
                (subjects.admin("scale"), (ScaleCommand,)),
                (subjects.admin("autoscale"), (AutoscaleStatusQuery,)),
            ]
            subs += [
                self.bus.run(
                    self.bus.asubscribe(subject, self._only(kinds, self.autoscaler), queue=subjects.CONTROL_QUEUE)
                )
                for subject, kinds in autoscaler_routes
            ]
            self._subscriptions = [f.result(timeout=10) for f in subs]
            self.bus.run(self.bus.nc.flush(timeout=5)).result(timeout=10)  # the server has every subscription
            self._leading.set()
            log.info("control plane leads (took %.0f ms)", (time.perf_counter() - started) * 1e3)

    def _demote(self) -> None:
        """Stop acting as the leader: leave the subjects, stop the actors (the new leader has the state)."""
        with self._role_lock:
            if not self._leading.is_set():
                return
            self._leading.clear()
            subs, self._subscriptions = self._subscriptions, []
            for sub in subs:
                try:
                    self.bus.run(sub.unsubscribe()).result(timeout=5)
                except Exception as exc:
                    log.warning("unsubscribe failed: %r", exc)
            self.scheduler = self.migrator = self.autoscaler = None
            self.peers.clear()
            if self.supervisor is not None and self.supervisor.is_alive():
                self.supervisor.stop(timeout=10)
            self.supervisor = None
            writer = self.state.writer if self.state is not None else None
            if writer is not None:
                try:
                    self.bus.run(writer.stop(flush_timeout_s=2)).result(timeout=5)
                except Exception as exc:
                    log.warning("state writer stop failed: %r", exc)
            if self._stop.is_set() or not self.leadership:
                log.info("control plane left the leader role")
            else:
                log.warning("control plane lost its lease: standing by")

    async def _ensure_output_stream(self) -> bool:
        rel = self.settings.reliability
        self.output_stream = await ensure_output_stream(
            self.bus.nc, max_age_s=rel.output_retention_s, max_bytes=rel.output_max_bytes, replicas=rel.output_replicas
        )
        return self.output_stream

    def _redeclare_output_stream(self) -> None:
        """After a reconnect: the output stream, and with HA the lease and state buckets, may be gone with a
        restarted (single, in-memory) NATS server; declare them again (existing handles bind by name)."""
        self.bus.run(self._redeclare())

    async def _redeclare(self) -> None:
        await self._ensure_output_stream()
        if self.leadership is None:
            return
        ha = self.settings.ha
        try:
            await self.leadership.open()
            if self._state_kv is not None:
                await open_bucket(self.bus.nc, ha.state_bucket, memory=ha.state_memory, replicas=ha.replicas)
        except Exception as exc:
            log.warning("re-declaring the HA buckets after a reconnect failed: %r", exc)

    def _only(self, kinds: tuple[type, ...], slot: ActorSlot | None) -> Callable[[Envelope], Awaitable[None] | None]:
        """A handler that passes on the message kinds a subject carries and refuses any other kind."""

        def handler(envelope: Envelope) -> Awaitable[None] | None:
            if self.leadership is not None and not self.leadership.is_leader():
                self._pass_on(envelope)
                return None
            if not isinstance(envelope.message, kinds):
                text = f"{type(envelope.message).__name__} is not accepted on {envelope.subject}"
                request_id = getattr(envelope.message, "request_id", None)
                identity = subjects.client_identity(envelope.subject)
                if identity is None:  # operators' and engines' subjects
                    self.bus.reply_error(envelope.reply, ErrorCode.INVALID_REQUEST, text, request_id)
                else:
                    self.replies.error(identity, envelope.reply, ErrorCode.INVALID_REQUEST, text, request_id, "error")
                return None
            if slot is None:
                return self._on_status(envelope)
            slot.tell(envelope)
            return None

        return self.audit.wrap(handler) if self.audit.audits(kinds) else handler  # admin actions: audit log

    def _pass_on(self, envelope: Envelope) -> None:
        """Our lease may have lapsed (a standby may lead now): publish a queue-group message once more for
        whoever leads (once: a forwarded message is dropped, and the client's retry covers it)."""
        broadcast = envelope.subject.startswith(subjects.HEARTBEATS) or envelope.subject == subjects.ENGINE_EVENTS
        if broadcast or envelope.headers.get(FORWARDED_HEADER):
            return
        log.warning("not the leader any more: passing on a %s", type(envelope.message).__name__)
        headers = {**envelope.headers, FORWARDED_HEADER: "1"}
        self.bus.publish(envelope.subject, envelope.message, headers=headers, reply=envelope.reply)

    async def _on_spans(self, envelope: Envelope) -> None:
        """Append a shipped SpanBatch to this control plane's JSON-lines trace file (what `drover trace`
        reads), so spans of engines and gateways on other hosts land beside the control plane's own."""
        if not isinstance(envelope.message, SpanBatch):
            log.warning("%s is not accepted on %s", type(envelope.message).__name__, envelope.subject)
            return
        path = self.settings.observability.jsonl_path
        if not path or not envelope.message.spans:
            return
        spans = self.span_budget.admit(envelope.message.spans, time.monotonic())  # size, depth, rate bounds
        if len(spans) < len(envelope.message.spans):
            log.warning("dropped %d of %d shipped spans (bounds)", len(envelope.message.spans) - len(spans), len(spans))
        if not spans:
            return
        try:
            await asyncio.to_thread(append_span_dicts, path, spans)
        except OSError as exc:
            log.warning("appending %d shipped spans to %s failed: %s", len(spans), path, exc)

    async def _on_replay(self, envelope: Envelope) -> None:
        """Read what the output stream holds for one of the sender's own inboxes and answer it (v3): the inbox
        and the reply subject are both checked against the identity the server authenticated."""
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        message = envelope.message
        if not isinstance(message, ReplayRequest):
            self.replies.error(
                identity, envelope.reply, ErrorCode.INVALID_REQUEST, "expected ReplayRequest", None, "replay"
            )
            return
        if not self.replies.allowed(identity, envelope.reply, "replay"):
            return
        if not message.inbox.startswith(subjects.INBOX_ROOT + ".") or not self.replies.allowed(
            identity, message.inbox, "replay"
        ):
            text = f"{message.inbox!r} is not one of your inboxes"
            self.replies.error(identity, envelope.reply, ErrorCode.INVALID_REQUEST, text, None, "replay")
            return
        try:
            stored = await read_subject(self.bus.nc, message.inbox)
        except Exception as exc:  # no output stream, reconnecting
            self.replies.error(identity, envelope.reply, ErrorCode.INTERNAL, f"replay failed: {exc}", None, "replay")
            return
        page: list[bytes] = []
        budget = REPLAY_PAGE_BYTES
        for data in stored[max(0, message.start) :]:
            if page and len(data) > budget:
                break
            page.append(data)
            budget -= len(data)
        more = max(0, message.start) + len(page) < len(stored)
        await self.replies.apublish(identity, envelope.reply, ReplayReply(messages=page, more=more), "replay")

    async def _on_status(self, envelope: Envelope) -> None:
        """Answer with the scheduler's view plus each actor's supervision state."""
        assert self.scheduler is not None and self.supervisor is not None
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        if not envelope.reply or not self.replies.allowed(identity, envelope.reply, "status"):
            return
        try:
            status: StatusReply = await asyncio.to_thread(self._ask_status)
        except Exception as exc:
            self.replies.error(
                identity, envelope.reply, ErrorCode.INTERNAL, f"status unavailable: {exc}", None, "status"
            )
            return
        await self.replies.apublish(identity, envelope.reply, status, "status")

    def _ask_status(self) -> StatusReply:
        assert self.scheduler is not None and self.supervisor is not None
        ref = self.scheduler.ref
        if ref is None:
            raise RuntimeError("scheduler is restarting")
        status: StatusReply = ref.proxy().status().get(timeout=5)
        actors: dict[str, str] = self.supervisor.ask(GetStatus(), timeout=5)  # type: ignore[assignment]
        return StatusReply(
            instances=status.instances,
            requests=status.requests,
            queued=status.queued,
            dispatch_policy=status.dispatch_policy,
            actors=actors,
            migrations_completed=status.migrations_completed,
            migrations_aborted=status.migrations_aborted,
            migrations_in_flight=status.migrations_in_flight,
            groups=status.groups,
        )

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_interval_s):
            if self.scheduler is not None:
                self.scheduler.tell(Tick())

    def _migration_tick_loop(self) -> None:
        while not self._stop.wait(self.settings.policy.migration_period_s):
            if self.scheduler is not None:
                self.scheduler.tell(MigrationTick())

    def stop(self, *, release: bool = True) -> None:
        """Stop; with ``release`` (SIGTERM) hand the lease over at once, else it lapses after its TTL."""
        self._stop.set()  # no promotion from here on
        self._demote()
        if self.leadership is not None:
            try:
                self.bus.run(self.leadership.stop(release=release)).result(timeout=10)
            except Exception as exc:
                log.warning("leadership stop failed: %r", exc)
        if self.supervisor is not None and self.supervisor.is_alive():
            self.supervisor.stop(timeout=10)
        if self.provisioner is not None:
            self.provisioner.close()  # stops the instances the autoscaler started
        if self._gc_tuned:
            self._gc_tuned = False
            gc_tuning.restore()
        log.info("control plane stopped")
