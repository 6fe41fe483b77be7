"""Every message on the Drover bus: msgspec structs in one tagged union, with a protocol version.

Wire format: msgpack. Every message carries ``kind`` (its tag) and ``v`` (the protocol version of the
sender). Decoders skip unknown *fields* (newer senders may add some), and an unknown *kind* becomes a
:class:`ProtocolError` that the receiver answers with an ``ErrorReply(code="unknown_kind")``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, TypeAlias

import msgspec

from control.errors import DroverError

PROTOCOL_VERSION = 3
"""The version this code speaks. Version negotiation (rolling upgrades, README "Version negotiation"):

- every message carries ``v``, the version it is encoded at; a receiver accepts ``v`` in
  ``SUPPORTED_VERSIONS`` (its own version and the one before) and answers anything else with
  ``unsupported_version``; an unknown ``kind`` sent at a newer ``v`` is ``unsupported_version`` too (a
  kind from a version this receiver does not speak), at a supported ``v`` it is ``unknown_kind``;
- versions only add optional fields (old receivers skip them) and kinds; a change that cannot be made
  that way takes a new subject prefix (``drover.v2``);
- a sender that knows its peer's version encodes at ``min(own, peer's)``: replies to a client at the
  client's ``v`` (the scheduler passes it on to engines as ``EngineAdd.client_v``), the scheduler's
  messages to an engine at the version the engine advertises (``EngineInfo.protocol_version``);
- engines send their unsolicited messages (heartbeats, engine events) at ``MIN_PROTOCOL_VERSION``, which
  every supported control plane reads (``EngineInfo.protocol_version`` says what the engine speaks), and
  answer requests (migration steps) at the requester's version: control planes and engines upgrade in
  any order; clients (whose submissions go at their own version) after the control planes.

Version 2 added: ``SubmitRequest.deadline_s`` and ``liveness``, ``EngineAdd.client_v``,
``EngineInfo.protocol_version``, error codes ``deadline_exceeded`` and ``client_gone`` (sent only to
clients that asked for deadlines or liveness probes, so a version-1 client never sees them).

