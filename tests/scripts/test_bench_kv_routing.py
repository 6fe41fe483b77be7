"""bench_kv_routing's seeds and dispatch micro-benchmark (the full grid is a script run, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control.simulator.prefix import load_prefix_trace
from scripts.bench_kv_routing import MOONCAKE_TRACE, dispatch_cost, main, reseeded


def test_reseeded_keeps_order_prompts_and_rate() -> None:
    trace = load_prefix_trace(MOONCAKE_TRACE, limit=400)
    assert reseeded(trace, 0) is trace
    one, again, two = reseeded(trace, 1), reseeded(trace, 1), reseeded(trace, 2)
    assert [r.arrival for r in one.requests] == [r.arrival for r in again.requests]  # a seed is reproducible
    assert [r.arrival for r in one.requests] != [r.arrival for r in two.requests]
    assert [r.request_id for r in one.requests] == [r.request_id for r in trace.requests]
    assert all(a.arrival <= b.arrival for a, b in zip(one.requests, one.requests[1:], strict=False))
    span = trace.requests[-1].arrival - trace.requests[0].arrival
    assert 0.7 * span < one.requests[-1].arrival - one.requests[0].arrival < 1.3 * span  # about the same rate


def test_dispatch_cost_reports_percentiles() -> None:
    cost = dispatch_cost(16, 200)
    assert cost["instances"] == 16 and cost["index_entries"] > 16 * 100
    assert 0 < cost["choose_p50_us"] <= cost["choose_p99_us"]
    assert 0 < cost["choose_cpu_p50_us"] <= cost["choose_cpu_p99_us"]


def test_main_reports_every_seed_and_the_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    main(
        [
            "--limit", "30", "--sizes", "4", "--policies", "round_robin,kv_aware", "--seeds", "0,1",
            "--no-goodput", "--dispatch-sizes", "16", "--decisions", "50", "--json", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert sorted((r["policy"], r["seed"]) for r in report["grid"]) == [
        ("kv_aware", 0),
        ("kv_aware", 1),
        ("round_robin", 0),
        ("round_robin", 1),
    ]
    spread = {r["policy"]: r for r in report["spread"]}
    assert spread["kv_aware"]["seeds"] == [0, 1]
    hit = spread["kv_aware"]["hit_rate"]
    assert hit["min"] <= hit["mean"] <= hit["max"]
    assert hit["ci95"] >= 0 and "tokens_saved" in spread["kv_aware"]
    assert [c["instances"] for c in report["dispatch_cost"]] == [16]
    assert "over seeds 0,1" in capsys.readouterr().out


def test_ci95_is_the_student_t_half_width() -> None:
    from scripts.bench_kv_routing import ci95

    assert ci95([1.0]) == 0.0
    assert abs(ci95([1.0, 2.0, 3.0]) - 4.303 * 1.0 / 3**0.5) < 1e-9
