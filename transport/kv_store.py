"""JetStream key-value helpers for control-plane state: open a bucket, name keys safely, read a whole bucket,
and write from actor threads without blocking them (:class:`KvWriter`).

The control plane keeps its request table and instance registry in one bucket (so a restarted or newly
elected control plane picks up where the last one left off) and its leader lease in another
(``actors/leadership.py``). Writes are ordered and coalesced per key on the bus loop; a callback queued
after a write runs once that write is acknowledged (the scheduler acknowledges a submission only after its
record is stored, so a client retry after a control-plane restart is still recognised).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import re
import time
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from transport.js_read import read_stored

log = logging.getLogger(__name__)

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def kv_key(namespace: str, ident: str) -> str:
    """A valid KV key for ``ident`` under ``namespace`` (readable when the id is plain, base64 otherwise)."""
    if _PLAIN_KEY.match(ident):
        return f"{namespace}.{ident}"
    encoded = base64.urlsafe_b64encode(ident.encode()).decode().rstrip("=")
    return f"{namespace}x.{encoded}"


async def open_bucket(
    nc: NatsClient,
    name: str,
    *,
    ttl_s: float | None = None,
    memory: bool = False,
    replicas: int = 1,
    timeout_s: float = 5.0,
) -> KeyValue:
    """Create the bucket if absent (else bind to it as it is: another control plane may have made it)."""
    js = nc.jetstream(timeout=timeout_s)
    config = KeyValueConfig(
        bucket=name,
        history=1,
        ttl=ttl_s,
        storage=StorageType.MEMORY if memory else StorageType.FILE,
        replicas=replicas,
    )
    try:
        return await js.create_key_value(config)
    except Exception as exc:  # exists with another configuration: use it as it is
        log.debug("bucket %s exists (%s): binding to it", name, exc)
        return await js.key_value(name)


KV_OPERATION_HEADERS = ("KV-Operation", "Nats-Marker-Reason")
"""Headers that mark a KV message as a delete, a purge or an expiry rather than a value."""


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind KV ``bucket`` (the KV convention: stream KV_<bucket>, one subject per key)."""
    return f"KV_{bucket}"


def kv_subject_prefix(bucket: str) -> str:
    """The subject prefix of ``bucket``'s keys: a key's subject is this prefix and the key."""
    return f"$KV.{bucket}."


def is_kv_marker(msg: Msg) -> bool:
    """Whether a KV stream message marks a delete, a purge or an expiry rather than carrying a value."""
    headers = msg.headers
    return headers is not None and any(header in headers for header in KV_OPERATION_HEADERS)


async def read_latest(nc: NatsClient, bucket: str) -> list[Msg]:
    """Each key's last message in ``bucket`` (values and markers) when the read began. Read with a counted,
    deleted-after consumer (``transport/js_read.py``): a KV watch's end marker can arrive before the values
    (a full bucket read as empty) and its consumer outlives it."""
    return await read_stored(nc, kv_stream(bucket), f"{kv_subject_prefix(bucket)}>", last_per_subject=True)


async def read_all(nc: NatsClient, bucket: str) -> dict[str, bytes]:
    """Every live key of ``bucket`` and its value when the read began (deleted keys left out)."""
    prefix = kv_subject_prefix(bucket)
    return {msg.subject[len(prefix) :]: msg.data for msg in await read_latest(nc, bucket) if not is_kv_marker(msg)}


async def delete_bucket(nc: NatsClient, name: str) -> None:
    js = nc.jetstream(timeout=5)
    try:
        await js.delete_key_value(name)
    except Exception as exc:
        log.debug("bucket %s not deleted: %s", name, exc)


_Callback = Callable[[], None]


