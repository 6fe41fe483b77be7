"""`drover metrics`: a Prometheus endpoint for a running cluster, fed from the outside.

It polls the control plane's status (instance load, queue, requests in flight) and listens to the engines'
request-ended events on the bus, so it works against any cluster without changes to its processes. From those
events it also keeps live SLO attainment and goodput per request class and client (:class:`SloTally`, which
`drover top` shows too). Request latency histograms and migration figures come from hooks inside the actors
(see docs/operators.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from control.client import DroverClient
from control.policy.autoscaling import SloParams
from observability.metrics import InstanceGauges, Metrics, SloRow
from transport import subjects
from transport.messages import EngineRequestEnded, ProtocolError, StatusReply, decode

log = logging.getLogger(__name__)


def instance_gauges(status: StatusReply) -> list[InstanceGauges]:
    return [
        InstanceGauges(
            instance_id=i.info.instance_id,
            state=i.state,
            free_blocks=i.load.num_free_blocks,
            total_blocks=i.load.num_total_blocks,
            running=i.load.num_running,
            waiting=i.load.num_waiting,
            dispatched=i.dispatched,
        )
        for i in status.instances
    ]


SLO_WINDOW_S = 60.0
"""SLO attainment and goodput are over the requests that ended in the last minute (live, not since start)."""


@dataclass(frozen=True, slots=True)
class _Ended:
    at: float
    request_class: str
    client: str
    met: bool
    tokens: int


class SloTally:
    """Which ended requests met their class's SLO, per request class and client, over a sliding window.

    Interactive (and unknown class): TTFT <= ``slo.ttft_s`` and mean inter-token gap <= ``slo.itl_s`` (a
    figure the engine could not know, 0, is not held against it: TTFT on an instance that resumed a migrated
    request). Batch: ended within ``slo.batch_deadline_s`` of arrival. A request that ended in error (or past
    its deadline) missed; one the client cancelled ("abort") is not counted; a move ("migrated", "evicted") is
    counted where the request ends. Goodput: output tokens of the requests that met their SLO, per second."""

    def __init__(self, slo: SloParams | None = None, window_s: float = SLO_WINDOW_S) -> None:
        self.slo = slo or SloParams()
        self.window_s = window_s
        self._ended: deque[_Ended] = deque()

    def met(self, event: EngineRequestEnded) -> bool:
        if event.error or event.finish_reason not in ("stop", "length"):
            return False
        if event.request_class == "batch":
            return event.e2e_s <= self.slo.batch_deadline_s
        return (not event.ttft_s or event.ttft_s <= self.slo.ttft_s) and (
            not event.itl_s or event.itl_s <= self.slo.itl_s
        )

    def observe(self, event: EngineRequestEnded, now: float | None = None) -> None:
        if event.finish_reason in ("migrated", "evicted", "abort"):
            return
        self._ended.append(
            _Ended(
                at=time.monotonic() if now is None else now,
                request_class=event.request_class or "unknown",
                client=event.client_id or "unknown",
                met=self.met(event),
                tokens=event.num_output_tokens,
            )
        )

    def rows(self, now: float | None = None) -> list[SloRow]:
        now = time.monotonic() if now is None else now
        while self._ended and self._ended[0].at < now - self.window_s:
            self._ended.popleft()
        cells: dict[tuple[str, str], list[int]] = {}
        for e in self._ended:
            cell = cells.setdefault((e.request_class, e.client), [0, 0, 0])
            cell[0] += 1
            cell[1] += int(e.met)
            cell[2] += e.tokens if e.met else 0
        return [
            SloRow(request_class=k[0], client=k[1], requests=c[0], met=c[1], goodput_tokens_per_s=c[2] / self.window_s)
            for k, c in sorted(cells.items())
        ]


class ClusterMetricsExporter:
    """Keeps ``metrics`` up to date from ``client``'s cluster every ``interval_s``."""

    def __init__(
        self, client: DroverClient, metrics: Metrics, interval_s: float = 1.0, slo: SloParams | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.interval_s = interval_s
        self.slo = SloTally(slo)
        self.last_poll_ok = False
        self.last_poll_detail = "no status poll yet"
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.client.nc.subscribe(subjects.ENGINE_EVENTS, cb=self._on_event)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = decode(msg.data)
        except ProtocolError:
            return
        if isinstance(event, EngineRequestEnded):
            self.metrics.engine_request_ended(event.instance_id, event.finish_reason)
            self.slo.observe(event)
            self.metrics.set_slo(self.slo.rows())

    async def poll_once(self) -> StatusReply:
        status = await self.client.status(timeout_s=max(1.0, self.interval_s))
        self.metrics.set_instances(instance_gauges(status))
        self.metrics.set_scheduler(queued=status.queued, in_flight=len(status.requests))
        self.metrics.set_migrations(
            status.migrations_completed, status.migrations_aborted, len(status.migrations_in_flight)
        )
        if self._subscription is not None:  # the window slides even when nothing ends
            self.metrics.set_slo(self.slo.rows())
        return status

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; a missed poll keeps the last values (and is logged)."""
        while not stop.is_set():
            try:
                status = await self.poll_once()
                self.last_poll_ok, self.last_poll_detail = True, f"{len(status.instances)} instances"
            except Exception as exc:  # DroverError, NATS timeouts: keep serving the last values
                self.last_poll_ok, self.last_poll_detail = False, f"status poll failed: {exc!r}"
                log.warning("status poll failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
