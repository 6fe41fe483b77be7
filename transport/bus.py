"""The bus: one asyncio loop thread per process owns the NATS connection; pykka actors use it from their
own threads through thread-safe, non-blocking calls.

- ``publish`` from any thread schedules the send on the loop and returns at once.
- ``subscribe`` runs a handler *on the loop thread* for every message, already decoded into an
  :class:`Envelope`; handlers must be tiny (hand the envelope to an actor with ``tell``).
- Messages that fail to decode never reach handlers: the bus answers them with an ``ErrorReply`` when the
  sender gave a reply subject (NATS reply or the ``reply_to`` field) and logs them.
- ``request`` returns a ``concurrent.futures.Future`` (for actor threads) and ``arequest`` a coroutine.
- Trace context travels in NATS headers (W3C ``traceparent``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from transport import subjects
from transport.messages import ErrorCode, ErrorReply, Message, ProtocolError, decode, encode, error_version
from transport.nats_auth import NatsAuth, connect_options

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message with its NATS metadata."""

    subject: str
    message: Message
    reply: str = ""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Envelope], Awaitable[None] | None]


@dataclass(slots=True)
class BusOptions:
    url: str
    name: str = "drover"
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    nkey_seed_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    inbox_prefix: str | None = None
    max_reconnect_attempts: int = -1  # forever: a NATS restart must be survived
    reconnect_wait_s: float = 0.25
    ping_interval_s: float = 2.0
    max_outstanding_pings: int = 2

    @classmethod
    def with_auth(cls, url: str, name: str, auth: NatsAuth | None, **kwargs: Any) -> BusOptions:
        """Options connecting as ``auth`` (user/password, nkey seed, creds file, TLS)."""
        a = auth or NatsAuth()
        return cls(
            url=url,
            name=name,
            user=a.user,
            password=a.password,
            creds_file=a.creds_file,
            tls_ca_file=a.tls_ca_file,
            nkey_seed_file=a.nkey_seed_file,
            tls_cert_file=a.tls_cert_file,
            tls_key_file=a.tls_key_file,
            tls_hostname=a.tls_hostname,
            **kwargs,
        )


def _error_target(msg: Msg, data: bytes) -> str | None:
    if msg.reply:
        return msg.reply
    with contextlib.suppress(Exception):
        raw = msgspec.msgpack.decode(data)
        if isinstance(raw, dict) and isinstance(raw.get("reply_to"), str) and raw["reply_to"]:
            return str(raw["reply_to"])
    return None


