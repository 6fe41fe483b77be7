"""Admission: whether a submission is well formed (:func:`validate`), the longest prompt the fleet can take
(:func:`max_prompt_tokens`), and the limits on load (:func:`decide`: queues, each client's share of them,
in-flight counts, deadlines, by :func:`control.policy.admission.admit`). No clock and no I/O: the shell passes
its request table, its queued ids (waiting and fair queue) and a way to ask the dispatcher whether the request
would start now.

Both shells use :func:`max_prompt_tokens`: the SchedulerActor at each submission (over the instances that
serve the request's model), the simulator at each arrival (over its instances), so a prompt the live
control plane refuses as too long is refused in the simulator too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from control.core.requests import RequestTable
from control.policy.admission import AdmissionLimits, AdmissionLoad, AdmissionRequest, Decision, admit, client_key
from control.settings import Settings
from transport import subjects
from transport.messages import SubmitRequest


def validate(submit: SubmitRequest) -> str | None:
    """A user-facing reason the submission is malformed, or None."""
    if (submit.prompt is None) == (submit.prompt_token_ids is None):
        return "give exactly one of prompt or prompt_token_ids"
    if submit.prompt is not None and not submit.prompt:
        return "prompt is empty"
    if submit.prompt_token_ids is not None and not submit.prompt_token_ids:
        return "prompt_token_ids is empty"
    if submit.prompt_token_ids is not None and any(t < 0 for t in submit.prompt_token_ids):
        return "prompt_token_ids must be non-negative"
    sampling = submit.sampling
    if sampling.temperature < 0 or not math.isfinite(sampling.temperature):
        return "temperature must be >= 0"
    if not 0 < sampling.top_p <= 1:
        return "top_p must be in (0, 1]"
    if submit.request_id is not None:
        try:
            subjects.validate_token(submit.request_id)
        except ValueError:
            return "request_id must be 1-128 characters without '.', '*', '>' or whitespace"
    return None


def max_prompt_tokens(configured: int, max_model_lens: Iterable[int], fallback_max_model_len: int) -> int:
    """The longest prompt admitted: ``configured`` when set (> 0), else one token less than the shortest
    context among the instances (``fallback_max_model_len`` when there are none): a prompt must leave room
    for at least one output token."""
    if configured > 0:
        return configured
    return min(max_model_lens, default=fallback_max_model_len) - 1


def decide(
    settings: Settings,
    requests: RequestTable[Any],
    queue: Collection[str],
    submit: SubmitRequest,
    reply_to: str,
    prompt_tokens: int,
    *,
    max_prompt_tokens: int,
    no_room: Callable[[], bool],
) -> Decision:
    """Admit or refuse a submission by the configured limits over the shell's request table and queue.

    ``queue``: the ids of every request waiting for an instance, in the waiting queue and in the fair queue
    (:attr:`control.core.dispatch.Dispatcher.queued`). The fair queue counts as much as the waiting queue:
    with fairness on, the backlog waits there, and a limit that did not count it would bound nothing. A
    client's queued requests are bounded too (``limits.max_queued_per_client``), so one client cannot fill
    the shared queue however many requests it may have in flight. The global batch queue is not counted:
    batch requests are meant to pile up there (in-flight limits bound them). Queue counts per class and per
    client and the dispatch try (``no_room``: True when no instance would take it now) are computed only
    when a queue could be at its limit."""
    lim = settings.limits
    key = client_key(submit.client_id, reply_to, subjects.INBOX_ROOT)
    limits = AdmissionLimits(
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=lim.max_new_tokens,
        max_queued_total=settings.scheduler.max_queued_requests,
        max_queued_interactive=lim.max_queued_interactive,
        max_queued_batch=lim.max_queued_batch,
        max_in_flight_per_client=lim.per_identity_max_in_flight.get(key, lim.max_in_flight_per_client),
        max_in_flight_requests=lim.max_in_flight_requests,
        max_deadline_s=lim.max_deadline_s,
        max_queued_per_client=lim.max_queued_per_client,
    )
    queued = len(queue)
    near_full = queued >= min(
        lim.max_queued_interactive, lim.max_queued_batch, limits.max_queued_total, limits.max_queued_per_client
    )
    in_class, of_client = _queued_by(requests, queue, submit, key) if near_full else (0, 0)
    load = AdmissionLoad(
        in_flight=len(requests),
        client_in_flight=requests.client_in_flight(key),
        queued_total=queued,
        queued_in_class=in_class,
        can_dispatch_now=not near_full or not no_room(),
        client_queued=of_client,
    )
    request = AdmissionRequest(
        prompt_tokens=prompt_tokens,
        max_tokens=submit.sampling.max_tokens,
        request_class=str(submit.request_class),
        deadline_s=submit.deadline_s,
    )
    return admit(request, load, limits)


def _queued_by(requests: Mapping[str, Any], queue: Iterable[str], submit: SubmitRequest, key: str) -> tuple[int, int]:
    """(queued requests of the submission's class, queued requests of its client ``key``)."""
    in_class = of_client = 0
    for request_id in queue:
        record = requests.get(request_id)
        if record is None:
            continue
        queued = record.submit
        in_class += queued.request_class == submit.request_class
        of_client += client_key(queued.client_id, queued.reply_to, subjects.INBOX_ROOT) == key
    return in_class, of_client
