"""Every message on the Drover bus: msgspec structs in one tagged union, with a protocol version.

Wire format: msgpack. Every message carries ``kind`` (its tag) and ``v`` (the protocol version of the
sender). Decoders skip unknown *fields* (newer senders may add some), and an unknown *kind* becomes a
:class:`ProtocolError` that the receiver answers with an ``ErrorReply(code="unknown_kind")``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeAlias

import msgspec

PROTOCOL_VERSION = 1
"""Bumped on incompatible changes; receivers accept ``v`` in ``SUPPORTED_VERSIONS``."""
SUPPORTED_VERSIONS = frozenset({1})


class ErrorCode(StrEnum):
    """Machine-readable error codes of :class:`ErrorReply`."""

    MALFORMED = "malformed"  # not msgpack, or fields of the wrong type
    UNKNOWN_KIND = "unknown_kind"  # a message kind this receiver does not know
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_REQUEST = "invalid_request"  # well-formed but unacceptable (empty prompt, bad params)
    PROMPT_TOO_LONG = "prompt_too_long"
    UNKNOWN_REQUEST = "unknown_request"  # cancel/migrate of an id we do not know (or wrong cancel token)
    DUPLICATE_REQUEST = "duplicate_request"
    OVERLOADED = "overloaded"
    NO_INSTANCE = "no_instance"  # no live instance can serve the request
    UNKNOWN_INSTANCE = "unknown_instance"
    ENGINE_FAILED = "engine_failed"
    CANCELLED = "cancelled"
    MIGRATION_FAILED = "migration_failed"
    INTERNAL = "internal"


class RequestClass(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every bus message. ``v`` has no wire default so it is always sent."""

    v: int = PROTOCOL_VERSION


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int = 16
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


# ---------------------------------------------------------------------------------------------------------
# Client <-> control plane
# ---------------------------------------------------------------------------------------------------------


class SubmitRequest(_Msg, frozen=True, tag="submit"):
    """A client's request. Replies (Accepted, TokenChunk..., RequestDone | ErrorReply) go to ``reply_to``."""

    reply_to: str
    request_id: str | None = None  # the client's id (idempotency key); Drover assigns one when absent
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = SamplingParams()
    priority: int = 0  # > 0 is high priority
    request_class: RequestClass = RequestClass.INTERACTIVE
    model: str | None = None
    client_id: str = ""
    stream_text: bool = True  # also send decoded text in each chunk


class Accepted(_Msg, frozen=True, tag="accepted"):
    request_id: str
    cancel_token: str
    prompt_tokens: int


class TokenChunk(_Msg, frozen=True, tag="chunk"):
    """New tokens of a request. ``index`` is the position of ``token_ids[0]`` in the output (0-based)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    instance_id: str = ""
    produced_at: float = 0.0  # engine's time.time() when the tokens left the engine (latency breakdown)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds, measured by Drover: arrival at the control plane to dispatch, first token, and end."""

    queue_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0


class RequestDone(_Msg, frozen=True, tag="done"):
    request_id: str
    finish_reason: str  # "stop" | "length" | "abort"
    usage: Usage
    timings: Timings = Timings()
    instances: list[str] = []  # every instance that served it, in order
    num_tokens: int = 0  # total tokens streamed; the client checks it saw them all
    # Every output token (from index 0): a client that lost chunks with a NATS node fills the gap from here.
    output_token_ids: list[int] = []


class ErrorReply(_Msg, frozen=True, tag="error"):
    code: ErrorCode
    message: str
    request_id: str | None = None


class Cancel(_Msg, frozen=True, tag="cancel"):
    request_id: str
    cancel_token: str
    reply_to: str | None = None


class CancelAck(_Msg, frozen=True, tag="cancel_ack"):
    request_id: str


