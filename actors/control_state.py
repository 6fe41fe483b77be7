"""The control plane's durable state: the scheduler's request table and instance registry, kept in a
JetStream KV bucket so that a restarted (or newly elected) control plane picks up where the last one left off.

What is stored is what the scheduler needs to keep accepted requests' guarantees: each request's submission,
cancel token, prompt tokens, where it runs and its failover history (failover and request-id deduplication
work across a restart), and each known instance (an instance that died while no control plane ran is still
noticed: it never heartbeats again, so its requests fail over). Loads and timings are not stored: heartbeats
rebuild them within a beat.

The scheduler calls :meth:`ControlState.save_request` and friends at each change (non-blocking; writes are
ordered and coalesced by :class:`transport.kv_store.KvWriter`) and :func:`restore_into` when it starts.
After a restore, a request whose instance's heartbeat no longer lists it (it ended, or the engine restarted,
while no control plane listened) is checked against the output stream exactly like a failover: finished
requests leave the table, unfinished ones resume from what their client has.
A request restored ``recovering`` (it was failing over when the last control plane stopped) is fenced again
on the instance it failed over from, where that instance is still known: the failover's hold (the instance may
still hold a copy) is derived again from that answer rather than stored (``control/core/requests.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from control.core.requests import InstanceRecord, RequestRecord, recover, recover_restored
from control.policy.pd import parse_phase
from transport.kv_store import KvWriter, kv_key, read_all
from transport.messages import EngineInfo, InstanceHeartbeat, InstanceLoad

if TYPE_CHECKING:
    from actors.scheduler import SchedulerActor

log = logging.getLogger(__name__)

REQUEST_NS = "req"
INSTANCE_NS = "inst"
MIGRATION_NS = "mig"
PHASE_NS = "phase"  # prefill/decode phases set by an operator or the split's rebalancing (win over reports)
STATE_VERSION = 1


class StoredInstance(msgspec.Struct, kw_only=True):
    """One known instance, as stored."""

    v: int = STATE_VERSION
    info: EngineInfo
    drain_requested: bool = False


class StoredPhase(msgspec.Struct, kw_only=True):
    """An instance's phase override (``drover phase set``, or the prefill:decode split's rebalancing)."""

    v: int = STATE_VERSION
    instance_id: str
    phase: str


class StoredMigration(msgspec.Struct, kw_only=True):
    """A migration in flight: if the control plane dies during it, the next leader releases both sides."""

    v: int = STATE_VERSION
    migration_id: str
    request_id: str
    source: str
    destination: str


_request_decoder = msgspec.msgpack.Decoder(RequestRecord)


def encode_request(record: RequestRecord) -> bytes:
    """A request table row as stored under ``req.<id>`` (the core's record itself, msgpack)."""
    return msgspec.msgpack.encode(record)


def decode_request(data: bytes) -> RequestRecord:
    """A stored ``req.<id>`` value back into the core's record. Rows stored by older versions decode too: a
    ``v`` field is ignored, and a field they lack takes its default."""
    return _request_decoder.decode(data)


_instance_decoder = msgspec.msgpack.Decoder(StoredInstance)
_migration_decoder = msgspec.msgpack.Decoder(StoredMigration)
_phase_decoder = msgspec.msgpack.Decoder(StoredPhase)


class ControlState:
    """The scheduler's handle on the state bucket; a disabled one (no writer) keeps state in memory only."""

    def __init__(self, writer: KvWriter | None = None, load_timeout_s: float = 10.0) -> None:
        self.writer = writer
        self.load_timeout_s = load_timeout_s
        self.unconfirmed: dict[str, str] = {}  # restored request id -> instance its record names
        self.phases: dict[str, str] = {}  # instance id -> phase override, as last loaded

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    # ------------------------------------------------------------------------------------------ writes
    def save_request(self, record: RequestRecord) -> None:
        """Store a request table row: the stored form is the core's record itself (msgspec), so a field
        added there is stored without a change here; rows stored by older versions (a ``v`` field, fewer
        fields) still decode."""
        if self.writer is None:
            return
        self.writer.put(kv_key(REQUEST_NS, record.request_id), encode_request(record))

    def drop_request(self, request_id: str) -> None:
        self.unconfirmed.pop(request_id, None)
        if self.writer is not None:
            self.writer.delete(kv_key(REQUEST_NS, request_id))

    def save_instance(self, record: InstanceRecord) -> None:
        if self.writer is not None:
            stored = StoredInstance(info=record.info, drain_requested=record.drain_requested)
            self.writer.put(kv_key(INSTANCE_NS, record.info.instance_id), msgspec.msgpack.encode(stored))

    def drop_instance(self, instance_id: str) -> None:
        if self.writer is not None:
            self.writer.delete(kv_key(INSTANCE_NS, instance_id))

    def save_migration(self, migration_id: str, request_id: str, source: str, destination: str) -> None:
        if self.writer is not None:
            stored = StoredMigration(
                migration_id=migration_id, request_id=request_id, source=source, destination=destination
            )
            self.writer.put(kv_key(MIGRATION_NS, migration_id), msgspec.msgpack.encode(stored))

    def drop_migration(self, migration_id: str) -> None:
        if self.writer is not None:
            self.writer.delete(kv_key(MIGRATION_NS, migration_id))

    def save_phase(self, instance_id: str, phase: str) -> None:
        """An instance's phase override: it outlives a control-plane restart (engines report only their own)."""
        if self.writer is not None:
            stored = StoredPhase(instance_id=instance_id, phase=phase)
            self.writer.put(kv_key(PHASE_NS, instance_id), msgspec.msgpack.encode(stored))

    def drop_phase(self, instance_id: str) -> None:
        if self.writer is not None:
            self.writer.delete(kv_key(PHASE_NS, instance_id))

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every write queued so far is stored (at once when disabled)."""
        if self.writer is None:
            callback()
        else:
            self.writer.then(callback)

    # ------------------------------------------------------------------------------------------ reads
    def load(
        self, scheduler: SchedulerActor
    ) -> tuple[list[RequestRecord], list[StoredInstance], list[StoredMigration]]:
        if self.writer is None:
            return [], [], []
        reading = read_all(scheduler.bus.nc, scheduler.settings.ha.state_bucket)
        values = scheduler.bus.run(reading).result(timeout=self.load_timeout_s)
        self.phases = {}
        requests: list[RequestRecord] = []
        instances: list[StoredInstance] = []
        migrations: list[StoredMigration] = []
        for key, value in values.items():
            namespace = key.split(".", 1)[0].removesuffix("x")
            try:
                if namespace == REQUEST_NS:
                    requests.append(decode_request(value))
                elif namespace == INSTANCE_NS:
                    instances.append(_instance_decoder.decode(value))
                elif namespace == MIGRATION_NS:
                    migrations.append(_migration_decoder.decode(value))
                elif namespace == PHASE_NS:
                    stored_phase = _phase_decoder.decode(value)
                    self.phases[stored_phase.instance_id] = stored_phase.phase
            except msgspec.DecodeError as exc:
                log.warning("state store: skipping unreadable %s: %s", key, exc)
        return requests, instances, migrations

    # ------------------------------------------------------------------------------------------ reconcile
    def on_heartbeat(self, scheduler: SchedulerActor, beat: InstanceHeartbeat) -> None:
        """Confirm restored requests against heartbeats (see the module doc).

        A restored request is confirmed where a heartbeat lists it (its record moves there if a migration
        ended while no control plane listened). It is recovered only once its recorded instance reported
        without it (nothing waiting there either) and every other known instance has reported since the
        restore without listing it: then it runs nowhere."""
        if not self.unconfirmed:
            return
        instance_id = beat.info.instance_id
        running = {r.request_id for r in beat.load.running}
        for request_id in [rid for rid in self.unconfirmed if rid in running]:
            self.unconfirmed.pop(request_id)
            record = scheduler.requests.get(request_id)
            if record is not None and record.state == "running" and record.instance_id != instance_id:
                log.info("restored request %s runs on %s (not %s)", request_id, instance_id, record.instance_id)
                record.instance_id = instance_id
                record.served_by.append(instance_id)
                self.save_request(record)
        if any(i.state == "restored" for i in scheduler.instances.values()):
            return  # not every instance has reported yet
        listed = {r.request_id for i in scheduler.instances.values() for r in i.load.running}
        for request_id, on in list(self.unconfirmed.items()):
            if request_id in listed:
                continue
            home = scheduler.instances.get(on)
            if home is not None and home.load.num_waiting > 0:
                continue  # it may be waiting there
            self.unconfirmed.pop(request_id)
            record = scheduler.requests.get(request_id)
            if record is not None and record.state == "running" and record.instance_id == on:
                log.info("restored request %s runs nowhere any more: checking its output", request_id)
                _recover(scheduler, record)


RESTARTED = "the control plane restarted and cannot resume this stream"


def _recover(scheduler: SchedulerActor, record: RequestRecord) -> None:
    """Read back what the client has; the scheduler then drops the request or resumes it (failover path)."""
    scheduler.failovers.carry_out([recover(record, unresumable=RESTARTED)])


def _recover_restored(scheduler: SchedulerActor, record: RequestRecord) -> None:
    """A restored request to recover: as :func:`_recover`, but a ``recovering`` one first fences again the
    instance it failed over from where that is still known (the core's ``recover_restored``), so a failover
    the last control plane left unfinished (fence unanswered, or held: its hold is not stored) is decided
    again on that instance's present answer, hold included."""
    scheduler.failovers.carry_out([recover_restored(record, scheduler.instances, unresumable=RESTARTED)])


def _release_migrations(scheduler: SchedulerActor, migrations: list[StoredMigration]) -> None:
    """Migrations the last leader left in flight: release each destination's reservation and abort each
    source's side (which frees a stopped copy's blocks). Where each request then runs (source, destination,
    or nowhere: recovered from its output) is settled by heartbeats, like every restored request."""
    import asyncio

    from transport import subjects
    from transport.messages import Message, MigrateIn, MigrateOut

    timeout_s = min(scheduler.settings.migration.op_timeout_s, 3.0)  # live engines answer in milliseconds

    async def ask(subject: str, message: Message) -> None:
        try:
            await scheduler.bus.arequest(subject, message, timeout_s=timeout_s)
        except Exception as exc:  # a dead instance: its resources went with it
            log.info("%s on %s not answered (%r)", type(message).__name__, subject, exc)

    async def release() -> None:
        await asyncio.gather(
            *(
                ask(subjects.engine(m.destination), MigrateIn(op="release", migration_id=m.migration_id))
                for m in migrations
            ),
            *(ask(subjects.engine(m.source), MigrateOut(op="abort", migration_id=m.migration_id)) for m in migrations),
        )

    try:
        scheduler.bus.run(release()).result(timeout=timeout_s + 5)
    except Exception as exc:
        log.warning("migrations left in flight could not all be released: %r", exc)
    for m in migrations:
        log.info(
            "released migration %s of %s (%s -> %s) left in flight",
            m.migration_id,
            m.request_id,
            m.source,
            m.destination,
        )
        scheduler.state.drop_migration(m.migration_id)


def restore_into(scheduler: SchedulerActor) -> None:
    """Fill a starting scheduler's tables from the state bucket (called from its ``on_start``, where an
    exception would stop the actor without a word: everything is caught and logged here)."""
    try:
        _restore(scheduler)
    except Exception:
        log.exception("restoring the control state failed: going on with what was restored")


def _restore(scheduler: SchedulerActor) -> None:
    state = scheduler.state
    if not state.enabled:
        return
    try:
        requests, instances, migrations = state.load(scheduler)
    except Exception as exc:
        log.error("state store unreadable (%r): starting with empty tables", exc)
        return
    if migrations:  # first: no request is recovered while a migration may still hold it
        _release_migrations(scheduler, migrations)
    now = time.monotonic()
    for stored_instance in instances:
        info = stored_instance.info
        if info.instance_id in scheduler.instances:
            continue
        # Not in the dispatch index until it heartbeats; declared dead (its requests fail over) if it never does.
        scheduler.instances[info.instance_id] = InstanceRecord(
            info=info,
            load=InstanceLoad(num_total_blocks=info.num_blocks, num_free_blocks=0, num_running=0, num_waiting=0),
            last_seen=now,
            state="restored",
            drain_requested=stored_instance.drain_requested,
        )
    for instance_id, text in state.phases.items():
        try:
            scheduler.pd.set_phase(instance_id, parse_phase(text))  # re-filed at the instance's next heartbeat
        except ValueError as exc:
            log.warning("state store: skipping the phase of %s: %s", instance_id, exc)
    recover: list[RequestRecord] = []
    for record in sorted(requests, key=lambda r: r.arrival):
        if record.request_id in scheduler.requests:
            continue
        scheduler.requests[record.request_id] = record
        if record.state == "queued" or (record.state == "running" and record.instance_id is None):
            record.state, record.instance_id = "queued", None
            scheduler.dispatch.wait(record.request_id)
        elif record.state == "running" and record.instance_id in scheduler.instances:
            state.unconfirmed[record.request_id] = record.instance_id
        else:  # recovering, or on an instance nobody knows: fence its last instance again, read back what
            # its client has (a failover's hold is derived again here: control/core/requests.py)
            recover.append(record)
    for record in recover:
        _recover_restored(scheduler, record)
    if requests or instances or state.phases:
        log.info(
            "restored %d requests, %d instances and %d phases from the state store (%d to recover)",
            len(requests),
            len(instances),
            len(state.phases),
            len(recover),
        )
