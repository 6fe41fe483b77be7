"""The autoscaler's timing, with no I/O and no clock: when the global autoscaler plans, and when an instance
it drains is stopped; and each instance's batch-size limit (:class:`LocalSizer`, the local autoscaler). The
AutoscalerActor feeds it ``time.monotonic()``; the elastic simulator its virtual clock. The plan itself is
:func:`control.policy.autoscaling.plan_scaling`.

One rule for both shells: **the first plan is due one whole period after the clock starts**, then one every
period. A plan's inputs (arrival rates, measured throughput, backpressure) are counted over the period before
it; at start there is no such period, and the engines may not even have reported yet, so a plan at t = 0 would
act on counters covering nothing (the live autoscaler used to plan at its first tick, the simulator one period
in; ``tests/parity/test_divergences.py`` holds both shells to this rule).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from control.core.record import DecisionLog
from control.policy.autoscaling import AutoscaleParams, LocalDecision, LocalObservation, LocalState, local_batch_limit


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


def engine_local_params(params: AutoscaleParams, engine_max_seqs: int) -> AutoscaleParams:
    """The policy's local limits clamped to the engine's own ``max_num_seqs`` (above it nothing binds)."""
    local = params.local
    top = max(1, min(local.max_batch, engine_max_seqs))
    low = min(local.min_batch, top)
    initial = min(max(local.initial_batch, low), top)
    return dataclasses.replace(
        params, local=dataclasses.replace(local, max_batch=top, min_batch=low, initial_batch=initial)
    )


class LocalSizer:
    """One instance's batch-size limit (Chiron's local autoscaler): the limit in force, what the rule remembers
    between windows, and each window's decision (:func:`local_batch_limit` under the policy's limits clamped to
    the engine's ``max_num_seqs``). Both shells hold one per instance: the engine host's LocalAutoscaler
    (``actors/local_autoscaler.py``, which measures a window from the token stream) and the elastic simulator
    (from its engine model). ``log``: each decision with its observation (replay parity); ``key`` names the
    instance there."""

    def __init__(
        self, params: AutoscaleParams, engine_max_seqs: int, *, log: DecisionLog | None = None, key: str = ""
    ) -> None:
        self.params = engine_local_params(params, engine_max_seqs)
        self.engine_max_seqs = engine_max_seqs
        self.limit = self.params.local.initial_batch
        self.state = LocalState()
        self.log = log
        self.key = key

    def decide(self, observation: LocalObservation) -> LocalDecision:
        """This window's decision; the limit in force during it is this sizer's (whatever ``batch_limit`` the
        observation carries), and the new one is in force from now on."""
        observation = dataclasses.replace(observation, batch_limit=self.limit)
        decision = local_batch_limit(observation, self.state, self.params)
        if self.log is not None:
            self.log.add("local_batch", self.key, (observation, self.engine_max_seqs), decision)
        self.limit, self.state = decision.batch_limit, decision.state
        return decision
