"""The local autoscaler's admission (EngineActor side): the batch limit binds, interactive requests are
admitted first, migrated-in and resumed requests are never held, and the window decision is the policy's."""

from __future__ import annotations

import time

from actors.local_autoscaler import LocalAutoscaler, engine_local_params
from control.policy.autoscaling import AutoscaleParams, LocalParams
from transport.messages import EngineAdd, InstanceLoad, RequestClass, SamplingParams

PARAMS = AutoscaleParams(local=LocalParams(min_batch=1, initial_batch=2, max_batch=4, period_s=0.01))


def add(rid: str, request_class: RequestClass = RequestClass.INTERACTIVE, **extra: object) -> EngineAdd:
    return EngineAdd(
        request_id=rid,
        prompt_token_ids=[1] * 40,
        sampling=SamplingParams(),
        reply_to="inbox",
        request_class=request_class,
        **extra,  # type: ignore[arg-type]
    )


def test_limits_are_clamped_to_the_engine_max_num_seqs() -> None:
    local = engine_local_params(AutoscaleParams(), 8).local
    assert (local.min_batch, local.initial_batch, local.max_batch) == (4, 8, 8)


def test_requests_beyond_the_limit_are_held_and_interactive_ones_admitted_first() -> None:
    local = LocalAutoscaler("mixed", PARAMS, engine_max_seqs=16)
    assert local.offer(add("a"), {}) and local.offer(add("b"), {})
    assert not local.offer(add("batch-1", RequestClass.BATCH), {})
    assert not local.offer(add("c"), {})
    assert local.is_held("c") and local.take_admittable() == []
    loaded = local.adjust_load(InstanceLoad(num_total_blocks=10, num_free_blocks=10, num_running=2, num_waiting=0), 32)
    assert loaded.num_waiting == 2 and loaded.waiting_blocks == 4 and loaded.batch_limit == 2
    local.ended("a")
    assert [a.request_id for a, _ in local.take_admittable()] == ["c"]  # interactive before the older batch one
    local.ended("b")
    assert [a.request_id for a, _ in local.take_admittable()] == ["batch-1"]
    report = local.report()
    assert (report.held, report.num_interactive, report.num_batch) == (0, 1, 1)


def test_migrated_in_and_resumed_requests_bypass_the_limit() -> None:
    local = LocalAutoscaler("interactive", PARAMS, engine_max_seqs=16)
    assert local.offer(add("a"), {}) and local.offer(add("b"), {})
    assert local.offer(add("moved", kv_transfer={"handle": 1}), {})
    assert local.offer(add("resumed", output_token_ids=[5, 6]), {})


def test_a_held_request_can_be_removed() -> None:
    local = LocalAutoscaler("mixed", PARAMS, engine_max_seqs=16)
    local.offer(add("a"), {})
    local.offer(add("b"), {})
    local.offer(add("c"), {})
    held = local.remove_held("c")
    assert held is not None and held.request_id == "c" and not local.is_held("c")
    assert local.remove_held("c") is None


def test_the_window_decision_grows_the_limit_while_itl_has_slack_and_wakes_the_actor() -> None:
    local = LocalAutoscaler("interactive", PARAMS, engine_max_seqs=16)
    woken: list[bool] = []
    local.wake = lambda: woken.append(True)
    for rid in "abcd":
        local.offer(add(rid), {})
    local.observe_tokens(10, 0.01)  # 10 ms ITL: far under the 100 ms SLO
    time.sleep(0.02)
    decision = local.tick(InstanceLoad(num_total_blocks=100, num_free_blocks=90, num_running=2, num_waiting=0))
    assert decision is not None and decision.batch_limit == 4 and decision.reason.startswith("grow")
    assert woken == [True]
    assert len(local.take_admittable()) == 2
    assert local.report().batch_limit == 4


def test_the_limit_shrinks_when_itl_breaks_the_slo() -> None:
    local = LocalAutoscaler("interactive", PARAMS, engine_max_seqs=16)
    for rid in "ab":
        local.offer(add(rid), {})
    local.observe_tokens(10, 0.5)  # 500 ms ITL
    time.sleep(0.02)
    decision = local.tick(InstanceLoad(num_total_blocks=100, num_free_blocks=90, num_running=2, num_waiting=0))
    assert decision is not None and decision.batch_limit == 1 and decision.backpressure >= 1.0
    assert not local.offer(add("c"), {})


def test_a_relabel_changes_the_role_and_an_unknown_role_is_refused() -> None:
    local = LocalAutoscaler("mixed", PARAMS, engine_max_seqs=16)
    assert local.set_role("batch") and local.role == "batch"
    assert not local.set_role("gpu") and local.role == "batch"
