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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from transport.kv_store import KvWriter, kv_key, read_all
from transport.messages import EngineInfo, InstanceHeartbeat, InstanceLoad, SubmitRequest

if TYPE_CHECKING:
    from actors.scheduler import InstanceRecord, RequestRecord, SchedulerActor

log = logging.getLogger(__name__)

REQUEST_NS = "req"
INSTANCE_NS = "inst"
STATE_VERSION = 1


class StoredRequest(msgspec.Struct, kw_only=True):
    """One row of the request table, as stored."""

    v: int = STATE_VERSION
    submit: SubmitRequest
    request_id: str
    cancel_token: str
    prompt_token_ids: list[int]
    arrival: float
    headers: dict[str, str] = {}
    instance_id: str | None = None
    state: str = "queued"
    served_by: list[str] = []
    resume_tokens: list[int] = []
    failovers: int = 0


class StoredInstance(msgspec.Struct, kw_only=True):
    """One known instance, as stored."""

    v: int = STATE_VERSION
    info: EngineInfo
    drain_requested: bool = False


_request_decoder = msgspec.msgpack.Decoder(StoredRequest)
_instance_decoder = msgspec.msgpack.Decoder(StoredInstance)


class ControlState:
    """The scheduler's handle on the state bucket; a disabled one (no writer) keeps state in memory only."""

    def __init__(self, writer: KvWriter | None = None, load_timeout_s: float = 10.0) -> None:
        self.writer = writer
        self.load_timeout_s = load_timeout_s
        self.unconfirmed: dict[str, str] = {}  # restored request id -> instance its record names

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    # ------------------------------------------------------------------------------------------ writes
    def save_request(self, record: RequestRecord) -> None:
        if self.writer is None:
            return
        stored = StoredRequest(
            submit=record.submit,
            request_id=record.request_id,
            cancel_token=record.cancel_token,
            prompt_token_ids=record.prompt_token_ids,
            arrival=record.arrival,
            headers=record.headers,
            instance_id=record.instance_id,
            state=record.state,
            served_by=list(record.served_by),
            resume_tokens=list(record.resume_tokens),
            failovers=record.failovers,
        )
        self.writer.put(kv_key(REQUEST_NS, record.request_id), msgspec.msgpack.encode(stored))

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

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every write queued so far is stored (at once when disabled)."""
        if self.writer is None:
            callback()
        else:
            self.writer.then(callback)

    # ------------------------------------------------------------------------------------------ reads
    def load(self, scheduler: SchedulerActor) -> tuple[list[StoredRequest], list[StoredInstance]]:
        if self.writer is None:
            return [], []
        values = scheduler.bus.run(read_all(self.writer.kv)).result(timeout=self.load_timeout_s)
        requests: list[StoredRequest] = []
        instances: list[StoredInstance] = []
        for key, value in values.items():
            try:
                if key.split(".", 1)[0] in (REQUEST_NS, REQUEST_NS + "x"):
                    requests.append(_request_decoder.decode(value))
                elif key.split(".", 1)[0] in (INSTANCE_NS, INSTANCE_NS + "x"):
                    instances.append(_instance_decoder.decode(value))
            except msgspec.DecodeError as exc:
                log.warning("state store: skipping unreadable %s: %s", key, exc)
        return requests, instances

    # ------------------------------------------------------------------------------------------ reconcile
    def on_heartbeat(self, scheduler: SchedulerActor, beat: InstanceHeartbeat) -> None:
        """Confirm restored requests against their instance's first heartbeats (see the module doc)."""
        if not self.unconfirmed:
            return
        instance_id = beat.info.instance_id
        running = {r.request_id for r in beat.load.running}
        for request_id, on in list(self.unconfirmed.items()):
            if on != instance_id:
                continue
            if request_id in running:
                self.unconfirmed.pop(request_id)
            elif beat.load.num_waiting == 0:
                self.unconfirmed.pop(request_id)
                record = scheduler.requests.get(request_id)
                if record is not None and record.instance_id == instance_id and record.state == "running":
                    log.info("restored request %s is not on %s any more: checking its output", request_id, on)
                    _recover(scheduler, record)


def _recover(scheduler: SchedulerActor, record: RequestRecord) -> None:
    """Read back what the client has; the scheduler then drops the request or resumes it (failover path)."""
    from transport import subjects

    if not record.submit.reply_to.startswith(subjects.INBOX_ROOT + "."):
        scheduler._fail_request(record, "the control plane restarted and cannot resume this stream")
        return
    record.state, record.instance_id = "recovering", None
    scheduler.state.save_request(record)
    scheduler.bus.run(scheduler._read_delivered(record.request_id, record.submit.reply_to))


def restore_into(scheduler: SchedulerActor) -> None:
    """Fill a starting scheduler's tables from the state bucket (called from its ``on_start``)."""
    from actors.scheduler import InstanceRecord, RequestRecord

    state = scheduler.state
    if not state.enabled:
        return
    try:
        requests, instances = state.load(scheduler)
    except Exception as exc:
        log.error("state store unreadable (%r): starting with empty tables", exc)
        return
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
    recover: list[RequestRecord] = []
    for stored in sorted(requests, key=lambda r: r.arrival):
        if stored.request_id in scheduler.requests:
            continue
        record = RequestRecord(
            submit=stored.submit,
            request_id=stored.request_id,
            cancel_token=stored.cancel_token,
            prompt_token_ids=stored.prompt_token_ids,
            arrival=stored.arrival,
            headers=stored.headers,
            instance_id=stored.instance_id,
            state=stored.state,
            served_by=stored.served_by,
            resume_tokens=stored.resume_tokens,
            failovers=stored.failovers,
        )
        scheduler.requests[record.request_id] = record
        if record.state == "queued" or (record.state == "running" and record.instance_id is None):
            record.state, record.instance_id = "queued", None
            scheduler.queue.append(record.request_id)
        elif record.state == "running" and record.instance_id in scheduler.instances:
            state.unconfirmed[record.request_id] = record.instance_id
        else:  # recovering, or on an instance nobody knows: read back what its client has
            recover.append(record)
    for record in recover:
        _recover(scheduler, record)
    if requests or instances:
        log.info(
            "restored %d requests and %d instances from the state store (%d to recover)",
            len(requests),
            len(instances),
            len(recover),
        )
