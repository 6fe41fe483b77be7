"""The robustness sweep's --quick grid runs through the real CLI and its tables have every point and ratio."""

from __future__ import annotations

import io
import math

from scripts.sweep_policies import QUICK, print_tables, summarise, sweep


def test_quick_sweep_tabulates_every_point_with_ratios() -> None:
    result = sweep(QUICK, jobs=1, log=io.StringIO())
    points = result["points"]
    assert len(points) == len(QUICK.seeds)  # one preset, workload, lengths and load
    assert {p["seed"] for p in points} == set(QUICK.seeds)
    cal = result["calibration"][f"{QUICK.presets[0]} {QUICK.lengths[0]}"]
    assert cal["capacity_rps"] > 0 and cal["slo_ttft_s"] > 0 and cal["slo_tpot_ms"] > 0
    for p in points:
        for policy in ("least_loaded", "drover"):
            assert p[f"{policy}:ttft_p99_s"] > 0
            assert 0.0 <= p[f"{policy}:slo_attainment"] <= 1.0
    (row,) = summarise(result)
    for metric in ("ttft_p99_s", "itl_p99_ms", "tpot_p99_ms"):
        assert math.isfinite(row[f"ratio:{metric}"])
    out = io.StringIO()
    print_tables(result, out)
    text = out.getvalue()
    assert text.count(f"| {QUICK.presets[0]} |") == len(points) + 1  # per-seed rows and the summary row
    assert "points flagged" in text


def test_flags_follow_the_targets() -> None:
    def pt(seed: int, ttft: float, itl: float) -> dict[str, object]:
        row: dict[str, object] = {"preset": "p", "workload": "poisson", "lengths": "l", "load": 1.0, "rate": 1.0}
        row["seed"] = seed
        for policy, scale in (("least_loaded", 1.0), ("drover", 2.0)):
            row[f"{policy}:ttft_p99_s"] = ttft * scale
            row[f"{policy}:itl_p99_ms"] = itl
            row[f"{policy}:tpot_p99_ms"] = itl
            row[f"{policy}:slo_attainment"] = 1.0
        return row

    (row,) = summarise({"points": [pt(0, 1.0, 30.0), pt(1, 1.1, 30.0)]})
    assert row["flags"] == ["TTFT"]  # twice as slow, far past the seed spread; ITL and TPOT equal
