"""Admission control: may a new request enter, and if not, which error at once.

Pure functions over plain values (no actors, transport or engines), called by the scheduler on every
submission after validation and tokenization. Every limit is bounded, so no queue or table grows without
limit: a request past one is refused at once with ``overloaded`` (a capacity limit: retry later) or
``prompt_too_long`` / ``invalid_request`` (the request itself is too big: retrying will not help).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    ADMIT = "admit"
    OVERLOADED = "overloaded"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_REQUEST = "invalid_request"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The documented limits (settings ``[limits]`` and ``[scheduler] max_queued_requests``)."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_queued_total: int
    max_queued_interactive: int
    max_queued_batch: int
    max_in_flight_per_client: int
    max_in_flight_requests: int
    max_deadline_s: float
    max_queued_per_client: int


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What admission needs of one submission."""

    prompt_tokens: int
    max_tokens: int
    request_class: str  # "interactive" | "batch"
    deadline_s: float | None = None


@dataclass(frozen=True, slots=True)
class AdmissionLoad:
    """The scheduler's state when the request arrives."""

    in_flight: int  # admitted and not finished (queued + running), all clients
    client_in_flight: int  # the same, of this request's client
    queued_total: int
    queued_in_class: int  # queued requests of the request's class
    can_dispatch_now: bool  # an instance takes it at once (it would not wait in the queue)
    client_queued: int = 0  # queued requests of this request's client


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMIT


ADMIT = Decision(Verdict.ADMIT)


def admit(request: AdmissionRequest, load: AdmissionLoad, limits: AdmissionLimits) -> Decision:
    """Decide one submission. Order: what is wrong with the request itself first (so a too-long prompt is
    not reported as overload), then the cluster-wide bound, the client's share, and, for a request that would
    wait, the client's share of the queue, the class's queue and the whole queue."""
    if request.prompt_tokens > limits.max_prompt_tokens:
        return Decision(
            Verdict.PROMPT_TOO_LONG,
            f"prompt has {request.prompt_tokens} tokens; this deployment accepts at most {limits.max_prompt_tokens}",
        )
    if not 1 <= request.max_tokens <= limits.max_new_tokens:
        return Decision(Verdict.INVALID_REQUEST, f"max_tokens must be in 1..{limits.max_new_tokens}")
    if request.deadline_s is not None and not 0 < request.deadline_s <= limits.max_deadline_s:
        return Decision(Verdict.INVALID_REQUEST, f"deadline_s must be in (0, {limits.max_deadline_s:g}]")
    if load.in_flight >= limits.max_in_flight_requests:
        return Decision(
            Verdict.OVERLOADED,
            f"{load.in_flight} requests in flight (limit {limits.max_in_flight_requests}); retry later",
        )
    if load.client_in_flight >= limits.max_in_flight_per_client:
        return Decision(
            Verdict.OVERLOADED,
            f"this client has {load.client_in_flight} requests in flight "
            f"(limit {limits.max_in_flight_per_client}); retry later",
        )
    if load.can_dispatch_now:
        return ADMIT
    if load.client_queued >= limits.max_queued_per_client:
        return Decision(
            Verdict.OVERLOADED,
            f"this client has {load.client_queued} requests queued (limit {limits.max_queued_per_client}); retry later",
        )
    class_limit = limits.max_queued_batch if request.request_class == "batch" else limits.max_queued_interactive
    if load.queued_in_class >= class_limit:
        return Decision(
            Verdict.OVERLOADED,
            f"{load.queued_in_class} {request.request_class} requests queued (limit {class_limit}); retry later",
        )
    if load.queued_total >= limits.max_queued_total:
        return Decision(Verdict.OVERLOADED, f"request queue is full ({limits.max_queued_total}); retry later")
    return ADMIT


def client_key(client_id: str, reply_to: str, inbox_root: str) -> str:
    """Whose request this is, for the per-client bound: the declared ``client_id``, else the client token of
    an inbox under ``inbox_root`` (``<root>.<client>.<id>``), else the whole reply subject."""
    if client_id:
        return client_id
    root = inbox_root + "."
    if reply_to.startswith(root):
        return reply_to[len(root) :].split(".", 1)[0]
    return reply_to
