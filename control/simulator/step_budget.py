"""The simulator shell of the SLO-sized step budget: each simulated instance starts with the token budget the
policy's rule gives for the run's TPOT SLO and the preset's step-latency profile (its cost model), as a live
engine host passes it to vLLM as ``max_num_batched_tokens`` at start-up (:mod:`control.policy.step_budget`).
With ``step_budget_adaptive`` each engine chooses per step between its configured budget and the SLO-sized
one, by recent pressure (:mod:`control.adaptive_budget`)."""

from __future__ import annotations

import dataclasses

from control.adaptive_budget import AdaptiveStepBudget
from control.policy.step_budget import slo_step_token_budget
from control.simulator.cluster import ClusterConfig


def with_slo_step_budget(cluster: ClusterConfig, slo_tpot_s: float) -> ClusterConfig:
    """``cluster`` with each engine's step budget sized from the TPOT SLO when its policy asks for it
    (``step_budget_slo_share`` > 0), never above the configured budget; unchanged otherwise."""
    share = cluster.policy.step_budget_slo_share
    if share <= 0:
        return cluster
    engine = cluster.engine
    budget = slo_step_token_budget(
        cluster.cost_model.prompt_step_ms,
        slo_tpot_s,
        share=share,
        ceiling=engine.max_num_batched_tokens,
        quantum=engine.block_size,
    )
    if cluster.policy.step_budget_adaptive:
        rule = AdaptiveStepBudget(floor=budget, ceiling=engine.max_num_batched_tokens)
        return dataclasses.replace(cluster, engine=dataclasses.replace(engine, adaptive_budget=rule))
    return dataclasses.replace(cluster, engine=dataclasses.replace(engine, max_num_batched_tokens=budget))


__all__ = ["with_slo_step_budget"]
