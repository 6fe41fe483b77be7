"""`drover metrics`: a Prometheus endpoint for a running cluster, fed from the outside.

It polls the control plane's status (instance load, queue, requests in flight) and listens to the engines'
request-ended events on the bus, so it works against any cluster without changes to its processes. Request
latency histograms and migration figures need hooks inside the actors (see docs/operators.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from control.client import DroverClient
from observability.metrics import InstanceGauges, Metrics
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


class ClusterMetricsExporter:
    """Keeps ``metrics`` up to date from ``client``'s cluster every ``interval_s``."""

    def __init__(self, client: DroverClient, metrics: Metrics, interval_s: float = 1.0) -> None:
        self.client = client
        self.metrics = metrics
        self.interval_s = interval_s
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

    async def poll_once(self) -> StatusReply:
        status = await self.client.status(timeout_s=max(1.0, self.interval_s))
        self.metrics.set_instances(instance_gauges(status))
        self.metrics.set_scheduler(queued=status.queued, in_flight=len(status.requests))
        self.metrics.set_migrations(
            status.migrations_completed, status.migrations_aborted, len(status.migrations_in_flight)
        )
        return status

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; a missed poll keeps the last values (and is logged)."""
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception as exc:  # DroverError, NATS timeouts: keep serving the last values
                log.warning("status poll failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
