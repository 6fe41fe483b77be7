"""EngineActor: owns one engine instance, takes requests from the bus, streams tokens straight to clients.

The pykka actor is the single owner of the instance's request table (what runs here, for whom). The token
path never goes through the actor: each request is a coroutine on the bus loop that reads the engine's
async iterator and publishes ``TokenChunk`` messages directly to the client's inbox, then ``RequestDone``.
The control plane is told when a request leaves (``EngineRequestEnded``) so it can forget it.

One copy of a request id at a time. An EngineAdd identical to what runs (or waits) here is a re-send of the
same dispatch and is ignored. A different EngineAdd for an id whose copy still runs here is a new dispatch
(the scheduler failed it over onto this instance, or resumed it here after an eviction, while the old copy
still ends): the old copy is stopped quietly (no more chunks, no RequestDone), the new one is parked and starts
only at the old copy's end (an engine lets go of an ended iterator's id: ``engines/base.py``), and it
continues after every token the old copy sent, so the client's indices stay consecutive and each arrives once.
The engine never runs two copies of one id, and the old copy's outputs cannot reach the new stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from opentelemetry import trace

from actors.local_autoscaler import LocalAutoscaler
from engines.base import Engine, EngineError, EngineRequest
from engines.migration import FrozenRequest, KvEndpoint, MigratableEngine, ReservationRefused, StageReport
from engines.prefix_listing import DEFAULT_MAX_BLOCKS, max_blocks_for
from engines.tokenizer import IncrementalDetokenizer, Tokenizer
from observability import spans
from observability.metrics import metrics
from observability.tracing import extract_context, tracer
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    AdminReply,
    EngineAbort,
    EngineAdd,
    EngineFence,
    EngineFirstToken,
    EngineMemory,
    EngineRequestEnded,
    ErrorCode,
    ErrorReply,
    GroupCommand,
    InstanceHeartbeat,
    Message,
    MigrateIn,
    MigrateInReply,
    MigrateOut,
    MigrateOutReply,
    MigrationStageInfo,
    PrefixCacheReport,
    PrefixResync,
    RequestDone,
    SetInstanceRole,
    Timings,
    TokenChunk,
    Usage,
    encode,
    peer_version,
)

log = logging.getLogger(__name__)

_FENCE_WAIT_S = 1.0  # a fenced request's stream ends within a step; below reliability.failover_fence_timeout_s


@dataclass(slots=True)
class _Running:
    add: EngineAdd
    future: concurrent.futures.Future[None]
    started_at: float = field(default_factory=time.time)
    stopping: bool = False  # fenced or aborted: a new dispatch of its id waits for its end (actor thread)
    received: EngineAdd | None = None  # the dispatch as it came, where it runs extended (_continued)


@dataclass(slots=True)
class _Stream:
    """Loop-side state of one request's token stream (touched only on the bus loop)."""

    add: EngineAdd
    index: int  # next output index to send
    migrated_out: bool = False
    abort_code: str = ""  # the scheduler aborted it with an error code (deadline, client gone): end with it
    last_sent_at: float = 0.0  # time.perf_counter() of the last chunk (inter-token metric)
    sent: list[Message] = field(default_factory=list)  # every chunk (and the final reply), for re-sending
    ended_at: float = 0.0  # time.monotonic() when the request left this engine
    tokens: list[int] = field(default_factory=list)  # the whole output so far (resumed tokens included)


@dataclass(frozen=True, slots=True)
class _Ended:
    """Internal: a request's coroutine finished (sent by the loop to the actor)."""

    request_id: str
    add: EngineAdd  # which copy ended (an id can be dispatched here again while its last copy ends)
    tokens: list[int] = field(default_factory=list)  # every output token its client has from it


@dataclass(frozen=True, slots=True)
class _AdmitHeld:
    """Internal: the local autoscaler's limit grew; admit held requests."""


