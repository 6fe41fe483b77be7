"""Prefill-interference placement (``predict_interference``, opt-in): of the few best instances with room, a
long prompt goes where fewer decodes would share its chunks' steps; a short one still goes where the work ahead
is least. Off (the default, and ``drover``), the choice is the work ahead alone."""

from __future__ import annotations

import pytest

from control.policy.dispatch import PredictiveIndex, make_dispatch_policy
from control.policy.params import DispatchParams, PolicyParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot

BS = 16


def snap(iid: str, *, running: int, waiting_blocks: int = 0) -> InstanceSnapshot:
    # running requests are decoding (all their tokens have blocks), so only the queue is prefill work ahead
    reqs = tuple(RunningSnapshot(f"{iid}-r{i}", num_tokens=64, num_blocks=4) for i in range(running))
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=1000,
        num_free_blocks=1000 - 4 * running,
        num_running=running,
        num_waiting=1 if waiting_blocks else 0,
        waiting_blocks=waiting_blocks,
        block_size=BS,
        running=reqs,
    )


def choose(weight: float, prompt_tokens: int) -> str | None:
    params = DispatchParams(predict_hold=True, predict_interference=weight)
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex)
    # a: 4 decodes, 20 blocks queued -> 320 + 16 x 4 = 384 tokens ahead; b: 20 decodes -> 16 x 20 = 320 ahead
    index.upsert(snap("a", running=4, waiting_blocks=20))
    index.upsert(snap("b", running=20))
    return index.choose(RequestDemand("r", num_prompt_tokens=prompt_tokens, num_blocks=-(-prompt_tokens // BS)))


def test_a_long_prompt_goes_where_fewer_decodes_share_its_steps() -> None:
    assert choose(0.0, 640) == "b"  # off: the least work ahead
    # on, 1/32: a = 384 + 640/32 x 4 = 464, b = 320 + 640/32 x 20 = 720
    assert choose(1 / 32, 640) == "a"


def test_a_short_prompt_still_goes_where_the_work_ahead_is_least() -> None:
    # 16 tokens: a = 384 + 0.5 x 4 = 386, b = 320 + 0.5 x 20 = 330
    assert choose(1 / 32, 16) == "b"


def test_off_by_default_and_in_drover_and_never_negative() -> None:
    assert DispatchParams().predict_interference == 0.0
    assert user_policy_params("drover").predict_interference == 0.0
    assert PolicyParams(predict_interference=0.25).dispatch_params().predict_interference == 0.25
    with pytest.raises(ValueError, match="predict_interference"):
        PolicyParams().with_updates(predict_interference="-1")  # as `drover policy set` sends it
