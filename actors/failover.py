"""The failover's I/O on the bus loop: before a request of an instance declared dead resumes elsewhere, fence
it there (a live instance would stream on: every index twice) and read back from the output stream what its
client already has. The decisions around it (resume or fail, then drop, fail or dispatch again) are the
control core's (``control/core/requests.py``); the SchedulerActor carries them out and runs these coroutines
on the bus loop, and the answer comes back to it as a :class:`Recovered` message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from control.settings import ReliabilitySettings
from transport import subjects
from transport.bus import Bus
from transport.messages import AdminReply, EngineFence
from transport.output_stream import delivered_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a failed-over request's client had received (read back from the output stream)."""

    request_id: str
    tokens: list[int]
    finished: bool
    error: str = ""


async def read_delivered(
    bus: Bus, settings: ReliabilitySettings, request_id: str, reply_to: str, fence_on: str = ""
) -> Recovered:
    """What the client of ``request_id`` has in the output stream (after fencing ``fence_on``); retried for
    ``output_read_retry_s`` while the stream cannot be read. Runs on the bus loop."""
    sent = 0
    if fence_on:
        try:
            sent = await fence(bus, settings, fence_on, request_id)
        except Exception as exc:  # the failover goes on as before
            log.info("fencing %s on %s failed: %s", request_id, fence_on, exc)
    deadline = time.monotonic() + settings.output_read_retry_s
    while True:
        try:
            tokens, finished = await delivered_tokens(bus.nc, reply_to, request_id)
            for _ in range(10):  # the fenced engine's last chunks may reach the output stream a moment later
                if finished or len(tokens) >= sent:
                    break
                await asyncio.sleep(0.05)
                tokens, finished = await delivered_tokens(bus.nc, reply_to, request_id)
            return Recovered(request_id, tokens, finished)
        except Exception as exc:  # no stream leader yet, or reconnecting: retry for a while
            if time.monotonic() >= deadline:
                return Recovered(request_id, [], False, f"output stream unreadable: {exc!r}")
            log.info("reading %s's delivered tokens failed (%s): retrying", request_id, exc)
            await asyncio.sleep(0.25)


async def fence(bus: Bus, settings: ReliabilitySettings, instance_id: str, request_id: str) -> int:
    """Stop the request on an instance declared dead before it resumes elsewhere: missed heartbeats do not
    prove death, and a live instance would stream on (every index twice). Returns the output tokens it says it
    sent (0 when it is gone, hangs, or does not know the request). Runs on the bus loop."""
    try:
        answer = await bus.arequest(
            subjects.engine(instance_id),
            EngineFence(request_id=request_id),
            timeout_s=settings.failover_fence_timeout_s,
        )
    except Exception:  # no responders (it is gone), a timeout (it hangs), transport errors
        return 0
    if not isinstance(answer, AdminReply) or not answer.ok:
        return 0
    log.warning("instance %s was alive: it stopped %s for the failover", instance_id, request_id)
    return int(answer.details.get("sent", 0))
