"""The Python client: submit requests over NATS and stream their tokens back.

Any NATS client in any language can do the same (see the README's wire schema): publish a msgpack
``SubmitRequest`` on ``drover.v1.submit`` with ``reply_to`` set to an inbox you subscribe to, and read
``Accepted``, ``TokenChunk``s and a final ``RequestDone`` (or ``ErrorReply``) from it. Chunks carry their
index: the client drops duplicates and reorders, so each token is delivered once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
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
most the lease TTL + renew period, 4 s by default) is sent again, every 0.2 s."""


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

    def _deliver(self, message: Message) -> None:
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
            elif isinstance(message, RequestDone):
                self.result_data.done = message
                self._finished = True
                await self.close()
            elif isinstance(message, ErrorReply):
                self._finished = True
                await self.close()
                error = DroverError(message.code, message.message, message.request_id)
                if not self.accepted.done():
                    self.accepted.set_exception(error)
                    self.accepted.exception()  # mark retrieved: the caller gets it from events()
                raise error

    def _on_chunk(self, chunk: TokenChunk) -> list[StreamEvent]:
        now = time.perf_counter()
        if chunk.produced_at:
            self.result_data.transit_s.append(time.time() - chunk.produced_at)
        end = chunk.index + len(chunk.token_ids)
        if end <= self._next_index:
            return []  # a duplicate (e.g. replayed after migration or failover)
        if chunk.index > self._next_index:
            self._held[chunk.index] = chunk  # arrived ahead of a gap: hold until the gap fills
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
        return events

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
        self._nc: NatsClient | None = None
        self._denied: set[str] = set()  # subjects the server refused this user (permissions violations)

    async def _on_error(self, exc: Exception) -> None:
        found = _VIOLATION.search(str(exc))
        if found:
            self._denied.add(found.group(1).lower())
            log.warning("nats (%s): %s", self.name, exc)
        else:
            log.debug("nats error (%s): %s", self.name, exc)

    async def connect(self, **kwargs: object) -> DroverClient:
        auth = connect_options(self.nats_settings.auth()) if self.nats_settings is not None else {}
        options: dict[str, object] = {
            "servers": self.url.split(","),
            "name": self.name,
            "error_cb": self._on_error,
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
        return self

    async def _check_inbox(self) -> None:
        """With credentials, check once that this user may read its inbox (a wrong ``client_id`` would
        otherwise make every request wait forever for replies it cannot receive)."""
        probe = f"{self.inbox_prefix}.probe"
        sub = await self.nc.subscribe(probe)
        await self.nc.flush(timeout=5)  # the server's -ERR, if any, comes before the PONG
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if probe.lower() in self._denied:
            raise DroverError(
                PERMISSION_DENIED,
                f"this NATS user may not read {self.inbox_prefix}: set nats.client_id to the user's client id",
            )

    async def _request(self, subject: str, data: bytes, timeout_s: float) -> Msg:
        """Request/reply; a subject the server refused this user gives a clear error instead of a timeout."""
        try:
            return await self.nc.request(subject, data, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if subject.lower() in self._denied:
                raise DroverError(
                    PERMISSION_DENIED,
                    f"this NATS user may not publish to {subject} (admin commands need operator credentials)",
                ) from None
            raise

    async def close(self) -> None:
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
    ) -> RequestStream:
        """Publish a request and return its stream (tokens start flowing at once). ``client_id`` says on
        whose behalf (a gateway submits for many clients); default: this client's name. ``deadline_s``: a batch
        request's deadline, seconds from now (default: the deployment's ``autoscaling.slo.batch_deadline_s``)."""
        inbox = self.nc.new_inbox()
        stream = RequestStream(self, request_id, time.perf_counter())
        resubmit_until = time.monotonic() + NO_CONTROL_PLANE_RETRY_S

        async def on_message(msg: Msg) -> None:
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                # Nobody took the submission (e.g. a control-plane takeover in progress): send it again
                # shortly; nobody received it, so this cannot run it twice.
                if time.monotonic() < resubmit_until:
                    asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(resend()))
                else:
                    text = "no control plane took the request (is one running?); retry with the same request_id"
                    stream._deliver(ErrorReply(code=ErrorCode.OVERLOADED, message=text, request_id=request_id))
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
            deadline_s=deadline_s,
        )
        with tracer().start_as_current_span(
            spans.CLIENT_SUBMIT,
            kind=trace.SpanKind.PRODUCER,
            attributes={spans.MESSAGING_SYSTEM: "nats", spans.MESSAGING_DESTINATION: subjects.SUBMIT},
        ):
            headers = inject_headers()

        async def resend() -> None:
            with contextlib.suppress(Exception):
                await self.nc.publish(subjects.SUBMIT, encode(submit), reply=inbox, headers=headers)

        await self.nc.publish(subjects.SUBMIT, encode(submit), reply=inbox, headers=headers)
        return stream

    async def generate(self, prompt: str | None = None, **kwargs: object) -> RequestResult:
        """Submit and wait for the whole result."""
        stream = await self.submit(prompt, **kwargs)  # type: ignore[arg-type]
        return await stream.result()

    async def cancel(self, request_id: str, cancel_token: str, *, timeout_s: float = 5.0) -> None:
        reply = await self._request(
            subjects.CANCEL, encode(Cancel(request_id=request_id, cancel_token=cancel_token)), timeout_s
        )
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise DroverError(message.code, message.message, message.request_id)
        if not isinstance(message, CancelAck):
            raise DroverError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")

    async def status(self, *, timeout_s: float = 5.0) -> StatusReply:
        reply = await self._request(subjects.admin("status"), encode(StatusQuery()), timeout_s)
        message = decode(reply.data)
        if isinstance(message, ErrorReply):
            raise DroverError(message.code, message.message)
        if not isinstance(message, StatusReply):
            raise DroverError(ErrorCode.INTERNAL, f"unexpected reply {type(message).__name__}")
        return message

    async def _admin(self, verb: str, message: Message, timeout_s: float) -> AdminReply:
        if "operator" in type(message).__struct_fields__:
            message = msgspec.structs.replace(message, operator=self.operator)
        reply = await self._request(subjects.admin(verb), encode(message), timeout_s)
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