# ---------------------------------------------------------------------------------------------------------
# Control plane <-> engine instances
# ---------------------------------------------------------------------------------------------------------


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an instance serves; dispatch and migration pair only compatible instances."""

    instance_id: str
    engine_kind: str  # "vllm" | "sim" | "torch"
    model: str
    dtype: str
    block_size: int
    num_blocks: int
    max_model_len: int
    kv_layout: str = ""  # opaque; migration requires equality
    host: str = ""
    pid: int = 0

    def compatible_with(self, other: EngineInfo) -> bool:
        return (
            self.model == other.model
            and self.dtype == other.dtype
            and self.block_size == other.block_size
            and self.kv_layout == other.kv_layout
        )


class RunningRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    num_tokens: int  # prompt + generated so far
    num_blocks: int
    priority: int = 0
    decoding: bool = True


class InstanceLoad(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's load, as engines report it and policies read it."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    waiting_blocks: int = 0  # blocks all waiting requests need
    head_waiting_blocks: int = 0  # blocks the first waiting request needs
    num_preempted: int = 0  # requests preempted since the last report
    batch_limit: int = 0  # admission cap (local autoscaler); 0 = engine default
    running: list[RunningRequest] = []


class InstanceHeartbeat(_Msg, frozen=True, tag="heartbeat"):
    info: EngineInfo
    load: InstanceLoad
    seq: int
    sent_at: float  # time.time() at the sender
    draining: bool = False
    state: str = "serving"  # "starting" | "serving" | "draining" | "stopping"
    can_migrate: bool = False  # the engine implements live migration


class EngineAdd(_Msg, frozen=True, tag="engine_add"):
    """Control plane -> engine: run this request and stream its tokens to ``reply_to``."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: str
    priority: int = 0
    request_class: RequestClass = RequestClass.INTERACTIVE
    arrival_time: float = 0.0  # time.time() when the control plane received it
    # Resume (migration or failover): tokens already delivered; the engine continues after them.
    output_token_ids: list[int] = []
    served_by: list[str] = []
    stream_text: bool = True
    kv_transfer: dict[str, Any] | None = None  # engine-specific handle for loading migrated KV


class EngineAbort(_Msg, frozen=True, tag="engine_abort"):
    request_id: str
    reason: str = "cancelled"


class EngineRequestEnded(_Msg, frozen=True, tag="engine_ended"):
    """Engine -> control plane: a request left this instance (finished, aborted, migrated away)."""

    instance_id: str
    request_id: str
    finish_reason: str
    num_output_tokens: int
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Live migration (MigratorActor <-> engines; operators -> migrator)
# ---------------------------------------------------------------------------------------------------------


class MigrationStageInfo(msgspec.Struct, frozen=True, kw_only=True):
    stage: int
    copied_blocks: int
    copied_bytes: int
    remaining_blocks: int
    total_blocks: int
    duration_s: float
    request_finished: bool = False


class MigrateOut(_Msg, frozen=True, tag="migrate_out"):
    """Migrator -> source engine. ``op``: begin | stage | stop | commit | abort."""

    op: str
    migration_id: str
    request_id: str = ""
    destination_instance: str = ""
    destination_address: str = ""


class MigrateOutReply(_Msg, frozen=True, tag="migrate_out_reply"):
    migration_id: str
    ok: bool
    error: str = ""
    total_blocks: int = 0
    stage: MigrationStageInfo | None = None
    # After stop: the exact token state the destination resumes from.
    request_id: str = ""
    prompt_token_ids: list[int] = []
    output_token_ids: list[int] = []
    kv_transfer: dict[str, Any] | None = None
    reply_to: str = ""  # the client's inbox (source knows it)
    sampling: SamplingParams | None = None
    priority: int = 0
    served_by: list[str] = []


class MigrateIn(_Msg, frozen=True, tag="migrate_in"):
    """Migrator -> destination engine. ``op``: reserve | release."""

    op: str
    migration_id: str
    num_blocks: int = 0


class MigrateInReply(_Msg, frozen=True, tag="migrate_in_reply"):
    migration_id: str
    ok: bool
    address: str = ""
    error: str = ""


class MigrateCommand(_Msg, frozen=True, tag="migrate"):
    """Operator or scheduler -> migrator: move ``request_id`` (to ``destination``, or where policy says)."""

    request_id: str
    destination: str = ""
    reason: str = "operator"


