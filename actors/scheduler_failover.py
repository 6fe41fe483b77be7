"""The scheduler's failover: the control core's decisions about a lost instance's requests, carried out.

An instance declared dead (missed heartbeats) or seen to restart loses its requests. The control core
(``control/core/requests.py``) decides: :func:`~control.core.requests.fail_over` resumes each elsewhere or
fails it (attempts exhausted), and :func:`~control.core.requests.on_recovered` says what to do once its
client's tokens are read back (drop it, it finished; fail it; dispatch it again after those tokens).
:class:`Failovers` carries these out: the fence and the read-back run on the bus loop (``actors/failover.py``)
and their answer comes back to the scheduler actor as a :class:`~actors.failover.Recovered` message. A
request an interactive one evicted, and requests restored after a control-plane restart
(``actors/control_state.py``), take the same path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import msgspec

from actors.client_replies import ClientReplies, owner_of
from actors.control_state import ControlState
from actors.dispatching import Placements
from actors.failover import Recovered, read_delivered
from actors.scheduler_ends import RequestEnds
from actors.scheduler_migration import SchedulerMigrations
from control.core.record import DecisionLog
from control.core.requests import (
    Drop,
    Fail,
    FailoverHolds,
    Hold,
    Redispatch,
    RequestRecord,
    RequestTable,
    Resume,
    fail_over,
    on_recovered,
    on_released,
    still_held_on,
)
from control.settings import ReliabilitySettings
from transport.bus import Bus
from transport.messages import ErrorCode

log = logging.getLogger(__name__)


class Failovers:
    """Failover for the scheduler (see the module docstring).

    Collaborators: the bus (the read-back runs on its loop), the ``reliability`` settings, the request table
    (``requests``), the state store (``state``), ``replies`` (the client hears why its request failed), the
    ``migrations`` (a lost request's move is over), ``placements`` (a request dispatched again), ``ends`` (a
    request that is over is forgotten), the decision log, and ``tell(message)``, which hands the read-back's
    :class:`Recovered` to the scheduler actor."""

    def __init__(
        self,
        bus: Bus,
        reliability: ReliabilitySettings,
        requests: RequestTable[RequestRecord],
        state: ControlState,
        replies: ClientReplies,
        migrations: SchedulerMigrations,
        placements: Placements,
        ends: RequestEnds,
        tell: Callable[[object], None],
        decision_log: DecisionLog | None = None,
        instances: Mapping[str, object] | None = None,
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.bus = bus
        self.reliability = reliability
        self.requests = requests
        self.state = state
        self.replies = replies
        self.migrations = migrations
        self.placements = placements
        self.ends = ends
        self.tell = tell
        self.decision_log = decision_log
        self.instances: Mapping[str, object] = instances if instances is not None else {}  # the registry's records
        self.holds = FailoverHolds()  # failed over, waiting for the fenced instance to let go of its copy

    def fail_over(self, dead_instance: str) -> None:
        """Resume every request of a dead instance elsewhere, from the tokens its client already
        has (the decision: :func:`control.core.requests.fail_over`).

        Thread: the scheduler actor's thread."""
        max_attempts = self.reliability.failover_max_attempts
        before = [msgspec.structs.replace(r) for r in self.requests.values()] if self.decision_log else []
        commands = fail_over(self.requests.values(), dead_instance, max_attempts)
        if self.decision_log is not None:  # for the replay parity test
            self.decision_log.add("fail_over", dead_instance, (tuple(before), max_attempts), tuple(commands))
        for command in commands:
            self.migrations.in_flight.pop(command.request_id, None)
        self.carry_out(commands)

    def carry_out(self, commands: list[Resume | Fail]) -> None:
        """Carry out the core's failover commands (``control/core/requests.py``): a
        :class:`Fail` ends the request with ``engine_failed``; a :class:`Resume` stores the (now
        ``recovering``) record and reads back, on the bus loop, what its client has (fencing the old instance
        first where one is named); the answer comes back to the scheduler as a ``Recovered`` message.

        Thread: the scheduler actor's thread."""
        for command in commands:
            record = self.requests.get(command.request_id)
            if record is None:
                continue
            if isinstance(command, Fail):
                self.fail_request(record, command.why)
                continue
            self.state.save_request(record)
            self.bus.run(self.read_delivered(record.request_id, record.submit.reply_to, fence_on=command.fence_on))

    async def read_delivered(self, request_id: str, reply_to: str, fence_on: str = "") -> None:
        """Read back what the client of ``request_id`` has (``actors/failover.py``) and tell the scheduler.

        Thread: the bus loop."""
        self.tell(await read_delivered(self.bus, self.reliability, request_id, reply_to, fence_on))

    def on_recovered(self, recovered: Recovered, now: float) -> None:
        """What a recovering request's client had: the core decides (``on_recovered``).

        Thread: the scheduler actor's thread."""
        record = self.requests.get(recovered.request_id)
        registered = recovered.fenced_on in self.instances
        held_on = still_held_on(recovered.fenced_on, recovered.fence, registered)
        command = on_recovered(record, recovered.tokens, recovered.finished, recovered.error, held_on)
        if record is None or command is None:
            return
        if isinstance(command, Hold):  # its copy there may still run: not resumed until it is gone
            log.warning(
                "request %s waits for %s to let go of it (fence: %s)", command.request_id, held_on, recovered.fence
            )
            self.holds.hold(command.request_id, command.instance_id, now)
            self.state.save_request(record)
            return
        if isinstance(command, Fail):
            self.fail_request(record, command.why)
        elif isinstance(command, Drop):
            self.ends.forget(recovered.request_id)
        elif isinstance(command, Redispatch):
            log.info("request %s fails over after %d delivered tokens", recovered.request_id, len(recovered.tokens))
            self.placements.dispatch_or_wait(record, now)

    def resume_held(self, request_ids: list[str], now: float) -> None:
        """Failed-over requests whose old instance let go of them resume now (``FailoverHolds``).

        Thread: the scheduler actor's thread."""
        for request_id in request_ids:
            record = self.requests.get(request_id)
            if record is not None and on_released(record) is not None:
                log.info("request %s resumes: the instance it waited for let go of it", request_id)
                self.placements.dispatch_or_wait(record, now)

    def fail_request(self, record: RequestRecord, why: str) -> None:
        """End a request with ``engine_failed`` (its client is told why) and drop it from the
        request table and the state store.

        Thread: the scheduler actor's thread."""
        log.warning("request %s failed: %s", record.request_id, why)  # the operator's only sign of it
        self.ends.forget(record.request_id)
        self.replies.error(
            owner_of(record.submit.reply_to),
            record.submit.reply_to,
            ErrorCode.ENGINE_FAILED,
            why,
            record.request_id,
            "error",
        )
