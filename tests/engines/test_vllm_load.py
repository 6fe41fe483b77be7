"""The vLLM engine's load report (no vLLM process: the front end's bookkeeping and the stats its logger keeps).

A request still in its prefill must show the unprefilled rest of its prompt, as the simulator and the sim and
torch engines report it: ``predictive`` dispatch's prefill-backlog hold (``predict_hold_prefill_tokens``,
on in ``drover``) reads it from the running requests' blocks (``running_totals``). Before round 29 the vLLM
engine reported every running request with its whole context's blocks, so a prompt being prefilled counted
as done and the live hold let requests through that the simulator holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control.policy.dispatch import make_dispatch_policy
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot, running_totals
from engines.base import EngineRequest
from engines.vllm.engine import VllmEngine, _Request, estimate_held_blocks
from transport.messages import InstanceLoad, SamplingParams

BS = 32


def _engine(tmp_path: Path, used_blocks: int, requests: list[tuple[str, int, int]], num_waiting: int) -> VllmEngine:
    """An engine whose front end tracks ``requests`` (id, prompt tokens, tokens streamed), oldest first, with
    vLLM's stats saying ``used_blocks`` of 512 are allocated and ``num_waiting`` requests wait."""
    engine = VllmEngine("v-0", tmp_path, model_name="m", block_size=BS)
    engine._num_blocks = 512  # as start() reads it from vLLM
    stats = engine._stats
    stats.kv_cache_usage = used_blocks / 512
    stats.num_waiting = num_waiting
    stats.num_running = len(requests) - num_waiting
    for k, (rid, prompt, streamed) in enumerate(requests):
        request = EngineRequest(request_id=rid, prompt_token_ids=[5] * prompt, sampling=SamplingParams(max_tokens=64))
        state = engine._requests[rid] = _Request(
            request=request, context_len=prompt, arrival=float(k), streamed=streamed
        )
        assert state.num_tokens == prompt + streamed
    return engine


def _snapshot(load: InstanceLoad, iid: str) -> InstanceSnapshot:
    running = tuple(
        RunningSnapshot(r.request_id, r.num_tokens, r.num_blocks, r.priority, r.decoding) for r in load.running
    )
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=load.num_total_blocks,
        num_free_blocks=load.num_free_blocks,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        waiting_blocks=load.waiting_blocks,
        head_waiting_blocks=load.head_waiting_blocks,
        block_size=BS,
        running=running,
    )


def test_a_prompt_in_its_prefill_reports_its_unprefilled_rest(tmp_path: Path) -> None:
    # two decoding requests (100 + 10 and 40 + 3 tokens: 4 + 2 blocks), a 3,000-token prompt of which 1,024
    # tokens are computed (32 blocks: vLLM's usage is 38 blocks), and a newer prompt not scheduled yet
    engine = _engine(tmp_path, 38, [("d1", 100, 10), ("d2", 40, 3), ("p", 3000, 0), ("w", 500, 0)], num_waiting=1)
    load = engine.load()
    assert [(r.request_id, r.num_blocks, r.decoding) for r in load.running] == [
        ("d1", 4, True),
        ("d2", 2, True),
        ("p", 32, False),
    ]
    assert load.waiting_blocks == -(-501 // BS)
    prefilling, to_allocate, decoding = running_totals(_snapshot(load, "v-0").running, BS)
    assert (prefilling, to_allocate, decoding) == (3000 - 1024, 94 - 32, 2)


def test_the_live_hold_holds_behind_a_vllm_prompt_in_its_prefill(tmp_path: Path) -> None:
    """drover's dispatch (the hold at 2,048 tokens) on two vLLM instances, each prefilling a 4,000-token prompt
    of which one chunk is computed: the next prompt is held (None), as the simulator would hold it."""
    params = user_policy_params("drover").dispatch_params()
    assert params.predict_hold_prefill_tokens == 2048
    index = make_dispatch_policy("predictive", params)
    for iid in ("v-0", "v-1"):
        engine = _engine(tmp_path, 64, [("d", 200, 5), (f"p-{iid}", 4000, 0)], num_waiting=0)
        index.upsert(_snapshot(engine.load(), iid))
    assert index.choose(RequestDemand("new", 300, -(-300 // BS))) is None
    # once the prompts are prefilled (their blocks all held, first tokens streamed) the request goes through
    for iid in ("v-0", "v-1"):
        engine = _engine(tmp_path, 7 + 126, [("d", 200, 5), (f"p-{iid}", 4000, 1)], num_waiting=0)
        index.upsert(_snapshot(engine.load(), iid))
    assert index.choose(RequestDemand("new", 300, -(-300 // BS))) in ("v-0", "v-1")


@pytest.mark.parametrize(
    ("used", "running", "held"),
    [
        (10, [(100, True), (2000, False)], [4, 6]),  # the prefilling one holds what decodes do not
        (3, [(100, True), (2000, False)], [4, 0]),  # shared prefix blocks: usage below the decodes' sum
        (200, [(64, False), (64, False)], [2, 2]),  # usage beyond every prompt (cached, reserved): capped
        (3, [(128, False), (128, False)], [3, 0]),  # oldest prompt first (vLLM schedules running in order)
    ],
)
def test_estimate_held_blocks(used: int, running: list[tuple[int, bool]], held: list[int]) -> None:
    assert estimate_held_blocks(used, running, BS) == held
