"""Decode stalls (``predict_decode_stall``, opt-in; ``drover``'s other rules on): when the soonest start is
beside decoding requests, a prompt's extra wait elsewhere is weighed against the stall its chunks put on those
decodes, token for token. A long prompt then joins an instance that is only prefilling; a short one still
starts beside the decodes (docs/policies.md, "Decode stalls: prompts beside decodes")."""

from __future__ import annotations

import dataclasses

import pytest

from control.policy.dispatch import PredictiveIndex, make_dispatch_policy
from control.policy.params import PolicyParams
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot

BS = 16


def snap(iid: str, running: tuple[RunningSnapshot, ...]) -> InstanceSnapshot:
    used = sum(r.num_blocks for r in running)
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=5000,
        num_free_blocks=5000 - used,
        num_running=len(running),
        num_waiting=0,
        waiting_blocks=0,
        block_size=BS,
        running=running,
    )


def choose(stall: float, prompt_tokens: int) -> str | None:
    params = dataclasses.replace(user_policy_params("drover").dispatch_params(), predict_decode_stall=stall)
    index = make_dispatch_policy("predictive", params)
    assert isinstance(index, PredictiveIndex)
    # "dec": one request decoding -> 16 tokens ahead (the decode weight); "pre": one 3,072-token prompt with
    # 2,048 tokens computed -> 1,024 + 16 tokens ahead, and nothing there decodes yet
    index.upsert(snap("dec", (RunningSnapshot("d", num_tokens=3080, num_blocks=193, decoding=True),)))
    index.upsert(snap("pre", (RunningSnapshot("p", num_tokens=3072, num_blocks=128, decoding=False),)))
    return index.choose(RequestDemand("r", num_prompt_tokens=prompt_tokens, num_blocks=-(-prompt_tokens // BS)))


def test_a_long_prompt_joins_the_prefilling_instance_rather_than_stall_a_decode() -> None:
    assert choose(0.0, 3072) == "dec"  # without the rule: the least work ahead
    # on: dec = 16 + 3,072 x 1 decode = 3,088 against pre = 1,040 (its wait), so the decode is spared
    assert choose(1.0, 3072) == "pre"


def test_a_short_prompt_still_starts_beside_the_decode() -> None:
    # 256 tokens: dec = 16 + 256 = 272 < pre = 1,040 (a short prefill stalls a decode less than it would wait)
    assert choose(1.0, 256) == "dec"


def test_off_by_default_and_in_drover_and_never_negative() -> None:
    assert PolicyParams().predict_decode_stall == 0.0
    assert user_policy_params("drover").predict_decode_stall == 0.0  # it cost Mooncake's attainment
    assert PolicyParams(predict_decode_stall=1.0).dispatch_params().predict_decode_stall == 1.0
    with pytest.raises(ValueError, match="predict_decode_stall"):
        PolicyParams().with_updates(predict_decode_stall="-1")  # as `drover policy set` sends it