class Bus:
    def __init__(self, options: BusOptions, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: run on an existing event loop (start with :meth:`astart` from inside it) instead of a
        loop thread of the bus's own (start with :meth:`start`)."""
        self.options = options
        self._own_loop = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"bus-{options.name}", daemon=True)
        self._nc: NatsClient | None = None
        self._subscriptions: list[Subscription] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        self.rejected_messages = 0
        self.refused_replies = 0  # error replies not sent: the target lay outside the sender's own inbox
        self.reconnects = 0
        self.disconnected_at = 0.0  # time.time() of the last lost connection
        self._stopped = False  # stop() ran: run() schedules nothing more on the loop

    # ----------------------------------------------------------------------------------------------- lifecycle
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> Bus:
        if not self._own_loop:
            raise RuntimeError("a bus on an existing loop starts with `await bus.astart()`")
        self._thread.start()
        self.run(self._connect()).result(timeout=self.options.connect_timeout_s + 5)
        return self

    async def astart(self) -> Bus:
        """Connect from inside the bus's loop (a bus created with ``loop=``)."""
        await self._connect()
        return self

    async def astop(self) -> None:
        await self._close()

    async def _connect(self) -> None:
        opts = self.options
        kwargs: dict[str, Any] = {
            "servers": opts.url.split(","),
            "name": opts.name,
            "connect_timeout": opts.connect_timeout_s,
            "max_reconnect_attempts": opts.max_reconnect_attempts,
            "reconnect_time_wait": opts.reconnect_wait_s,
            "ping_interval": opts.ping_interval_s,
            "max_outstanding_pings": opts.max_outstanding_pings,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        kwargs.update(
            connect_options(
                NatsAuth(
                    user=opts.user,
                    password=opts.password,
                    nkey_seed_file=opts.nkey_seed_file,
                    creds_file=opts.creds_file,
                    tls_ca_file=opts.tls_ca_file,
                    tls_cert_file=opts.tls_cert_file,
                    tls_key_file=opts.tls_key_file,
                    tls_hostname=opts.tls_hostname,
                )
            )
        )
        if opts.inbox_prefix:
            kwargs["inbox_prefix"] = opts.inbox_prefix
        self._nc = await nats.connect(**kwargs)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats error (%s): %s", self.options.name, exc)

    async def _on_disconnected(self) -> None:
        self.disconnected_at = time.time()
        log.warning("nats disconnected (%s)", self.options.name)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        log.info("nats reconnected (%s) to %s", self.options.name, self._nc.connected_url if self._nc else "?")
        for hook in list(self._reconnect_hooks):
            try:
                hook()
            except Exception:
                log.exception("reconnect hook failed (%s)", self.options.name)

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on the loop thread after every reconnect (subscriptions are already back); it must
        not block: schedule work (``loop.create_task``, an actor ``tell``)."""
        self._reconnect_hooks.append(hook)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the connection, cancel every task left on the loop and wait for them, then stop the loop: a
        loop stopped under pending tasks drops them silently ("Task was destroyed but it is pending")."""
        if not self._own_loop:
            raise RuntimeError("a bus on an existing loop stops with `await bus.astop()`")
        if not self._thread.is_alive():
            self._stopped = True
            if self._thread.ident is not None and not self.loop.is_running() and not self.loop.is_closed():
                # its loop was stopped from outside (a kill -9 stand-in in tests): end its tasks here
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    self.loop.run_until_complete(self._shutdown(timeout_s))
            return
        with contextlib.suppress(Exception):
            self.run(self._shutdown(timeout_s)).result(timeout=timeout_s + 3)
        self._stopped = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)

    async def _shutdown(self, timeout_s: float) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._close(), timeout_s)
        current = asyncio.current_task()
        deadline = time.monotonic() + 2.0
        # Cancel in rounds: a task whose library call turned the CancelledError into an ordinary error (a NATS
        # publish on a closing connection does) and retries is cancelled again at its next await.
        while True:
            tasks = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
            if not tasks or time.monotonic() >= deadline:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    async def _close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("bus not connected")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # ----------------------------------------------------------------------------------------------- helpers
    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the bus loop from any thread. Once the bus is stopped the coroutine is closed
        unrun and the future fails (scheduled on a dead loop it would be dropped with "never awaited")."""
        if self._stopped:
            coro.close()
            failed: concurrent.futures.Future[T] = concurrent.futures.Future()
            failed.set_exception(RuntimeError(f"bus {self.options.name} is stopped"))
            return failed
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # ----------------------------------------------------------------------------------------------- publish
    def publish(
        self, subject: str, message: Message, *, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        """Send ``message``; thread-safe and non-blocking (errors are logged, not raised)."""
        self.publish_raw(subject, encode(message), headers=headers, reply=reply)

    def publish_raw(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None, reply: str = "") -> None:
        if self.in_loop():
            self.loop.create_task(self._publish(subject, data, headers, reply))
        else:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._publish(subject, data, headers, reply)))

    async def apublish(
        self, subject: str, message: Message, *, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        """Send on the loop; awaiting it keeps per-caller ordering (nats-py buffers, no round trip)."""
        await self._publish(subject, encode(message), headers, reply)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None, reply: str) -> None:
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers or None)
        except Exception as exc:  # a bad subject or a closed connection must not kill the loop
            log.warning("publish to %s failed: %s", subject, exc)

    def reply_error(self, target: str | None, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        """Errors go at the oldest version that has their code: every supported peer can read them."""
        if target:
            self.publish(target, ErrorReply(code=code, message=message, request_id=request_id, v=error_version(code)))

    # ----------------------------------------------------------------------------------------------- subscribe
    def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> None:
        """Deliver decoded messages on ``subject`` to ``handler`` (on the loop thread). Blocks until set up."""
        self.run(self.asubscribe(subject, handler, queue=queue)).result(timeout=10)

    async def asubscribe(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        async def callback(msg: Msg) -> None:
            envelope = self._decode(msg)
            if envelope is None:
                return
            try:
                result = handler(envelope)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handler for %s failed on %s", subject, type(envelope.message).__name__)

        sub = await self.nc.subscribe(
            subject, queue=queue, cb=callback, pending_msgs_limit=1_000_000, pending_bytes_limit=512 << 20
        )
        self._subscriptions.append(sub)
        return sub

    def _decode(self, msg: Msg) -> Envelope | None:
        headers = dict(msg.headers or {})
        try:
            message = decode(msg.data)
        except ProtocolError as exc:
            self.rejected_messages += 1
            target = _error_target(msg, msg.data)
            log.warning("rejected message on %s (%s): %s", msg.subject, exc.code, exc)
            identity = subjects.client_identity(msg.subject)
            if target and identity is not None and not subjects.reply_target_allowed(identity, target):
                # a client's message: its error goes only to its own inbox (docs/security.md)
                log.warning("not answering %r: %r is outside its own inbox", identity, target[:300])
                self.refused_replies += 1
                target = None
            self.reply_error(target, exc.code, str(exc), exc.request_id)
            return None
        return Envelope(subject=msg.subject, message=message, reply=msg.reply or "", headers=headers)

    # ----------------------------------------------------------------------------------------------- request
    async def arequest(
        self,
        subject: str,
        message: Message,
        *,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """Request/reply; raises ``TimeoutError`` or ``nats.errors.NoRespondersError``."""
        reply = await self.nc.request(
            subject,
            encode(message),
            timeout=timeout_s or self.options.request_timeout_s,
            headers=headers or None,
        )
        return decode(reply.data)

    def request(
        self, subject: str, message: Message, *, timeout_s: float | None = None
    ) -> concurrent.futures.Future[Message]:
        return self.run(self.arequest(subject, message, timeout_s=timeout_s))