class EngineActor(pykka.ThreadingActor):
    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        tokenizer: Tokenizer,
        local: LocalAutoscaler | None = None,
        *,
        resend_window_s: float = 30.0,
    ) -> None:
        """``local``: the local autoscaler's admission limit (None: admit everything). ``resend_window_s``:
        after a NATS reconnect, re-send what was streamed to clients this recently
        (``reliability.resend_window_s``).
        Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__()
        self.local = local  # admission limit (local autoscaler); None: admit everything
        self.bus = bus
        self.engine = engine
        self.tokenizer = tokenizer
        self.instance_id = engine.info.instance_id
        self.running: dict[str, _Running] = {}
        # a new dispatch of an id whose copy still ends here: started at that copy's end (actor thread)
        self._parked: dict[str, tuple[EngineAdd, dict[str, str]]] = {}
        self._evicted: set[str] = set()  # batch requests evicted for interactive ones: no RequestDone
        self.draining = False
        self._streams: dict[str, _Stream] = {}  # loop-only
        self._migrations_out: dict[str, str] = {}  # migration id -> request id (loop-only)
        self.groups: Any = None  # KunServe group steps (torch engines): actors.engine_groups.GroupAgent
        if engine.info.engine_kind == "torch":
            from actors.engine_groups import group_agent_for

            self.groups = group_agent_for(self)
        self.resend_window_s = resend_window_s
        self._ended: deque[_Stream] = deque()  # recently ended streams, oldest first (loop-only)
        self._storing: set[asyncio.Task[None]] = set()
        self._store_off_until = 0.0  # a final reply got no PubAck while connected: no output stream here
        self._reconnected_at = -1e9  # monotonic time of the last NATS reconnect
        bus.on_reconnect(self._on_bus_reconnected)

    def on_stop(self) -> None:
        """Thread: the engine actor's thread."""
        if self.groups is not None:
            self.groups.close()
        self._end_loop_work()

    def _end_loop_work(self, timeout_s: float = 2.0) -> None:
        """Cancel what this actor left on the bus loop (requests still being served, final replies waiting for
        their PubAck) and wait for it to end, before the host stops the bus: a loop stopped under pending tasks
        drops them silently ("Task was destroyed but it is pending", coroutines never awaited).
        Thread: the engine actor's thread (on_stop); it waits for the bus loop."""
        if not self.bus.loop.is_running() or self.bus.in_loop():
            return
        futures = [running.future for running in self.running.values()]

        async def cancel_all() -> None:
            tasks = list(self._storing)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for future in futures:
            future.cancel()  # cancels the task on the loop (run_coroutine_threadsafe)
        with contextlib.suppress(Exception):
            self.bus.run(cancel_all()).result(timeout=timeout_s)
        with contextlib.suppress(Exception):
            concurrent.futures.wait(futures, timeout=timeout_s)

    def on_start(self) -> None:
        """Thread: the engine actor's thread."""
        if self.local is not None:
            ref = self.actor_ref
            self.local.wake = lambda: ref.tell(_AdmitHeld()) if ref.is_alive() else None

    # ------------------------------------------------------------------------------------------- messages
    def on_receive(self, message: object) -> object:
        """Thread: the engine actor's thread."""
        if isinstance(message, Envelope):
            self._on_envelope(message)
        elif isinstance(message, _Ended):
            self._on_ended(message)
        elif isinstance(message, _AdmitHeld):
            self._admit_held()
        return None

    def _on_ended(self, ended: _Ended) -> None:
        """A copy's coroutine finished: forget it, and start the dispatch parked behind it (it takes over the
        old copy's admission slot), continuing after every token the old copy sent.
        Thread: the engine actor's thread."""
        current = self.running.get(ended.request_id)
        if current is not None and current.add is not ended.add:
            return  # an older copy's late end: the current one is not touched
        self.running.pop(ended.request_id, None)
        parked = self._parked.pop(ended.request_id, None)
        if parked is not None:
            add = _continued(parked[0], ended.tokens)
            log.info(
                "engine %s: %s runs again here after %d tokens",
                self.instance_id,
                add.request_id,
                len(add.output_token_ids),
            )
            future = self.bus.run(self._serve(add, parked[1]))
            self.running[add.request_id] = _Running(add=add, future=future, received=parked[0])
            return
        if self.local is not None:
            self.local.ended(ended.request_id)
            self._admit_held()

    def _admit_held(self) -> None:
        """Thread: the engine actor's thread."""
        assert self.local is not None
        for add, headers in self.local.take_admittable():
            self.running[add.request_id] = _Running(add=add, future=self.bus.run(self._serve(add, headers)))

    def _on_envelope(self, envelope: Envelope) -> None:
        """Thread: the engine actor's thread."""
        message = envelope.message
        if isinstance(message, EngineAdd):
            accepted = self._add(message, envelope.headers)
            if envelope.reply:
                self.bus.publish(
                    envelope.reply,
                    AdminReply(ok=accepted, message="added" if accepted else "refused", v=peer_version(message.v)),
                )
        elif isinstance(message, MigrateOut | MigrateIn):
            self.bus.run(self._migration_op(message, envelope.reply))
        elif isinstance(message, EngineAbort):
            self._abort(message, envelope.reply)
        elif isinstance(message, EngineFence):
            self.bus.run(self._fence(message, envelope.reply, self._stop_here(message.request_id)))
        elif isinstance(message, GroupCommand) and self.groups is not None:
            self.bus.run(self.groups.handle(message, envelope.reply))
        elif isinstance(message, PrefixResync):
            resync = getattr(self.engine, "request_prefix_resync", None)
            if resync is not None:  # engines without a prefix-cache report have nothing to list
                resync()
        elif isinstance(message, SetInstanceRole) and self.local is not None:
            if not self.local.set_role(message.role):
                log.warning("engine %s: unknown role %r", self.instance_id, message.role)
                self.bus.reply_error(envelope.reply, ErrorCode.INVALID_REQUEST, f"unknown role {message.role!r}")
        else:
            log.warning("engine %s: unexpected %s", self.instance_id, type(message).__name__)
            self.bus.reply_error(
                envelope.reply, ErrorCode.INVALID_REQUEST, f"engine does not take {type(message).__name__}"
            )

    def _add(self, add: EngineAdd, headers: dict[str, str]) -> bool:
        """Thread: the engine actor's thread."""
        if not subjects.is_client_reply_target(add.reply_to):
            # what engines send to clients goes only to client inboxes (docs/security.md): nothing is sent there
            log.warning(
                "engine %s refuses %s: reply_to %r is no client inbox", self.instance_id, add.request_id, add.reply_to
            )
            metrics().reply_refused("engine")
            return False
        current = self.running.get(add.request_id)
        parked = self._parked.get(add.request_id)
        if (
            (current is not None and (current.add == add or current.received == add))
            or (parked is not None and parked[0] == add)
            or (self.local is not None and self.local.is_held(add.request_id))
        ):
            # The scheduler re-sent an unacknowledged EngineAdd (or dispatched again what waits here for a
            # slot and never started): the copy here serves the client (an error to the client would end a
            # healthy request).
            log.warning("engine %s: %s already runs here; duplicate dispatch ignored", self.instance_id, add.request_id)
            return False
        context_len = len(add.prompt_token_ids) + len(add.output_token_ids)
        max_len = self.engine.info.max_model_len
        if not add.prompt_token_ids or context_len >= max_len:
            self._reject(add, ErrorCode.PROMPT_TOO_LONG, f"context of {context_len} tokens; limit {max_len - 1}")
            return False
        if current is not None:
            # A new dispatch of what still runs here: never two copies of one id in the engine (both would
            # stream into one client's stream). The old copy stops quietly; this one starts at its end.
            self._parked[add.request_id] = (add, headers)
            if not current.stopping:
                current.stopping = True
                self.bus.run(self._supersede(add.request_id))
            log.warning(
                "engine %s: %s dispatched again while its copy here ends: it starts after that copy",
                self.instance_id,
                add.request_id,
            )
            return True
        if self.local is not None and not self.local.offer(add, headers):
            return True  # held by the admission limit; _admit_held starts it
        future = self.bus.run(self._serve(add, headers))
        self.running[add.request_id] = _Running(add=add, future=future)
        return True

    def _stop_here(self, request_id: str) -> bool:
        """The control plane takes ``request_id`` away from this instance (a fence): what waits here for a
        slot or behind an ending copy never starts, and a running copy is marked stopping (a later dispatch
        of the id waits for its end). True when a copy that never started was dropped.
        Thread: the engine actor's thread."""
        held = self.local.remove_held(request_id) if self.local is not None else None
        parked = self._parked.pop(request_id, None)
        current = self.running.get(request_id)
        if current is not None:
            current.stopping = True
        return held is not None or parked is not None

    def _abort(self, abort: EngineAbort, reply: str) -> None:
        """Thread: the engine actor's thread."""
        held = self.local.remove_held(abort.request_id) if self.local is not None else None
        parked = self._parked.pop(abort.request_id, None)
        if held is None and parked is not None:
            held = parked[0]  # its old copy ends quietly already: this one never started
        evicted = abort.reason == "evicted"  # the control plane requeues it; the client's stream goes on
        if held is not None:  # never reached the engine: end it here
            if not evicted and abort.reason != "superseded":  # (superseded: it runs elsewhere, its client waits)
                self.bus.publish(
                    held.reply_to,
                    RequestDone(
                        request_id=held.request_id,
                        finish_reason="abort",
                        usage=Usage(
                            prompt_tokens=len(held.prompt_token_ids), completion_tokens=len(held.output_token_ids)
                        ),
                        instances=[*held.served_by, self.instance_id],
                        num_tokens=len(held.output_token_ids),
                    ),
                )
            self.bus.publish(
                subjects.ENGINE_EVENTS,
                EngineRequestEnded(
                    instance_id=self.instance_id,
                    request_id=held.request_id,
                    finish_reason="evicted" if evicted else "abort",
                    num_output_tokens=len(held.output_token_ids),
                ),
            )
            return
        if abort.request_id not in self.running:
            self.bus.reply_error(
                reply, ErrorCode.UNKNOWN_REQUEST, f"no request {abort.request_id} on {self.instance_id}"
            )
            return
        self.running[abort.request_id].stopping = True
        if abort.reason == "superseded":
            self.bus.run(self._supersede(abort.request_id))
            return
        if abort.reason in (ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CLIENT_GONE):
            self.bus.call_soon(self._mark_abort, abort.request_id, abort.reason)  # runs before the abort below
        if evicted:
            self._evicted.add(abort.request_id)
        self.bus.run(self.engine.abort(abort.request_id))

    async def _fence(self, fence: EngineFence, reply: str, dropped: bool = False) -> None:
        """The control plane declared this instance dead and resumes the request elsewhere from what its client
        has: stop streaming it (ends as "migrated": no RequestDone) and free it. The answer goes out after its
        last chunk, on the same connection, so the control plane reads back every token it sent (bus loop).
        ``dropped``: a copy that had not started was dropped (``_stop_here``). The answer's ``ended`` says the
        engine lets go of the id (its copy ended, or none ran): the control plane may dispatch it here again.
        Thread: the bus loop."""
        stream = self._streams.get(fence.request_id)
        running = self.running.get(fence.request_id)
        if stream is not None:
            stream.migrated_out = True
            log.warning("engine %s: declared dead; %s stops here (it fails over)", self.instance_id, fence.request_id)
            await self.engine.abort(fence.request_id)
        if running is not None:  # its end reaches the actor before the request can be dispatched here again
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running.future)), _FENCE_WAIT_S)
        if reply:
            held = stream is not None or running is not None or dropped
            await self.bus.apublish(
                reply,
                AdminReply(
                    ok=held,
                    message="stopped" if held else f"no request {fence.request_id} here",
                    details={
                        "sent": stream.index if stream is not None else 0,
                        "ended": running is None or running.future.done(),
                    },
                    v=peer_version(fence.v),
                ),
            )

    def _mark_abort(self, request_id: str, code: str) -> None:
        """Thread: the bus loop (scheduled by _abort with call_soon)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort_code = code

    async def _supersede(self, request_id: str) -> None:
        """The request failed over elsewhere while this instance was taken for dead: stop it here quietly
        (no more chunks, no RequestDone), as a migrated-away request ends.
        Thread: the bus loop."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.migrated_out = True
        await self.engine.abort(request_id)

    def _reject(self, add: EngineAdd, code: ErrorCode, text: str) -> None:
        """Thread: the engine actor's thread."""
        log.info("engine %s rejects %s: %s", self.instance_id, add.request_id, text)
        self.bus.publish(
            add.reply_to, ErrorReply(code=code, message=text, request_id=add.request_id, v=peer_version(add.client_v))
        )
        self.bus.publish(
            subjects.ENGINE_EVENTS,
            EngineRequestEnded(
                v=MIN_PROTOCOL_VERSION,  # unsolicited, to a control plane of either supported version
                instance_id=self.instance_id,
                request_id=add.request_id,
                finish_reason="error",
                num_output_tokens=len(add.output_token_ids),
                error=text,
            ),
        )

    # ------------------------------------------------------------------------------------------- token path
    async def _serve(self, add: EngineAdd, headers: dict[str, str]) -> None:
        """Run one request on the engine and stream it to the client (runs on the bus loop).

        Thread: the bus loop."""
        request = EngineRequest(
            request_id=add.request_id,
            prompt_token_ids=add.prompt_token_ids,
            sampling=add.sampling,
            output_token_ids=list(add.output_token_ids),
            priority=add.priority,
            arrival_time=add.arrival_time,
            kv_transfer=add.kv_transfer,
        )
        detok = IncrementalDetokenizer(self.tokenizer)
        stream = _Stream(add=add, index=len(add.output_token_ids), tokens=list(add.output_token_ids))
        self._streams[add.request_id] = stream
        added_at = time.time()
        first_token_at: float | None = None
        finish_reason = "abort"
        error: str | None = None
        span = tracer().start_span(
            spans.ENGINE_REQUEST,
            context=extract_context(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                spans.REQUEST_ID: add.request_id,
                spans.INSTANCE_ID: self.instance_id,
                spans.MESSAGING_SYSTEM: "nats",
                spans.GEN_AI_REQUEST_MAX_TOKENS: add.sampling.max_tokens,
                "drover.resumed_tokens": len(add.output_token_ids),
            },
        )
        try:
            async for output in self.engine.generate(request):
                if output.new_token_ids and not stream.migrated_out:  # after a stop the tail covers them
                    first_here = first_token_at is None
                    if first_here:
                        first_token_at = time.time()
                        span.add_event("first_token")
                    text = detok.push(output.new_token_ids) if add.stream_text else ""
                    await self._send_tokens(stream, output.new_token_ids, text)
                    if first_here and add.report_first_token and output.finish_reason is None:
                        # its first token here: a prefill instance's request is handed off on this event
                        await self.bus.apublish(
                            subjects.ENGINE_EVENTS,
                            EngineFirstToken(
                                instance_id=self.instance_id,
                                request_id=add.request_id,
                                num_tokens=len(add.prompt_token_ids) + stream.index,
                            ),
                        )
                if output.finish_reason is not None:
                    finish_reason = output.finish_reason
                    break
        except EngineError as exc:
            finish_reason, error = "error", str(exc)
            await self._send_final(
                stream,
                ErrorReply(
                    code=ErrorCode.INVALID_REQUEST,
                    message=str(exc),
                    request_id=add.request_id,
                    v=peer_version(add.client_v),
                ),
            )
        except asyncio.CancelledError:
            finish_reason = "abort"
            await self.engine.abort(add.request_id)
        except Exception as exc:
            log.exception("engine %s failed request %s", self.instance_id, add.request_id)
            finish_reason, error = "error", f"engine failure: {exc}"
            await self._send_final(
                stream,
                ErrorReply(
                    code=ErrorCode.ENGINE_FAILED, message=error, request_id=add.request_id, v=peer_version(add.client_v)
                ),
            )
        finally:
            now = time.time()
            if self._streams.get(add.request_id) is stream:
                del self._streams[add.request_id]
            index = stream.index
            if stream.migrated_out:
                finish_reason = "migrated"
            elif add.request_id in self._evicted and finish_reason == "abort":
                finish_reason = "evicted"  # preempted for an interactive request: the scheduler requeues it
            self._evicted.discard(add.request_id)
            if stream.abort_code and finish_reason == "abort":  # after its last chunk, the scheduler's reason
                error = stream.abort_code
                await self._send_final(
                    stream,
                    ErrorReply(
                        code=ErrorCode(stream.abort_code),
                        message=f"stopped by the scheduler after {index} tokens: {stream.abort_code}",
                        request_id=add.request_id,
                        v=max(2, peer_version(add.client_v)),
                    ),
                )
            elif finish_reason not in ("error", "migrated", "evicted"):
                await self._send_final(
                    stream,
                    RequestDone(
                        request_id=add.request_id,
                        finish_reason=finish_reason,
                        usage=Usage(prompt_tokens=len(add.prompt_token_ids), completion_tokens=index),
                        timings=Timings(
                            queue_s=max(0.0, added_at - add.arrival_time) if add.arrival_time else 0.0,
                            ttft_s=(first_token_at - add.arrival_time) if first_token_at and add.arrival_time else 0.0,
                            e2e_s=(now - add.arrival_time) if add.arrival_time else 0.0,
                        ),
                        instances=[*add.served_by, self.instance_id],
                        num_tokens=index,
                        v=peer_version(add.client_v),
                        output_token_ids=stream.tokens[:index],
                    ),
                )
            stream.ended_at = time.monotonic()
            self._ended.append(stream)
            self._forget_ended(stream.ended_at)
            resumed = bool(add.output_token_ids)
            made_here = index - len(add.output_token_ids)
            ended_at = time.time()
            await self.bus.apublish(
                subjects.ENGINE_EVENTS,
                EngineRequestEnded(
                    v=MIN_PROTOCOL_VERSION,  # unsolicited, to a control plane of either supported version
                    instance_id=self.instance_id,
                    request_id=add.request_id,
                    finish_reason=finish_reason,
                    num_output_tokens=index,
                    error=error,
                    request_class=str(add.request_class),
                    client_id=add.client_id,
                    ttft_s=(first_token_at - add.arrival_time)
                    if first_token_at and add.arrival_time and not resumed
                    else 0.0,
                    itl_s=(ended_at - first_token_at) / (made_here - 1) if first_token_at and made_here > 1 else 0.0,
                    e2e_s=(ended_at - add.arrival_time) if add.arrival_time else 0.0,
                ),
            )
            request_class = str(add.request_class)
            if finish_reason not in ("migrated", "evicted"):  # it ends (and is counted) where it runs last
                metrics().request_finished(
                    finish_reason, request_class, 0 if resumed else len(add.prompt_token_ids), index
                )
            if first_token_at is not None and add.arrival_time and not resumed:
                metrics().observe_ttft(first_token_at - add.arrival_time, request_class)
            span.set_attribute(spans.GEN_AI_USAGE_OUTPUT_TOKENS, index - len(add.output_token_ids))
            span.set_attribute(spans.GEN_AI_RESPONSE_FINISH_REASONS, [finish_reason])
            span.end()
            if self.actor_ref.is_alive():
                self.actor_ref.tell(_Ended(add.request_id, add, stream.tokens[:index]))

    async def _send_tokens(self, stream: _Stream, token_ids: list[int], text: str) -> None:
        # Claim the index range before the first await: a concurrent sender (the migration tail) must see it.
        """Thread: the bus loop."""
        index = stream.index
        stream.index += len(token_ids)
        add = stream.add
        now = time.perf_counter()
        gap: float | None = None
        if stream.last_sent_at:  # a chunk of n tokens after a gap d: n gaps of d/n (as the client counts)
            gap = (now - stream.last_sent_at) / len(token_ids)
            metrics().observe_inter_token([gap] * len(token_ids), str(add.request_class))
        stream.last_sent_at = now
        if self.local is not None:
            self.local.observe_tokens(len(token_ids), gap)
        chunk = TokenChunk(
            request_id=add.request_id,
            index=index,
            token_ids=token_ids,
            text=text,
            instance_id=self.instance_id,
            produced_at=time.time(),
            v=peer_version(add.client_v),
        )
        stream.sent.append(chunk)
        stream.tokens.extend(token_ids)
        await self.bus.apublish(add.reply_to, chunk)

    async def _send_final(self, stream: _Stream, message: Message) -> None:
        """Send the last reply (RequestDone, which carries every token, or an error) as ONE JetStream publish
        to the client's inbox: the client receives it like any message and the output stream stores it, so a
        client that lost chunks or the reply itself with a NATS node finds it there. One publish, not a core
        publish plus a stored copy: the client's inbox sees a request end once. The PubAck is awaited in the
        background (what follows, EngineRequestEnded, is not delayed); an unacknowledged publish while this
        connection is down is retried until acknowledged.
        Thread: the bus loop."""
        stream.sent.append(message)
        reply_to = stream.add.reply_to
        if not reply_to.startswith(subjects.INBOX_ROOT + ".") or time.monotonic() < self._store_off_until:
            await self.bus.apublish(reply_to, message)  # no output stream captures it: no ack to wait for
            return
        request_id = stream.add.request_id
        try:
            nc = self.bus.nc
            ack_inbox = nc.new_inbox()  # under this engine's reply prefix (its permissions allow it)
            sub = await nc.subscribe(ack_inbox, max_msgs=1)
            await nc.publish(reply_to, encode(message), reply=ack_inbox, headers=self._final_headers(request_id))
        except Exception as exc:
            log.debug("engine %s: final reply of %s: %s", self.instance_id, request_id, exc)
            sub = None
        task = self.bus.loop.create_task(self._await_stored(sub, reply_to, request_id, message))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    def _final_headers(self, request_id: str) -> dict[str, str]:
        """Thread: the bus loop."""
        return {"Nats-Msg-Id": f"{request_id}:final:{self.instance_id}"}  # stored once however often sent

    async def _await_stored(self, sub: Subscription | None, reply_to: str, request_id: str, message: Message) -> None:
        """Thread: the bus loop."""
        if sub is not None:
            try:
                ack = await sub.next_msg(timeout=2)  # a PubAck, or a no-responders status: no stream (yet)
                just_reconnected = time.monotonic() - self._reconnected_at < self.resend_window_s
                if not (ack.headers and ack.headers.get("Status") == "503") or not just_reconnected:
                    if ack.headers and ack.headers.get("Status") == "503":
                        self._store_off_until = time.monotonic() + 10.0  # no output stream here
                    return
                # No output stream: none here at all, or not declared again yet after a NATS restart (then
                # the client may not have been resubscribed either, and this reply would be lost for good).
                # Try to store it for a short while before concluding there is none.
                if not await self._store_final(reply_to, request_id, message, no_stream_grace_s=5.0):
                    self._store_off_until = time.monotonic() + 10.0
                return
            except Exception:
                _raise_if_cancelled()
                if self.bus.nc.is_connected:  # delivered to the inbox, but nothing stored it: no stream here
                    self._store_off_until = time.monotonic() + 10.0
                    return
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await self._store_final(reply_to, request_id, message)

    async def _store_final(
        self, reply_to: str, request_id: str, message: Message, *, no_stream_grace_s: float = 0.0
    ) -> bool:
        """Retry the final reply as a JetStream publish until acknowledged (this connection was down, or the
        output stream is being declared again); each try also delivers it live (the client keeps the first).
        ``no_stream_grace_s``: how long "no stream" (no responders) is retried before giving up.
        Thread: the bus loop."""
        started = time.monotonic()
        deadline = started + self.resend_window_s
        delay = 0.25
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self.bus.nc.jetstream(timeout=2).publish(
                    reply_to, encode(message), headers=self._final_headers(request_id)
                )
                return True
            except NoRespondersError:
                if time.monotonic() - started >= no_stream_grace_s:
                    return False  # nobody listens there and no output stream captures it
                delay = min(1.0, delay * 2)
            except Exception as exc:  # no stream leader yet (a NATS node died), reconnecting: retry
                _raise_if_cancelled()  # a closing connection turns a cancel into an ordinary error
                log.debug("engine %s: storing the reply of %s: %s", self.instance_id, request_id, exc)
        log.warning("engine %s: reply of %s not stored in %.0fs", self.instance_id, request_id, self.resend_window_s)
        return False

    # ------------------------------------------------------------------------------------------- NATS faults
    def _on_bus_reconnected(self) -> None:
        """On the bus loop after a reconnect: what was in flight through a NATS node that died may be lost
        (with the stream's copy, if that node led it). Re-send every chunk and final reply of running and
        recently ended requests; clients keep one copy of each token by index.
        Thread: the bus loop (the bus's reconnect callback)."""
        self._reconnected_at = time.monotonic()
        if self.actor_ref.is_alive():
            self.bus.loop.create_task(self._resend())

    def _forget_ended(self, now: float) -> None:
        """Thread: the bus loop."""
        while self._ended and self._ended[0].ended_at < now - self.resend_window_s:
            self._ended.popleft()

    async def _resend(self) -> None:
        """Thread: the bus loop."""
        self._forget_ended(time.monotonic())
        streams = [*self._streams.values(), *self._ended]
        since = self.bus.disconnected_at - 1.0  # what may have been in flight when the connection broke
        count = 0
        for stream in streams:
            for message in list(stream.sent):
                if isinstance(message, TokenChunk) and message.produced_at < since:
                    continue
                await self.bus.apublish(stream.add.reply_to, message)
                count += 1
        if count:
            log.info("engine %s re-sent %d messages of %d requests (reconnect)", self.instance_id, count, len(streams))

    async def end_evicted(self, request_id: str, outputs: list[int]) -> None:
        """An evicted request's stream ends without RequestDone; the client first gets every output token
        it has not seen (the scheduler resumes the request after them). Runs on the bus loop.
        Thread: the bus loop."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.migrated_out = True
        tail = outputs[stream.index :]
        if tail:
            await self._send_tokens(stream, tail, "")

    async def hand_over(
        self, request_id: str, outputs: list[int], kv_transfer: dict[str, Any] | None
    ) -> EngineAdd | None:
        """A request this engine stopped to hand it to another instance (a member joining a KunServe group):
        its client first gets every output token it has not seen, its stream here ends without RequestDone
        (as a migrated one), and the answer is the EngineAdd that resumes it after ``outputs`` (None: no
        stream here).

        Thread: the bus loop."""
        stream = self._streams.get(request_id)
        if stream is None:
            return None
        await self.end_evicted(request_id, outputs)
        add = stream.add
        return msgspec.structs.replace(
            add,
            output_token_ids=list(outputs),
            served_by=[*add.served_by, self.instance_id],
            kv_transfer=kv_transfer,
            report_first_token=False,
        )

    # ------------------------------------------------------------------------------------------- migration
    def _migratable(self) -> MigratableEngine:
        """Thread: the bus loop (the migration coroutines)."""
        if not isinstance(self.engine, MigratableEngine):
            raise EngineError(f"{self.engine.info.engine_kind} engines cannot migrate requests")
        return self.engine

    async def _migration_op(self, message: MigrateOut | MigrateIn, reply: str) -> None:
        """Run one migration step on the engine and answer the migrator (runs on the bus loop).

        Thread: the bus loop."""
        try:
            answer = await (
                self._migrate_out(message) if isinstance(message, MigrateOut) else self._migrate_in(message)
            )
        except Exception as exc:
            log.warning(
                "engine %s: migration %s %s failed: %s", self.instance_id, message.op, message.migration_id, exc
            )
            answer = (MigrateOutReply if isinstance(message, MigrateOut) else MigrateInReply)(
                migration_id=message.migration_id, ok=False, error=f"{type(exc).__name__}: {exc}"
            )
        if reply:
            await self.bus.apublish(reply, msgspec.structs.replace(answer, v=peer_version(message.v)))

    async def _migrate_in(self, message: MigrateIn) -> MigrateInReply:
        """Thread: the bus loop."""
        engine = self._migratable()
        if message.op == "reserve":
            try:
                endpoint = await engine.migrate_in_reserve(message.migration_id, message.num_blocks)
            except ReservationRefused as exc:  # the engine names the limit (its KV blocks, its staging pool)
                return MigrateInReply(migration_id=message.migration_id, ok=False, error=str(exc))
            return MigrateInReply(migration_id=message.migration_id, ok=True, address=endpoint.address)
        if message.op == "release":
            await engine.migrate_in_release(message.migration_id)
            return MigrateInReply(migration_id=message.migration_id, ok=True)
        raise ValueError(f"unknown migrate_in op {message.op!r}")

    async def _migrate_out(self, message: MigrateOut) -> MigrateOutReply:
        """Thread: the bus loop."""
        engine = self._migratable()
        mid = message.migration_id
        if message.op == "begin":
            if message.request_id not in self._streams:
                raise EngineError(f"no request {message.request_id} on {self.instance_id}")
            endpoint = KvEndpoint(
                instance_id=message.destination_instance, address=message.destination_address, migration_id=mid
            )
            total = await engine.migrate_out_begin(message.request_id, mid, endpoint)
            self._migrations_out[mid] = message.request_id
            return MigrateOutReply(migration_id=mid, ok=True, total_blocks=total)
        if message.op == "stage":
            report = await engine.migrate_out_stage(mid)
            return MigrateOutReply(
                migration_id=mid, ok=True, total_blocks=report.total_blocks, stage=_stage_info(report)
            )
        if message.op == "stop":
            frozen = await engine.migrate_out_stop(mid)
            return await self._frozen_reply(mid, frozen)
        if message.op == "commit":
            await engine.migrate_out_commit(mid)
            self._migrations_out.pop(mid, None)
            return MigrateOutReply(migration_id=mid, ok=True)
        if message.op == "abort":
            frozen_or_none = await engine.migrate_out_abort(mid)
            self._migrations_out.pop(mid, None)
            if frozen_or_none is None:
                return MigrateOutReply(migration_id=mid, ok=True)
            return await self._frozen_reply(mid, frozen_or_none)
        raise ValueError(f"unknown migrate_out op {message.op!r}")

    async def _frozen_reply(self, mid: str, frozen: FrozenRequest) -> MigrateOutReply:
        """The stopped request's exact state; first send the client any tokens sampled but not yet sent.

        Thread: the bus loop."""
        stream = self._streams.get(frozen.request_id)
        if stream is None:
            raise EngineError(f"request {frozen.request_id} has no stream on {self.instance_id}")
        stream.migrated_out = True
        tail = frozen.output_token_ids[stream.index :]
        if tail:
            await self._send_tokens(stream, tail, "")
        add = stream.add
        return MigrateOutReply(
            migration_id=mid,
            ok=True,
            total_blocks=frozen.num_blocks,
            stage=_stage_info(frozen.final_stage),
            request_id=frozen.request_id,
            prompt_token_ids=frozen.prompt_token_ids,
            output_token_ids=frozen.output_token_ids,
            kv_transfer=frozen.kv_transfer,
            reply_to=add.reply_to,
            sampling=add.sampling,
            priority=add.priority,
            served_by=[*add.served_by, self.instance_id],
            request_class=add.request_class,
            client_id=add.client_id,
        )


def _continued(add: EngineAdd, sent: list[int]) -> EngineAdd:
    """A dispatch parked behind an ending copy of its id resumes after every token that copy sent (the
    client has them; resuming from fewer would make it generate those indices again), provided they extend
    what the dispatch resumes from (and it loads no migrated KV, which is for its own context only)."""
    resumed = add.output_token_ids
    if add.kv_transfer is not None or len(sent) <= len(resumed) or sent[: len(resumed)] != resumed:
        return add
    return msgspec.structs.replace(add, output_token_ids=list(sent))


def _stage_info(report: StageReport) -> MigrationStageInfo:
    return MigrationStageInfo(
        stage=report.stage,
        copied_blocks=report.copied_blocks,
        copied_bytes=report.copied_bytes,
        remaining_blocks=report.remaining_blocks,
        total_blocks=report.total_blocks,
        duration_s=report.duration_s,
        request_finished=report.request_finished,
    )


def _raise_if_cancelled() -> None:
    """Re-raise a cancel that a library call swallowed into another exception (Python 3.11 counts them)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Heartbeater:
    """Publishes the instance's load from a thread of its own, so a busy engine loop is not taken for dead."""

    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        interval_s: float,
        *,
        role: str = "mixed",
        local: LocalAutoscaler | None = None,
        phase: str = "both",
    ) -> None:
        """Thread: the engine host's thread."""
        self.bus = bus
        self.engine = engine
        self.interval_s = interval_s
        self.role = role
        self.phase = phase  # prefill/decode disaggregation (engine.phase)
        self.local = local
        self.state = "serving"
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        """Thread: the engine host's thread."""
        self._thread.start()

    def stop(self) -> None:
        """Thread: the engine host's thread."""
        self._stop.set()
        self._thread.join(timeout=2)

    def beat(self) -> None:
        """Thread: the heartbeat thread; or the engine host's thread, for a last beat when draining or stopping."""
        info = self.engine.info
        if info.protocol_version != PROTOCOL_VERSION:  # advertise what this code speaks (version negotiation)
            info = msgspec.structs.replace(info, protocol_version=PROTOCOL_VERSION)
        self._seq += 1
        load = self.engine.load()
        if self.local is not None:  # one window's decision, then held requests counted as waiting
            self.local.tick(load)
            load = self.local.adjust_load(load, info.block_size)
        self.bus.publish(
            subjects.heartbeat(info.instance_id),
            InstanceHeartbeat(
                v=MIN_PROTOCOL_VERSION,  # any supported control plane reads it; info says what we speak
                role=self.local.role if self.local is not None else self.role,
                local=self.local.report() if self.local is not None else None,
                info=info,
                load=load,
                seq=self._seq,
                sent_at=time.time(),
                draining=self.state == "draining",
                state=self.state,
                can_migrate=isinstance(self.engine, MigratableEngine),
                memory=self._memory(),
                prefix_cache=self._prefix_cache(),
                phase=self.phase,
            ),
        )

    def _prefix_cache(self) -> PrefixCacheReport | None:
        """Engines that report their prefix cache (vLLM's KV events) put it in every beat.

        Thread: as beat."""
        report = getattr(self.engine, "prefix_cache_report", None)
        if report is None:
            return None
        try:  # a listing too big for one beat goes in chunks that fit the server's max_payload
            max_blocks = max_blocks_for(self.bus.nc.max_payload)
        except Exception:  # not connected yet: the NATS default's share
            max_blocks = DEFAULT_MAX_BLOCKS
        try:
            value: PrefixCacheReport | None = report(max_blocks=max_blocks)
        except Exception:  # not started yet, or the listener failed: the beat goes without it
            log.exception("prefix-cache report failed")
            return None
        return value

    def _memory(self) -> EngineMemory | None:
        """Thread: as beat."""
        report = getattr(self.engine, "memory_status", None)
        if report is None:
            return None
        try:
            memory: EngineMemory = report()
        except Exception:  # not started yet
            return None
        return memory

    def _run(self) -> None:
        """Thread: the heartbeat thread."""
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # never let a transient error stop the heartbeat
                log.exception("heartbeat failed")
            self._stop.wait(self.interval_s)
