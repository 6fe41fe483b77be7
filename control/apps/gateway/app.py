"""The gateway's HTTP surface (FastAPI): OpenAI's ``/v1/completions``, ``/v1/chat/completions`` (streamed
as server-sent events or whole), ``/v1/models``, plus ``/v1/usage``, ``/healthz``, ``/readyz`` and
``/metrics``. Everything below HTTP lives in :mod:`control.apps.gateway.service`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from control.apps.gateway.access import Principal
from control.apps.gateway.errors import GatewayError
from control.apps.gateway.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationSpec,
    Kind,
    chat_spec,
    chunk_body,
    completion_spec,
    response_body,
    usage_body,
    usage_chunk_body,
)
from control.apps.gateway.service import Gateway, Generation
from control.errors import DroverError
from control.gateway_settings import GatewaySettings
from observability.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from control.settings import NatsSettings

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (metrics only)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(DroverError):
    """The HTTP client disconnected before the answer was ready."""

    default_code = "client_gone"


def _error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`ClientGone` (with ``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


def create_app(
    settings: GatewaySettings,
    nats_url: str,
    metrics: Metrics | None = None,
    *,
    nats_settings: NatsSettings | None = None,
) -> FastAPI:
    """The gateway app; its lifespan opens the one NATS connection every request shares (with the
    credentials and TLS of ``nats_settings``)."""
    gateway = Gateway(settings, nats_url, metrics or Metrics(service_name="drover-gateway"), nats_settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Drover OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    _install_error_handlers(app)

    def principal(request: Request) -> Principal:
        return gateway.access.authenticate(request.headers.get("authorization"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: the process answers and its NATS connection is up."""
        if not gateway.client.connected:
            return JSONResponse({"status": "fail", "reason": "not connected to NATS"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the control plane answers and at least one instance is serving."""
        try:
            status = await gateway.status()
        except GatewayError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        serving = [i.info.instance_id for i in status.instances if i.state == "serving"]
        body = {
            "status": "ready" if serving else "no_instances",
            "serving_instances": serving,
            "models": sorted({i.info.model for i in status.instances}),
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    if settings.metrics_enabled:

        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(_: Principal = Depends(principal)) -> dict[str, Any]:
        models = await gateway.models(refresh=True)
        return {"object": "list", "data": [_model_card(m, gateway.created) for m in models]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, _: Principal = Depends(principal)) -> dict[str, Any]:
        await gateway.check_model(model)
        return _model_card(model, gateway.created)

    @app.get("/v1/usage")
    async def usage(caller: Principal = Depends(principal)) -> dict[str, Any]:
        """Tokens in and out since the gateway started: the caller's, or every client's for an admin key."""
        return gateway.access.report(caller)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, caller: Principal = Depends(principal)
    ) -> Response:
        return await _generate(gateway, request, caller, "completion", "/v1/completions", lambda: completion_spec(body))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, caller: Principal = Depends(principal)
    ) -> Response:
        return await _generate(
            gateway,
            request,
            caller,
            "chat",
            "/v1/chat/completions",
            lambda: chat_spec(body, settings.default_max_tokens),
        )

    return app


def _model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "drover"}


async def _generate(
    gateway: Gateway,
    request: Request,
    caller: Principal,
    kind: Kind,
    endpoint: str,
    make_spec: Callable[[], GenerationSpec],
) -> Response:
    arrived = time.perf_counter()

    def done(status: int) -> None:
        gateway.metrics.gateway_request(endpoint, status, caller.client_id, time.perf_counter() - arrived)

    try:
        spec = make_spec()
        gateway.access.admit(caller)
        await gateway.check_model(spec.model)
        gateway.check_length(spec)
        generation = await gateway.submit(spec, caller, endpoint, arrived)
    except GatewayError as exc:
        done(exc.status)
        raise
    created = int(time.time())
    try:
        if not spec.stream:
            text = await until_disconnected(request, generation.text())
            done(200)
            return JSONResponse(
                response_body(
                    kind, spec, created, text, generation.finish_reason or "abort", usage_body(*generation.usage())
                )
            )
        pieces = generation.deltas()
        first = await until_disconnected(request, anext(pieces, None))
    except ClientGone:
        done(CLIENT_CLOSED_REQUEST)
        generation.close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except GatewayError as exc:
        done(exc.status)
        generation.close()
        raise
    finally:
        if not spec.stream:
            generation.close()
    return StreamingResponse(
        _event_stream(generation, kind, created, first, pieces, done),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _event_stream(
    generation: Generation,
    kind: Kind,
    created: int,
    first: str | None,
    pieces: AsyncIterator[str],
    done: Callable[[int], None],
) -> AsyncIterator[str]:
    """The SSE body: a role chunk (chat), text chunks, the closing chunk, usage if asked, ``[DONE]``.

    If the client disconnects, Starlette cancels this generator; ``finally`` then cancels the request on
    Drover (``close()`` spawns the cancel, so it survives the cancellation)."""
    spec = generation.spec
    status = CLIENT_CLOSED_REQUEST
    try:
        if kind == "chat":
            yield _sse(chunk_body(kind, spec, created, "", role=True))
        if first is not None:
            yield _sse(chunk_body(kind, spec, created, first))
        try:
            async for piece in pieces:
                yield _sse(chunk_body(kind, spec, created, piece))
        except GatewayError as exc:  # after the first bytes the status is sent: report it in the stream
            status = exc.status
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
            return
        yield _sse(chunk_body(kind, spec, created, None, generation.finish_reason or "abort"))
        if spec.include_usage:
            yield _sse(usage_chunk_body(kind, spec, created, usage_body(*generation.usage())))
        yield "data: [DONE]\n\n"
        status = 200
    finally:
        generation.close()
        done(status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):  # its "loc" is a character offset, not a field
            where = next((e.get("loc", ("body", "?"))[-1] for e in errors if e.get("type") == "json_invalid"), "?")
            return _error_response(GatewayError(400, f"the body is not valid JSON (at character {where})"))
        params = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
        message = "; ".join(f"{p or 'body'}: {e.get('msg', 'invalid')}" for p, e in zip(params, errors, strict=True))
        return _error_response(
            GatewayError(
                400,
                message or "invalid request body",
                param=params[0] or None if params else None,
                code="invalid_value",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(GatewayError(exc.status_code, str(exc.detail), type=kind))
