"""Leader election for control planes: a lease in a JetStream KV bucket, taken and renewed by
compare-and-set (revision-based ``create``/``update``), expiring by TTL.

- The leader renews every ``renew_period_s`` with ``update(key, last=its revision)``. A renewal that fails
  because the revision moved (someone else holds the lease) demotes it at once; a leader that cannot renew
  for ``ttl_s`` (measured from the *start* of its last successful renewal, on its own clock) demotes itself,
  so it has stopped acting before any standby can have taken over.
- A standby polls the key. It takes the lease with ``create`` when the key is absent (released, or expired
  by the bucket's TTL) or with ``update(last=rev)`` once the revision it sees has not moved for ``ttl_s`` of
  its own clock (a leader that died without releasing; no clock comparison between hosts is needed).
- ``release`` deletes the key (only if we still hold that revision): a standby takes over at its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from transport.kv_store import open_bucket

log = logging.getLogger(__name__)

LEASE_KEY = "leader"


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The lease's value: who holds it (for operators; correctness rests on revisions alone)."""

    holder: str
    host: str
    pid: int
    acquired_at: float  # time.time() at the holder
    renewed_at: float


@dataclass(slots=True)
class _Seen:
    revision: int
    since: float  # time.monotonic() when this revision was first seen


class Leadership:
    """One control plane's side of the lease; ``run`` is a task on the bus loop.

    ``on_elected`` / ``on_lost`` are called on the loop thread and must not block (hand off to a thread).
    """

    def __init__(
        self,
        nc: NatsClient,
        bucket: str,
        *,
        ttl_s: float,
        renew_period_s: float,
        memory: bool = True,
        replicas: int = 1,
        holder: str | None = None,
        on_elected: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        if renew_period_s >= ttl_s:
            raise ValueError("the renew period must be shorter than the lease TTL")
        self.nc = nc
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.renew_period_s = renew_period_s
        self.memory = memory
        self.replicas = replicas
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.kv: KeyValue | None = None
        self.revision = 0  # ours while leading
        self.acquired_at = 0.0
        self._valid_until = 0.0  # time.monotonic(): we act as leader only before this
        self._seen: _Seen | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # set when the lease key changes (a standby acts at once)
        self._stopping = False

    # ------------------------------------------------------------------------------------------ queries
    def is_leader(self) -> bool:
        """True while we hold a lease that cannot have lapsed yet (safe to act as the leader)."""
        return self.revision > 0 and time.monotonic() < self._valid_until

    # ------------------------------------------------------------------------------------------ loop side
    async def open(self) -> None:
        self.kv = await open_bucket(self.nc, self.bucket, ttl_s=self.ttl_s, memory=self.memory, replicas=self.replicas)

    def _value(self) -> bytes:
        now = time.time()
        return msgspec.msgpack.encode(
            LeaseRecord(
                holder=self.holder,
                host=socket.gethostname(),
                pid=os.getpid(),
                acquired_at=self.acquired_at or now,
                renewed_at=now,
            )
        )

    async def try_acquire(self) -> bool:
        """One standby step: take the lease if it is free or has lapsed. True when we now lead."""
        assert self.kv is not None
        started = time.monotonic()
        try:
            entry = await self.kv.get(LEASE_KEY)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None:
                self.acquired_at = time.time()
                revision = await self.kv.create(LEASE_KEY, self._value())
            else:
                seen, revision_now = self._seen, entry.revision or 0
                if seen is None or seen.revision != revision_now:
                    self._seen = _Seen(revision_now, started)
                    return False
                if started - seen.since < self.ttl_s:
                    return False
                log.warning("leader lease revision %d did not move for %.1fs: taking over", entry.revision, self.ttl_s)
                self.acquired_at = time.time()
                revision = await self.kv.update(LEASE_KEY, self._value(), last=revision_now)
        except KeyWrongLastSequenceError:
            return False  # another standby was quicker
        self.revision, self._valid_until, self._seen = revision, started + self.ttl_s, None
        log.info("%s is now the leader (lease revision %d)", self.holder, revision)
        return True

    async def renew(self) -> bool:
        """One leader step; False when the lease is lost."""
        assert self.kv is not None
        started = time.monotonic()
        try:
            self.revision = await self.kv.update(LEASE_KEY, self._value(), last=self.revision)
            self._valid_until = started + self.ttl_s
            return True
        except KeyWrongLastSequenceError:
            own = await self._own_revision()
            if own is not None:
                # a renewal whose reply was lost (a timeout on a starved loop) was applied all the same: the
                # key moved under our own name, not another control plane's; carry on from its revision
                self.revision = own
                log.warning("%s: a renewal reported as failed had been applied; lease kept", self.holder)
                return await self.renew()
            if await self._lease_vanished():
                try:  # the bucket came back empty (a restarted single NATS server): take the lease again
                    self.revision = await self.kv.create(LEASE_KEY, self._value())
                    self._valid_until = started + self.ttl_s
                    log.warning("%s: the lease key vanished (NATS restarted?): lease taken again", self.holder)
                    return True
                except Exception as exc:
                    log.warning("retaking the vanished lease failed: %r", exc)
            log.error("%s lost the leader lease to another control plane", self.holder)
            self.revision = 0
            return False
        except Exception as exc:  # NATS down or slow: keep trying until the lease may have lapsed
            if time.monotonic() >= self._valid_until:
                log.error("%s could not renew its lease for %.1fs (%r): stepping down", self.holder, self.ttl_s, exc)
                self.revision = 0
                return False
            log.warning("lease renewal failed (%r); retrying", exc)
            return True

    async def _own_revision(self) -> int | None:
        """The lease key's revision when the record there names this holder (None: another's, gone or unread)."""
        assert self.kv is not None
        try:
            entry = await self.kv.get(LEASE_KEY)
            record = msgspec.msgpack.decode(entry.value or b"", type=LeaseRecord)
        except Exception:
            return None
        if record.holder != self.holder or not entry.revision or entry.revision == self.revision:
            return None
        return entry.revision

    async def _lease_vanished(self) -> bool:
        assert self.kv is not None
        try:
            await self.kv.get(LEASE_KEY)
        except KeyNotFoundError:
            return True
        except Exception:
            return False
        return False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the election loop (call from any thread once :meth:`open` ran)."""

        def begin() -> None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
            self._watch_task = loop.create_task(self._watch())

        loop.call_soon_threadsafe(begin)

    async def _watch(self) -> None:
        """Wake the election loop when the lease key changes: a released lease is taken at once, not at the
        next poll. Best effort: polling every renew period is the fallback."""
        assert self.kv is not None
        try:
            watcher = await self.kv.watch(LEASE_KEY, include_history=False)
        except Exception as exc:
            log.debug("no lease watch (%r): polling only", exc)
            return
        try:
            async for _ in watcher:
                if self._wake is not None and not self.revision:
                    self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("lease watch ended (%r): polling only", exc)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(watcher.stop())

    async def _sleep(self) -> None:
        if self._wake is None:
            await asyncio.sleep(self.renew_period_s)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.renew_period_s)
        self._wake.clear()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.revision:
                    if not await self.renew():
                        self.on_lost()
                elif await self.try_acquire():
                    self.on_elected()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the election loop die
                log.warning("leader election step failed: %r", exc)
                if self.revision and time.monotonic() >= self._valid_until:
                    self.revision = 0
                    self.on_lost()
            await self._sleep()

    async def stop(self, *, release: bool = True) -> None:
        """End the election loop; ``release`` hands the lease over at once (else it lapses by TTL)."""
        self._stopping = True
        for task in (self._task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._watch_task = None
        if release and self.revision and self.kv is not None:
            try:
                await self.kv.delete(LEASE_KEY, last=self.revision)
                log.info("%s released the leader lease", self.holder)
            except Exception as exc:
                log.warning("lease release failed (it lapses in %.1fs): %r", self.ttl_s, exc)
        self.revision = 0
