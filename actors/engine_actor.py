"""EngineActor: owns one engine instance, takes requests from the bus, streams tokens straight to clients.

The pykka actor is the single owner of the instance's request table (what runs here, for whom). The token
path never goes through the actor: each request is a coroutine on the bus loop that reads the engine's
async iterator and publishes ``TokenChunk`` messages directly to the client's inbox, then ``RequestDone``.
The control plane is told when a request leaves (``EngineRequestEnded``) so it can forget it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pykka
from opentelemetry import trace

from engines.base import Engine, EngineError, EngineRequest
from engines.tokenizer import IncrementalDetokenizer, Tokenizer
from observability import spans
from observability.tracing import extract_context, tracer
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    EngineAbort,
    EngineAdd,
    EngineRequestEnded,
    ErrorCode,
    ErrorReply,
    InstanceHeartbeat,
    RequestDone,
    Timings,
    TokenChunk,
    Usage,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Running:
    add: EngineAdd
    future: concurrent.futures.Future[None]
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class _Ended:
    """Internal: a request's coroutine finished (sent by the loop to the actor)."""

    request_id: str


class EngineActor(pykka.ThreadingActor):
    def __init__(self, bus: Bus, engine: Engine, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.bus = bus
        self.engine = engine
        self.tokenizer = tokenizer
        self.instance_id = engine.info.instance_id
        self.running: dict[str, _Running] = {}
        self.draining = False

    # ------------------------------------------------------------------------------------------- messages
    def on_receive(self, message: object) -> object:
        if isinstance(message, Envelope):
            self._on_envelope(message)
        elif isinstance(message, _Ended):
            self.running.pop(message.request_id, None)
        return None

    def _on_envelope(self, envelope: Envelope) -> None:
        message = envelope.message
        if isinstance(message, EngineAdd):
            self._add(message, envelope.headers)
        elif isinstance(message, EngineAbort):
            self._abort(message, envelope.reply)
        else:
            log.warning("engine %s: unexpected %s", self.instance_id, type(message).__name__)
            self.bus.reply_error(
                envelope.reply, ErrorCode.INVALID_REQUEST, f"engine does not take {type(message).__name__}"
            )

    def _add(self, add: EngineAdd, headers: dict[str, str]) -> None:
        if add.request_id in self.running:
            self.bus.publish(
                add.reply_to,
                ErrorReply(
                    code=ErrorCode.DUPLICATE_REQUEST,
                    message=f"request {add.request_id} already runs on {self.instance_id}",
                    request_id=add.request_id,
                ),
            )
            return
        context_len = len(add.prompt_token_ids) + len(add.output_token_ids)
        max_len = self.engine.info.max_model_len
        if not add.prompt_token_ids or context_len >= max_len:
            self._reject(add, ErrorCode.PROMPT_TOO_LONG, f"context of {context_len} tokens; limit {max_len - 1}")
            return
        future = self.bus.run(self._serve(add, headers))
        self.running[add.request_id] = _Running(add=add, future=future)

    def _abort(self, abort: EngineAbort, reply: str) -> None:
        if abort.request_id not in self.running:
            self.bus.reply_error(
                reply, ErrorCode.UNKNOWN_REQUEST, f"no request {abort.request_id} on {self.instance_id}"
            )
            return
        self.bus.run(self.engine.abort(abort.request_id))

    def _reject(self, add: EngineAdd, code: ErrorCode, text: str) -> None:
        log.info("engine %s rejects %s: %s", self.instance_id, add.request_id, text)
        self.bus.publish(add.reply_to, ErrorReply(code=code, message=text, request_id=add.request_id))
        self.bus.publish(
            subjects.ENGINE_EVENTS,
            EngineRequestEnded(
                instance_id=self.instance_id,
                request_id=add.request_id,
                finish_reason="error",
                num_output_tokens=len(add.output_token_ids),
                error=text,
            ),
        )

    # ------------------------------------------------------------------------------------------- token path
    async def _serve(self, add: EngineAdd, headers: dict[str, str]) -> None:
        """Run one request on the engine and stream it to the client (runs on the bus loop)."""
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
        index = len(add.output_token_ids)
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
                if output.new_token_ids:
                    if first_token_at is None:
                        first_token_at = time.time()
                        span.add_event("first_token")
                    text = detok.push(output.new_token_ids) if add.stream_text else ""
                    await self.bus.apublish(
                        add.reply_to,
                        TokenChunk(
                            request_id=add.request_id,
                            index=index,
                            token_ids=output.new_token_ids,
                            text=text,
                            instance_id=self.instance_id,
                            produced_at=time.time(),
                        ),
                    )
                    index += len(output.new_token_ids)
                if output.finish_reason is not None:
                    finish_reason = output.finish_reason
                    break
        except EngineError as exc:
            finish_reason, error = "error", str(exc)
            await self.bus.apublish(
                add.reply_to,
                ErrorReply(code=ErrorCode.INVALID_REQUEST, message=str(exc), request_id=add.request_id),
            )
        except asyncio.CancelledError:
            finish_reason = "abort"
            await self.engine.abort(add.request_id)
        except Exception as exc:
            log.exception("engine %s failed request %s", self.instance_id, add.request_id)
            finish_reason, error = "error", f"engine failure: {exc}"
            await self.bus.apublish(
                add.reply_to,
                ErrorReply(code=ErrorCode.ENGINE_FAILED, message=error, request_id=add.request_id),
            )
        finally:
            now = time.time()
            if finish_reason not in ("error", "migrated"):
                await self.bus.apublish(
                    add.reply_to,
                    RequestDone(
                        request_id=add.request_id,
                        finish_reason=finish_reason,
                        usage=Usage(prompt_tokens=len(add.prompt_token_ids), completion_tokens=index),
                        timings=Timings(
                            queue_s=max(0.0, added_at - add.arrival_time) if add.arrival_time else 0.0,
                            ttft_s=(first_token_at - add.arrival_time)
                            if first_token_at and add.arrival_time
                            else 0.0,
                            e2e_s=(now - add.arrival_time) if add.arrival_time else 0.0,
                        ),
                        instances=[*add.served_by, self.instance_id],
                        num_tokens=index,
                    ),
                )
            await self.bus.apublish(
                subjects.ENGINE_EVENTS,
                EngineRequestEnded(
                    instance_id=self.instance_id,
                    request_id=add.request_id,
                    finish_reason=finish_reason,
                    num_output_tokens=index,
                    error=error,
                ),
            )
            span.set_attribute(spans.GEN_AI_USAGE_OUTPUT_TOKENS, index - len(add.output_token_ids))
            span.set_attribute(spans.GEN_AI_RESPONSE_FINISH_REASONS, [finish_reason])
            span.end()
            if self.actor_ref.is_alive():
                self.actor_ref.tell(_Ended(add.request_id))


class Heartbeater:
    """Publishes the instance's load from a thread of its own, so a busy engine loop is not taken for dead."""

    def __init__(self, bus: Bus, engine: Engine, interval_s: float) -> None:
        self.bus = bus
        self.engine = engine
        self.interval_s = interval_s
        self.state = "serving"
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def beat(self) -> None:
        info = self.engine.info
        self._seq += 1
        self.bus.publish(
            subjects.heartbeat(info.instance_id),
            InstanceHeartbeat(
                info=info,
                load=self.engine.load(),
                seq=self._seq,
                sent_at=time.time(),
                draining=self.state == "draining",
                state=self.state,
            ),
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # never let a transient error stop the heartbeat
                log.exception("heartbeat failed")
            self._stop.wait(self.interval_s)


def host_identity() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()
