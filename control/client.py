"""The Python client: submit requests over NATS and stream their tokens back.

Any NATS client in any language can do the same (see the README's wire schema): publish a msgpack
``SubmitRequest`` on ``drover.v1.submit`` with ``reply_to`` set to an inbox you subscribe to, and read
``Accepted``, ``TokenChunk``s and a final ``RequestDone`` (or ``ErrorReply``) from it. Chunks carry their
index: the client drops duplicates and reorders, so each token is delivered once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from observability import spans
from observability.tracing import inject_headers, tracer
from transport import subjects
from transport.messages import (
    Accepted,
    AdminReply,
    Cancel,
    CancelAck,
    DrainCommand,
    ErrorCode,
    ErrorReply,
    Message,
    MigrateCommand,
    PolicyQuery,
    PolicyUpdate,
    ProtocolError,
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
from transport.output_stream import read_subject

log = logging.getLogger(__name__)

# Stream repair (see DroverClient._watch): how long a gap, a silent request or a short RequestDone may last
# before the client replays its inbox from the output stream, and how long it keeps trying before it gives up.
REPAIR_AFTER_S = 1.0
SILENT_REPAIR_S = 5.0  # a running request that sent nothing for this long is replayed too
REPAIR_GIVE_UP_S = 15.0


class DroverError(Exception):
    """An error reply from Drover; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


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

    def __init__(self, client: DroverClient, request_id: str | None, submitted_at: float) -> None:
        self._client = client
        self.request_id = request_id
        self.submitted_at = submitted_at
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._next_index = 0
        self._held: dict[int, TokenChunk] = {}  # chunks that arrived ahead of a gap
        self.accepted: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self.result_data = RequestResult(request_id=request_id or "", submitted_at=submitted_at)
        self._subscription: Subscription | None = None
        self._finished = False
        self.inbox = ""
        self._submit: tuple[bytes, dict[str, str]] | None = None  # the encoded submit, for a retry
        self._last_message_at = time.monotonic()
        self._gap_since: float | None = None  # a chunk is held ahead of a gap since then
        self._pending_done: RequestDone | None = None  # arrived while tokens were still missing
        self._pending_done_at = 0.0
        self._needs_repair = False
        self.repairs = 0  # inbox replays from the output stream
        self.resubmits = 0
        self.filled_tokens = 0  # tokens taken from RequestDone because their chunks never came
        self.raw_chunks: list[tuple[int, int]] = []  # (index, length) of every chunk received, duplicates too

    def _deliver(self, message: Message) -> None:
        self._last_message_at = time.monotonic()
        if isinstance(message, Accepted):  # resolved at once, so cancel() works without iterating
            self.request_id = self.result_data.request_id = message.request_id
            self.result_data.accepted = message
            if not self.accepted.done():
                self.accepted.set_result(message)
            return
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
                error = DroverError(message.code, message.message, message.request_id)
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

    @property
    def finished(self) -> bool:
        return self._finished

    def _repair_due(self, now: float) -> bool:
        """Whether this stream looks damaged: a gap, a RequestDone ahead of its tokens, a reconnect, or
        silence (a submit or its Accepted lost with a NATS node)."""
        if self._finished:
            return False
        if self._needs_repair:
            return True
        if self._gap_since is not None and now - self._gap_since > REPAIR_AFTER_S:
            return True
        silent_s = now - self._last_message_at
        return silent_s > (SILENT_REPAIR_S if self.accepted.done() else REPAIR_AFTER_S)

    async def result(self) -> RequestResult:
        async for _ in self.events():
            pass
        return self.result_data

    async def cancel(self, timeout_s: float = 5.0) -> None:
        accepted = await asyncio.wait_for(asyncio.shield(self.accepted), timeout_s)
        await self._client.cancel(accepted.request_id, accepted.cancel_token, timeout_s=timeout_s)

    async def close(self) -> None:
        if self._subscription is not None:
            sub, self._subscription = self._subscription, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


@dataclass(frozen=True, slots=True)
class _GiveUp:
    """Internal: repairs did not bring the missing tokens back; finish with what arrived."""


