"""SimEngineCore: block conservation, preemption, batching, and fast-forward == step-by-step."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.sim.core import FINISHED, SimEngineConfig, SimEngineCore, SimRequest
from engines.sim.cost_model import LLAMA7B_A100


def check_blocks(core: SimEngineCore) -> None:
    held = sum(r.num_blocks for r in core.running)
    assert held == core.allocated_blocks
    assert all(r.num_blocks == 0 for r in core.waiting)
    assert core.num_free_blocks >= 0
    assert core.num_free_blocks + core.allocated_blocks + core.reserved_blocks + core.outgoing_blocks == (
        core.config.num_blocks
    )
    assert core.waiting_blocks == sum(core.blocks_for(r.context_len) for r in core.waiting)
    assert len(core.running) <= core.config.max_num_seqs
    for r in core.running:
        assert r.num_blocks >= core.blocks_for(r.num_computed)


def run_to_completion(core: SimEngineCore, max_steps: int, now: float = 0.0) -> float:
    while core.has_work:
        end = core.plan(now, max_steps)
        assert end is not None
        check_blocks(core)
        core.finish_plan()
        check_blocks(core)
        now = end
    return now


def make_requests(n: int, seed: int, prompt: tuple[int, int] = (10, 900), out: tuple[int, int] = (1, 300)):
    rng = random.Random(seed)
    return [
        SimRequest(f"r{i}", prompt_len=rng.randint(*prompt), max_tokens=rng.randint(*out), arrival_time=0.0)
        for i in range(n)
    ]


def test_batching_runs_requests_together() -> None:
    core = SimEngineCore(SimEngineConfig(num_blocks=512, max_num_seqs=8))
    requests = [SimRequest(f"r{i}", prompt_len=100, max_tokens=50) for i in range(8)]
    for r in requests:
        core.add(r)
    core.plan(0.0)
    assert len(core.running) == 8  # all admitted in the first step (800 prompt tokens <= 2048 budget)
    core.finish_plan()
    run_to_completion(core, 1)
    assert core.num_steps == 50  # one prefill step + 49 decode steps, all batched
    assert all(r.state == FINISHED and r.num_output == 50 for r in requests)


def test_chunked_prefill_splits_long_prompt() -> None:
    core = SimEngineCore(SimEngineConfig(max_num_batched_tokens=256, max_model_len=4096, num_blocks=512))
    r = SimRequest("long", prompt_len=1000, max_tokens=2)
    core.add(r)
    run_to_completion(core, 1)
    assert core.num_steps == 4 + 1  # ceil(1000/256) prefill chunks, then one decode


def test_vllm_v0_schedules_a_whole_prompt_before_running_decodes() -> None:
    # vLLM v0 without chunked prefill (``_schedule_default``) schedules waiting prompts first with the whole
    # budget, and a step with prefills runs no decodes. A prompt as long as the budget used to wait behind
    # running decodes (each took a token of the budget first) until they all finished.
    config = SimEngineConfig(
        max_num_batched_tokens=4096, max_model_len=8192, num_blocks=1024, block_size=16, chunked_prefill=False
    )
    core = SimEngineCore(config)
    decoding = [SimRequest(f"d{i}", prompt_len=16, max_tokens=500) for i in range(2)]
    for r in decoding:
        core.add(r)
    now = run_steps(core, 3)  # the prefill step, then decodes
    assert all(r.num_output == 3 for r in decoding)
    long = SimRequest("long", prompt_len=4095, max_tokens=2)
    core.add(long)
    end = core.plan(now)
    assert end is not None
    outputs = core.finish_plan()
    assert [o.request.request_id for o in outputs] == ["long"]  # the prompt alone, decodes paused a step
    assert long.first_token_time == end
    assert all(r.num_output == 3 for r in decoding)
    run_steps(core, 1, end)  # then everyone decodes together
    assert long.num_output == 2 and all(r.num_output == 4 for r in decoding)


def run_steps(core: SimEngineCore, steps: int, now: float = 0.0) -> float:
    for _ in range(steps):
        end = core.plan(now)
        assert end is not None
        core.finish_plan()
        check_blocks(core)
        now = end
    return now


def test_preemption_under_memory_pressure_and_everyone_finishes() -> None:
    core = SimEngineCore(SimEngineConfig(num_blocks=64, max_num_seqs=16, block_size=16))
    requests = [SimRequest(f"r{i}", prompt_len=100, max_tokens=200) for i in range(8)]
    for r in requests:
        core.add(r)
    run_to_completion(core, 1)
    assert core.num_preemptions > 0
    assert all(r.state == FINISHED and r.num_output == 200 for r in requests)
    assert core.allocated_blocks == 0 and core.num_free_blocks == 64
    preempted = [r for r in requests if r.num_preemptions]
    assert preempted and all(r.recomputed_tokens > 0 and r.preemption_loss > 0 for r in preempted)


def test_newest_running_request_is_preempted_first() -> None:
    core = SimEngineCore(SimEngineConfig(num_blocks=8, block_size=16, max_num_seqs=4))
    a = SimRequest("a", prompt_len=48, max_tokens=60)  # each needs <= 7 blocks alone, 8 together at most
    b = SimRequest("b", prompt_len=48, max_tokens=60)
    core.add(a)
    core.add(b)
    now = 0.0
    while not (a.num_preemptions or b.num_preemptions):
        end = core.plan(now)
        assert end is not None
        core.finish_plan()
        now = end
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert core.waiting[0] is b


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 24),
    num_blocks=st.integers(60, 400),
    max_num_seqs=st.integers(1, 16),
)
def test_fast_forward_matches_step_by_step(seed: int, n: int, num_blocks: int, max_num_seqs: int) -> None:
    config = SimEngineConfig(num_blocks=num_blocks, block_size=16, max_num_seqs=max_num_seqs)
    results = []
    for max_steps in (1, 10_000):
        core = SimEngineCore(config, LLAMA7B_A100)
        requests = [r for r in make_requests(n, seed) if core.can_ever_fit(r.prompt_len, r.max_tokens) is None]
        for r in requests:
            core.add(r)
        run_to_completion(core, max_steps)
        results.append(
            (
                [(r.first_token_time, r.finish_time, r.num_preemptions, r.num_output) for r in requests],
                core.num_steps,
            )
        )
    (a, steps_a), (b, steps_b) = results
    assert steps_a == steps_b
    for x, y in zip(a, b, strict=True):
        assert abs(x[0] - y[0]) < 1e-6 and abs(x[1] - y[1]) < 1e-6 and x[2:] == y[2:]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_truncated_runs_match_step_by_step(seed: int, cuts: list[float]) -> None:
    """Interrupting fast-forward runs at arbitrary times (advance_to + truncate) changes nothing."""
    config = SimEngineConfig(num_blocks=200, block_size=16, max_num_seqs=8)
    reference = SimEngineCore(config)
    ref_requests = make_requests(10, seed)
    for r in ref_requests:
        reference.add(r)
    run_to_completion(reference, 1)

    core = SimEngineCore(config)
    requests = make_requests(10, seed)
    for r in requests:
        core.add(r)
    now, cut_index = 0.0, 0
    while core.has_work:
        end = core.plan(now, 10_000)
        assert end is not None
        if cut_index < len(cuts):
            t = now + (end - now) * cuts[cut_index]
            cut_index += 1
            core.advance_to(t)
            check_blocks(core)
            end = core.truncate(t)
            assert end is not None and end >= t - 1e-12
            check_blocks(core)
        core.finish_plan()
        check_blocks(core)
        now = end
    for x, y in zip(ref_requests, requests, strict=True):
        assert abs(x.finish_time - y.finish_time) < 1e-6
        assert x.num_output == y.num_output and x.num_preemptions == y.num_preemptions


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "remove", "reserve", "release", "run"]), st.integers(0, 40)),
        max_size=60,
    )
)
def test_blocks_conserved_under_random_operations(ops: list[tuple[str, int]]) -> None:
    core = SimEngineCore(SimEngineConfig(num_blocks=80, block_size=16, max_num_seqs=6, max_model_len=1024))
    now, counter, reserved = 0.0, 0, 0
    for op, k in ops:
        if op == "add":
            counter += 1
            core.add(SimRequest(f"r{counter}", prompt_len=10 + k * 7, max_tokens=1 + k * 5))
        elif op in ("step", "run") and core.has_work:
            end = core.plan(now, 1 if op == "step" else 1000)
            if end is not None:
                if op == "run":
                    core.advance_to((now + end) / 2)
                    check_blocks(core)
                core.finish_plan()
                now = end
        elif op == "remove" and core.requests:
            victim = sorted(core.requests)[k % len(core.requests)]
            core.remove(victim, keep_blocks=k % 2 == 0)
            if k % 3 == 0:
                core.release_outgoing(victim)
        elif op == "reserve" and core.reserve(k % 10):
            reserved += k % 10
        elif op == "release":
            core.release_reservation(reserved)
            reserved = 0
        check_blocks(core)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), polls=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_advance_blocks_to_keeps_block_state_exact(seed: int, polls: list[float]) -> None:
    """Polling a run with ``advance_blocks_to`` leaves blocks and ``version`` exactly as ``advance_to`` does
    at every poll (token counts may lag), ``next_block_time`` never skips a change, and the run's outcome
    is unchanged."""
    config = SimEngineConfig(num_blocks=300, block_size=16, max_num_seqs=8)
    eager, lazy = SimEngineCore(config), SimEngineCore(config)
    eager_requests, lazy_requests = make_requests(10, seed), make_requests(10, seed)
    for core, requests in ((eager, eager_requests), (lazy, lazy_requests)):
        for r in requests:
            core.add(r)
    now = 0.0
    while eager.has_work:
        end = eager.plan(now, 10_000)
        assert end is not None and lazy.plan(now, 10_000) == end
        for fraction in sorted(polls):
            t = now + (end - now) * fraction
            eager.advance_to(t)
            before = lazy.version
            due = lazy.next_block_time()
            lazy.advance_blocks_to(t)
            if due is None or t < due - 1e-9:
                assert lazy.version == before  # nothing was due
            assert lazy.allocated_blocks == eager.allocated_blocks and lazy.version == eager.version
            assert [r.num_blocks for r in lazy.running] == [r.num_blocks for r in eager.running]
        eager.finish_plan()
        lazy.finish_plan()
        now = end
    for x, y in zip(eager_requests, lazy_requests, strict=True):
        assert (x.first_token_time, x.finish_time, x.num_output) == (y.first_token_time, y.finish_time, y.num_output)


def test_fast_forward_stamps_first_token_when_a_chunk_leaves_one_prompt_token() -> None:
    """Two decodes take 2 of the 2,048-token budget, so a 2 x 2,046 + 1 token prompt has one token left after
    its chunks: that step is decode-sized but yields the first token; a multi-step decode run planned over it
    used to stamp the first token at the run's end (seconds late on the Azure trace's 4,08x-token prompts)."""
    config = SimEngineConfig(num_blocks=2000, block_size=16, max_num_seqs=8, max_model_len=8192)
    firsts = []
    for max_steps in (1, 10_000):
        core = SimEngineCore(config, LLAMA7B_A100)
        for i in range(2):
            core.add(SimRequest(f"d{i}", prompt_len=10, max_tokens=300))
        now = run_steps(core, 1, 0.0)  # both prefilled: they decode from here on
        long = SimRequest("long", prompt_len=2 * 2046 + 1, max_tokens=5)
        core.add(long)
        run_to_completion(core, max_steps, now)
        firsts.append(long.first_token_time)
    step_by_step, fast_forward = firsts
    assert abs(step_by_step - fast_forward) < 1e-6
