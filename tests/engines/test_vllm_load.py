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

from actors.scheduler_instances import snapshot_from_load
from control.policy.dispatch import make_dispatch_policy
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, running_totals
from engines.base import EngineRequest
from engines.vllm.engine import VllmEngine, _Request, estimate_held_blocks
from transport.messages import SamplingParams

BS = 32


def _engine(
    tmp_path: Path,
    used_blocks: int,
    requests: list[tuple[str, int, int]],
    num_waiting: int,
    iid: str = "v-0",
    cached: dict[str, int] | None = None,
) -> VllmEngine:
    """An engine whose front end tracks ``requests`` (id, prompt tokens, tokens streamed), oldest first, with
    vLLM's stats saying ``used_blocks`` of 512 are allocated and ``num_waiting`` requests wait; ``cached``:
    the blocks of a request's prompt that the prefix cache held at its admission."""
    engine = VllmEngine(iid, tmp_path, model_name="m", block_size=BS)
    engine._num_blocks = 512  # as start() reads it from vLLM
    stats = engine._stats
    stats.kv_cache_usage = used_blocks / 512
    stats.num_waiting = num_waiting
    stats.num_running = len(requests) - num_waiting
    for k, (rid, prompt, streamed) in enumerate(requests):
        request = EngineRequest(request_id=rid, prompt_token_ids=[5] * prompt, sampling=SamplingParams(max_tokens=64))
        state = engine._requests[rid] = _Request(
            request=request,
            context_len=prompt,
            arrival=float(k),
            streamed=streamed,
            cached_blocks=(cached or {}).get(rid, 0),
        )
        assert state.num_tokens == prompt + streamed
    return engine


def _snapshot(engine: VllmEngine) -> InstanceSnapshot:
    """What the scheduler builds from the engine's heartbeat (the function the live scheduler calls)."""
    return snapshot_from_load(engine.load(), engine.info, False)


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
    prefilling, to_allocate, decoding = running_totals(_snapshot(engine).running, BS)
    assert (prefilling, to_allocate, decoding) == (3000 - 1024, 94 - 32, 2)


def test_the_live_hold_holds_behind_a_vllm_prompt_in_its_prefill(tmp_path: Path) -> None:
    """drover's dispatch (the hold at 2,048 tokens) on two vLLM instances, each prefilling a 4,000-token prompt
    of which one chunk is computed: the next prompt is held (None), as the simulator would hold it."""
    params = user_policy_params("drover").dispatch_params()
    assert params.predict_hold_prefill_tokens == 2048
    index = make_dispatch_policy("predictive", params)
    for iid in ("v-0", "v-1"):
        engine = _engine(tmp_path, 64, [("d", 200, 5), (f"p-{iid}", 4000, 0)], num_waiting=0, iid=iid)
        index.upsert(_snapshot(engine))
    assert index.choose(RequestDemand("new", 300, -(-300 // BS))) is None
    # once the prompts are prefilled (their blocks all held, first tokens streamed) the request goes through
    for iid in ("v-0", "v-1"):
        engine = _engine(tmp_path, 7 + 126, [("d", 200, 5), (f"p-{iid}", 4000, 1)], num_waiting=0, iid=iid)
        index.upsert(_snapshot(engine))
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


@pytest.mark.parametrize(
    ("used", "running", "cached", "held"),
    [
        (0, [(1503, False)], [46], [46]),  # usage from before its first step: its cached prefix is held
        (4, [(100, True), (1503, False)], [0, 46], [4, 46]),  # the same beside a decode
        (60, [(1503, False)], [46], [47]),  # scheduled: usage says more than the floor
        (0, [(200, False)], [46], [7]),  # a floor never exceeds the prompt's blocks
        (0, [(1503, True)], [46], [47]),  # decoding: all its blocks, floor or not
    ],
)
def test_a_cached_prefix_is_a_floor_of_a_prompts_held_blocks(
    used: int, running: list[tuple[int, bool]], cached: list[int], held: list[int]
) -> None:
    assert estimate_held_blocks(used, running, BS, cached) == held


def test_a_prompt_whose_prefix_is_cached_is_not_reported_as_queued_work(tmp_path: Path) -> None:
    """vLLM's stats lag the front end by a step: a just-admitted prompt whose 46-block prefix the engine
    caches must not count as 47 blocks still to prefill (prefix-aware dispatch would then send the next
    request with that prefix away from its cache)."""
    engine = _engine(tmp_path, 0, [("f", 1503, 0)], num_waiting=0, cached={"f": 46})
    prefilling, _, _ = running_totals(_snapshot(engine).running, BS)
    assert prefilling == 1503 - 46 * BS
    stale = _engine(tmp_path, 0, [("f", 1503, 0)], num_waiting=0)  # without the floor: the whole prompt
    assert running_totals(_snapshot(stale).running, BS)[0] == 1503
