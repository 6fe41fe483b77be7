"""The failover's I/O on the bus loop: before a request of an instance declared dead resumes elsewhere, fence
it there (a live instance would stream on: every index twice) and read back from the output stream what its
client already has. The decisions around it (resume or fail, then drop, fail, wait or dispatch again) are the
control core's (``control/core/requests.py``); the SchedulerActor carries them out and runs these coroutines
on the bus loop, and the answer comes back to it as a :class:`Recovered` message. The fence's answer goes
with it: the core resumes the request on the fenced instance (or anywhere) only once no copy can run there
(``still_held_on``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.errors import NoRespondersError

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
    fenced_on: str = ""  # the instance fenced first ("" when none was)
    fence: str = "gone"  # its answer (control.core.requests.FENCE_ANSWERS)


async def read_delivered(
    bus: Bus, settings: ReliabilitySettings, request_id: str, reply_to: str, fence_on: str = ""
) -> Recovered:
    """What the client of ``request_id`` has in the output stream (after fencing ``fence_on``); retried for
    ``output_read_retry_s`` while the stream cannot be read. Runs on the bus loop."""
    sent, answer = 0, "gone"
    if fence_on:
        try:
            sent, answer = await fence(bus, settings, fence_on, request_id)
        except Exception as exc:  # the failover goes on as before; whether a copy runs there is not known
            log.info("fencing %s on %s failed: %s", request_id, fence_on, exc)
            answer = "silent"
    deadline = time.monotonic() + settings.output_read_retry_s
    while True:
        try:
            tokens, finished = await delivered_tokens(bus.nc, reply_to, request_id)
            for _ in range(10):  # the fenced engine's last chunks may reach the output stream a moment later
                if finished or len(tokens) >= sent:
                    break
                await asyncio.sleep(0.05)
                tokens, finished = await delivered_tokens(bus.nc, reply_to, request_id)
            return Recovered(request_id, tokens, finished, fenced_on=fence_on, fence=answer)
        except Exception as exc:  # no stream leader yet, or reconnecting: retry for a while
            if time.monotonic() >= deadline:
                return Recovered(
                    request_id, [], False, f"output stream unreadable: {exc!r}", fenced_on=fence_on, fence=answer
                )
            log.info("reading %s's delivered tokens failed (%s): retrying", request_id, exc)
            await asyncio.sleep(0.25)


async def fence(bus: Bus, settings: ReliabilitySettings, instance_id: str, request_id: str) -> tuple[int, str]:
    """Stop the request on an instance declared dead before it resumes elsewhere: missed heartbeats do not
    prove death, and a live instance would stream on (every index twice). Returns the output tokens it says it
    sent (0 when it is gone, hangs, or does not know the request) and its answer, one of
    ``control.core.requests.FENCE_ANSWERS``: ``gone`` (no responders), ``silent`` (a timeout, a transport error
    or an answer that is no AdminReply: whether it still runs the request is not known), ``not_here``,
    ``stopped`` (the copy ended) or ``stopping`` (it had not ended when the instance answered; an engine
    without the ``ended`` detail counts as that too). Runs on the bus loop."""
    try:
        answer = await bus.arequest(
            subjects.engine(instance_id),
            EngineFence(request_id=request_id),
            timeout_s=settings.failover_fence_timeout_s,
        )
    except NoRespondersError:  # nobody listens on its subject: it is gone
        return 0, "gone"
    except Exception:  # a timeout (it hangs), transport errors
        return 0, "silent"
    if not isinstance(answer, AdminReply):
        return 0, "silent"
    if not answer.ok:
        return 0, "not_here"
    log.warning("instance %s was alive: it stopped %s for the failover", instance_id, request_id)
    return int(answer.details.get("sent", 0)), "stopped" if answer.details.get("ended") is True else "stopping"
