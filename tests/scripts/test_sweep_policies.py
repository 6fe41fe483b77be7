"""The robustness sweep's --quick grid runs through the real CLI and its tables have every point and ratio."""

from __future__ import annotations

import dataclasses
import io
import math

from scripts.sweep_policies import (
    QUICK,
    TRACE_LOADS,
    TraceSetting,
    ablate,
    print_tables,
    summarise,
    sweep,
    sweep_traces,
    worst_points,
)


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


def test_worst_points_rank_by_the_metric_asked() -> None:
    rows = [
        {"name": "a", "ratio:ttft_p99_s": 3.0, "ratio:tpot_p99_ms": 1.0, "ratio:itl_p99_ms": 1.0},
        {"name": "b", "ratio:ttft_p99_s": 0.5, "ratio:tpot_p99_ms": 1.2, "ratio:itl_p99_ms": 1.0},
        {"name": "c", "ratio:ttft_p99_s": 1.5, "ratio:tpot_p99_ms": 1.1, "ratio:itl_p99_ms": 1.005},
    ]
    assert [r["name"] for r in worst_points(rows, "ttft", 5)] == ["a", "c"]
    assert [r["name"] for r in worst_points(rows, "tpot", 1)] == ["b"]
    assert worst_points(rows, "itl", 5) == []  # 1.005 is inside the 1 % margin


def test_ablation_reports_preemptions_and_the_clean_tail() -> None:
    # a KV-bound point (8 instances' worth of long requests on one a10 instance) so that some preempt
    grid = dataclasses.replace(QUICK, seeds=(0,), instances=1, requests=12, lengths=("fixed:3000:1500",))
    result = {
        "grid": dataclasses.asdict(grid),
        "calibration": {"llama7b-a10 fixed:3000:1500": {"slo_ttft_s": 5.0, "slo_tpot_ms": 200.0}},
    }
    row = {"preset": "llama7b-a10", "workload": "poisson", "lengths": "fixed:3000:1500", "load": 1.0, "rate": 5.0}
    out = io.StringIO()
    ablate(result, row, out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("| ")]
    assert "preemptions mean" in lines[0] and "never preempted" in lines[0]
    by_name = {line.split("|")[1].strip(): line.split("|") for line in lines[1:]}
    assert {"least_loaded", "drover", "hold reserve 16"} <= set(by_name)
    assert float(by_name["least_loaded"][6]) > 0  # four 4,500-token requests cannot share 791 blocks of 16


def test_trace_points_run_through_the_cli_and_the_ablation_rebuilds_them() -> None:
    # three short windows of the Azure trace on llama7b-a10 (16 instances), one seed
    ts = TraceSetting("a10 azure", (0.47, 0.93, 1.86), 8.0)
    result = sweep_traces([ts], seeds=(1,), jobs=1, log=io.StringIO())
    points = result["points"]
    assert [(p["load"], p["rate"]) for p in points] == list(zip(TRACE_LOADS, ts.rates, strict=True))
    for p in points:
        assert (p["preset"], p["workload"], p["lengths"]) == ("llama7b-a10", "trace", "azure2023_conv")
        for policy in ("least_loaded", "drover"):
            assert p[f"{policy}:ttft_p99_s"] > 0 and p[f"{policy}:itl_p99_ms"] > 0
            assert 0.0 <= p[f"{policy}:slo_attainment"] <= 1.0
    result["grid"] = {"seeds": [1]}
    (row,) = [r for r in summarise(result) if r["load"] == 1.0]
    out = io.StringIO()
    ablate(result, row, out)
    lines = [line.split("|") for line in out.getvalue().splitlines() if line.startswith("| ")]
    assert "p99 ITL ms mean" in lines[0][5]
    by_name = {cells[1].strip(): cells for cells in lines[1:]}
    assert {"least_loaded", "drover", "no step budget"} <= set(by_name)
    # the in-process rerun is the CLI's run: the same p99 TTFT, TPOT and ITL for both policies
    (cli,) = [p for p in points if p["load"] == 1.0]
    for name in ("least_loaded", "drover"):
        cells = by_name[name]
        assert float(cells[2]) == float(_g(cli[f"{name}:ttft_p99_s"]))
        assert float(cells[4]) == float(_g(cli[f"{name}:tpot_p99_ms"]))
        assert float(cells[5]) == float(_g(cli[f"{name}:itl_p99_ms"]))


def _g(v: float) -> str:
    return f"{v:.3g}"
