"""The adaptive step budget (control/adaptive_budget.py): the rule against gap-by-gap arithmetic and a
hand-worked case, and the simulated engine keeping the full budget at light load and shrinking it under
pressure."""

from __future__ import annotations

import dataclasses
import math

import pytest

from control.adaptive_budget import AdaptiveStepBudget, BudgetState
from control.policy.params import ENGINE_STARTUP_KEYS, PolicyParams
from control.policy.recommended import STEP_BUDGET_SHARE, user_policy_params
from control.simulator.presets import get_preset
from control.simulator.runner import fixed_simulator
from control.simulator.step_budget import with_slo_step_budget
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig, SimEngineCore, SimRequest

RULE = AdaptiveStepBudget(floor=480, ceiling=2048, window_gaps=100.0)


def test_a_step_of_many_gaps_equals_its_gaps_one_by_one() -> None:
    """``observe`` with k gaps is the exponential average taken gap by gap (brute force)."""
    steps = [(3, 2048), (7, 0), (1, 100), (40, 0), (12, 4096), (250, 0), (5, 480)]
    state = BudgetState()
    share = 0.0
    alpha = 1.0 - math.exp(-1.0 / RULE.window_gaps)
    for gaps, tokens in steps:
        state = RULE.observe(state, gaps, tokens)
        for _ in range(gaps):
            share += alpha * (min(1.0, tokens / RULE.ceiling) - share)
        assert state.share == pytest.approx(share, rel=1e-9, abs=1e-15)


def test_hand_worked_pressure_and_release() -> None:
    """10 gaps beside a full 2,048-token chunk: share 1 - e^-0.1 = 0.0952 > 1 %: pressed, the SLO-sized
    budget. Decode-only steps decay it by e^(-gaps/100); it is released once the average over the gaps seen,
    0.0952 e^(-n/100) / (1 - e^(-(10 + n)/100)), falls under 0.7 %: first at n = 268."""
    state = RULE.observe(BudgetState(), 10, 2048)
    assert state.share == pytest.approx(1 - math.exp(-0.1))
    assert state.seen == pytest.approx(1 - math.exp(-0.1))
    assert state.pressed and RULE.budget(state) == 480
    held = RULE.observe(state, 267, 0)
    assert held.share / held.seen == pytest.approx(0.0070308, abs=1e-6)
    assert held.pressed and RULE.budget(held) == 480  # under 1 % but over 0.7 %: hysteresis holds it
    released = RULE.observe(state, 268, 0)
    assert not released.pressed and RULE.budget(released) == 2048
    # between the thresholds an unpressed instance stays on the full budget (its window seen: no cold test)
    between = BudgetState(share=0.008, pressed=False, seen=1.0, second=0.008)
    assert not RULE.observe(between, 1, 0).pressed


COLD = AdaptiveStepBudget(floor=480, ceiling=2048)  # the defaults: a 20,000-gap window, z = 2


def cold_start(rule: AdaptiveStepBudget, steps: int, every: int) -> BudgetState:
    """A cold instance: 16 decoders, a full chunk in one step of every ``every``."""
    state = BudgetState()
    for k in range(steps):
        state = rule.observe(state, 16, 2048 if k % every == 0 else 0)
        if state.pressed:
            return state
    return state


