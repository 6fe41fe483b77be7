"""The gateway's core, below HTTP: one shared NATS connection (a :class:`DroverClient`), the model list,
access control, and :class:`Generation`, one OpenAI request running on Drover.

Every request goes through Drover's ordinary client path (``DroverClient.submit``): the gateway is just
another NATS client, so the control plane and engines need nothing gateway-specific.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

import nats.errors
from opentelemetry import trace

from control.apps.gateway.access import AccessControl, Principal
from control.apps.gateway.errors import GatewayError, from_drover, unavailable
from control.apps.gateway.schema import GenerationSpec
from control.apps.gateway.stops import StopMatcher
from control.client import DroverClient, DroverError, RequestStream, StreamEvent
from control.gateway_settings import GatewaySettings
from observability import spans
from observability.metrics import Metrics
from observability.tracing import tracer
from transport.messages import StatusReply

if TYPE_CHECKING:
    from control.settings import NatsSettings

log = logging.getLogger(__name__)


# What a lost or missing control plane looks like from nats-py.
NATS_UNAVAILABLE = (
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    TimeoutError,
)


class Gateway:
    """Shared state of one gateway process; ``start()`` connects, ``stop()`` drains."""

    def __init__(
        self, settings: GatewaySettings, nats_url: str, metrics: Metrics, nats_settings: NatsSettings | None = None
    ) -> None:
        self.settings = settings
        self.client = DroverClient(nats_url, name=settings.client_name, nats_settings=nats_settings)
        self.access = AccessControl(settings)
        self.metrics = metrics
        self.created = int(time.time())
        self._models: list[str] = []
        self._contexts: dict[str, int] = {}  # model -> smallest context length among its instances
        self._models_at = -float("inf")
        self._background: set[asyncio.Task[Any]] = set()
        self.startup_error: Exception | None = None

    async def start(self) -> None:
        """Connect (fail fast: a gateway that cannot reach NATS at start is misconfigured); once connected,
        nats-py reconnects forever, so a NATS restart only fails the requests in flight."""
        timeout_s = self.settings.nats_connect_timeout_s
        try:
            await asyncio.wait_for(
                self.client.connect(
                    connect_timeout=timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=_log_nats_error,
                ),
                timeout_s,
            )
        except Exception as exc:
            self.startup_error = RuntimeError(
                f"cannot reach NATS at {self.client.url} within {timeout_s:g}s ({type(exc).__name__})"
            )
            raise self.startup_error from exc

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.cancel_timeout_s * 2)
        await self.client.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` to completion even if the HTTP handler that started it is cancelled."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------------------- cluster
    async def status(self) -> StatusReply:
        try:
            return await self.client.status(timeout_s=self.settings.cancel_timeout_s)
        except NATS_UNAVAILABLE as exc:
            raise unavailable(f"the Drover control plane did not answer: {type(exc).__name__}") from exc
        except DroverError as exc:
            raise from_drover(exc.code, exc.message) from exc

    async def models(self, *, refresh: bool = False) -> list[str]:
        """Models the cluster's instances serve (from status, cached for ``models_cache_s``)."""
        if refresh or time.monotonic() - self._models_at > self.settings.models_cache_s:
            status = await self.status()
            self._models = sorted({i.info.model for i in status.instances})
            contexts: dict[str, int] = {}
            for i in status.instances:  # the smallest context among a model's instances: any may serve it
                contexts[i.info.model] = min(contexts.get(i.info.model, i.info.max_model_len), i.info.max_model_len)
            self._contexts = contexts
            self._models_at = time.monotonic()
        return self._models

    def check_length(self, spec: GenerationSpec) -> None:
        """400 when max_tokens (with the prompt, when its tokens are known) cannot fit the model's context, as
        vLLM's server answers, rather than a request cut short without a word."""
        context = self._contexts.get(spec.model)
        if not context:
            return
        prompt = len(spec.prompt_token_ids) if spec.prompt_token_ids else 1
        if spec.sampling.max_tokens + prompt > context:
            raise GatewayError(
                400,
                f"max_tokens {spec.sampling.max_tokens} plus a prompt of {'' if spec.prompt_token_ids else 'at least '}"
                f"{prompt} tokens exceeds the context length of {spec.model} ({context} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def check_model(self, model: str) -> None:
        """404 for a model no instance serves. With no instances at all the request goes through: the
        scheduler holds it until one joins (or answers overloaded)."""
        models = await self.models()
        if model in models:
            return
        models = await self.models(refresh=True)
        if models and model not in models:
            raise GatewayError(
                404,
                f"the model {model!r} does not exist; served: {', '.join(models)}",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------------------------------------- requests
    async def submit(self, spec: GenerationSpec, principal: Principal, endpoint: str, arrived: float) -> Generation:
        """Submit on Drover and wait for the first text (or the end): errors before any output become
        HTTP errors with the right status rather than a broken stream."""
        span = tracer().start_span(
            spans.GATEWAY_REQUEST,
            kind=trace.SpanKind.SERVER,
            attributes={
                spans.REQUEST_ID: spec.request_id,
                spans.CLIENT_ID: principal.client_id,
                spans.GEN_AI_REQUEST_MODEL: spec.model,
                spans.GEN_AI_REQUEST_MAX_TOKENS: spec.sampling.max_tokens,
                spans.GEN_AI_REQUEST_TEMPERATURE: spec.sampling.temperature,
                spans.PRIORITY: spec.priority,
                spans.REQUEST_CLASS: str(spec.request_class),
                "http.route": endpoint,
                "drover.gateway.stream": spec.stream,
            },
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                stream = await self.client.submit(
                    spec.prompt,
                    prompt_token_ids=spec.prompt_token_ids,
                    sampling=spec.sampling,
                    request_id=spec.request_id,
                    priority=spec.priority,
                    request_class=spec.request_class,
                    model=spec.model,
                    client_id=principal.client_id,
                    deadline_s=self.settings.request_deadline_s or None,
                )
        except Exception as exc:
            span.record_exception(exc)
            span.end()
            if isinstance(exc, NATS_UNAVAILABLE | nats.errors.Error):
                raise unavailable(f"could not submit to Drover: {type(exc).__name__}") from exc
            raise
        return Generation(self, spec, principal, stream, span, arrived)


_NATS_LOG_EVERY_S = 30.0
_nats_errors = {"last": 0.0, "quiet": 0}


async def _log_nats_error(exc: Exception) -> None:
    """One line per NATS error, not nats-py's traceback per reconnect attempt; while NATS stays down (an
    error every reconnect_wait_s), one line per 30 s with how many were left out."""
    now = time.monotonic()
    if now - _nats_errors["last"] < _NATS_LOG_EVERY_S:
        _nats_errors["quiet"] += 1
        return
    quiet = int(_nats_errors["quiet"])
    _nats_errors.update(last=now, quiet=0)
    log.warning("nats: %r%s", exc, f" ({quiet} more in the last {_NATS_LOG_EVERY_S:.0f}s)" if quiet else "")


class Generation:
    """One request on Drover as its HTTP client sees it: text deltas with stop strings applied, then a
    finish reason and usage. ``close()`` (always called) cancels it on Drover if it did not end, and
    charges the client's usage."""

    def __init__(
        self,
        gateway: Gateway,
        spec: GenerationSpec,
        principal: Principal,
        stream: RequestStream,
        span: trace.Span,
        arrived: float,
    ) -> None:
        self.gateway = gateway
        self.spec = spec
        self.principal = principal
        self.stream = stream
        self.span = span
        self.arrived = arrived
        self.finish_reason: str | None = None
        self.error: GatewayError | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._stop = StopMatcher(spec.stops)
        self._events: AsyncIterator[StreamEvent] | None = None
        self._last_at: float | None = None
        self._closed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    async def deltas(self) -> AsyncIterator[str]:
        """Non-empty text pieces in order; raises :class:`GatewayError` on a Drover error."""
        self._events = self.stream.events()
        try:
            async for event in self._events:
                self._on_event(event)
                text = self._stop.push(event.text)
                if text:
                    yield text
                if self._stop.stopped:
                    self.finish_reason = "stop"  # the rest is cancelled by close()
                    return
        except DroverError as exc:
            self.error = from_drover(exc.code, exc.message, self.spec.input_param)
            raise self.error from exc
        tail = self._stop.flush()
        if tail:
            yield tail
        done = self.stream.result_data.done
        if done is not None:
            self.finish_reason = done.finish_reason
            self.completion_tokens = done.usage.completion_tokens
            self.prompt_tokens = done.usage.prompt_tokens

    def _on_event(self, event: StreamEvent) -> None:
        class_ = str(self.spec.request_class)
        metrics = self.gateway.metrics
        n = len(event.token_ids)
        if self._last_at is None:
            metrics.gateway_ttft(event.received_at - self.arrived, class_)
            self.span.add_event("first_token")
        else:
            metrics.gateway_inter_token(itertools.repeat((event.received_at - self._last_at) / n, n), class_)
        self._last_at = event.received_at
        self.completion_tokens += n

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) so far."""
        accepted = self.stream.result_data.accepted
        prompt = self.prompt_tokens or (accepted.prompt_tokens if accepted is not None else 0)
        return prompt, self.completion_tokens

    async def text(self) -> str:
        """The whole text (non-streamed responses)."""
        return "".join([piece async for piece in self.deltas()])

    def close(self) -> None:
        """Account for the request; if it is still running on Drover (client gone, stop string), cancel it
        in the background. Idempotent and never blocks, so it is safe in a cancelled handler."""
        if self._closed:
            return
        self._closed = True
        running = self.stream.result_data.done is None and self.error is None
        if running:
            self.gateway.spawn(self._cancel_and_drain())
        self.prompt_tokens, self.completion_tokens = self.usage()
        self.gateway.access.record(self.principal, self.prompt_tokens, self.completion_tokens)
        self.gateway.metrics.gateway_tokens(self.principal.client_id, self.prompt_tokens, self.completion_tokens)
        outcome = self.finish_reason or (self.error.openai_code if self.error else None) or "disconnected"
        self.span.set_attribute(spans.GEN_AI_USAGE_INPUT_TOKENS, self.prompt_tokens)
        self.span.set_attribute(spans.GEN_AI_USAGE_OUTPUT_TOKENS, self.completion_tokens)
        self.span.set_attribute(spans.GEN_AI_RESPONSE_FINISH_REASONS, [str(outcome)])
        self.span.end()

    async def _cancel_and_drain(self) -> None:
        """Cancel on Drover, then read the stream to its end so its inbox is unsubscribed."""
        timeout_s = self.gateway.settings.cancel_timeout_s
        if self._events is not None:
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]

        async def drain() -> None:
            with contextlib.suppress(DroverError):
                async for _ in self.stream.events():
                    pass

        drainer = asyncio.get_running_loop().create_task(drain())
        try:
            await self.stream.cancel(timeout_s=timeout_s)
        except (DroverError, *NATS_UNAVAILABLE) as exc:
            log.debug("cancel of %s: %s", self.spec.request_id, exc)  # it ended meanwhile, or Drover is gone
        try:
            await asyncio.wait_for(drainer, timeout_s)
        except TimeoutError:
            log.warning("request %s did not end %.0fs after its cancel", self.spec.request_id, timeout_s)
        finally:
            await self.stream.close()