class DrainCommand(_Msg, frozen=True, tag="drain"):
    """Operator -> control plane: move every request off ``instance_id``, then mark it drained.
    ``undo`` puts a drained instance back into service."""

    instance_id: str
    undo: bool = False


class PolicyQuery(_Msg, frozen=True, tag="policy_query"):
    pass


class PolicyUpdate(_Msg, frozen=True, tag="policy_update"):
    """Operator -> scheduler: set policy parameters (values as text; validated and coerced)."""

    changes: dict[str, str]


class AdminReply(_Msg, frozen=True, tag="admin_reply"):
    ok: bool
    message: str
    details: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------------------
# Admin (operators, CLI)
# ---------------------------------------------------------------------------------------------------------


class StatusQuery(_Msg, frozen=True, tag="status_query"):
    pass


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True):
    info: EngineInfo
    load: InstanceLoad
    age_s: float
    state: str
    dispatched: int


class RequestStatus(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    instance_id: str | None
    state: str
    prompt_tokens: int
    age_s: float
    priority: int
    request_class: RequestClass


class StatusReply(_Msg, frozen=True, tag="status"):
    instances: list[InstanceStatus]
    requests: list[RequestStatus]
    queued: int
    dispatch_policy: str
    actors: dict[str, str] = {}
    migrations_completed: int = 0
    migrations_aborted: int = 0
    migrations_in_flight: list[str] = []  # request ids being migrated


# The union every receiver decodes. Append new kinds at the end.
Message: TypeAlias = (
    SubmitRequest
    | Accepted
    | TokenChunk
    | RequestDone
    | ErrorReply
    | Cancel
    | CancelAck
    | InstanceHeartbeat
    | EngineAdd
    | EngineAbort
    | EngineRequestEnded
    | StatusQuery
    | StatusReply
    | MigrateOut
    | MigrateOutReply
    | MigrateIn
    | MigrateInReply
    | MigrateCommand
    | DrainCommand
    | AdminReply
    | PolicyQuery
    | PolicyUpdate
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class ProtocolError(Exception):
    """A message could not be decoded; ``code`` says why, for the ErrorReply."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def _peek(data: bytes) -> tuple[str | None, int | None, str | None]:
    """Best-effort read of kind, version and request_id from an undecodable message."""
    try:
        raw = msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError):  # ValueError: invalid UTF-8 inside a str
        return None, None, None
    if not isinstance(raw, dict):
        return None, None, None
    kind = raw.get("kind") if isinstance(raw.get("kind"), str) else None
    version = raw.get("v") if isinstance(raw.get("v"), int) else None
    rid = raw.get("request_id") if isinstance(raw.get("request_id"), str) else None
    return kind, version, rid


_KNOWN_KINDS = frozenset(cls.__struct_config__.tag for cls in Message.__args__)


def decode(data: bytes) -> Message:
    """Decode one bus message or raise :class:`ProtocolError` with a code for the error reply."""
    try:
        message = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        kind, version, rid = _peek(data)
        if kind is not None and kind not in _KNOWN_KINDS:
            raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {kind!r}", rid) from exc
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} not supported (supported: {sorted(SUPPORTED_VERSIONS)})",
                rid,
            ) from exc
        raise ProtocolError(ErrorCode.MALFORMED, f"malformed message: {exc}", rid) from exc
    if message.v not in SUPPORTED_VERSIONS:
        rid = getattr(message, "request_id", None)
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {message.v} not supported (supported: {sorted(SUPPORTED_VERSIONS)})",
            rid if isinstance(rid, str) else None,
        )
    return message


def decode_as(data: bytes, expected: type[Any]) -> Any:
    """Decode and check the kind; a wrong kind is a ProtocolError(INVALID_REQUEST)."""
    message = decode(data)
    if not isinstance(message, expected):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"expected {expected.__name__}, got {type(message).__name__}",
            getattr(message, "request_id", None),
        )
    return message
