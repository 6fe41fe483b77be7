"""Admission's checks that need no state beyond what is passed in: whether a submission is well formed, and
the longest prompt the fleet can take. The limits on load (queues, in-flight counts, deadlines) are
:func:`control.policy.admission.admit`; the scheduler gathers their inputs.

Both shells use :func:`max_prompt_tokens`: the SchedulerActor at each submission (over the instances that
serve the request's model), the simulator at each arrival (over its instances), so a prompt the live
control plane refuses as too long is refused in the simulator too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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
