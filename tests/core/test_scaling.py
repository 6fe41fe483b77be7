"""The control core's autoscaler timing, which the AutoscalerActor and the elastic simulator both run."""

from __future__ import annotations

from control.core.scaling import ScalingClock


def test_plans_once_per_period_the_first_one_period_after_the_start() -> None:
    clock = ScalingClock(period_s=10.0, started_at=100.0)
    assert clock.next_plan_at == 110.0
    assert not clock.plan_due(100.0) and not clock.plan_due(109.9)  # nothing measured yet at the start
    assert clock.plan_due(110.0) and not clock.plan_due(115.0)
    assert clock.next_plan_at == 120.0 and clock.plan_due(120.0)
    assert clock.poll_s == 1.0 and ScalingClock(0.5, started_at=0.0).poll_s == 0.5


def test_a_draining_instance_stops_when_empty_or_after_the_timeout() -> None:
    clock = ScalingClock(period_s=10.0, drain_timeout_s=60.0, started_at=0.0)
    assert clock.start_drain("a", 0.0, "plan") and not clock.start_drain("a", 1.0, "plan")
    assert clock.stop_reason("a", empty=False, now=30.0) is None
    assert clock.stop_reason("a", empty=True, now=31.0) == "drained" and "a" not in clock.draining
    clock.start_drain("b", 0.0, "plan")
    assert clock.stop_reason("b", empty=False, now=61.0) == "still busy after 60 s of draining"
    assert clock.stop_reason("unknown", empty=True, now=61.0) is None
