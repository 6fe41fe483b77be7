"""The adaptive step budget: each instance chooses, per step, between its configured chunked-prefill token
budget and the SLO-sized one, by how often a full-size chunk would land in a decode gap (issue 17;
docs/policies.md, "Adaptive step budget").

Why: a step carrying a prompt chunk is as slow as its tokens (Qwen2.5-7B/A10: ~355 ms with vLLM's default
2,048 tokens against ~40 ms for decodes alone). The SLO-sized budget
(:func:`control.policy.step_budget.slo_step_token_budget`: 480 tokens, ~85 ms, on qwen for a 170 ms TPOT SLO)
wins under load twice over: p99 inter-token latency becomes an 85 ms step instead of a 355 ms one, and more
prefill fits the instance (a small chunk rides in the slack of a decode step bound by reading the weights,
Sarathi-Serve's piggybacking: qwen's p99 TTFT at 6.73x compression 1.74 s against 5.50 s). At light load it
loses: a prompt spread over 4-8x more steps puts a chunk in more than 1 % of the decode gaps, where the full
budget put one in fewer, so p99 inter-token latency rises (qwen at 1.32x: 86 ms against 71-78).

The signal is the one p99 reads: the share of decode gaps that carry a chunk. Each step weighs its gaps by the
share of a full-budget chunk it carried (``prefill tokens / configured budget``), so the average estimates the
share of gaps the *full* budget would put a chunk in, whatever budget actually ran (a budget that reads its
own effect would flap). Above 1 % (:attr:`AdaptiveStepBudget.gap_share`), p99 inter-token latency is a chunk
step whatever the budget: make it the short one. The average runs over ~20,000 gaps (qwen: ~80 s at light
load, ~10 s under load): p99 is a whole run's statistic, and a short window reacts to bursts a light run
shrugs off (5,000 gaps made qwen's p99 at 1.32x 86 ms; 50,000 kept 2.63x on the full budget half the time).
Pressure ends below 0.7 % (hysteresis).

A leaf module (imports nothing of the project): the simulated engine (``engines/sim/core.py``), the vLLM
engine's scheduler (``engines/vllm/budget_scheduler.py``) and the shells read it, as
:mod:`control.block_hash`. Pure: the caller keeps the :class:`BudgetState` and reports each step's counts;
nothing here reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What the rule carries from step to step on one instance (the caller keeps it)."""

    share: float = 0.0
    """Exponential average over decode gaps of the share of a full-budget chunk each gap's step carried,
    started at 0 (so it under-reads until about a window of gaps is seen: ``seen`` corrects it)."""
    pressed: bool = False
    seen: float = 0.0
    """The weight the average has gathered: the same average of a constant 1, ``1 - e^(-gaps / window)``."""
    second: float = 0.0
    """The same average of each step's gaps x its share squared: the spread of ``share`` (a step's gaps all
    see one chunk, so they count as one draw, not as independent ones)."""


@dataclass(frozen=True, slots=True)
class AdaptiveStepBudget:
    """One instance's rule, fixed at start-up."""

    floor: int
    """The budget under pressure: the SLO-sized one."""
    ceiling: int
    """The budget otherwise: the engine's configured one (vLLM's ``max_num_batched_tokens``)."""
    gap_share: float = 0.01
    """Pressure starts when the average exceeds this: p99 looks at 1 % of the gaps."""
    release_share: float = 0.007
    """... and ends when it falls under this."""
    window_gaps: float = 20000.0
    """The average's horizon, in decode gaps (one decoder's token is one gap)."""
    evidence_z: float = 2.0
    """A cold start: the average starts at 0, so until about a window of gaps is seen it under-reads (unseen
    gaps count as chunk-free; Mooncake at 4x: each instance pressed ~5 s after its first decode, and most of
    the run's extra misses against the fixed budget fell in its first 30 s). The average divided by the
    weight it has gathered (``seen``: a bias correction, as Adam's) reads the gaps seen, but from a few
    thousand gaps it is noise at light load (pressing on it as it stands raised qwen's p99 ITL at 1.32x from
    71-79 to 85-86 ms). So the rule also presses when the corrected share is this many standard errors above
    ``gap_share``: at 10 % it takes ~1,000 gaps, and a light instance's 2 % burst over 5,000 gaps is not
    enough. Once the window is seen the uncorrected test decides as before; 0 disables the cold test."""

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError("need 1 <= floor <= ceiling")
        if not 0 <= self.release_share <= self.gap_share <= 1:
            raise ValueError("need 0 <= release_share <= gap_share <= 1")
        if self.window_gaps < 1:
            raise ValueError("window_gaps must be >= 1")
        if self.evidence_z < 0:
            raise ValueError("evidence_z must be >= 0")

    def observe(self, state: BudgetState, decode_gaps: int, prefill_tokens: int) -> BudgetState:
        """The state after a step (or a run of ``k`` decode-only steps: ``decode_gaps`` summed over them) in
        which ``decode_gaps`` decoders got a token and ``prefill_tokens`` prompt tokens were computed. A
        step without decodes changes nothing: no gap saw it."""
        if decode_gaps <= 0:
            return state
        share, second, seen, pressed = self.update(
            state.share, state.second, state.seen, state.pressed, decode_gaps, prefill_tokens
        )
        return BudgetState(share, pressed, seen, second)

    def update(
        self, share: float, second: float, seen: float, pressed: bool, decode_gaps: int, prefill_tokens: int
    ) -> tuple[float, float, float, bool]:
        """:meth:`observe` on the state's fields, for a caller that keeps them itself (the simulated engine
        calls this once per step: no object made)."""
        if decode_gaps <= 0:
            return share, second, seen, pressed
        keep = math.exp(-decode_gaps / self.window_gaps)
        carried = prefill_tokens / self.ceiling if prefill_tokens < self.ceiling else 1.0
        share = share * keep + (1.0 - keep) * carried
        second = second * keep + (1.0 - keep) * decode_gaps * carried * carried
        seen = seen * keep + (1.0 - keep)
        if share > self.gap_share:  # even reading unseen gaps as chunk-free
            return share, second, seen, True
        mean = share / seen
        if pressed:
            return share, second, seen, mean > self.release_share
        # the corrected mean's standard error: steps as draws, weights summing to window x seen gaps
        error = math.sqrt(second / self.window_gaps) / seen
        return share, second, seen, self.evidence_z > 0 and mean - self.evidence_z * error > self.gap_share

    def budget(self, state: BudgetState) -> int:
        """This step's token budget."""
        return self.budget_when(state.pressed)

    def budget_when(self, pressed: bool) -> int:
        """:meth:`budget` from the state's ``pressed`` field (the simulated engine keeps it flat)."""
        return self.floor if pressed else self.ceiling


__all__ = ["AdaptiveStepBudget", "BudgetState"]
