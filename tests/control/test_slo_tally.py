"""SLO attainment and goodput per request class and client (control/apps/metrics_exporter.SloTally): pure."""

from __future__ import annotations

from control.apps.metrics_exporter import SloTally
from control.policy.autoscaling import SloParams
from transport.messages import EngineRequestEnded


def ended(reason: str = "stop", cls: str = "interactive", client: str = "a", **kw: float) -> EngineRequestEnded:
    return EngineRequestEnded(
        instance_id="i",
        request_id="r",
        finish_reason=reason,
        num_output_tokens=10,
        request_class=cls,
        client_id=client,
        ttft_s=kw.get("ttft", 0.1),
        itl_s=kw.get("itl", 0.01),
        e2e_s=kw.get("e2e", 1.0),
    )


def test_attainment_and_goodput_per_class_and_client_over_the_window() -> None:
    tally = SloTally(SloParams(ttft_s=1.0, itl_s=0.05, batch_deadline_s=60), window_s=10)
    tally.observe(ended(), now=0)
    tally.observe(ended(ttft=2.0), now=1)  # TTFT missed
    tally.observe(ended(itl=0.2, client="b"), now=2)  # inter-token missed
    tally.observe(ended(cls="batch", e2e=30), now=3)
    tally.observe(ended(cls="batch", e2e=90), now=4)  # deadline missed
    tally.observe(ended(reason="deadline_exceeded"), now=5)  # an error is a miss
    tally.observe(ended(reason="migrated"), now=5)  # counted where it ends
    tally.observe(ended(reason="abort"), now=5)  # the client cancelled: not counted
    rows = {(r.request_class, r.client): r for r in tally.rows(now=6)}
    assert (rows["interactive", "a"].requests, rows["interactive", "a"].met) == (3, 1)
    assert rows["interactive", "a"].goodput_tokens_per_s == 10 / 10
    assert rows["interactive", "b"].attainment == 0.0
    assert (rows["batch", "a"].requests, rows["batch", "a"].met) == (2, 1)
    later = {(r.request_class, r.client): r for r in tally.rows(now=12.5)}  # the first three left the window
    assert later["interactive", "a"].requests == 1 and ("interactive", "b") not in later


def test_a_resumed_request_is_not_held_to_an_unknown_ttft() -> None:
    tally = SloTally(SloParams(ttft_s=0.5, itl_s=0.05))
    assert tally.met(ended(ttft=0.0, itl=0.01))
    assert not tally.met(ended(ttft=0.0, itl=0.5))
