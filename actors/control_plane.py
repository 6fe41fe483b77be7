"""The control-plane process: bus, SupervisorActor and its children, wired to their NATS subjects."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pykka

from actors.migrator import MigratorActor
from actors.scheduler import MigrationTick, SchedulerActor, Tick
from actors.supervisor import ActorSlot, GetStatus, SupervisorActor
from control.settings import Settings
from engines.tokenizer import Tokenizer
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    Cancel,
    DrainCommand,
    EngineRequestEnded,
    ErrorCode,
    InstanceHeartbeat,
    MigrateCommand,
    PolicyQuery,
    PolicyUpdate,
    StatusQuery,
    StatusReply,
    SubmitRequest,
)
from transport.output_stream import ensure_output_stream

log = logging.getLogger(__name__)


class ControlPlane:
    """Starts and stops the control plane's actors; bus handlers only hand envelopes to actor slots."""

    def __init__(self, settings: Settings, bus: Bus, tokenizer: Tokenizer, *, tick_interval_s: float = 0.25) -> None:
        self.settings = settings
        self.bus = bus
        self.tokenizer = tokenizer
        self.tick_interval_s = tick_interval_s
        self.supervisor: pykka.ActorRef[Any] | None = None
        self.scheduler: ActorSlot | None = None
        self.migrator: ActorSlot | None = None
        self.peers: dict[str, ActorSlot] = {}
        self.output_stream = False
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="control-tick", daemon=True)
        self._migration_ticker = threading.Thread(target=self._migration_tick_loop, name="migration-tick", daemon=True)

    def start(self) -> ControlPlane:
        sup = self.settings.supervisor
        self.supervisor = SupervisorActor.start(
            backoff_initial_s=sup.restart_backoff_initial_s,
            backoff_max_s=sup.restart_backoff_max_s,
            max_restarts=sup.max_restarts,
            restart_window_s=sup.restart_window_s,
        )

        self.output_stream = self.bus.run(self._ensure_output_stream()).result(timeout=15)
        # A restarted single NATS node may come back without the (memory) stream: declare it again.
        self.bus.on_reconnect(self._redeclare_output_stream)
        peers = self.peers

        def make_scheduler(parent: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
            return SchedulerActor.start(self.bus, self.settings, self.tokenizer, parent, name, peers)

        def make_migrator(parent: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
            return MigratorActor.start(self.bus, self.settings.migration, peers["scheduler"], parent, name)

        self.scheduler = self.supervisor.proxy().start_child("scheduler", make_scheduler).get(timeout=10)
        peers["scheduler"] = self.scheduler
        self.migrator = self.supervisor.proxy().start_child("migrator", make_migrator).get(timeout=10)
        peers["migrator"] = self.migrator
        scheduler = self.scheduler
        routes: list[tuple[str, tuple[type, ...], str]] = [
            (subjects.SUBMIT, (SubmitRequest,), subjects.CONTROL_QUEUE),
            (subjects.CANCEL, (Cancel,), subjects.CONTROL_QUEUE),
            (subjects.heartbeat("*"), (InstanceHeartbeat,), ""),
            (subjects.ENGINE_EVENTS, (EngineRequestEnded,), ""),
            (subjects.admin("migrate"), (MigrateCommand,), subjects.CONTROL_QUEUE),
            (subjects.admin("drain"), (DrainCommand,), subjects.CONTROL_QUEUE),
            (subjects.admin("policy"), (PolicyQuery, PolicyUpdate), subjects.CONTROL_QUEUE),
        ]
        for subject, kinds, queue in routes:
            self.bus.subscribe(subject, self._only(kinds, scheduler), queue=queue)
        self.bus.subscribe(subjects.admin("status"), self._only((StatusQuery,), None), queue=subjects.CONTROL_QUEUE)
        self._ticker.start()
        self._migration_ticker.start()
        log.info("control plane started")
        return self

    async def _ensure_output_stream(self) -> bool:
        rel = self.settings.reliability
        self.output_stream = await ensure_output_stream(
            self.bus.nc, max_age_s=rel.output_retention_s, max_bytes=rel.output_max_bytes, replicas=rel.output_replicas
        )
        return self.output_stream

    def _redeclare_output_stream(self) -> None:
        self.bus.run(self._ensure_output_stream())

    def _only(self, kinds: tuple[type, ...], slot: ActorSlot | None) -> Callable[[Envelope], Awaitable[None] | None]:
        """A handler that passes on the message kinds a subject carries and refuses any other kind."""

        def handler(envelope: Envelope) -> Awaitable[None] | None:
            if not isinstance(envelope.message, kinds):
                self.bus.reply_error(
                    envelope.reply,
                    ErrorCode.INVALID_REQUEST,
                    f"{type(envelope.message).__name__} is not accepted on {envelope.subject}",
                    getattr(envelope.message, "request_id", None),
                )
                return None
            if slot is None:
                return self._on_status(envelope)
            slot.tell(envelope)
            return None

        return handler

    async def _on_status(self, envelope: Envelope) -> None:
        """Answer with the scheduler's view plus each actor's supervision state."""
        assert self.scheduler is not None and self.supervisor is not None
        try:
            status: StatusReply = await asyncio.to_thread(self._ask_status)
        except Exception as exc:
            self.bus.reply_error(envelope.reply, ErrorCode.INTERNAL, f"status unavailable: {exc}")
            return
        if envelope.reply:
            await self.bus.apublish(envelope.reply, status)

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
        )

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_interval_s):
            if self.scheduler is not None:
                self.scheduler.tell(Tick())

    def _migration_tick_loop(self) -> None:
        while not self._stop.wait(self.settings.policy.migration_period_s):
            if self.scheduler is not None:
                self.scheduler.tell(MigrationTick())

    def stop(self) -> None:
        self._stop.set()
        if self.supervisor is not None and self.supervisor.is_alive():
            self.supervisor.stop(timeout=10)
        log.info("control plane stopped")
