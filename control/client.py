"""The Python client: submit requests over NATS and stream their tokens back.

Any NATS client in any language can do the same (see the README's wire schema): publish a msgpack
``SubmitRequest`` on ``drover.v1.submit.<client id>`` (protocol v3: the subject only your NATS user may
publish on) with ``reply_to`` set to an inbox under ``drover.v1.inbox.<client id>.`` that you subscribe to,
and read ``Accepted``, ``TokenChunk``s and a final ``RequestDone`` (or ``ErrorReply``) from it. Chunks carry
their index: the client drops duplicates and reorders, so each token is delivered once, in order. Each
request gets its own inbox ending in a random nonce; a message on it is delivered only when it carries the
request's id (anything else is dropped and logged: ``RequestStream.dropped``).

Resume (after a client restart or lost connection): :meth:`DroverClient.resume` subscribes the request's
inbox again, asks the control plane for what was already sent there (``ReplayRequest`` on
``drover.v1.replay.<client id>``: it reads the JetStream output stream for you, since clients may create no
consumers), delivers tokens from ``resume_from`` on, then the live ones, each once.
The README's "Resuming a stream" gives the same steps for clients in other languages.

Repair (one mechanism, :meth:`DroverClient._watch`): every open stream (submitted or resumed) is watched; one
that looks damaged (this connection reconnected, a gap in the chunk indexes lasts ``REPAIR_AFTER_S``, a
``RequestDone`` announced more tokens than arrived, a running request is silent for ``SILENT_REPAIR_S``, or
a submission got no ``Accepted`` / a "no responders" status) replays its inbox from the output stream; a
submission that left no trace there is sent again with the same request id (Drover runs an id once). Chunks
lost for good are filled from the final ``RequestDone`` (it carries every output token).

Reads (``status``, ``autoscale_status``, ``policy`` without changes) are asked again while no control plane
answers (a takeover, a lapsed lease) until their timeout, then fail with :class:`NoAnswerError`; commands
(migrate, drain, set_phase, memory, policy changes) are sent once.

Liveness: unless ``liveness=False``, a request's client answers probes on ``subjects.alive(inbox)``; when
nothing answers there for ``lifecycle.client_gone_after_s``, Drover stops the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import itertools
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from control.errors import DroverError
from observability import spans
from observability.tracing import inject_headers, tracer
from transport import subjects
from transport.messages import (
    Accepted,
    AdminReply,
    AutoscaleStatusQuery,
    AutoscaleStatusReply,
    Cancel,
    CancelAck,
    DrainCommand,
    ErrorCode,
    ErrorReply,
    MemoryCommand,
    Message,
    MigrateCommand,
    PhaseCommand,
    PolicyQuery,
    PolicyUpdate,
    ProtocolError,
    ReplayReply,
    ReplayRequest,
    RequestClass,
    RequestDone,
    SamplingParams,
    StatusQuery,
    StatusReply,
    SubmitRequest,
    TokenChunk,
    decode,
    encode,
)
from transport.nats_auth import NatsAuth, connect_options

if TYPE_CHECKING:
    from control.settings import NatsSettings

log = logging.getLogger(__name__)
PERMISSION_DENIED = "permission_denied"
"""``DroverError.code`` when the NATS server refused this user a subject (client-side only, never on the wire)."""
_VIOLATION = re.compile(r'permissions violation for (?:publish to|subscription to) "([^"]+)"', re.IGNORECASE)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


NO_CONTROL_PLANE_RETRY_S = 15.0
"""How long a submission nobody takes ("no responders": e.g. during a control-plane takeover, which lasts at
most the lease TTL + renew period, 4 s by default, or the control plane reconnecting after a NATS fault) is
sent again before the stream fails with OVERLOADED."""
# Stream repair (see DroverClient._watch): how long a gap, a silent request or a short RequestDone may last
# before the client replays its inbox from the output stream, and how long it keeps trying before it gives up.
REPAIR_AFTER_S = 1.0
SILENT_REPAIR_S = 5.0  # a running request that sent nothing for this long is replayed too
# No Accepted yet: with control-plane HA, Accepted waits for the request's record to be stored in JetStream
# KV, which on a loaded host takes over a second; repairing sooner only resubmits (harmlessly) what runs.
UNACKNOWLEDGED_REPAIR_S = 3.0
REPAIR_GIVE_UP_S = 15.0
# Read-only questions (status, autoscale status, reading the policy) are asked again until the caller's timeout
# is spent: while a lone control plane's lease lapses (its loop starved past ha.lease_ttl_s) it answers
# nothing for a moment, then leads again. A try waits a third of the timeout (READ_TRY_MIN_S to READ_TRY_MAX_S)
# for an answer; the next one uses the same inbox, so an answer that comes late still counts and a short wait
# costs only a repeated question. After "no responders" (nobody subscribed) the next try waits READ_PAUSE_S,
# doubling up to READ_PAUSE_MAX_S.
READ_TRIES = 3
READ_TRY_MIN_S = 1.0
READ_TRY_MAX_S = 5.0
READ_PAUSE_S = 0.1
READ_PAUSE_MAX_S = 1.0


class ReplyError(DroverError):
    """An error reply from Drover; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None = None) -> None:
        super().__init__(message, code=str(code), request_id=request_id)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NoAnswerError(DroverError, TimeoutError):
    """No control plane answered a read-only question within the caller's timeout, though it was asked again
    after every "no responders" and every try left unanswered. A ``TimeoutError`` too, as a single
    unanswered request was before."""

    default_code = "no_answer"

    def __init__(self, subject: str, timeout_s: float, no_responders: int, unanswered: int) -> None:
        tries = no_responders + unanswered
        outcomes = ", ".join(
            part
            for part in (
                f"{no_responders} with no responders" if no_responders else "",
                f"{unanswered} unanswered" if unanswered else "",
            )
            if part
        )
        super().__init__(
            f"no control plane answered {subject} in {timeout_s:.1f} s "
            f"({tries} {'try' if tries == 1 else 'tries'}: {outcomes})"
        )
        self.subject = subject
        self.timeout_s = timeout_s
        self.tries = tries


