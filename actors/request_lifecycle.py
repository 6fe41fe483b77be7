"""The scheduler's request lifecycle: a bounded request table, deadlines, and clients that went away.

Kept out of ``actors/scheduler.py`` so the scheduler only calls a few hooks:

- :class:`control.core.requests.RequestTable` (in the control core) is the scheduler's ``requests`` dict. It
  counts each client's unfinished requests (admission's per-client bound) and remembers finished ids for
  ``lifecycle.finished_retention_s`` (at most ``finished_max_entries``), so a late retry of a finished
  request is answered ``duplicate_request`` instead of running twice, and the table itself never holds a
  finished request.
- :class:`RequestLifecycle` runs on the scheduler's tick: a request past its ``deadline_s`` ends with
  ``deadline_exceeded``; a request whose client asked for liveness and whose probe subject has had no
  subscriber for ``client_gone_after_s`` ends with ``client_gone``. Either way the engine aborts it
  (freeing its blocks) and the client's inbox gets the ``ErrorReply``.

Why a NATS no-responders probe (and not connection or JetStream info): when nothing subscribes to a
subject, the server itself answers a request on it with a 503 status at once, so one small request per
request per ``probe_period_s`` tells "nobody reads this inbox" with no server privileges (``$SYS``
connection info needs the system account), no per-client state in JetStream (whose consumers know nothing
of core subscriptions), and it works the same in every client language and across a NATS cluster. Only a
no-responders answer counts as absence; a timeout or a failed send (a NATS outage) is inconclusive, so a
bus restart or a busy client never kills requests. The scheduler probes, not the engines: it already
holds every request, and a request keeps one prober across migrations and failovers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors

from actors.client_replies import ClientReplies
from control.core.requests import RequestTable
from control.settings import LifecycleSettings
from transport import subjects
from transport.bus import Bus
from transport.messages import EngineAbort, EngineInfo, ErrorCode, ErrorReply, peer_version

log = logging.getLogger(__name__)


class _Scheduler(Protocol):
    """What the lifecycle needs of the scheduler."""

    bus: Bus
    replies: ClientReplies  # checked publishing to clients (actors/client_replies.py)
    requests: RequestTable[Any]
    instances: dict[str, Any]  # instance id -> a record with ``info: EngineInfo``


@dataclass(slots=True)
class _Tracked:
    deadline_at: float | None  # time.time()
    probe_subject: str | None
    last_probe: float = 0.0  # time.monotonic()
    absent_since: float | None = None  # first no-responders answer of the current run of them
    probing: bool = False
    ending: bool = False


class RequestLifecycle:
    """Deadlines and liveness probes of the scheduler's requests (state touched under a lock: the scheduler
    thread ticks, probe answers land on the bus loop)."""

    def __init__(self, bus: Bus, settings: LifecycleSettings) -> None:
        self.bus = bus
        self.settings = settings
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self.deadline_exceeded = 0
        self.clients_gone = 0

    def tick(self, scheduler: _Scheduler) -> None:
        """Probe clients that are due and end requests past their deadline or whose client is gone."""
        now, mono = time.time(), time.monotonic()
        requests = scheduler.requests
        to_end: list[tuple[Any, ErrorCode, str]] = []
        with self._lock:
            for request_id in [r for r in self._tracked if r not in requests]:
                del self._tracked[request_id]
            for record in requests.values():
                submit = record.submit
                if submit.deadline_s is None and not submit.liveness:
                    continue
                tracked = self._tracked.get(record.request_id)
                if tracked is None:
                    tracked = _Tracked(
                        deadline_at=None if submit.deadline_s is None else record.arrival + submit.deadline_s,
                        probe_subject=subjects.alive(submit.reply_to) if submit.liveness else None,
                        last_probe=mono,  # the first probe one period after arrival
                    )
                    self._tracked[record.request_id] = tracked
                if tracked.ending:
                    continue
                if tracked.deadline_at is not None and now >= tracked.deadline_at:
                    tracked.ending = True
                    to_end.append((record, ErrorCode.DEADLINE_EXCEEDED, f"deadline of {submit.deadline_s:g}s passed"))
                    continue
                gone_after = self.settings.client_gone_after_s
                if tracked.absent_since is not None and mono - tracked.absent_since >= gone_after:
                    tracked.ending = True
                    to_end.append(
                        (
                            record,
                            ErrorCode.CLIENT_GONE,
                            f"no reader on {tracked.probe_subject} for {self.settings.client_gone_after_s:g}s",
                        )
                    )
                    continue
                if (
                    tracked.probe_subject is not None
                    and not tracked.probing
                    and mono - tracked.last_probe >= self.settings.probe_period_s
                ):
                    tracked.probing, tracked.last_probe = True, mono
                    self.bus.run(self._probe(record.request_id, tracked.probe_subject))
        for record, code, why in to_end:
            self._end(scheduler, record, code, why)

    async def _probe(self, request_id: str, subject: str) -> None:
        absent: bool | None = None  # None: inconclusive
        try:
            await self.bus.nc.request(subject, b"", timeout=self.settings.probe_timeout_s)
            absent = False
        except nats.errors.NoRespondersError:
            absent = True
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("liveness probe of %s inconclusive: %r", request_id, exc)
        with self._lock:
            tracked = self._tracked.get(request_id)
            if tracked is None:
                return
            tracked.probing = False
            if absent is False:
                tracked.absent_since = None
            elif absent and tracked.absent_since is None:
                tracked.absent_since = time.monotonic()

    def _end(self, scheduler: _Scheduler, record: Any, code: ErrorCode, why: str) -> None:
        """Stop a request: a queued one here; a running one by its engine, which frees its blocks and sends
        the client the error after its last chunk (a version-1 engine cannot: then the scheduler sends it)."""
        if code is ErrorCode.DEADLINE_EXCEEDED:
            self.deadline_exceeded += 1
        else:
            self.clients_gone += 1
        log.info("request %s ends: %s (%s)", record.request_id, code, why)
        submit = record.submit
        error = ErrorReply(code=code, message=why, request_id=record.request_id, v=peer_version(submit.v))
        instance = scheduler.instances.get(record.instance_id) if record.instance_id else None
        info: EngineInfo | None = instance.info if instance is not None else None
        if record.state == "running" and info is not None:
            version = peer_version(info.protocol_version)
            scheduler.bus.publish(
                subjects.engine(info.instance_id),
                EngineAbort(request_id=record.request_id, reason=str(code), v=version),
            )
            if version >= 2:
                return  # the engine ends it; EngineRequestEnded removes the record
        scheduler.requests.pop(record.request_id, None)  # queued or recovering: nothing runs it
        scheduler.replies.to_owner(submit.reply_to, error, "error")  # checked, over the client-bound connection
