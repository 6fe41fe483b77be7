"""The OpenAI request bodies the gateway accepts, and their translation to one Drover submission.

Honoured: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (chat: also ``max_completion_tokens``),
``temperature`` (OpenAI's default 1.0), ``top_p``, ``seed``, ``stop`` (applied by the gateway to the text),
``stream`` and ``stream_options.include_usage``, ``n=1``. Drover extras in the body: ``priority`` (int, > 0
is high), ``request_class`` (``interactive`` | ``batch``), ``request_id`` (becomes the response ``id``;
``drover trace`` finds the request by it) and ``ignore_eos`` (as in vLLM's server; for benchmarks).
Fields that would change the answer but are not implemented (``n`` > 1, ``logprobs``, ``echo``, ``tools``,
penalties, ...) are refused with a 400 that names them; other unknown fields are ignored, as OpenAI clients
send many.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control.apps.gateway.errors import invalid
from control.apps.gateway.prompts import ROLES, message_text, render_chat
from transport import subjects
from transport.messages import RequestClass, SamplingParams

MAX_STOPS = 4  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Drover extras
    priority: int = 0
    request_class: RequestClass = RequestClass.INTERACTIVE
    request_id: str | None = None
    ignore_eos: bool = False  # as vLLM's OpenAI server: generate max_tokens whatever the model says


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """One Drover submission, as the gateway will make it."""

    request_id: str
    model: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    sampling: SamplingParams
    stops: tuple[str, ...]
    priority: int
    request_class: RequestClass
    stream: bool
    include_usage: bool
    input_param: str  # the body field holding the input: "prompt" or "messages" (for error messages)


def _refuse_unsupported(body: _Common, extra: dict[str, bool]) -> None:
    if body.n != 1:
        raise invalid("only n=1 is supported", "n")
    checks = {
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "logit_bias": bool(body.logit_bias),
        **extra,
    }
    for name, used in checks.items():
        if used:
            raise invalid(f"{name} is not supported by this gateway", name)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise invalid(f"at most {MAX_STOPS} stop sequences", "stop")
    return tuple(s for s in stops if s)


def _request_id(body: _Common, prefix: str) -> str:
    if body.request_id is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    try:
        return subjects.validate_token(body.request_id)
    except ValueError:
        raise invalid("request_id must be 1-128 characters without '.', '*', '>' or whitespace", "request_id") from None


def _spec(
    body: _Common, prefix: str, max_tokens: int, prompt: str | None, token_ids: list[int] | None, input_param: str
) -> GenerationSpec:
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    return GenerationSpec(
        request_id=_request_id(body, prefix),
        model=body.model,
        prompt=prompt,
        prompt_token_ids=token_ids,
        sampling=sampling,
        stops=_stops(body.stop),
        priority=body.priority,
        request_class=body.request_class,
        stream=body.stream,
        include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage),
        input_param=input_param,
    )


def completion_spec(body: CompletionRequest) -> GenerationSpec:
    _refuse_unsupported(
        body,
        {
            "echo": body.echo,
            "logprobs": body.logprobs is not None,
            "best_of": (body.best_of or 1) != 1,
            "suffix": bool(body.suffix),
        },
    )
    prompt: str | None = None
    token_ids: list[int] | None = None
    raw = body.prompt
    if not raw:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(raw, str):
        prompt = raw
    elif raw and all(isinstance(t, int) for t in raw):
        token_ids = [int(t) for t in raw]  # type: ignore[arg-type]
    elif len(raw) == 1:
        only = raw[0]
        prompt, token_ids = (only, None) if isinstance(only, str) else (None, list(only))  # type: ignore[arg-type]
    else:
        raise invalid("send one prompt per request (a list of prompts is not supported)", "prompt")
    return _spec(body, "cmpl", body.max_tokens or 16, prompt, token_ids, "prompt")


def chat_spec(body: ChatCompletionRequest, default_max_tokens: int) -> GenerationSpec:
    _refuse_unsupported(
        body,
        {
            "logprobs": body.logprobs,
            "tools": bool(body.tools),
            "response_format": bool(body.response_format and body.response_format.get("type") != "text"),
        },
    )
    messages: list[tuple[str, str]] = []
    for index, message in enumerate(body.messages):
        if message.role not in ROLES:
            raise invalid(f"messages[{index}].role must be one of {sorted(ROLES)}", f"messages[{index}].role")
        messages.append((message.role, message_text(message.content, index)))
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    return _spec(body, "chatcmpl", max_tokens, render_chat(messages), None, "messages")


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


Kind = Literal["completion", "chat"]


def response_body(
    kind: Kind, spec: GenerationSpec, created: int, text: str, finish_reason: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A whole (non-streamed) response."""
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    return {
        "id": spec.request_id,
        "object": obj,
        "created": created,
        "model": spec.model,
        "choices": [choice],
        "usage": usage,
    }


def chunk_body(
    kind: Kind,
    spec: GenerationSpec,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    *,
    role: bool = False,
) -> dict[str, Any]:
    """One streamed chunk; ``text`` None with a finish reason is the closing chunk."""
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    return {"id": spec.request_id, "object": obj, "created": created, "model": spec.model, "choices": [choice]}


def usage_chunk_body(kind: Kind, spec: GenerationSpec, created: int, usage: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {
        "id": spec.request_id,
        "object": obj,
        "created": created,
        "model": spec.model,
        "choices": [],
        "usage": usage,
    }