def test_a_cold_instance_under_pressure_presses_once_the_gaps_seen_show_it() -> None:
    """True share 10 %. The average starts at 0, so it reads 10 % x (1 - e^(-gaps / 20,000)): under 1 % for
    the first ~2,100 gaps (the rule before this correction waited that long: ~5 s of a Mooncake run at 4x).
    Divided by the weight gathered it reads ~10 %, and once that is 2 standard errors above 1 % (a step's
    16 gaps one draw) the instance presses, after ~1,000 gaps."""
    state = cold_start(COLD, 200, every=10)
    gaps = round(-COLD.window_gaps * math.log(1 - state.seen))
    assert state.pressed and COLD.budget(state) == 480
    assert gaps <= 1200 and state.share < COLD.gap_share  # the uncorrected reading alone would not press yet
    uncorrected = dataclasses.replace(COLD, evidence_z=0.0)
    assert not cold_start(uncorrected, gaps // 16, every=10).pressed
    assert cold_start(uncorrected, 140, every=10).pressed  # ... until 2,240 gaps


def test_a_cold_instance_does_not_press_on_a_few_chunks() -> None:
    """A light instance's early burst: a full chunk in one step of every 50 (2 %) over 5,000 gaps reads 2 %
    corrected, but that is 8 chunks: not 2 standard errors above 1 %. The bias correction alone would press
    (it raised qwen's light-load p99 ITL from 71-79 to 85-86 ms)."""
    state = cold_start(COLD, 5000 // 16, every=50)
    assert not state.pressed
    mean = state.share / state.seen
    assert 0.015 < mean < 0.025
    assert mean > COLD.gap_share  # the corrected mean alone would have pressed


def test_a_step_without_decodes_changes_nothing() -> None:
    state = BudgetState(share=0.02, pressed=True)
    assert RULE.observe(state, 0, 2048) is state


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        AdaptiveStepBudget(floor=4096, ceiling=2048)
    with pytest.raises(ValueError, match="release_share"):
        AdaptiveStepBudget(floor=480, ceiling=2048, gap_share=0.005, release_share=0.01)
    with pytest.raises(ValueError, match="window_gaps"):
        AdaptiveStepBudget(floor=480, ceiling=2048, window_gaps=0.0)
    with pytest.raises(ValueError, match="evidence_z"):
        AdaptiveStepBudget(floor=480, ceiling=2048, evidence_z=-1.0)


def test_the_policy_key_is_a_start_up_key_and_coerces_from_text() -> None:
    assert "step_budget_adaptive" in ENGINE_STARTUP_KEYS  # `drover policy set` refuses it, names [engine]
    assert PolicyParams().with_updates(step_budget_adaptive="true").step_budget_adaptive is True


# ------------------------------------------------------------------------------------- the simulated engine
QWEN = get_preset("qwen2.5-7b-a10")


def engine(rule: AdaptiveStepBudget | None) -> SimEngineCore:
    config = dataclasses.replace(QWEN.engine_config(), adaptive_budget=rule)
    return SimEngineCore(config, QWEN.cost_model)


def drive(core: SimEngineCore, arrivals: list[tuple[float, SimRequest]], until: float) -> list[int]:
    """Step the core, adding each request at its time; returns every step's prompt tokens (from the
    requests' computed counts)."""
    now = 0.0
    pending = sorted(arrivals, key=lambda a: a[0])
    chunks: list[int] = []
    while now < until:
        while pending and pending[0][0] <= now:
            core.add(pending.pop(0)[1])
        before = {r.request_id: r.num_computed for r in core.running}
        prompts = {r.request_id for r in core.running if r.first_token_time < 0} | {r.request_id for r in core.waiting}
        end = core.plan(now)
        if end is None:
            now = pending[0][0] if pending else until
            continue
        core.finish_plan()
        done = {r.request_id: r.num_computed for r in core.requests.values()}
        chunks.append(sum(done[i] - before.get(i, 0) for i in prompts if i in done))
        now = end
    return chunks


def decoders(n: int) -> list[tuple[float, SimRequest]]:
    return [(0.0, SimRequest(f"d{i}", prompt_len=64, max_tokens=100_000)) for i in range(n)]


def test_light_load_keeps_the_full_budget_and_pressure_shrinks_it() -> None:
    """16 decoding requests on one qwen instance. One 2,000-token prompt (light load: a full chunk in
    16 of ~16,000 gaps) is prefilled in one step, as with vLLM's budget; a 2,000-token prompt every
    0.5 s (a full chunk in ~16 of every ~200 gaps) presses the instance, and its prompts go in SLO-sized
    chunks."""
    floor = 480
    rule = AdaptiveStepBudget(floor=floor, ceiling=2048)
    light = engine(rule)
    chunks = drive(light, [*decoders(16), (20.0, SimRequest("p", prompt_len=2000, max_tokens=4))], until=40.0)
    assert 2000 in chunks  # the whole prompt in one step
    assert not light.budget_state.pressed and light.budget_state.share < rule.gap_share

    heavy = engine(rule)
    prompts = [(1.0 + 0.5 * k, SimRequest(f"p{k}", prompt_len=2000, max_tokens=4)) for k in range(60)]
    chunks = drive(heavy, [*decoders(16), *prompts], until=31.0)
    assert heavy.budget_state.pressed
    later = chunks[len(chunks) // 2 :]
    # under pressure every chunk is SLO-sized: the budget less the 16 decodes' tokens
    assert max(later) == floor - 16
    assert 2000 in chunks[: len(chunks) // 4]  # ... but the first prompts, before the pressure, went whole


def test_fast_forward_observes_what_step_by_step_observes() -> None:
    """Decode-only runs report their gaps in one ``observe``; the state and every finish time are those of
    stepping one by one."""
    rule = AdaptiveStepBudget(floor=480, ceiling=2048, window_gaps=500.0)
    results = []
    for max_steps in (1, 64):
        core = engine(rule)
        reqs = [SimRequest(f"r{i}", prompt_len=300 + 700 * (i % 3), max_tokens=40 + 13 * i) for i in range(12)]
        now = 0.0
        for k, r in enumerate(reqs):  # request k arrives at 0.4 k s: added at the first step boundary after
            arrival = 0.4 * k
            while core.has_work and now < arrival:
                end = core.plan(now, max_steps)
                assert end is not None
                if end > arrival:
                    end = core.truncate(arrival)
                    assert end is not None
                core.finish_plan()
                now = end
            core.add(r)
        while core.has_work:
            end = core.plan(now, max_steps)
            assert end is not None
            core.finish_plan()
            now = end
        results.append(([r.finish_time for r in reqs], core.budget_state))
    (times_1, state_1), (times_k, state_k) = results
    assert times_1 == pytest.approx(times_k, rel=1e-9)
    assert state_1.pressed == state_k.pressed
    assert state_1.share == pytest.approx(state_k.share, rel=1e-9)
    assert state_1.seen == pytest.approx(state_k.seen, rel=1e-9)


def test_a_one_token_prompt_chunk_is_observed_as_prompt_tokens() -> None:
    """A 2-token budget beside a decoder leaves a running prompt one token per step. The rule sees that
    token as prompt (as the step's cost counts it, and as vLLM's scheduler reports a 1-token prompt chunk),
    so each step carried half a full chunk; it is not a decode-only step."""
    rule = AdaptiveStepBudget(floor=2, ceiling=2, window_gaps=10.0)
    config = SimEngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=2, max_model_len=64)
    core = SimEngineCore(dataclasses.replace(config, adaptive_budget=rule))
    core.add(SimRequest("d", prompt_len=1, max_tokens=1000))
    now = core.plan(0.0)
    assert now is not None
    core.finish_plan()  # d's one-token prompt: its first token, no decode gap yet
    prompt = SimRequest("p", prompt_len=10, max_tokens=2)
    core.add(prompt)
    expected = core.budget_state
    for _ in range(8):  # p's prompt one token a step (the first admits it), d decoding beside it
        before = prompt.num_computed
        end = core.plan(now)
        assert end is not None
        core.finish_plan()
        now = end
        assert prompt.num_computed - before == 1
        expected = rule.observe(expected, 1, 1)
    assert core.budget_state.pressed == expected.pressed
    assert core.budget_state.share == pytest.approx(expected.share, rel=1e-12)


def test_the_simulator_builds_the_rule_only_when_asked() -> None:
    adaptive = dataclasses.replace(
        user_policy_params("drover"), step_budget_slo_share=STEP_BUDGET_SHARE, step_budget_adaptive=True
    )
    static = dataclasses.replace(adaptive, step_budget_adaptive=False)
    on = with_slo_step_budget(QWEN.cluster_config(2, adaptive), 0.170).engine
    off = with_slo_step_budget(QWEN.cluster_config(2, static), 0.170).engine
    assert off.adaptive_budget is None and off.max_num_batched_tokens == 480
    assert on.adaptive_budget == AdaptiveStepBudget(floor=480, ceiling=2048)
    assert on.max_num_batched_tokens == 2048
    baseline = with_slo_step_budget(QWEN.cluster_config(2, user_policy_params("least_loaded")), 0.170).engine
    assert baseline.adaptive_budget is None and baseline.max_num_batched_tokens == 2048


def test_a_light_cluster_run_is_the_full_budget_run() -> None:
    """Never pressed, the adaptive engines step exactly as vLLM's fixed budget does: same gaps."""
    adaptive = dataclasses.replace(
        user_policy_params("drover"), step_budget_slo_share=STEP_BUDGET_SHARE, step_budget_adaptive=True
    )
    plain = dataclasses.replace(adaptive, step_budget_slo_share=0.0, step_budget_adaptive=False)
    specs = [RequestSpec(f"r{i}", 2.0 * i, 1500, 200) for i in range(10)]
    gaps = []
    for params in (adaptive, plain):
        sim = fixed_simulator(with_slo_step_budget(QWEN.cluster_config(2, params), 0.170), specs)
        result = sim.run()
        assert all(r.done for r in result.requests)
        gaps.append(sim.gaps)
    assert gaps[0] == gaps[1]


def test_the_live_engine_host_builds_the_rule_into_its_engine() -> None:
    """``[engine] step_budget_adaptive`` with a share: the engine host hands the engine the rule (the SLO-sized
    budget as its floor, ``max_num_batched_tokens`` as its ceiling); without the share it is ignored."""
    from actors.engine_host import adaptive_step_budget, build_engine, step_token_budget
    from control.settings import Settings

    base = Settings()
    engine_settings = {"kind": "sim", "step_budget_slo_share": 0.5, "step_budget_adaptive": True}
    on = base.model_copy(update={"engine": base.engine.model_copy(update=engine_settings)})
    rule = adaptive_step_budget(on)
    assert rule == AdaptiveStepBudget(floor=step_token_budget(on), ceiling=2048)
    assert rule.floor < 2048
    engine, _ = build_engine(on, "adaptive-0")
    assert engine.config.adaptive_budget == rule  # type: ignore[attr-defined]
    assert engine.config.max_num_batched_tokens == 2048  # type: ignore[attr-defined]
    no_share = base.model_copy(update={"engine": base.engine.model_copy(update={"step_budget_adaptive": True})})
    assert adaptive_step_budget(no_share) is None