@dataclass(slots=True)
class StreamEvent:
    """One delivery to the caller: new tokens (in order, no duplicates) with their arrival time."""

    index: int
    token_ids: list[int]
    text: str
    instance_id: str
    received_at: float


@dataclass(slots=True)
class RequestResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: RequestDone | None = None
    accepted: Accepted | None = None
    submitted_at: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each token (perf_counter)
    transit_s: list[float] = field(default_factory=list)  # engine -> client delay of each chunk (wall clock)
    instances: list[str] = field(default_factory=list)  # instance of each chunk, in order

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.submitted_at if self.token_times else float("nan")

    @property
    def inter_token_s(self) -> list[float]:
        """One gap per token after the first: a chunk of n tokens that arrived d after the previous chunk
        gives n gaps of d/n (tokens that travel together share the wait, as in vLLM's serving benchmark)."""
        chunks = [(at, len(list(group))) for at, group in itertools.groupby(self.token_times)]
        gaps: list[float] = []
        for (previous, _), (at, n) in itertools.pairwise(chunks):
            gaps.extend([(at - previous) / n] * n)
        return gaps


class RequestStream:
    """A submitted request: iterate it for tokens; ``result()`` waits for the end."""

    def __init__(
        self,
        client: DroverClient,
        request_id: str | None,
        submitted_at: float,
        inbox: str = "",
        resume_from: int = 0,
    ) -> None:
        self._client = client
        self.request_id = request_id
        self.submitted_at = submitted_at
        self.inbox = inbox  # keep it (with request_id) to resume this stream from another connection
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._next_index = resume_from  # tokens below it are the caller's already: dropped
        self._replaying = False
        self._live_buffer: list[Message] = []  # live messages that arrive while the output stream replays
        self._alive_subscription: Subscription | None = None
        self._held: dict[int, TokenChunk] = {}  # chunks that arrived ahead of a gap
        self.accepted: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self.result_data = RequestResult(request_id=request_id or "", submitted_at=submitted_at)
        self._subscription: Subscription | None = None
        self._finished = False
        self._submit: tuple[bytes, dict[str, str]] | None = None  # the encoded submit, for a retry
        self._last_message_at = time.monotonic()
        self._gap_since: float | None = None  # a chunk is held ahead of a gap since then
        self._pending_done: RequestDone | None = None  # arrived while tokens were still missing
        self._pending_done_at = 0.0
        self._needs_repair = False
        self._no_responders_since: float | None = None  # first "no responders" status on the inbox
        self.repairs = 0  # inbox replays from the output stream
        self.resubmits = 0
        self.filled_tokens = 0  # tokens taken from RequestDone because their chunks never came
        self.raw_chunks: list[tuple[int, int]] = []  # (index, length) of every chunk received, duplicates too
        self.dropped = 0  # messages on this inbox that were not this request's (dropped and logged)

    def belongs(self, message: Message) -> bool:
        """Is ``message`` this request's? Every reply names its request; one without a request id is only
        taken while none is known yet (an error before acceptance)."""
        request_id = getattr(message, "request_id", None)
        if request_id == self.request_id or (request_id is None and isinstance(message, ErrorReply)):
            return True
        self.dropped += 1
        log.warning(
            "dropped a %s for request %r on the inbox of request %r",
            type(message).__name__,
            request_id,
            self.request_id,
        )
        return False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def next_index(self) -> int:
        """Output index of the next token to deliver: what to pass as ``resume_from`` after a restart."""
        return self._next_index

    def _on_live(self, message: Message) -> None:
        if self._replaying:  # keep order: a live RequestDone must not overtake replayed chunks
            self._live_buffer.append(message)
        else:
            self._deliver(message)

    def _on_no_responders(self) -> None:
        """A "no responders" status on the inbox: nobody took the submission (a control-plane takeover, or
        the control plane reconnecting after a NATS fault). Not an answer: the watchdog submits it again."""
        if self._no_responders_since is None:
            self._no_responders_since = time.monotonic()
        self._needs_repair = True

    async def _replay(self) -> int:
        """Deliver what the output stream holds for this inbox, then what arrived live meanwhile (duplicates
        by index are dropped by the usual reassembly). Returns how many stored messages were this request's."""
        if self._finished or self._replaying:
            return 0
        self._replaying = True
        stored = 0
        try:
            for data in await self._client.read_inbox(self.inbox):
                try:
                    message = decode(data)
                except ProtocolError:
                    continue
                if self.belongs(message):
                    self._deliver(message)
                    stored += 1
        finally:
            self._replaying = False
            buffered, self._live_buffer = self._live_buffer, []
            for message in buffered:
                self._deliver(message)
        return stored

    def _deliver(self, message: Message) -> None:
        self._last_message_at = time.monotonic()
        if isinstance(message, Accepted):  # resolved at once, so cancel() works without iterating
            self.request_id = self.result_data.request_id = message.request_id
            self.result_data.accepted = message
            if not self.accepted.done():
                self.accepted.set_result(message)
            return
        if isinstance(message, ErrorReply) and not self.accepted.done():  # refused: `accepted` fails at once
            self.accepted.set_exception(ReplyError(message.code, message.message, message.request_id))
            self.accepted.exception()  # mark retrieved: events() raises it too
        self._queue.put_nowait(message)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Token deliveries, each token once and in order; raises DroverError on an error reply.

        Breaking out and iterating again later resumes where it left off (the inbox stays subscribed
        until the request ends)."""
        while not self._finished:
            message = await self._queue.get()
            if isinstance(message, TokenChunk):
                for event in self._on_chunk(message):
                    yield event
                if self._pending_done is not None and self._next_index >= self._pending_done.num_tokens:
                    await self._finish(self._pending_done)
            elif isinstance(message, _GiveUp):
                if self._pending_done is not None:
                    await self._finish(self._pending_done)  # tokens stay missing: result shows how many
            elif isinstance(message, RequestDone):
                if len(message.output_token_ids) > self._next_index:
                    # Chunks lost on the way (a NATS node died holding them): the reply carries every token.
                    fill = TokenChunk(
                        request_id=message.request_id,
                        index=self._next_index,
                        token_ids=message.output_token_ids[self._next_index :],
                        instance_id=(message.instances or [""])[-1],
                    )
                    self.filled_tokens += len(fill.token_ids)
                    for event in self._on_chunk(fill):
                        yield event
                if message.num_tokens > self._next_index and message.finish_reason != "abort":
                    # Tokens were lost on the way (a NATS node died holding them): repair first.
                    if self._pending_done is None:
                        self._pending_done, self._pending_done_at = message, time.monotonic()
                        self._needs_repair = True
                    continue
                await self._finish(message)
            elif isinstance(message, ErrorReply):
                self._finished = True
                await self.close()
                error = ReplyError(message.code, message.message, message.request_id)
                if not self.accepted.done():
                    self.accepted.set_exception(error)
                    self.accepted.exception()  # mark retrieved: the caller gets it from events()
                raise error

    async def _finish(self, done: RequestDone) -> None:
        self.result_data.done = done
        self._finished = True
        await self.close()

    def _on_chunk(self, chunk: TokenChunk) -> list[StreamEvent]:
        now = time.perf_counter()
        self.raw_chunks.append((chunk.index, len(chunk.token_ids)))
        if chunk.produced_at:
            self.result_data.transit_s.append(time.time() - chunk.produced_at)
        end = chunk.index + len(chunk.token_ids)
        if end <= self._next_index:
            return []  # a duplicate (e.g. replayed after migration or failover)
        if chunk.index > self._next_index:
            self._held[chunk.index] = chunk  # arrived ahead of a gap: hold until the gap fills
            self._gap_since = self._gap_since or time.monotonic()
            return []
        events = []
        pending: TokenChunk | None = chunk
        while pending is not None:
            skip = self._next_index - pending.index
            tokens = pending.token_ids[skip:]
            if tokens:
                events.append(
                    StreamEvent(self._next_index, tokens, pending.text if skip == 0 else "", pending.instance_id, now)
                )
                self.result_data.token_ids.extend(tokens)
                self.result_data.text += pending.text if skip == 0 else ""
                self.result_data.token_times.extend([now] * len(tokens))
                self.result_data.instances.append(pending.instance_id)
                self._next_index += len(tokens)
            pending = self._held.pop(self._next_index, None)
            for index in [i for i, c in self._held.items() if i + len(c.token_ids) <= self._next_index]:
                del self._held[index]  # wholly covered by what was delivered meanwhile
            if pending is None:
                pending = next((c for i, c in self._held.items() if i < self._next_index), None)
                if pending is not None:
                    del self._held[pending.index]
        self._gap_since = (self._gap_since or time.monotonic()) if self._held else None
        return events

    def _repair_due(self, now: float) -> bool:
        """Whether this stream looks damaged: a gap, a RequestDone ahead of its tokens, a reconnect, a
        "no responders" status, or silence (a submit or its Accepted lost with a NATS node)."""
        if self._finished:
            return False
        if self._needs_repair:
            return True
        if self._gap_since is not None and now - self._gap_since > REPAIR_AFTER_S:
            return True
        silent_s = now - self._last_message_at
        return silent_s > (SILENT_REPAIR_S if self.accepted.done() else UNACKNOWLEDGED_REPAIR_S)

    async def result(self) -> RequestResult:
        async for _ in self.events():
            pass
        return self.result_data

    async def cancel(self, timeout_s: float = 5.0) -> None:
        accepted = await asyncio.wait_for(asyncio.shield(self.accepted), timeout_s)
        await self._client.cancel(accepted.request_id, accepted.cancel_token, timeout_s=timeout_s)

    async def close(self) -> None:
        self._client._streams.pop(self.inbox, None)
        for name in ("_subscription", "_alive_subscription"):
            sub = getattr(self, name)
            if sub is not None:
                setattr(self, name, None)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


@dataclass(frozen=True, slots=True)
class _GiveUp:
    """Internal: repairs did not bring the missing tokens back; finish with what arrived."""


class DroverClient:
    def __init__(
        self,
        url: str,
        *,
        name: str = "drover-client",
        inbox_prefix: str | None = None,
        nats_settings: NatsSettings | None = None,
        operator: str | None = None,
    ) -> None:
        """``inbox_prefix`` defaults to ``drover.v1.inbox.<client id>``: replies there are kept in the output
        stream, which is what lets Drover resume a request whose engine died. ``nats_settings`` (the settings'
        ``[nats]`` section) gives the credentials, TLS and the client id (its ``client_id``, else ``name``).
        ``operator`` names who sends admin commands, for the control plane's audit log (default: the OS user)."""
        self.url = url
        self.name = name
        self.nats_settings = nats_settings
        self.operator = operator or _os_user()
        client_id = nats_settings.client_id if nats_settings is not None else None
        self.inbox_prefix = inbox_prefix or subjects.client_inbox_prefix(
            client_id or re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64] or "client"
        )
        # who this client is to the control plane (protocol v3): the id token of its inbox; its NATS user may
        # publish only on the subjects that end in it. None (an inbox outside drover.v1.inbox): v2 subjects.
        self.identity = subjects.inbox_owner(self.inbox_prefix + ".x")
        self._nc: NatsClient | None = None
        self._denied: set[str] = set()  # subjects the server refused this user (permissions violations)
        self._streams: dict[str, RequestStream] = {}  # inbox -> open stream (watched and repaired)
        self._watchdog: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.read_retries = 0  # read-only questions asked again (no responders, or a try left unanswered)

    async def _on_error(self, exc: Exception) -> None:
        found = _VIOLATION.search(str(exc))
        if found:
            self._denied.add(found.group(1).lower())
            log.warning("nats (%s): %s", self.name, exc)
        else:
            log.debug("nats error (%s): %s", self.name, exc)

    async def connect(self, **kwargs: object) -> DroverClient:
        """Connect to every server of ``url`` (comma-separated: a NATS cluster) and, unless ``kwargs`` say
        otherwise, reconnect forever: after a reconnect every open request's inbox is replayed from the
        output stream, so nothing sent while this client was away is missed."""
        auth = connect_options(self.nats_settings.auth()) if self.nats_settings is not None else {}
        ns = self.nats_settings
        user_reconnected = kwargs.pop("reconnected_cb", None)

        async def reconnected() -> None:
            await self._on_reconnected()
            if callable(user_reconnected):
                await user_reconnected()

        options: dict[str, object] = {
            "servers": self.url.split(","),
            "name": self.name,
            "error_cb": self._on_error,
            "reconnected_cb": reconnected,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": ns.reconnect_wait_s if ns is not None else 0.25,
            "ping_interval": ns.ping_interval_s if ns is not None else 2,
            "max_outstanding_pings": ns.max_outstanding_pings if ns is not None else 2,
            **auth,
            **kwargs,
        }
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        self._nc = await nats.connect(**options)  # type: ignore[arg-type]
        if self.nats_settings is not None and self.nats_settings.auth() != NatsAuth():
            try:
                await self._check_inbox()
            except BaseException:
                await self.nc.close()
                self._nc = None
                raise
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _check_inbox(self) -> None:
        """With credentials, check once that this user may read its inbox (a wrong ``client_id`` would
        otherwise make every request wait forever for replies it cannot receive)."""
        probe = f"{self.inbox_prefix}.probe"
        sub = await self.nc.subscribe(probe)
        # Two flushes: nats-py writes a flush's PING straight to the socket, ahead of the SUB still in its write
        # buffer, so the first PONG can come before the server has even read the SUB. Its flusher task writes the
        # SUB while we wait; the second PING follows it, so the server's -ERR, if any, comes before that PONG
        # (nats-py runs the error callback for a permissions violation before it reads on).
        await self.nc.flush(timeout=5)
        await self.nc.flush(timeout=5)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if probe.lower() in self._denied:
            raise ReplyError(
                PERMISSION_DENIED,
                f"this NATS user may not read {self.inbox_prefix}: set nats.client_id to the user's client id",
            )

    async def _request(self, subject: str, data: bytes, timeout_s: float) -> Msg:
        """Request/reply; a subject the server refused this user gives a clear error instead of a timeout."""
        try:
            return await self.nc.request(subject, data, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            self._raise_if_denied(subject)
            raise

    def _raise_if_denied(self, subject: str) -> None:
        """A request that got no answer because the server refused this user the subject: say so."""
        if subject.lower() in self._denied:
            raise ReplyError(
                PERMISSION_DENIED,
                f"this NATS user may not publish to {subject} (admin commands need operator credentials)",
            ) from None

    async def _read(self, subject: str, data: bytes, timeout_s: float) -> Msg:
        """Request/reply for a read-only question, asked again until ``timeout_s`` is spent: after a "no
        responders" status (no control plane subscribed: a lapsed lease, a takeover) following a short pause,
        and after a try left unanswered for a third of ``timeout_s``, 1 to 5 s (a control plane whose lease
        lapsed drops what it was asked meanwhile). Every try uses one inbox: a late answer to any try counts.
        Raises :class:`NoAnswerError` naming the tries; never use it for a command that changes something."""
        started = time.monotonic()
        deadline = started + timeout_s
        try_s = min(READ_TRY_MAX_S, max(READ_TRY_MIN_S, timeout_s / READ_TRIES))
        pause = READ_PAUSE_S
        answers: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_answer(msg: Msg) -> None:
            answers.put_nowait(msg)

        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=on_answer)
        no_responders = unanswered = 0
        try:
            while True:
                await self.nc.publish(subject, data, reply=sub.subject)
                try_ends = min(deadline, time.monotonic() + try_s)
                try:
                    answer = await asyncio.wait_for(answers.get(), max(0.0, try_ends - time.monotonic()))
                except TimeoutError:
                    self._raise_if_denied(subject)
                    unanswered += 1
                else:
                    if answer.data or not answer.headers or answer.headers.get("Status") != "503":
                        return answer
                    no_responders += 1
                    await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                    pause = min(pause * 2, READ_PAUSE_MAX_S)
                if time.monotonic() >= deadline:
                    raise NoAnswerError(subject, timeout_s, no_responders, unanswered)
                self.read_retries += 1
                log.info("no answer on %s yet (%d tries): asking again", subject, no_responders + unanswered)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_reconnected(self) -> None:
        """nats-py resubscribed; chunks sent while we were away are in the output stream: the watchdog
        replays every open stream at its next period."""
        self.reconnects += 1
        for stream in self._streams.values():
            stream._needs_repair = True

    async def _watch(self, period_s: float = 0.25) -> None:
        """Repair damaged streams (see :meth:`RequestStream._repair_due`): replay the inbox from the output
        stream (JetStream keeps what was sent there), resubmit a request that left no trace (same request
        id: Drover runs it once), and give up on tokens that never come back after ``REPAIR_GIVE_UP_S``."""
        last_repair: dict[str, float] = {}
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            due: list[RequestStream] = []
            for inbox, stream in list(self._streams.items()):
                if stream.finished:
                    self._streams.pop(inbox, None)
                    last_repair.pop(inbox, None)
                elif stream._repair_due(now) and now - last_repair.get(inbox, 0.0) >= REPAIR_AFTER_S:
                    due.append(stream)
            for inbox in [i for i in last_repair if i not in self._streams]:
                del last_repair[inbox]
            if not due or self._nc is None or not self._nc.is_connected:
                continue
            for stream in due:
                last_repair[stream.inbox] = now
            await asyncio.gather(*(self._repair_logged(stream, now) for stream in due))

    async def _repair_logged(self, stream: RequestStream, now: float) -> None:
        try:
            await self._repair(stream)
        except Exception as exc:  # no JetStream, a stream leader election: retried at the next period
            log.warning("repair of %s failed: %s", stream.request_id, exc)
            if stream._no_responders_since is not None:  # nothing to replay: still resend the submission
                with contextlib.suppress(Exception):
                    await self._resubmit(stream)
        if stream._pending_done is not None and now - stream._pending_done_at > REPAIR_GIVE_UP_S:
            stream._queue.put_nowait(_GiveUp())  # type: ignore[arg-type]

    async def _repair(self, stream: RequestStream) -> None:
        stream._needs_repair = False
        stream.repairs += 1
        stored = await stream._replay()
        if not stored and not stream.accepted.done():
            await self._resubmit(stream)

    async def _resubmit(self, stream: RequestStream) -> None:
        """Submit again (same request id) what left no trace; fail it once nobody took it for too long."""
        if stream._submit is None or stream.accepted.done() or stream.finished:
            return
        since = stream._no_responders_since
        if since is not None and time.monotonic() - since > NO_CONTROL_PLANE_RETRY_S:
            text = "no control plane took the request (is one running?); retry with the same request_id"
            stream._on_live(ErrorReply(code=ErrorCode.OVERLOADED, message=text, request_id=stream.request_id))
            return
        payload, headers = stream._submit
        stream.resubmits += 1
        log.info("request %s left no trace: submitting it again", stream.request_id)
        await self.nc.publish(self._subject("submit"), payload, reply=stream.inbox, headers=headers or None)

    def _subject(self, verb: str) -> str:
        """This client's own subject for ``verb`` (submit, cancel, status, replay), or the v2 one."""
        if self.identity is None:
            return {"submit": subjects.SUBMIT, "cancel": subjects.CANCEL, "status": subjects.STATUS}[verb]
        return {
            "submit": subjects.submit,
            "cancel": subjects.cancel,
            "status": subjects.status,
            "replay": subjects.replay,
        }[verb](self.identity)

    async def read_inbox(self, inbox: str, timeout_s: float = 10.0) -> list[bytes]:
        """What the output stream holds for one of this client's inboxes, oldest first: the control plane reads
        it for us (clients may create no JetStream consumers, docs/security.md)."""
        if self.identity is None:
            raise DroverError(
                f"only inboxes under {subjects.INBOX_ROOT} can be replayed", code=ErrorCode.INVALID_REQUEST
            )
        stored: list[bytes] = []
        while True:
            reply = await self._request(
                self._subject("replay"), encode(ReplayRequest(inbox=inbox, start=len(stored))), timeout_s
            )
            answer = decode(reply.data)
            if isinstance(answer, ErrorReply):
                raise DroverError(answer.message, code=answer.code)
            if not isinstance(answer, ReplayReply):
                raise DroverError(f"unexpected reply {type(answer).__name__}", code=ErrorCode.INTERNAL)
            stored += answer.messages
            if not answer.more or not answer.messages:
                return stored

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def __aenter__(self) -> DroverClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """The NATS connection is up (false while reconnecting, and before connect/after close)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("client not connected: call connect()")
        return self._nc

    async def submit(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        request_class: RequestClass = RequestClass.INTERACTIVE,
        model: str | None = None,
        client_id: str | None = None,
        deadline_s: float | None = None,
        liveness: bool = True,
    ) -> RequestStream:
        """Publish a request and return its stream (tokens start flowing at once). ``client_id`` says on
        whose behalf (a gateway submits for many clients); default: this client's name. ``deadline_s``:
        generation stops (DEADLINE_EXCEEDED) that long after Drover received it. ``liveness``: answer
        Drover's probes, so the request stops when this client is gone."""
        # its own inbox, ending in a random nonce nobody else can guess (nats-py's NUIDs are not secret)
        inbox = f"{self.inbox_prefix}.{secrets.token_hex(12)}"
        request_id = request_id or uuid.uuid4().hex  # ours, so a retry after a lost submit runs once
        stream = RequestStream(self, request_id, time.perf_counter(), inbox)
        await self._subscribe(stream, liveness, stream._on_no_responders)
        submit = SubmitRequest(
            reply_to=inbox,
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling or SamplingParams(max_tokens=max_tokens, temperature=temperature),
            priority=priority,
            request_class=request_class,
            model=model,
            client_id=client_id or self.name,
            deadline_s=deadline_s,
            liveness=liveness,
        )
        with tracer().start_as_current_span(
            spans.CLIENT_SUBMIT,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                spans.MESSAGING_SYSTEM: "nats",
                spans.MESSAGING_DESTINATION: self._subject("submit"),
                spans.REQUEST_ID: request_id,  # `drover trace ID` finds the client's side too
            },
        ):
            headers = inject_headers()
        payload = encode(submit)
        stream._submit = (payload, headers)
        await self.nc.publish(self._subject("submit"), payload, reply=inbox, headers=headers)
        return stream

    async def _subscribe(
        self, stream: RequestStream, liveness: bool, on_no_responders: Callable[[], None] | None = None
    ) -> None:
        async def on_message(msg: Msg) -> None:
            if on_no_responders is not None and not msg.data and msg.headers and msg.headers.get("Status") == "503":
                on_no_responders()
                return
            if msg.subject != stream.inbox:  # only this request's inbox (its nonce), never a wildcard match
                stream.dropped += 1
                log.warning("dropped a message on %s: not the inbox of request %r", msg.subject, stream.request_id)
                return
            try:
                message = decode(msg.data)
            except ProtocolError as exc:
                stream.dropped += 1
                log.warning("dropped an undecodable message on the inbox of request %r: %s", stream.request_id, exc)
                return
            if stream.belongs(message):
                stream._on_live(message)

        async def on_probe(msg: Msg) -> None:
            if msg.reply:
                await self.nc.publish(msg.reply, b"")

        if liveness:  # first: the request must never look gone while the inbox is read
            stream._alive_subscription = await self.nc.subscribe(subjects.alive(stream.inbox), cb=on_probe)
        stream._subscription = await self.nc.subscribe(stream.inbox, cb=on_message)
        self._streams[stream.inbox] = stream

    async def resume(
        self,
        request_id: str,
        inbox: str,
        *,
        resume_from: int = 0,
        cancel_token: str | None = None,
        liveness: bool = True,
    ) -> RequestStream:
        """Pick up a request submitted earlier (by this or another connection) on ``inbox``: tokens from
        output index ``resume_from`` on, each once and in order, first from the output stream, then live.

        The request must have been submitted with an inbox under ``drover.v1.inbox`` (the default), and be
        resumed within ``reliability.output_retention_s``; with liveness, within
        ``lifecycle.client_gone_after_s`` of the old connection's end, or Drover will have stopped it
        (the stream then ends with CLIENT_GONE). ``cancel_token`` makes ``stream.cancel()`` work."""
        if not inbox.startswith(subjects.INBOX_ROOT + "."):
            raise ValueError(f"only inboxes under {subjects.INBOX_ROOT} are kept in the output stream")
        stream = RequestStream(self, request_id, time.perf_counter(), inbox, resume_from)
        if cancel_token is not None:
            stream._deliver(Accepted(request_id=request_id, cancel_token=cancel_token, prompt_tokens=0))
        await self._subscribe(stream, liveness)
        await stream._replay()
        return stream

    async def generate(self, prompt: str | None = None, **kwargs: object) -> RequestResult:
        """Submit and wait for the whole result."""
        stream = await self.submit(prompt, **kwargs)  # type: ignore[arg-type]
        return await stream.result()

    async def cancel(self, request_id: str, cancel_token: str, *, timeout_s: float = 5.0) -> None:
        reply = await self._request(
            self._subject("cancel"), encode(Cancel(request_id=request_id, cancel_token=cancel_token)), timeout_s
        )
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise ReplyError(message.code, message.message, message.request_id)
        if not isinstance(message, CancelAck):
            raise ReplyError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")

    async def status(self, *, timeout_s: float = 5.0) -> StatusReply:
        """The cluster's status. Read-only: asked again while no control plane answers (a lapsed lease, a
        takeover) until ``timeout_s`` is spent; then :class:`NoAnswerError`."""
        reply = await self._read(self._subject("status"), encode(StatusQuery()), timeout_s)
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise ReplyError(message.code, message.message)
        if not isinstance(message, StatusReply):
            raise ReplyError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")
        return message

    async def autoscale_status(self, *, timeout_s: float = 5.0) -> AutoscaleStatusReply:
        """The autoscaler's state and last decision (``drover autoscale``; operators' credentials). Read-only:
        asked again like :meth:`status`."""
        reply = await self._read(subjects.admin("autoscale"), encode(AutoscaleStatusQuery()), timeout_s)
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise ReplyError(message.code, message.message)
        if not isinstance(message, AutoscaleStatusReply):
            raise ReplyError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")
        return message

    async def _admin(self, verb: str, message: Message, timeout_s: float, *, read_only: bool = False) -> AdminReply:
        """One admin request; ``read_only`` ones are asked again while no control plane answers (:meth:`_read`),
        commands are sent once (a command whose answer was lost may have run: repeating it is the caller's call)."""
        if "operator" in type(message).__struct_fields__:
            message = msgspec.structs.replace(message, operator=self.operator)
        ask = self._read if read_only else self._request
        reply = await ask(subjects.admin(verb), encode(message), timeout_s)
        answer = decode(reply.data)
        if isinstance(answer, ErrorReply):
            raise ReplyError(answer.code, answer.message, answer.request_id)
        if not isinstance(answer, AdminReply):
            raise ReplyError(ErrorCode.INTERNAL, f"unexpected reply {type(answer).__name__}")
        return answer

    async def migrate(self, request_id: str, destination: str = "", *, timeout_s: float = 60.0) -> AdminReply:
        """Live-migrate a running request (to ``destination``, or the freest compatible instance).

        Returns when the migration committed or aborted; ``ok`` says which, ``details`` has the figures."""
        return await self._admin("migrate", MigrateCommand(request_id=request_id, destination=destination), timeout_s)

    async def drain(self, instance_id: str, *, undo: bool = False, timeout_s: float = 5.0) -> AdminReply:
        """Stop dispatching to an instance and migrate its requests away (poll status for 'drained');
        ``undo`` puts it back into service."""
        return await self._admin("drain", DrainCommand(instance_id=instance_id, undo=undo), timeout_s)

    async def set_phase(self, instance_id: str, phase: str, *, timeout_s: float = 5.0) -> AdminReply:
        """Make an instance serve ``phase`` (prefill | decode | both) from now on (prefill/decode
        disaggregation); the control plane's setting wins over what the instance reports."""
        return await self._admin("phase", PhaseCommand(instance_id=instance_id, phase=phase), timeout_s)

    async def memory(self, op: str, target: str, *, timeout_s: float = 180.0) -> AdminReply:
        """Force a KunServe drop (``target``: instance ids, comma-separated, leader first) or a restore
        (``target``: a group id); returns when the step is over."""
        return await self._admin("memory", MemoryCommand(op=op, target=target), timeout_s)

    async def policy(self, changes: dict[str, str] | None = None, *, timeout_s: float = 5.0) -> dict[str, object]:
        """Read (or, with ``changes``, set then read) the scheduler's policy parameters. A read is asked again
        while no control plane answers, like :meth:`status`; a change is sent once."""
        if changes:
            return dict((await self._admin("policy", PolicyUpdate(changes=changes), timeout_s)).details)
        return dict((await self._admin("policy", PolicyQuery(), timeout_s, read_only=True)).details)

    async def wait_for_instances(self, count: int, *, timeout_s: float = 120.0) -> StatusReply:
        """Wait until ``count`` instances are serving (used by `drover up` and tests)."""
        deadline = time.monotonic() + timeout_s
        last: StatusReply | None = None
        while time.monotonic() < deadline:
            try:
                last = await self.status(timeout_s=2.0)
                if sum(1 for i in last.instances if i.state == "serving") >= count:
                    return last
            except (TimeoutError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            await asyncio.sleep(0.2)
        have = 0 if last is None else len(last.instances)
        raise TimeoutError(f"{have} of {count} instances serving after {timeout_s:.0f}s")