class DroverClient:
    def __init__(self, url: str, *, name: str = "drover-client", inbox_prefix: str | None = None) -> None:
        """``inbox_prefix`` defaults to ``drover.v1.inbox.<name>``: replies there are kept in the output
        stream, which is what lets Drover resume a request whose engine died."""
        self.url = url
        self.name = name
        self.inbox_prefix = inbox_prefix or subjects.client_inbox_prefix(
            re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64] or "client"
        )
        self._nc: NatsClient | None = None
        self._open: dict[str, RequestStream] = {}  # inbox -> stream not yet finished
        self._watchdog: asyncio.Task[None] | None = None
        self.reconnects = 0

    async def connect(self, **kwargs: object) -> DroverClient:
        """Connect to every server of ``url`` (comma-separated: a NATS cluster) and, unless ``kwargs`` say
        otherwise, reconnect forever: after a reconnect every open request's inbox is replayed from the
        output stream, so nothing sent while this client was away is missed."""
        user_reconnected = kwargs.pop("reconnected_cb", None)

        async def reconnected() -> None:
            self.reconnects += 1
            for stream in self._open.values():
                stream._needs_repair = True
            if callable(user_reconnected):
                await user_reconnected()

        options: dict[str, object] = {
            "servers": self.url.split(","),
            "name": self.name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "ping_interval": 2,
            "max_outstanding_pings": 2,
            "reconnected_cb": reconnected,
            **kwargs,
        }
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        self._nc = await nats.connect(**options)  # type: ignore[arg-type]
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def _watch(self, period_s: float = 0.25) -> None:
        """Repair damaged streams: replay the inbox from the output stream (JetStream keeps what was sent
        there), resubmit a request that left no trace (same request id: Drover runs it once), and give up on
        tokens that never come back after ``REPAIR_GIVE_UP_S``."""
        last_repair: dict[str, float] = {}
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            due: list[RequestStream] = []
            for inbox, stream in list(self._open.items()):
                if stream.finished:
                    self._open.pop(inbox, None)
                    last_repair.pop(inbox, None)
                elif stream._repair_due(now) and now - last_repair.get(inbox, 0.0) >= REPAIR_AFTER_S:
                    due.append(stream)
            if not due or self._nc is None or not self._nc.is_connected:
                continue
            for stream in due:
                last_repair[stream.inbox] = now
            await asyncio.gather(*(self._repair_logged(stream, now) for stream in due))

    async def _repair_logged(self, stream: RequestStream, now: float) -> None:
        try:
            await self._repair(stream)
        except Exception as exc:  # a repair that fails is retried at the next period
            log.warning("repair of %s failed: %s", stream.request_id, exc)
        if stream._pending_done is not None and now - stream._pending_done_at > REPAIR_GIVE_UP_S:
            stream._queue.put_nowait(_GiveUp())  # type: ignore[arg-type]

    async def _repair(self, stream: RequestStream) -> None:
        stream._needs_repair = False
        stream.repairs += 1
        stored = 0
        for data in await read_subject(self.nc, stream.inbox):
            try:
                stream._deliver(decode(data))
                stored += 1
            except ProtocolError:
                continue
        if not stored and not stream.accepted.done() and stream._submit is not None:
            payload, headers = stream._submit
            stream.resubmits += 1
            log.info("request %s left no trace: submitting it again", stream.request_id)
            await self.nc.publish(subjects.SUBMIT, payload, reply=stream.inbox, headers=headers or None)

    async def __aenter__(self) -> DroverClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
    ) -> RequestStream:
        """Publish a request and return its stream (tokens start flowing at once). ``client_id`` says on
        whose behalf (a gateway submits for many clients); default: this client's name."""
        inbox = self.nc.new_inbox()
        request_id = request_id or uuid.uuid4().hex  # ours, so a retry after a lost submit runs once
        stream = RequestStream(self, request_id, time.perf_counter())
        stream.inbox = inbox

        async def on_message(msg: Msg) -> None:
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                # "No responders": nobody took the submit (the control plane is reconnecting after a NATS
                # fault). Not an answer: the watchdog submits it again with the same request id.
                stream._needs_repair = True
                return
            try:
                stream._deliver(decode(msg.data))
            except ProtocolError as exc:
                stream._deliver(ErrorReply(code=exc.code, message=str(exc)))

        stream._subscription = await self.nc.subscribe(inbox, cb=on_message)
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
        )
        with tracer().start_as_current_span(
            spans.CLIENT_SUBMIT,
            kind=trace.SpanKind.PRODUCER,
            attributes={spans.MESSAGING_SYSTEM: "nats", spans.MESSAGING_DESTINATION: subjects.SUBMIT},
        ):
            headers = inject_headers()
        payload = encode(submit)
        stream._submit = (payload, headers)
        self._open[inbox] = stream
        await self.nc.publish(subjects.SUBMIT, payload, reply=inbox, headers=headers)
        return stream

    async def generate(self, prompt: str | None = None, **kwargs: object) -> RequestResult:
        """Submit and wait for the whole result."""
        stream = await self.submit(prompt, **kwargs)  # type: ignore[arg-type]
        return await stream.result()

    async def cancel(self, request_id: str, cancel_token: str, *, timeout_s: float = 5.0) -> None:
        reply = await self.nc.request(
            subjects.CANCEL,
            encode(Cancel(request_id=request_id, cancel_token=cancel_token)),
            timeout=timeout_s,
        )
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise DroverError(message.code, message.message, message.request_id)
        if not isinstance(message, CancelAck):
            raise DroverError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")

    async def status(self, *, timeout_s: float = 5.0) -> StatusReply:
        reply = await self.nc.request(subjects.admin("status"), encode(StatusQuery()), timeout=timeout_s)
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise DroverError(message.code, message.message)
        if not isinstance(message, StatusReply):
            raise DroverError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")
        return message

    async def _admin(self, verb: str, message: Message, timeout_s: float) -> AdminReply:
        reply = await self.nc.request(subjects.admin(verb), encode(message), timeout=timeout_s)
        answer = decode(reply.data)
        if isinstance(answer, ErrorReply):
            raise DroverError(answer.code, answer.message, answer.request_id)
        if not isinstance(answer, AdminReply):
            raise DroverError(ErrorCode.INTERNAL, f"unexpected reply {type(answer).__name__}")
        return answer

    async def migrate(self, request_id: str, destination: str = "", *, timeout_s: float = 60.0) -> AdminReply:
        """Live-migrate a running request (to ``destination``, or the freest compatible instance).

        Returns when the migration committed or aborted; ``ok`` says which, ``details`` has the figures."""
        return await self._admin("migrate", MigrateCommand(request_id=request_id, destination=destination), timeout_s)

    async def drain(self, instance_id: str, *, undo: bool = False, timeout_s: float = 5.0) -> AdminReply:
        """Stop dispatching to an instance and migrate its requests away (poll status for 'drained');
        ``undo`` puts it back into service."""
        return await self._admin("drain", DrainCommand(instance_id=instance_id, undo=undo), timeout_s)

    async def policy(self, changes: dict[str, str] | None = None, *, timeout_s: float = 5.0) -> dict[str, object]:
        """Read (or, with ``changes``, set then read) the scheduler's policy parameters."""
        message: Message = PolicyUpdate(changes=changes) if changes else PolicyQuery()
        return dict((await self._admin("policy", message, timeout_s)).details)

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
