"""SLO-aware step token budget (Sarathi-Serve's rule, set per instance at start-up, Chiron-style local control).

Under chunked prefill a step that carries a prompt chunk is as slow as its tokens: on Qwen2.5-7B/A10 a step
with vLLM's default 2,048-token budget takes ~370 ms against ~40 ms for decodes only, so against a 170 ms
TPOT SLO a running request may share at most ~40 % of its steps with chunks, and in a burst every instance
prefills nearly every step (docs/policies.md, "SLO-sized step budget"). Where the linear layers are compute
bound (past a few hundred tokens a step) a smaller budget costs little prefill throughput: the same tokens
are computed in more, shorter steps, and the decodes run between them.

The rule: the largest token budget (a multiple of ``quantum``, between ``floor`` and ``ceiling``) whose step
of prompt tokens alone takes at most ``share`` x the TPOT SLO, leaving the rest of the SLO for the decodes'
own cost in the same step. The step time comes from a step-latency profile of the instance (the simulator's
cost model, or a profile fitted to measurements of the real engine). It is a start-up setting: vLLM takes it
as ``max_num_batched_tokens``, which it cannot change while running (its EngineCore runs in its own
process), and the simulated engine the same way.
"""

from __future__ import annotations

from collections.abc import Callable


def slo_step_token_budget(
    prompt_step_ms: Callable[[int], float],
    slo_tpot_s: float,
    *,
    share: float,
    ceiling: int,
    floor: int = 256,
    quantum: int = 16,
) -> int:
    """The largest budget b in [floor, ceiling] (multiples of ``quantum``; ``ceiling`` itself allowed) with
    ``prompt_step_ms(b) <= share * slo_tpot_s`` (in ms); ``floor`` when even that is slower (a budget below a
    few hundred tokens falls under the weight-read floor, where a step's time no longer shrinks with its
    tokens), ``ceiling`` when every budget fits. ``prompt_step_ms`` must not decrease with b."""
    if slo_tpot_s <= 0 or not 0 < share <= 1:
        raise ValueError("slo_tpot_s must be > 0 and share in (0, 1]")
    if quantum < 1 or floor < 1 or ceiling < 1:
        raise ValueError("floor, ceiling and quantum must be >= 1")
    floor = min(floor, ceiling)
    limit_ms = share * slo_tpot_s * 1000.0
    if prompt_step_ms(ceiling) <= limit_ms:
        return ceiling
    lo, hi = 0, (ceiling - floor) // quantum  # candidates floor + k*quantum, k in [0, hi]
    if prompt_step_ms(floor) > limit_ms:
        return floor
    while lo < hi:  # the step time grows with b: bisect for the last k that fits
        mid = (lo + hi + 1) // 2
        if prompt_step_ms(floor + mid * quantum) <= limit_ms:
            lo = mid
        else:
            hi = mid - 1
    return floor + lo * quantum


__all__ = ["slo_step_token_budget"]
