"""The autoscaler's timing, with no I/O and no clock: when the global autoscaler plans, and when an instance
it drains is stopped. The AutoscalerActor feeds it ``time.monotonic()``; the elastic simulator its virtual
clock. The plan itself is :func:`control.policy.autoscaling.plan_scaling`.

One rule for both shells: **the first plan is due one whole period after the clock starts**, then one every
period. A plan's inputs (arrival rates, measured throughput, backpressure) are counted over the period before
it; at start there is no such period, and the engines may not even have reported yet, so a plan at t = 0 would
act on counters covering nothing (the live autoscaler used to plan at its first tick, the simulator one period
in; ``tests/parity/test_divergences.py`` holds both shells to this rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Draining:
    since: float
    reason: str


class ScalingClock:
    """Plan every ``period_s``; stop a draining instance once it is empty, or after ``drain_timeout_s``."""

    def __init__(self, period_s: float, drain_timeout_s: float = math.inf, *, started_at: float) -> None:
        self.period_s = period_s
        self.drain_timeout_s = drain_timeout_s
        self.last_plan_at = started_at  # the first plan is due one whole period in (the module doc)
        self.draining: dict[str, Draining] = {}

    @property
    def poll_s(self) -> float:
        """How often a shell should look (at least once a second, so drained instances stop promptly)."""
        return min(1.0, self.period_s)

    @property
    def next_plan_at(self) -> float:
        """When the next plan is due (a shell with timers of its own schedules its planning tick for it)."""
        return self.last_plan_at + self.period_s

    def plan_due(self, now: float) -> bool:
        """True (and the period restarts) when a plan is due at ``now``."""
        if now - self.last_plan_at < self.period_s:
            return False
        self.last_plan_at = now
        return True

    def start_drain(self, instance_id: str, now: float, reason: str) -> bool:
        """Track a drain; False when the instance is already draining."""
        if instance_id in self.draining:
            return False
        self.draining[instance_id] = Draining(now, reason)
        return True

    def forget(self, instance_id: str) -> None:
        self.draining.pop(instance_id, None)

    def stop_reason(self, instance_id: str, empty: bool, now: float) -> str | None:
        """Why a draining instance should be stopped now (and it is no longer tracked), or None: not yet."""
        draining = self.draining.get(instance_id)
        if draining is None:
            return None
        if empty:
            reason = "drained"
        elif now - draining.since > self.drain_timeout_s:
            reason = f"still busy after {self.drain_timeout_s:.0f} s of draining"
        else:
            return None
        del self.draining[instance_id]
        return reason
