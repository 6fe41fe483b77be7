"""Audits admin commands on their way through the control plane (observability/audit.py writes the records).

The scheduler answers admin commands on the envelope's reply subject, sometimes much later (a live
migration answers when it commits). To learn the result without touching the scheduler, the auditor hands
it a reply subject of its own (``<inbox>.<n>``), writes the audit record when the answer arrives, and
forwards the answer unchanged to the caller. A command that is never answered (the scheduler restarting)
is audited as such after ``reply_timeout_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg

from actors.threads import LoopOwned
from observability.audit import AuditLog
from transport.bus import Bus, Envelope
from transport.messages import (
    AdminReply,
    DrainCommand,
    ErrorReply,
    MemoryCommand,
    Message,
    MigrateCommand,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    ProtocolError,
    ScaleCommand,
    decode,
)

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[None] | None]
# the admin actions (status queries are not audited)
AUDITED: tuple[type, ...] = (
    MigrateCommand,
    DrainCommand,
    PolicyQuery,
    PolicyUpdate,
    MemoryCommand,
    ScaleCommand,
    PhaseCommand,
)


@dataclass(slots=True)
class _Pending:
    envelope: Envelope
    arrived_at: float  # epoch seconds, for the record
    started: float  # monotonic, for the duration
    timer: asyncio.TimerHandle


def describe(message: Message) -> tuple[str, str, dict[str, Any]]:
    """(command, operator, parameters) of an admin message; the command is its wire tag."""
    fields = msgspec.structs.asdict(message)
    operator = str(fields.pop("operator", "") or "")
    fields.pop("v", None)
    tag = type(message).__struct_config__.tag
    return str(tag or type(message).__name__), operator, fields


class AdminAuditor:
    """Wraps admin-subject handlers so every command, and its answer, lands in the audit log."""

    def __init__(self, bus: Bus, audit: AuditLog, reply_timeout_s: float = 600.0) -> None:
        self.bus = bus
        self.audit = audit
        self.reply_timeout_s = reply_timeout_s
        self._inbox = ""
        self._seq = itertools.count()
        self._pending: LoopOwned[dict[str, _Pending]] = LoopOwned({}, bus.loop)

    @staticmethod
    def audits(kinds: tuple[type, ...]) -> bool:
        """Whether a subject carrying ``kinds`` carries admin actions (status queries are not audited)."""
        return any(kind in AUDITED for kind in kinds)

    def start(self) -> AdminAuditor:
        """Subscribe to the reply inbox (once; from any thread but the bus loop's)."""
        if self._inbox:
            return self
        inbox = self.bus.nc.new_inbox()

        async def subscribe() -> None:
            await self.bus.nc.subscribe(f"{inbox}.*", cb=self._on_reply)

        self.bus.run(subscribe()).result(timeout=10)
        self._inbox = inbox
        return self

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` with every envelope audited; starts the auditor on first use."""
        self.start()

        def audited(envelope: Envelope) -> Awaitable[None] | None:
            key = str(next(self._seq))
            timer = self.bus.loop.call_later(self.reply_timeout_s, self._expire, key)
            self._pending.value[key] = _Pending(envelope, time.time(), time.monotonic(), timer)
            return handler(
                Envelope(
                    subject=envelope.subject,
                    message=envelope.message,
                    reply=f"{self._inbox}.{key}",
                    headers=envelope.headers,
                )
            )

        return audited

    async def _on_reply(self, msg: Msg) -> None:
        pending = self._pending.value.pop(msg.subject.rsplit(".", 1)[-1], None)
        if pending is None:
            return
        pending.timer.cancel()
        try:
            answer: Message | None = decode(msg.data)
        except ProtocolError:
            answer = None
        extra: dict[str, Any] = {}
        if isinstance(answer, AdminReply):
            ok, result = answer.ok, answer.message
            if answer.details:
                extra["details"] = answer.details
        elif isinstance(answer, ErrorReply):
            ok, result = False, f"{answer.code}: {answer.message}"
        else:
            ok, result = False, f"unexpected answer {type(answer).__name__}"
        self._write(pending, ok, result, **extra)  # first: once the caller has its answer, the record exists
        if pending.envelope.reply:
            try:
                await self.bus.nc.publish(pending.envelope.reply, msg.data, headers=msg.headers)
            except Exception as exc:  # the caller went away: the action still happened (and is audited)
                log.warning("admin reply to %s not forwarded: %s", pending.envelope.reply, exc)

    def _expire(self, key: str) -> None:
        pending = self._pending.value.pop(key, None)
        if pending is not None:
            self._write(pending, False, f"no reply within {self.reply_timeout_s:g}s")

    def _write(self, pending: _Pending, ok: bool, result: str, **extra: Any) -> None:
        command, operator, params = describe(pending.envelope.message)
        self.audit.record(
            operator=operator,
            command=command,
            params=params,
            ok=ok,
            result=result,
            at=pending.arrived_at,
            subject=pending.envelope.subject,
            duration_s=round(time.monotonic() - pending.started, 6),
            **extra,
        )
