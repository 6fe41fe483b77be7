"""The request table's rows and the instance registry's rows, and the failover decisions made on them, with
no I/O and no clock of its own (``now`` is passed in).

The live shell (:class:`actors.scheduler.SchedulerActor`) keeps these records in its tables, stores a
:class:`RequestRecord` as it is in the JetStream KV bucket (``actors/control_state.py``: the stored form *is*
the record, encoded by msgspec, so the two cannot drift apart), and carries out the commands below:

* :class:`RequestTable`: the table itself, with per-client counts and a bounded memory of finished ids;
* :func:`expired_instances`: which instances to declare dead at ``now`` (missed heartbeats, or stopping);
* :func:`fail_over`: for every request running on a dead instance, either :class:`Resume` (read back what its
  client already has, then dispatch it again from there) or :class:`Fail` (tell the client);
* :func:`recover`: the same choice for one request (restored after a restart, or evicted for an interactive
  one);
* :func:`on_recovered`: what the client had, read back: :class:`Drop` (it finished), :class:`Fail`,
  :class:`Hold` (an instance may still hold a copy: see below), or :class:`Redispatch` with the tokens to resume
  after;
* :func:`still_held_on` and :class:`FailoverHolds`: where a failed-over request must not resume yet;
  :func:`recover_restored`: the same question asked again after a control-plane restart (see below).

Exactly-once bookkeeping lives here: a request being resumed is ``recovering`` with no instance (so no late
event from the dead instance can end it, and a heartbeat that still lists it there has it stopped as
superseded), its ``failovers`` count bounds the retries, and it is dispatched again only with the tokens its
client already has as ``resume_tokens`` (the engine continues after them, so every output index reaches the
client once). The simulator has no instance failures, so only the live shell drives these today.

**Where a failed-over request may resume** (one copy of a request id at a time). A failover fences the instance
it leaves first (``actors/failover.py``), because "declared dead" (missed heartbeats) and "restarted" (its
heartbeat sequence went back, or its pid changed) are guesses: the instance may be alive and still run the
request, and an instance that sends a stray or second heartbeat stream under its id is not restarted at all.
The fence's answer is the evidence :func:`still_held_on` reads:

* ``stopped`` (it ran the request, stopped it, and the copy ended), ``not_here`` (the process answering for that
  id does not hold it: the new incarnation after a real restart never had it), ``gone`` (nobody listens on its
  subject): no copy can run there, and the request resumes at once, on any instance, the fenced one included
  (a real restart of the only instance resumes onto it);
* ``stopping`` (it stopped streaming but the copy had not ended when it answered) or ``silent`` (no answer: it
  hangs, or the answer was lost) from an instance still registered: its engine may still hold the request, so
  the request waits (:class:`Hold`, still ``recovering``) until that instance's heartbeat no longer lists it,
  the instance is declared dead, or a heartbeat timeout's worth of time has passed (a copy that outlives that is
  stopped as superseded when its heartbeat lists it: ``_stop_superseded`` in the scheduler). Resuming it on that
  instance earlier would start a second copy under the same id there, which the engine actor also refuses
  (``actors/engine_actor.py``: the new copy waits for the old one's end): two guards, one in each layer.

**After a control-plane restart** (a new leader, or a restart reading the state store back) the holds are not
read from storage: they are derived again (:func:`recover_restored`). A request stored ``recovering`` names
the instance it failed over from (the last of ``served_by``); where that instance is still known, the restored
scheduler fences it again and the fresh answer decides by the same rule. A stored hold would only repeat the
old answer: it would not cover a control plane that stopped before the fence answered, nor a leader killed
before its last write was stored, and the instance's present answer (or its heartbeats) is the better evidence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from control.policy.admission import client_key
from control.settings import LifecycleSettings
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


def takes_no_dispatch(
    *, serving: bool, draining: bool = False, drain_requested: bool = False, blocked: bool = False
) -> bool:
    """The one rule for which instance takes no new request: no dispatch, no batch release, no fair-queue room,
    no migration or prefill/decode handoff to it (its snapshot says ``draining``), and ``drover migrate`` without
    a destination does not pick it (one an operator names is theirs to choose). Both shells call it, each
    with its own words for the inputs:

    * ``serving``: it is in service. Live: its record's state is ``serving`` (not ``restored`` from the state
      store and unheard since, not ``starting`` or ``stopping``); simulated: ``active``.
    * ``draining``: the engine says it drains (live), or the shell drains it for scale-in (simulated).
    * ``drain_requested``: an operator or the autoscaler's scale-in asked (``drover drain``; live only).
    * ``blocked``: held for another reason than its own report: a KunServe group's member, or its leader while
      the group forms or restores (live: the MemoryManager's ``blocks_dispatch``; the memory simulator: its
      unit forms or restores a group).

    A dead instance has left the registry (and a stopped simulated one the simulator) before this is asked."""
    return not serving or draining or drain_requested or blocked


def record_takes_no_dispatch(record: InstanceRecord, blocked: bool = False) -> bool:
    """:func:`takes_no_dispatch` for a live registry row (``blocked``: the MemoryManager's answer for it)."""
    return takes_no_dispatch(
        serving=record.state == "serving",
        draining=record.draining,
        drain_requested=record.drain_requested,
        blocked=blocked,
    )


# ----------------------------------------------------------------------------------------------- the table
class TableRow(Protocol):
    """What the request table reads of a row (a :class:`RequestRecord`, or a test's own)."""

    submit: SubmitRequest
    request_id: str
    cancel_token: str
    arrival: float  # time.time()
    instance_id: str | None
    state: str


R = TypeVar("R", bound=TableRow)


@dataclass(frozen=True, slots=True)
class FinishedEntry:
    reply_to: str
    finished_at: float  # the shell's monotonic clock


class RequestTable(dict[str, R], Generic[R]):
    """The scheduler's request table (a dict): per-client counts and a bounded memory of finished ids (for
    ``lifecycle.finished_retention_s``, at most ``finished_max_entries``), so a late retry of a finished
    request is answered ``duplicate_request`` instead of running twice. No clock of its own: ``clock`` is the
    shell's (the scheduler passes ``time.monotonic``), read when a request leaves."""

    def __init__(self, settings: LifecycleSettings, *, clock: Callable[[], float]) -> None:
        super().__init__()
        self.settings = settings
        self.clock = clock
        self.per_client: dict[str, int] = {}
        self.finished: OrderedDict[str, FinishedEntry] = OrderedDict()

    @staticmethod
    def _key(record: TableRow) -> str:
        return client_key(record.submit.client_id, record.submit.reply_to, subjects.INBOX_ROOT)

    def __setitem__(self, request_id: str, record: R) -> None:
        if request_id in self:
            self._forget(super().__getitem__(request_id))
        super().__setitem__(request_id, record)
        key = self._key(record)
        self.per_client[key] = self.per_client.get(key, 0) + 1
        self.finished.pop(request_id, None)

    def _forget(self, record: R) -> None:
        key = self._key(record)
        left = self.per_client.get(key, 0) - 1
        if left > 0:
            self.per_client[key] = left
        else:
            self.per_client.pop(key, None)

    def _finished(self, request_id: str, record: R) -> None:
        self._forget(record)
        self.finished[request_id] = FinishedEntry(record.submit.reply_to, self.clock())
        self.finished.move_to_end(request_id)
        while len(self.finished) > self.settings.finished_max_entries:
            self.finished.popitem(last=False)

    def __delitem__(self, request_id: str) -> None:
        record = super().__getitem__(request_id)
        super().__delitem__(request_id)
        self._finished(request_id, record)

    def pop(self, request_id: str, *default: Any) -> Any:
        if request_id not in self:
            if default:
                return default[0]
            raise KeyError(request_id)
        record = super().pop(request_id)
        self._finished(request_id, record)
        return record

    def client_in_flight(self, key: str) -> int:
        return self.per_client.get(key, 0)

    def forget_expired(self, now: float) -> int:
        """Drop finished ids older than the retention at ``now``; returns how many are still remembered."""
        horizon = now - self.settings.finished_retention_s
        while self.finished:
            entry = next(iter(self.finished.values()))
            if entry.finished_at > horizon:
                break
            self.finished.popitem(last=False)
        return len(self.finished)


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


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the request ``recovering`` (its ``resume_tokens`` set) until ``instance_id`` no longer holds a copy
    of it (:class:`FailoverHolds`), then dispatch it again."""

    request_id: str
    instance_id: str


FENCE_ANSWERS = ("stopped", "stopping", "not_here", "gone", "silent")
"""What a fence can answer (``actors/failover.py``): see the module docstring."""


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


def still_held_on(fenced_on: str, answer: str, registered: bool) -> str:
    """The instance that may still hold a copy of a failed-over request, from the fence's ``answer`` (one of
    :data:`FENCE_ANSWERS`); "" when none can. Only a ``stopping`` or ``silent`` instance that is still
    ``registered`` (not declared dead: a restart signal, a fence that outran the copy's end) may; what a
    declared-dead instance still runs is stopped as superseded if it comes back."""
    if answer not in FENCE_ANSWERS:
        raise ValueError(f"unknown fence answer {answer!r}")
    return fenced_on if fenced_on and registered and answer in ("stopping", "silent") else ""


def on_recovered(
    record: RequestRecord | None, tokens: list[int], finished: bool, error: str = "", held_on: str = ""
) -> Drop | Fail | Hold | Redispatch | None:
    """What the client of a ``recovering`` request had (read back from the output stream): drop it when it
    finished, fail it when that could not be read, else resume it after those tokens: at once, or once
    ``held_on`` (:func:`still_held_on`) no longer holds a copy. None: the request is not recovering any more
    (cancelled, or a duplicate answer)."""
    if record is None or record.state != "recovering":
        return None
    if error:
        return Fail(record.request_id, error)
    if finished:
        return Drop(record.request_id)
    record.resume_tokens = list(tokens)
    if held_on:
        return Hold(record.request_id, held_on)
    record.state = "queued"
    return Redispatch(record.request_id)


def on_released(record: RequestRecord | None) -> Redispatch | None:
    """A held request (:class:`Hold`) may resume now: dispatch it again after its ``resume_tokens``. None: it is
    not recovering any more (cancelled meanwhile)."""
    if record is None or record.state != "recovering":
        return None
    record.state = "queued"
    return Redispatch(record.request_id)


def recover_restored(record: RequestRecord, registered: Collection[str], unresumable: str = "") -> Resume | Fail:
    """A request restored from the state store ``recovering`` (the last control plane stopped while it failed
    over: before the fence answered, while it was held, or before it was dispatched again) or on an instance
    nobody knows: recover it. Where a ``recovering`` request's last instance (``served_by[-1]``, the one it
    failed over from) is still ``registered``, that instance is fenced again, so a copy it may still hold is
    stopped and the fence's fresh answer decides (:func:`still_held_on`: resume at once, or :class:`Hold`).
    Otherwise nothing of it can run there and it is read back without a fence."""
    last = record.served_by[-1] if record.served_by else ""
    fence_on = last if record.state == "recovering" and last in registered else ""
    return recover(record, fence_on=fence_on, unresumable=unresumable)


class FailoverHolds:
    """Failed-over requests waiting for an instance to let go of its copy (:class:`Hold`): released when that
    instance's heartbeat no longer lists them, when it is declared dead, or ``hold_s`` after they were held.
    No clock of its own: ``now`` is the shell's monotonic clock."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}  # request id -> (instance id, held since)

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, instance_id: str, now: float) -> None:
        """Hold ``request_id`` until ``instance_id`` lets go of it; ``now`` starts its time limit."""
        self._held[request_id] = (instance_id, now)

    def held(self) -> dict[str, str]:
        """What is held: request id -> the instance it waits for (a copy, taken in one step: an observer on
        another thread, such as a test, never iterates the table while it changes)."""
        return {rid: held_on for rid, (held_on, _since) in list(self._held.items())}

    def on_heartbeat(self, instance_id: str, listed: Collection[str]) -> list[str]:
        """``instance_id``'s heartbeat lists ``listed`` (the request ids its engine runs): what it let go of."""
        return self._release(lambda rid, held_on, _since: held_on == instance_id and rid not in listed)

    def on_instance_gone(self, instance_id: str) -> list[str]:
        """``instance_id`` was declared dead: nothing of it can run any more."""
        return self._release(lambda _rid, held_on, _since: held_on == instance_id)

    def expired(self, now: float, hold_s: float) -> list[str]:
        """Held longer than ``hold_s``: resumed anyway (a copy that lingers is stopped as superseded)."""
        return self._release(lambda _rid, _held_on, since: now - since > hold_s)

    def _release(self, released: Callable[[str, str, float], bool]) -> list[str]:
        if not self._held:
            return []
        out = [rid for rid, (held_on, since) in self._held.items() if released(rid, held_on, since)]
        for rid in out:
            del self._held[rid]
        return out
