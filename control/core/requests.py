"""The request table's rows and the instance registry's rows, and the failover decisions made on them, with
no I/O and no clock of its own (``now`` is passed in).

The live shell (:class:`actors.scheduler.SchedulerActor`) keeps these records in its tables, stores a
:class:`RequestRecord` as it is in the JetStream KV bucket (``actors/control_state.py``: the stored form *is*
the record, encoded by msgspec, so the two cannot drift apart), and carries out the commands below:

* :func:`expired_instances`: which instances to declare dead at ``now`` (missed heartbeats, or stopping);
* :func:`fail_over`: for every request running on a dead instance, either :class:`Resume` (read back what its
  client already has, then dispatch it again from there) or :class:`Fail` (tell the client);
* :func:`recover`: the same choice for one request (restored after a restart, or evicted for an interactive
  one);
* :func:`on_recovered`: what the client had, read back: :class:`Drop` (it finished), :class:`Fail`, or
  :class:`Redispatch` with the tokens to resume after.

Exactly-once bookkeeping lives here: a request being resumed is ``recovering`` with no instance (so no late
event from the dead instance can end it, and a heartbeat that still lists it there has it stopped as
superseded), its ``failovers`` count bounds the retries, and it is dispatched again only with the tokens its
client already has as ``resume_tokens`` (the engine continues after them, so every output index reaches the
client once). The simulator has no instance failures, so only the live shell drives these today.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from transport import subjects
from transport.messages import EngineInfo, InstanceLoad, SubmitRequest


class RequestRecord(msgspec.Struct, kw_only=True):
    """One row of the request table; also its stored form (``actors/control_state.py``)."""

    submit: SubmitRequest
    request_id: str
    cancel_token: str
    prompt_token_ids: list[int]
    arrival: float  # time.time()
    headers: dict[str, str] = {}
    instance_id: str | None = None
    state: str = "queued"  # queued | running | recovering
    served_by: list[str] = []
    resume_tokens: list[int] = []  # delivered before a failover
    failovers: int = 0


@dataclass(slots=True)
class InstanceRecord:
    """One row of the instance registry (from heartbeats)."""

    info: EngineInfo
    load: InstanceLoad
    last_seen: float  # the shell's monotonic clock
    state: str = "serving"
    draining: bool = False  # the engine says so
    drain_requested: bool = False  # an operator asked (drover drain)
    can_migrate: bool = False
    dispatched: int = 0
    seq: int = 0  # last heartbeat sequence number (restarts at 1 with a new process)
    cached_blocks: int = -1  # prefix-cache blocks it reports (-1: none reported)


# ----------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True, slots=True)
class Resume:
    """Read back what the client has (after fencing ``fence_on``, when set), then dispatch it again."""

    request_id: str
    fence_on: str = ""


@dataclass(frozen=True, slots=True)
class Fail:
    """End the request with ``engine_failed`` and this reason; it leaves the table."""

    request_id: str
    why: str


@dataclass(frozen=True, slots=True)
class Drop:
    """The client has the whole output already: the request leaves the table without a word."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Redispatch:
    """Dispatch again (or queue) after the tokens the client already has (set as ``resume_tokens``)."""

    request_id: str


# ----------------------------------------------------------------------------------------------- decisions
def resumable(reply_to: str) -> bool:
    """A stream can be resumed only where its output is kept: an inbox under the Drover inbox root."""
    return reply_to.startswith(subjects.INBOX_ROOT + ".")


def expired_instances(instances: Mapping[str, InstanceRecord], now: float, stale_after_s: float) -> list[str]:
    """Instances to declare dead at ``now``: silent for longer than ``stale_after_s``, or stopping."""
    return [
        instance_id
        for instance_id, record in instances.items()
        if now - record.last_seen > stale_after_s or record.state == "stopping"
    ]


def recover(record: RequestRecord, fence_on: str = "", unresumable: str = "") -> Resume | Fail:
    """Resume one request from what its client has, or fail it where its stream cannot be resumed (with
    ``unresumable`` as the reason). A resumed request becomes ``recovering`` with no instance."""
    if not resumable(record.submit.reply_to):
        return Fail(
            record.request_id,
            unresumable or f"its stream cannot be resumed (use an inbox under {subjects.INBOX_ROOT})",
        )
    record.state, record.instance_id = "recovering", None
    return Resume(record.request_id, fence_on)


def fail_over(requests: Iterable[RequestRecord], dead_instance: str, max_attempts: int) -> list[Resume | Fail]:
    """Every request running on ``dead_instance``: resume it elsewhere (each counts one failover), or fail it
    once it has failed over more than ``max_attempts`` times or its stream cannot be resumed."""
    commands: list[Resume | Fail] = []
    for record in list(requests):
        if record.instance_id != dead_instance or record.state != "running":
            continue
        record.failovers += 1
        if record.failovers > max_attempts:
            commands.append(Fail(record.request_id, f"engine {dead_instance} failed; retry limit reached"))
            continue
        commands.append(
            recover(
                record,
                fence_on=dead_instance,
                unresumable=f"engine {dead_instance} failed "
                f"(use an inbox under {subjects.INBOX_ROOT} to have streams resumed)",
            )
        )
    return commands


def on_recovered(
    record: RequestRecord | None, tokens: list[int], finished: bool, error: str = ""
) -> Drop | Fail | Redispatch | None:
    """What the client of a ``recovering`` request had (read back from the output stream): drop it when it
    finished, fail it when that could not be read, else dispatch it again after those tokens. None: the
    request is not recovering any more (cancelled, or a duplicate answer)."""
    if record is None or record.state != "recovering":
        return None
    if error:
        return Fail(record.request_id, error)
    if finished:
        return Drop(record.request_id)
    record.resume_tokens, record.state = list(tokens), "queued"
    return Redispatch(record.request_id)
