"""SLO-sized step budget (``step_budget_slo_share``, opt-in; ``drover`` leaves it off): each instance's
per-step token budget is the largest whose step of prompt tokens alone fits a share of the TPOT SLO, so the
decodes that share a step with a long prompt's chunk keep their per-token latency under the SLO
(docs/policies.md, "SLO-sized step budget")."""

from __future__ import annotations

import dataclasses

import pytest

from control.policy.params import PolicyParams
from control.policy.recommended import STEP_BUDGET_SHARE, user_policy_params
from control.policy.step_budget import slo_step_token_budget
from control.simulator.presets import get_preset
from control.simulator.runner import fixed_simulator, weighted_percentile
from control.simulator.step_budget import with_slo_step_budget
from control.simulator.workload import RequestSpec


@pytest.mark.parametrize("slo_ms", [5.0, 40.0, 100.0, 170.0, 400.0, 10_000.0])
@pytest.mark.parametrize("share", [0.3, 0.5, 1.0])
def test_the_budget_is_the_largest_that_fits_or_the_floor(slo_ms: float, share: float) -> None:
    def step(tokens: int) -> float:
        return 30.0 + 0.15 * tokens

    got = slo_step_token_budget(step, slo_ms / 1000, share=share, ceiling=2048, floor=256, quantum=16)
    fits = [b for b in [*range(256, 2048, 16), 2048] if step(b) <= share * slo_ms]
    assert got == (max(fits) if fits else 256)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="slo_tpot_s"):
        slo_step_token_budget(lambda b: 1.0, 0.0, share=0.5, ceiling=2048)
    with pytest.raises(ValueError, match="step_budget_slo_share"):
        PolicyParams().with_updates(step_budget_slo_share="1.5")  # as `drover policy set` sends it


def with_budget() -> PolicyParams:
    """``drover`` with the fixed SLO-sized budget (its default is the adaptive one, test_adaptive_budget.py)."""
    return dataclasses.replace(
        user_policy_params("drover"), step_budget_slo_share=STEP_BUDGET_SHARE, step_budget_adaptive=False
    )


def test_the_rule_sizes_the_budget_from_the_slo_and_the_baseline_keeps_vllms() -> None:
    preset = get_preset("qwen2.5-7b-a10")
    drover = with_slo_step_budget(preset.cluster_config(2, with_budget()), 0.170)
    baseline = with_slo_step_budget(preset.cluster_config(2, user_policy_params("least_loaded")), 0.170)
    budget = drover.engine.max_num_batched_tokens
    assert baseline.engine.max_num_batched_tokens == 2048
    assert budget < 2048 and budget % drover.engine.block_size == 0
    share = drover.policy.step_budget_slo_share
    cost = drover.cost_model
    assert cost.prompt_step_ms(budget) <= share * 170 < cost.prompt_step_ms(budget + 16)
    # a loose SLO leaves vLLM's budget alone
    assert with_slo_step_budget(drover, 10.0).engine.max_num_batched_tokens == budget


def test_decodes_beside_a_long_prompt_keep_their_gaps_under_the_slo() -> None:
    """One Qwen/A10 instance decodes 8 requests when a 6,000-token prompt arrives. With vLLM's 2,048-token
    budget each of its chunk steps takes ~370 ms, over the 170 ms TPOT SLO, and is p99 of the gaps; with the
    SLO-sized budget every step stays under it."""
    preset = get_preset("qwen2.5-7b-a10")
    specs = [RequestSpec(f"d{i}", 0.0, 64, 100) for i in range(8)] + [RequestSpec("long", 0.5, 6000, 2)]
    p99: dict[str, float] = {}
    off = dataclasses.replace(user_policy_params("drover"), step_budget_slo_share=0.0, step_budget_adaptive=False)
    for name, params in (("off", off), ("on", with_budget())):
        sim = fixed_simulator(with_slo_step_budget(preset.cluster_config(1, params), 0.170), specs)
        result = sim.run()
        assert sum(1 for r in result.requests if r.done) == 9
        gap = weighted_percentile(sim.gaps, sim.gap_weights, 99)
        assert gap is not None
        p99[name] = gap * 1000
    assert p99["off"] > 170.0
    assert p99["on"] < 170.0


def test_drover_runs_it_adaptive_and_the_baseline_keeps_vllms_budget() -> None:
    """``drover`` takes the SLO-sized budget only under pressure (the adaptive rule, round 28): its engines
    start at vLLM's budget with the rule; ``least_loaded`` keeps vLLM's fixed budget."""
    preset = get_preset("qwen2.5-7b-a10")
    drover = user_policy_params("drover")
    assert drover.step_budget_slo_share == STEP_BUDGET_SHARE and drover.step_budget_adaptive
    engine = with_slo_step_budget(preset.cluster_config(1, drover), 0.170).engine
    assert engine.max_num_batched_tokens == 2048
    assert engine.adaptive_budget is not None and engine.adaptive_budget.floor == 480
    baseline = with_slo_step_budget(preset.cluster_config(1, user_policy_params("least_loaded")), 0.170).engine
    assert baseline.max_num_batched_tokens == 2048 and baseline.adaptive_budget is None


def test_the_live_engine_host_starts_its_engine_with_the_slo_sized_budget() -> None:
    """The live shell follows the same rule at start-up: the engine is built with the budget (vLLM takes it as
    ``max_num_batched_tokens``; it cannot change while running)."""
    from actors.engine_host import build_engine, step_token_budget
    from control.settings import Settings
    from engines.sim.cost_model import DEFAULT_COST_MODEL

    base = Settings()
    on = base.model_copy(
        update={"engine": base.engine.model_copy(update={"kind": "sim", "step_budget_slo_share": 0.5})}
    )
    off = base.model_copy(update={"engine": base.engine.model_copy(update={"kind": "sim"})})
    budget = step_token_budget(on)
    assert step_token_budget(off) == base.engine.max_num_batched_tokens == 2048
    assert budget < 2048
    assert DEFAULT_COST_MODEL.prompt_step_ms(budget) <= 0.5 * base.autoscaling.slo.itl_s * 1000
    engine, _ = build_engine(on, "budget-0")
    assert engine.config.max_num_batched_tokens == budget  # type: ignore[attr-defined]
