"""``drover sim plan``: the fewest instances per preset that meet the SLOs on a workload (capacity planning).

Vidur-Search is the anchor: a search over configurations, each evaluated by a full simulation. Here the
configuration is the instance count of a fixed fleet: double until the run meets the target SLO attainment
(or ``max_instances`` is reached), then bisect between the last miss and the first hit. Attainment is not
strictly monotone in the count (dispatch and migration change with it), so the answer is always a count the
simulator actually ran and saw meet the target, never an interpolation; a preset that cannot meet it within
``max_instances`` (or rejects more than ``1 - target`` of the requests: prompts over its context) says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from control.simulator.presets import Preset
from control.simulator.runner import RunOptions, run_policy
from control.simulator.workload import RequestSpec


@dataclass(slots=True)
class PlanResult:
    preset: str
    policy: str
    instances: int | None  # None: not met within max_instances
    instance_hours: float | None
    slo_attainment: float | None
    tried: dict[int, float] = field(default_factory=dict)  # instances -> attainment
    reason: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "policy": self.policy,
            "instances": self.instances,
            "instance_hours": self.instance_hours,
            "slo_attainment": self.slo_attainment,
            "tried": {str(k): v for k, v in sorted(self.tried.items())},
            "reason": self.reason,
        }


def plan_capacity(
    workload: Sequence[RequestSpec],
    preset: Preset,
    *,
    policy: str,
    slo_ttft_s: float,
    slo_tpot_ms: float,
    target: float = 0.99,
    max_instances: int = 256,
    max_model_len: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> PlanResult:
    """Search the instance count for ``preset`` (see the module docstring)."""
    if not 0 < target <= 1:
        raise ValueError("--target must be in (0, 1]")
    if max_instances < 1:
        raise ValueError("--max-instances must be >= 1")
    result = PlanResult(preset.name, policy, None, None, None)
    hours: dict[int, float] = {}

    def attainment(n: int) -> float:
        if n not in result.tried:
            options = RunOptions(
                preset=preset,
                instances=n,
                max_model_len=max_model_len,
                slo_ttft_s=slo_ttft_s,
                slo_tpot_ms=slo_tpot_ms,
            )
            run = run_policy(policy, workload, options)
            got = run.row["slo_attainment"] or 0.0
            result.tried[n] = got
            hours[n] = run.row["instance_seconds"] / 3600
            progress(f"{preset.name}: {n} instances -> SLO attainment {got:.3f}")
            if run.row["rejected"] > (1 - target) * len(workload) and not result.reason:
                result.reason = (
                    f"{run.row['rejected']} of {len(workload)} requests rejected (prompt over the context "
                    f"{options.max_model_len or preset.max_model_len})"
                )
        return result.tried[n]

    lo, hi = 0, 1  # lo: largest count known to miss; hi: candidate
    while attainment(hi) < target:
        if result.reason or hi >= max_instances:
            result.reason = result.reason or f"target {target} not met with {max_instances} instances"
            result.slo_attainment = max(result.tried.values())
            return result
        lo, hi = hi, min(max_instances, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attainment(mid) >= target:
            hi = mid
        else:
            lo = mid
    result.instances = hi
    result.slo_attainment = result.tried[hi]
    result.instance_hours = hours[hi]
    return result


def fmt_hours(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"
