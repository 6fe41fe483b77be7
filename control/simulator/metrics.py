"""Per-request metrics of a simulation and their summary (Llumnix's latency breakdown).

* request latency: arrival to last token (end to end);
* prefill latency: arrival to first token (queueing + prefill: the TTFT);
* decode latency: (last token - first token) / (output tokens - 1), per request, seconds per token;
* preemptions: times a request was preempted (recompute); preemption loss: the time from a preemption
  until the request produced its next token (queueing again + recomputing), summed per request.
* SLO attainment per request class (:func:`slo_attainment`): an interactive request meets its SLO when its
  TTFT and its mean inter-token latency are both within ``SloParams``; a batch request when it finishes by
  its deadline. Unfinished and rejected requests miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from control.policy.autoscaling import SloParams, meets_interactive_slo
from control.simulator.workload import RequestSpec
from engines.sim.core import SimRequest

if TYPE_CHECKING:
    from control.simulator.cluster import ClusterConfig


@dataclass(slots=True, eq=False)
class RequestMetrics:
    """What happened to one request."""

    spec: RequestSpec
    sim: SimRequest | None = None
    dispatch_time: float = -1.0
    instances: list[int] = field(default_factory=list)
    migrations: int = 0
    migration_downtime: float = 0.0
    rejected: bool = False

    @property
    def done(self) -> bool:
        return self.sim is not None and self.sim.finish_time >= 0

    @property
    def e2e(self) -> float:
        assert self.sim is not None
        return self.sim.finish_time - self.spec.arrival

    @property
    def prefill(self) -> float:
        assert self.sim is not None
        return self.sim.first_token_time - self.spec.arrival

    @property
    def decode_per_token(self) -> float | None:
        assert self.sim is not None
        if self.sim.num_output <= 1:
            return None
        return (self.sim.finish_time - self.sim.first_token_time) / (self.sim.num_output - 1)


@dataclass(frozen=True, slots=True)
class Stat:
    mean: float
    p50: float
    p99: float

    @staticmethod
    def of(values: list[float]) -> Stat:
        if not values:
            return Stat(float("nan"), float("nan"), float("nan"))
        array = np.asarray(values, dtype=np.float64)
        return Stat(float(array.mean()), float(np.percentile(array, 50)), float(np.percentile(array, 99)))


@dataclass(frozen=True, slots=True)
class SimulationResult:
    policy: str
    migration: bool
    num_instances: int
    completed: int
    rejected: int
    unfinished: int
    request: Stat  # seconds
    prefill: Stat  # seconds
    decode: Stat  # seconds per token
    preemptions: int
    preempted_requests: int
    preemption_loss_mean: float  # seconds per request, over all completed requests
    preemption_loss_total: float
    recomputed_tokens: int
    migrations_started: int
    migrations_committed: int
    migrations_aborted: int
    abort_reasons: dict[str, int]
    downtime: Stat  # seconds, committed migrations
    wall_s: float
    virtual_s: float
    steps: int
    utilisation: float  # busy instance-seconds / (instances x virtual time)
    dispatch_decisions: int
    ticks: int
    requests: list[RequestMetrics]

    def row(self) -> dict[str, Any]:
        """The headline numbers, flat (for tables and JSON)."""
        return {
            "policy": self.policy,
            "migration": self.migration,
            "completed": self.completed,
            "request_mean_s": self.request.mean,
            "request_p99_s": self.request.p99,
            "prefill_mean_s": self.prefill.mean,
            "prefill_p99_s": self.prefill.p99,
            "decode_mean_ms": self.decode.mean * 1000,
            "decode_p99_ms": self.decode.p99 * 1000,
            "preemptions": self.preemptions,
            "preemption_loss_s": self.preemption_loss_mean,
            "migrations": self.migrations_committed,
            "migration_aborts": self.migrations_aborted,
            "downtime_mean_ms": self.downtime.mean * 1000,
            "wall_s": self.wall_s,
        }


def summarize(
    records: list[RequestMetrics],
    *,
    config: ClusterConfig,
    wall_s: float,
    virtual_s: float,
    steps: int,
    busy_s: float,
    preemptions: int,
    counters: Any,
) -> SimulationResult:
    done = [r for r in records if r.done]
    sims = [r.sim for r in done if r.sim is not None]
    decode = [d for d in (r.decode_per_token for r in done) if d is not None]
    loss = [s.preemption_loss for s in sims]
    policy = config.policy
    return SimulationResult(
        policy=policy.dispatch_policy,
        migration=policy.migration_enabled,
        num_instances=config.num_instances,
        completed=len(done),
        rejected=sum(1 for r in records if r.rejected),
        unfinished=sum(1 for r in records if not r.done and not r.rejected),
        request=Stat.of([r.e2e for r in done]),
        prefill=Stat.of([r.prefill for r in done]),
        decode=Stat.of(decode),
        preemptions=preemptions,
        preempted_requests=sum(1 for s in sims if s.num_preemptions),
        preemption_loss_mean=float(np.mean(loss)) if loss else 0.0,
        preemption_loss_total=float(np.sum(loss)) if loss else 0.0,
        recomputed_tokens=sum(s.recomputed_tokens for s in sims),
        migrations_started=counters.migrations_started,
        migrations_committed=counters.migrations_committed,
        migrations_aborted=counters.migrations_aborted,
        abort_reasons=dict(counters.abort_reasons),
        downtime=Stat.of(counters.downtimes),
        wall_s=wall_s,
        virtual_s=virtual_s,
        steps=steps,
        utilisation=busy_s / (config.num_instances * virtual_s) if virtual_s > 0 else 0.0,
        dispatch_decisions=counters.dispatch_decisions,
        ticks=counters.ticks,
        requests=records,
    )


@dataclass(frozen=True, slots=True)
class ClassAttainment:
    """SLO attainment of one request class."""

    request_class: str
    total: int
    completed: int
    met: int
    """Requests that met every SLO of their class."""
    ttft_met: int = 0  # interactive only
    itl_met: int = 0  # interactive only

    @property
    def attainment(self) -> float:
        return self.met / self.total if self.total else float("nan")


def slo_attainment(records: list[RequestMetrics], slo: SloParams) -> dict[str, ClassAttainment]:
    """Attainment per class present in ``records`` (see the module docstring for the definitions)."""
    by_class: dict[str, list[RequestMetrics]] = {}
    for record in records:
        by_class.setdefault(record.spec.request_class, []).append(record)
    out = {}
    for cls, group in sorted(by_class.items()):
        done = [r for r in group if r.done]
        if cls == "batch":
            met = sum(1 for r in done if r.sim is not None and r.sim.finish_time <= r.spec.deadline)
            out[cls] = ClassAttainment(cls, len(group), len(done), met)
            continue
        ttft = sum(1 for r in done if r.prefill <= slo.ttft_s)
        itl = sum(1 for r in done if (d := r.decode_per_token) is None or d <= slo.itl_s)
        met = sum(1 for r in done if meets_interactive_slo(r.prefill, r.decode_per_token, slo))
        out[cls] = ClassAttainment(cls, len(group), len(done), met, ttft, itl)
    return out
