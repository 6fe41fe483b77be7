"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that
OpenAI clients expect (their retry logic keys off 429 and 5xx), mapped from Drover's error codes."""

from __future__ import annotations

from typing import Any

from control.errors import DroverError
from transport.messages import ErrorCode

# Drover code -> (HTTP status, OpenAI error type, OpenAI code). Clients retry 429/5xx, not 4xx.
_BY_CODE: dict[str, tuple[int, str, str | None]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", None),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.UNKNOWN_REQUEST: (404, "invalid_request_error", "unknown_request"),
    ErrorCode.DUPLICATE_REQUEST: (409, "invalid_request_error", "duplicate_request"),
    ErrorCode.OVERLOADED: (503, "server_error", "overloaded"),
    ErrorCode.NO_INSTANCE: (503, "server_error", "no_instance"),
    ErrorCode.UNKNOWN_INSTANCE: (500, "server_error", "unknown_instance"),
    ErrorCode.ENGINE_FAILED: (502, "server_error", "engine_failed"),
    ErrorCode.MIGRATION_FAILED: (502, "server_error", "migration_failed"),
    ErrorCode.CANCELLED: (500, "server_error", "cancelled"),
    # The gateway wrote the message: a protocol error here is a version mismatch with the control plane.
    ErrorCode.MALFORMED: (502, "server_error", "upstream_protocol"),
    ErrorCode.UNKNOWN_KIND: (502, "server_error", "upstream_protocol"),
    ErrorCode.UNSUPPORTED_VERSION: (502, "server_error", "upstream_protocol"),
    ErrorCode.INTERNAL: (500, "server_error", "internal"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}


class GatewayError(DroverError):
    """An error answered to the HTTP client; ``headers`` carries e.g. ``Retry-After``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # The OpenAI body's ``code`` stays None where OpenAI has none (the status and ``type`` say it); the
        # root's ``code`` is never empty.
        super().__init__(message, code=code or type)
        self.status = status
        self.type = type
        self.param = param
        self.openai_code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.openai_code}}


def from_drover(code: ErrorCode | str, message: str, prompt_param: str = "prompt") -> GatewayError:
    """The gateway error for a Drover ``ErrorReply`` code; ``prompt_param`` names the input field
    (``prompt`` or ``messages``) an input error points at."""
    status, kind, openai_code = _BY_CODE.get(str(code), (500, "server_error", str(code)))
    param = prompt_param if code == ErrorCode.PROMPT_TOO_LONG else None
    headers = {"Retry-After": "1"} if status == 503 else None
    return GatewayError(status, message, type=kind, param=param, code=openai_code or str(code), headers=headers)


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if param else None)


def unavailable(message: str) -> GatewayError:
    """The control plane did not answer (no responders, timeout, NATS down)."""
    return GatewayError(
        503, message, type="server_error", code="control_plane_unavailable", headers={"Retry-After": "1"}
    )