class KvWriter:
    """Ordered, coalescing writes to one bucket from any thread; runs as a task on the bus loop.

    ``put``/``delete`` record the key's latest value and queue the key once; ``then`` queues a callback that
    runs after every write queued before it. Keys queued together are written concurrently (one round trip
    for a batch). A failed write is retried (``retry_s`` apart) for ``give_up_s``, then logged and dropped:
    the serving path never waits on the store forever. ``fence`` is checked before each write: while it is
    False (this process may not lead: a late renewal, or deposed) the write waits, and is dropped after
    ``give_up_s``. ``nc`` and ``bucket`` (the connection and name ``kv`` was opened with) are what the periodic
    compaction reads the bucket's delete markers with.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        kv: KeyValue,
        *,
        nc: NatsClient,
        bucket: str,
        fence: Callable[[], bool] = lambda: True,
        retry_s: float = 0.2,
        give_up_s: float = 10.0,
        compact_period_s: float = 60.0,
        max_batch: int = 256,
    ) -> None:
        self.loop = loop
        self.kv = kv
        self.nc = nc
        self.bucket = bucket
        self.fence = fence
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self.compact_period_s = compact_period_s
        self.max_batch = max_batch
        self._latest: dict[str, bytes | None] = {}
        self._queue: asyncio.Queue[str | _Callback | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0
        self.failed = 0

    # -------------------------------------------------------------------------------------- any thread
    def put(self, key: str, value: bytes) -> None:
        self.loop.call_soon_threadsafe(self._enqueue, key, value)

    def delete(self, key: str) -> None:
        self.loop.call_soon_threadsafe(self._enqueue, key, None)

    def then(self, callback: _Callback) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, callback)

    # -------------------------------------------------------------------------------------- loop side
    def _enqueue(self, key: str, value: bytes | None) -> None:
        if key not in self._latest:
            self._queue.put_nowait(key)
        self._latest[key] = value

    def start(self) -> None:
        """Call on the loop (or via ``loop.call_soon_threadsafe``)."""
        self._task = self.loop.create_task(self._run())

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Write what is queued (bounded by ``flush_timeout_s``), then end the task."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), flush_timeout_s)
        except TimeoutError:
            self._task.cancel()
        self._task = None

    async def _run(self) -> None:
        next_compact = time.monotonic() + self.compact_period_s
        while True:
            try:
                item: str | _Callback | None = await asyncio.wait_for(self._queue.get(), timeout=self.compact_period_s)
            except TimeoutError:
                item = ""
            # Everything queued now: write its keys concurrently, then run its callbacks in order (a callback
            # needs the writes queued before it done; writing later ones in the same round trip is fine).
            batch: list[str] = []
            callbacks: list[_Callback] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif callable(item):
                    callbacks.append(item)
                elif item:
                    batch.append(item)
                if stop or self._queue.empty() or len(batch) >= self.max_batch:
                    break
                item = self._queue.get_nowait()
            await self._write_all(batch)
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("state-store callback failed")
            if stop:
                return
            if time.monotonic() >= next_compact:
                next_compact = time.monotonic() + self.compact_period_s
                await self._compact()

    async def _write_all(self, keys: list[str]) -> None:
        if len(keys) == 1:
            await self._write(keys[0])
        elif keys:
            await asyncio.gather(*(self._write(key) for key in keys))

    async def _write(self, key: str) -> None:
        deadline = time.monotonic() + self.give_up_s
        while key in self._latest:
            value = self._latest[key]
            if not self.fence():
                if time.monotonic() > deadline:
                    self._latest.pop(key, None)
                    log.warning("state store: not the leader; dropped the write of %s", key)
                    return
                await asyncio.sleep(self.retry_s)
                continue
            try:
                if value is None:
                    await self.kv.delete(key)
                else:
                    await self.kv.put(key, value)
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.failed += 1
                    self._latest.pop(key, None)
                    log.error("state store: giving up on %s: %r", key, exc)
                    return
                await asyncio.sleep(self.retry_s)
                continue
            self.writes += 1
            if self._latest.get(key, b"") is value:  # not changed while we wrote: done
                self._latest.pop(key, None)

    async def _compact(self) -> None:
        """Drop delete markers (one per finished request) older than a compaction period, so the bucket stays
        bounded. The markers are found with :func:`read_latest` (``transport/js_read.py``: a counted read
        whose consumer is deleted after it), not with nats-py's ``watchall`` or ``purge_deletes``: a watch's
        end marker can arrive before the values (a round that finds nothing) and its consumer outlives it."""
        if not self.fence():
            return
        try:
            cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self.compact_period_s)
            latest = await read_latest(self.nc, self.bucket)
            markers = [msg.subject for msg in latest if is_kv_marker(msg) and msg.metadata.timestamp < cutoff]
            js = self.nc.jetstream()
            for subject in markers:
                await js.purge_stream(kv_stream(self.bucket), subject=subject, keep=0)
        except Exception as exc:
            log.debug("state store compaction skipped: %r", exc)