Version 3 (security, docs/security.md): clients publish on per-identity subjects (``drover.v1.submit.<id>``,
``cancel.<id>``, ``admin.status.<id>``, ``replay.<id>``) that only that NATS user may publish on; the
identity is read from the subject, never from ``client_id``; every reply target must lie under the sender's
own inbox ``drover.v1.inbox.<id>.``; kinds ``replay`` / ``replay_reply`` (the control plane reads a client's
inbox back from the output stream for it: clients create no JetStream consumers); and wire bounds on every
list, string and map a client sends (:data:`WIRE_BOUNDS`), answered with ``malformed``.
"""
MIN_PROTOCOL_VERSION = PROTOCOL_VERSION - 1
SUPPORTED_VERSIONS = frozenset({MIN_PROTOCOL_VERSION, PROTOCOL_VERSION})


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
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline_s passed (v2)
    CLIENT_GONE = "client_gone"  # its inbox had no reader for lifecycle.client_gone_after_s (v2)


# ------------------------------------------------------------------------------------- wire bounds (v3)
MAX_ID_LENGTH = 128  # request ids, cancel tokens, client ids (a subject token)
MAX_SUBJECT_LENGTH = 256  # reply subjects
MAX_NAME_LENGTH = 256  # model names
MAX_PROMPT_CHARS = 1 << 20  # a text prompt
MAX_PROMPT_TOKENS = 1 << 18  # prompt_token_ids
MAX_STOP_TOKENS = 256  # sampling.stop_token_ids
MAX_SPANS_PER_BATCH = 512  # SpanBatch.spans
MAX_NESTING_DEPTH = 32  # maps and lists inside free-form (Any) fields: span attributes
WIRE_BOUNDS = {
    "request_id, cancel_token, client_id": MAX_ID_LENGTH,
    "reply_to": MAX_SUBJECT_LENGTH,
    "model": MAX_NAME_LENGTH,
    "prompt (characters)": MAX_PROMPT_CHARS,
    "prompt_token_ids": MAX_PROMPT_TOKENS,
    "sampling.stop_token_ids": MAX_STOP_TOKENS,
    "SpanBatch.spans": MAX_SPANS_PER_BATCH,
    "nesting depth of free-form fields": MAX_NESTING_DEPTH,
}
"""The documented bounds (README "Wire schema"): a message past one is answered ``malformed`` and logged."""

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
Subject = Annotated[str, msgspec.Meta(max_length=MAX_SUBJECT_LENGTH)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]
PromptText = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
PromptTokens = Annotated[list[int], msgspec.Meta(max_length=MAX_PROMPT_TOKENS)]
StopTokens = Annotated[list[int], msgspec.Meta(max_length=MAX_STOP_TOKENS)]


def nesting_depth(value: Any, limit: int = MAX_NESTING_DEPTH) -> int:
    """Depth of nested maps and lists in ``value`` (iterative; stops counting past ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
    return deepest


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
    stop_token_ids: StopTokens = []
    ignore_eos: bool = False


# ---------------------------------------------------------------------------------------------------------
# Client <-> control plane
# ---------------------------------------------------------------------------------------------------------


class SubmitRequest(_Msg, frozen=True, tag="submit"):
    """A client's request. Replies (Accepted, TokenChunk..., RequestDone | ErrorReply) go to ``reply_to``."""

    reply_to: Subject
    request_id: Id | None = None  # the client's id (idempotency key); Drover assigns one when absent
    prompt: PromptText | None = None
    prompt_token_ids: PromptTokens | None = None
    sampling: SamplingParams = SamplingParams()
    priority: int = 0  # > 0 is high priority
    request_class: RequestClass = RequestClass.INTERACTIVE
    model: Name | None = None
    # v3: informational only (audit, logs); limits and ownership use the identity the NATS server
    # authenticated (the subject the submission came on), see transport/subjects.client_identity
    client_id: Id = ""
    stream_text: bool = True  # also send decoded text in each chunk
    # v2: seconds from arrival at the control plane after which generation stops (DEADLINE_EXCEEDED);
    # relative, so clocks of client and control plane need not agree. None: no deadline. A batch request's
    # deadline is also what the autoscaler plans for (None: autoscaling.slo.batch_deadline_s, not enforced).
    deadline_s: float | None = None
    # v2: the client answers liveness probes on subjects.alive(reply_to); without an answer for
    # lifecycle.client_gone_after_s the request is aborted (CLIENT_GONE). False: never probed.
    liveness: bool = False


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
    instances: list[str] = []  # every instance it was sent to, in order (README: Wire schema)
    num_tokens: int = 0  # total tokens streamed; the client checks it saw them all
    # Every output token (from index 0): a client that lost chunks with a NATS node fills the gap from here.
    output_token_ids: list[int] = []


class ErrorReply(_Msg, frozen=True, tag="error"):
    code: ErrorCode
    message: str
    request_id: str | None = None


class Cancel(_Msg, frozen=True, tag="cancel"):
    request_id: Id
    cancel_token: Id
    reply_to: Subject | None = None


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
    protocol_version: int = 1  # v2: the bus protocol the engine speaks (absent: a version-1 engine)

    def compatible_with(self, other: EngineInfo) -> bool:
        return (
            self.model == other.model
            and self.dtype == other.dtype
            and self.block_size == other.block_size
            and self.kv_layout == other.kv_layout
            and self.protocol_version == other.protocol_version
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


class EngineMemory(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's parameter-centric memory (KunServe): what it holds, what it could hold, its group.

    Sent by engines that can drop layers (torch); the memory manager plans drops and restores from it.
    """

    num_layers: int  # layers of the whole model
    layer_range: list[int]  # [first, last) held now
    model_weight_bytes: int  # one full copy of the weights
    weight_bytes: int  # weights held now
    kv_block_bytes: int  # one block over every layer (full-model layout)
    budget_bytes: int  # weights + KV pool
    home_num_blocks: int  # KV blocks when holding every layer alone
    rss_bytes: int = 0  # resident memory of the engine's process
    group_id: str = ""
    group_role: str = "standalone"  # "standalone" | "leader" | "member"
    group_members: list[str] = []  # the leader's view, leader first


class LocalReport(msgspec.Struct, frozen=True, kw_only=True):
    """The instance's local autoscaler (Chiron's lower level), reported upward in every heartbeat."""

    batch_limit: int  # requests the instance admits at once (EngineActor admission)
    capacity: int  # SLO-safe concurrent requests (the limit, or fewer when KV memory binds)
    backpressure: float  # (running + waiting) / capacity, or ITL / SLO when larger; >= 1: full at SLO
    held: int = 0  # requests held back by the admission limit (counted in load.num_waiting too)
    num_interactive: int = 0  # requests here (admitted or held) by class
    num_batch: int = 0
    itl_s: float = 0.0  # mean inter-token gap over the last window
    tokens_per_s: float = 0.0  # output tokens per second over the last window
    reason: str = ""  # the last local decision


class PrefixCacheReport(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine's prefix cache stored and evicted since its last report (vLLM's KV events), carried in
    heartbeats so an old control plane simply skips it. ``(epoch, seq)`` number the batches: ``seq`` grows by
    one per batch with events and stays put in a heartbeat that has none (which lets the receiver notice a
    lost last batch); the epoch changes when the stream restarts. ``full``: ``stored`` lists every cached
    block (a resync; sent periodically and after a restart). Hashes are vLLM's block hashes as 64-bit ints
    (sha256 of the pickled ``(parent, tokens, extra keys)``, low 8 bytes)."""

    epoch: str
    seq: int
    stored: list[int] = []
    removed: list[int] = []
    cleared: bool = False
    full: bool = False
    num_cached: int = 0  # distinct cached blocks now
    query_tokens: int = 0  # cumulative prompt tokens looked up in the cache (vLLM's prefix-cache stats)
    hit_tokens: int = 0  # cumulative prompt tokens found cached (prefill skipped)
    # a full listing too big for one message is sent over several beats: chunk ``chunk`` of ``chunks``, all
    # at the listing's ``seq`` (engines/prefix_listing.py); the defaults are a listing in one piece
    chunk: int = 0
    chunks: int = 1


class InstanceHeartbeat(_Msg, frozen=True, tag="heartbeat"):
    info: EngineInfo
    load: InstanceLoad
    seq: int
    sent_at: float  # time.time() at the sender
    draining: bool = False
    state: str = "serving"  # "starting" | "serving" | "draining" | "stopping"
    can_migrate: bool = False  # the engine implements live migration
    memory: EngineMemory | None = None  # engines that can drop layers report it
    role: str = "mixed"  # "interactive" | "mixed" | "batch" (Chiron instance roles; mixed serves both classes)
    local: LocalReport | None = None  # None: the engine runs no local autoscaler
    prefix_cache: PrefixCacheReport | None = None  # None: the engine reports no prefix-cache events
    phase: str = "both"  # "prefill" | "decode" | "both" (prefill/decode disaggregation; absent: both)


class PrefixResync(_Msg, frozen=True, tag="prefix_resync"):
    """Control plane -> engine: the prefix index lost track of this engine's cache (a gap in the report
    sequence, a missed stream start, a reconnect): send a full listing in the next heartbeat. No reply;
    engines that report no cache ignore it."""

    reason: Name = ""


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
    client_v: int = 1  # v2: the protocol version the client submitted at; replies go at this version
    client_id: str = ""  # on whose behalf (SubmitRequest.client_id): SLO attainment per client
    # Prefill/decode disaggregation: the control plane hands the request to a decode instance after its first
    # token; the engine tells it at once (EngineFirstToken) instead of leaving it to its next heartbeat.
    report_first_token: bool = False


class EngineAbort(_Msg, frozen=True, tag="engine_abort"):
    request_id: str
    reason: str = "cancelled"


class EngineFence(_Msg, frozen=True, tag="engine_fence"):
    """Control plane -> an instance it declared dead (missed heartbeats) before failing ``request_id`` over:
    a live one stops streaming it (no chunk, no RequestDone after its last one) and answers ``AdminReply``
    (details ``sent``: output tokens its client was sent); a dead one does not answer. An engine that does
    not know this kind answers an error: the failover goes on as before."""

    request_id: str


class EngineRequestEnded(_Msg, frozen=True, tag="engine_ended"):
    """Engine -> control plane: a request left this instance (finished, aborted, migrated away)."""

    instance_id: str
    request_id: str
    finish_reason: str
    num_output_tokens: int
    error: str | None = None
    # finish_reason "evicted": the engine stopped it to free itself (joining a KunServe group, or a group that
    # broke); every output token so far was sent to the client, and the scheduler resumes it from these.
    output_token_ids: list[int] = []
    # For SLO attainment and goodput per class and client (`drover metrics`, `drover top`); 0 / "": unknown
    # (an older engine; ttft_s also on an instance that resumed the request, where its first token was not made).
    request_class: str = ""
    client_id: str = ""
    ttft_s: float = 0.0  # arrival at the control plane to the first token
    itl_s: float = 0.0  # mean gap between this instance's tokens
    e2e_s: float = 0.0  # arrival to the end


class EngineFirstToken(_Msg, frozen=True, tag="engine_first_token"):
    """Engine -> control plane (only when ``EngineAdd.report_first_token`` asked): the request's first token
    was made here; ``num_tokens`` (prompt + output) are in its KV now. A prefill instance's request is handed
    to a decode instance on this event, so the KV copy starts right after its prefill."""

    instance_id: str
    request_id: str
    num_tokens: int


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
    # What the destination needs to keep the request's class and owner (SLO accounting per class and client).
    request_class: RequestClass = RequestClass.INTERACTIVE
    client_id: str = ""


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
    operator: str = ""  # who asked (audit log); the CLI fills in the OS user or [audit] operator


class DrainCommand(_Msg, frozen=True, tag="drain"):
    """Operator -> control plane: move every request off ``instance_id``, then mark it drained.
    ``undo`` puts a drained instance back into service."""

    instance_id: str
    undo: bool = False
    operator: str = ""  # who asked (audit log)


class PhaseCommand(_Msg, frozen=True, tag="phase_set"):
    """Operator -> control plane: ``instance_id`` serves ``phase`` (prefill | decode | both) from now on
    (prefill/decode disaggregation); it wins over the phase the instance reports."""

    instance_id: str
    phase: str
    operator: str = ""  # who asked (audit log)


class GroupCommand(_Msg, frozen=True, tag="group_command"):
    """Memory manager -> torch engine: one step of forming or ending a KunServe group.

    ``op``: ``join`` (member: hand its requests to the group, the KV of every layer parked at its stage, keep
    ``layer_range``, serve it as a stage; reply: its address and the handed requests), ``lead`` (leader: move
    running requests' KV of other layers to the members at ``stage_addresses``, drop to ``layer_range``,
    compute as the pipeline, take in the KV the members parked), ``dissolve`` (leader: take the KV back,
    restore, serve alone), ``leave`` (member: restore, serve alone), ``break`` (leader of a group that lost a
    member: evict its requests for the scheduler to resume, restore).
    """

    op: str
    group_id: str
    layer_range: list[int] = []
    members: list[str] = []  # leader first
    stage_addresses: list[str] = []  # members[1:]'s stage servers, in order
    micro_batches: int = 0  # lead: micro-batches per step in the pipeline; 0 = one per stage


class GroupReply(_Msg, frozen=True, tag="group_reply"):
    group_id: str
    ok: bool
    error: str = ""
    address: str = ""  # a joined member's stage server
    evicted: list[str] = []  # request ids handed back to the scheduler
    # join: the member's requests, each as the EngineAdd that resumes it on the leader after its outputs so far
    # (kv_transfer names the KV parked at the member's stage, which the leader takes in at "lead")
    handed: list[EngineAdd] = []
    details: dict[str, Any] = {}  # freed bytes, blocks, KV moved, seconds


class MemoryCommand(_Msg, frozen=True, tag="memory_command"):
    """Operator -> control plane: force a KunServe drop (``target``: instance ids joined by ',' , the first
    leads; or one instance id, with the freest compatible instance as partner) or a restore (a group id)."""

    op: str  # "drop" | "restore"
    target: str
    operator: str = ""  # who asked (audit log)


class PolicyQuery(_Msg, frozen=True, tag="policy_query"):
    operator: str = ""  # who asked (audit log)


class PolicyUpdate(_Msg, frozen=True, tag="policy_update"):
    """Operator -> scheduler: set policy parameters (values as text; validated and coerced)."""

    changes: dict[str, str]
    operator: str = ""  # who asked (audit log)


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
    cached_blocks: int = -1  # prefix-cache blocks the instance reports holding; -1: it reports none
    phase: str = "both"  # prefill | decode | both: the phase it serves now (an operator's setting wins)


class RequestStatus(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    instance_id: str | None
    state: str
    prompt_tokens: int
    age_s: float
    priority: int
    request_class: RequestClass


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A KunServe group as the memory manager sees it."""

    group_id: str
    members: list[str]  # leader first; the leader is the group's one dispatch target
    layer_ranges: list[list[int]]
    state: str  # forming | pipelined | restoring
    extra_kv_blocks: int = 0  # KV blocks the group has beyond the leader's pool alone
    age_s: float = 0.0


class StatusReply(_Msg, frozen=True, tag="status"):
    instances: list[InstanceStatus]
    requests: list[RequestStatus]
    queued: int
    dispatch_policy: str
    actors: dict[str, str] = {}
    migrations_completed: int = 0
    migrations_aborted: int = 0
    migrations_in_flight: list[str] = []  # request ids being migrated
    groups: list[GroupStatus] = []  # KunServe groups (parameter-centric memory)


# ---------------------------------------------------------------------------------------------------------
# Autoscaling (operators -> AutoscalerActor)
# ---------------------------------------------------------------------------------------------------------


class ScaleCommand(_Msg, frozen=True, tag="scale"):
    """Operator -> autoscaler: run ``count`` instances of ``role`` (a manual override pinning that role's
    min and max); ``auto`` gives the role back to the autoscaler's configured limits."""

    role: str
    count: int = 0
    auto: bool = False
    operator: str = ""  # who asked (audit log)


class SetInstanceRole(_Msg, frozen=True, tag="set_role"):
    """Autoscaler -> engine: serve as ``role`` from now on (a relabel; the local autoscaler's SLO check and
    the heartbeat follow it)."""

    role: str


class AutoscaleStatusQuery(_Msg, frozen=True, tag="autoscale_status_query"):
    pass


class RoleScaleStatus(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    instances: int  # active (serving, not draining)
    starting: int
    draining: int
    target: int  # the last plan's target
    min_instances: int
    max_instances: int
    pinned: bool = False  # `drover scale` holds it


class InstanceScaleStatus(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    role: str
    state: str  # starting | active | draining
    owned: bool  # the provisioner started it (the autoscaler may stop it)
    batch_limit: int = 0
    capacity: int = 0
    backpressure: float = 0.0
    num_interactive: int = 0
    num_batch: int = 0
    tokens_per_s: float = 0.0
    local_reason: str = ""


class ScaleEventInfo(msgspec.Struct, frozen=True, kw_only=True):
    at: float  # time.time()
    action: str  # start | ready | drain | stop | relabel | decision | manual
    instance_id: str = ""
    role: str = ""
    reason: str = ""


class AutoscaleStatusReply(_Msg, frozen=True, tag="autoscale_status"):
    enabled: bool
    provisioner: str
    period_s: float
    startup_estimate_s: float
    startup_samples: list[float] = []
    roles: list[RoleScaleStatus] = []
    instances: list[InstanceScaleStatus] = []
    inputs: dict[str, float] = {}  # the global level's inputs at the last decision
    last_reason: str = ""
    last_decision_at: float = 0.0  # time.time(); 0: none yet
    batch_queue: int = 0
    events: list[ScaleEventInfo] = []  # the most recent scale events, oldest first


class SpanBatch(_Msg, frozen=True, tag="span_batch"):
    """Any process -> control plane (``drover.v1.spans``): finished spans, in the JSON-lines form the jsonl
    exporter writes (``observability.tracing.span_to_dict``); the control plane appends them to its trace
    file, so ``drover trace`` sees every host's spans in one place."""

    spans: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_SPANS_PER_BATCH)] = []


class ReplayRequest(_Msg, frozen=True, tag="replay"):
    """Client -> control plane (v3, ``drover.v1.replay.<identity>``, request/reply): what the output stream
    holds for ``inbox`` (one of the sender's own inboxes), from stored message ``start`` on. Clients may not
    create JetStream consumers; the control plane reads for them after checking the inbox is theirs."""

    inbox: Subject
    start: int = 0


class ReplayReply(_Msg, frozen=True, tag="replay_reply"):
    """The stored messages (encoded bus messages, oldest first); ``more``: ask again from ``start + len``."""

    messages: list[bytes] = []
    more: bool = False


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
    | EngineFence
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
    | GroupCommand
    | GroupReply
    | MemoryCommand
    | ScaleCommand
    | AutoscaleStatusQuery
    | AutoscaleStatusReply
    | SetInstanceRole
    | SpanBatch
    | ReplayRequest
    | ReplayReply
    | PhaseCommand
    | PrefixResync
    | EngineFirstToken
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class ProtocolError(DroverError):
    """A message could not be decoded; ``code`` says why, for the ErrorReply."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.code: ErrorCode = code


def encode(message: Message, version: int | None = None) -> bytes:
    """msgpack bytes of ``message``; ``version`` re-stamps ``v`` (encode for an older peer)."""
    if version is not None and version != message.v:
        message = msgspec.structs.replace(message, v=version)
    return _encoder.encode(message)


_V2_ERROR_CODES = frozenset({ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CLIENT_GONE})


def error_version(code: ErrorCode) -> int:
    """The oldest supported version whose ErrorReply has ``code`` (an error any supported peer can read)."""
    return max(MIN_PROTOCOL_VERSION, 2 if code in _V2_ERROR_CODES else 1)


def peer_version(version: int) -> int:
    """The version to encode at for a peer that speaks ``version``: the lower of the two."""
    return max(MIN_PROTOCOL_VERSION, min(PROTOCOL_VERSION, version))


def _peek(data: bytes) -> tuple[str | None, int | None, str | None]:
    """Best-effort read of kind, version and request_id from an undecodable message."""
    try:
        raw = msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: invalid UTF-8 inside a str
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
    except RecursionError as exc:  # maps or lists nested deeper than the decoder follows
        raise ProtocolError(ErrorCode.MALFORMED, "malformed message: nested too deeply") from exc
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        kind, version, rid = _peek(data)
        if kind is not None and kind not in _KNOWN_KINDS:
            if version is not None and version > PROTOCOL_VERSION:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"message kind {kind!r} of protocol version {version} is not known here "
                    f"(this receiver speaks versions {sorted(SUPPORTED_VERSIONS)})",
                    rid,
                ) from exc
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
