"""Smoke and semantics tests of the policy benchmarks' own logic (the numbers are the benchmarks' job)."""

from __future__ import annotations

import dataclasses
import gc
import math
import random

import pytest

from control import gc_tuning
from control.policy.recommended import user_policy_params as named_policy
from control.simulator import simulate
from scripts.bench_policy_scale import bench_dispatch, bench_planning, fresh_copy, random_snapshot
from scripts.bench_scheduling import attainment, goodput, goodput_settings, mean_ci, slo_for


def test_scale_benchmark_reports_every_operation() -> None:
    for name in ("round_robin", "predictive", "prefix_affinity"):
        row = bench_dispatch(16, name, 50, 0)
        assert {"decide_p99_us", "heartbeat_p99_us", "total_p99_us"} <= set(row)
        assert ("drain_flip_p99_us" in row) == (name == "round_robin")
    plan = bench_planning(16, 5, 0, named_policy("drover"))
    assert plan["round_p99_us"] > 0 and plan["changed_per_round"] == 1


def test_scale_benchmark_replays_and_noise_floor() -> None:
    # replays time the same decisions on identical indexes (it raises if a replay chose differently)
    row = bench_dispatch(16, "drover", 40, 0, "cpu", replays=2, warmup=10, fresh=True)
    assert len(row["reps"]) == 2 and row["total_min_p99_us"] <= row["total_p99_us"]
    for label in ("total_uninterrupted", "control", "control_memory", "timer"):
        assert row[f"{label}_p50_us"] > 0
    assert 0 <= row["interrupted"] <= 40 and 0 <= row["gc_collections_timed"] <= row["gc_collections"]
    # each replay's slowest 1 % (at least its slowest decision), each one put down to one cause
    assert set(row["slowest_1pct"]) == {"gc", "switched_out", "own", "noise"}
    assert 2 <= sum(row["slowest_1pct"].values()) <= 2 * 40
    with pytest.raises(ValueError):
        bench_dispatch(16, "drover", 10, 0, gc_mode="frozen")


def test_scale_benchmark_times_the_collector_as_the_product_sets_it() -> None:
    # default: control/gc_tuning.py's setting, as the control plane and the simulator run; "on": Python's defaults
    before = gc.get_threshold()
    row = bench_dispatch(16, "drover", 20, 0, warmup=5)
    assert f"thresholds {gc_tuning.YOUNG_THRESHOLD}/" in row["gc"] and "objects frozen" in row["gc"]
    assert 0 <= row["gc_decisions"] <= 20 and row["total_cpu_p99_us"] > 0 and row["total_p999_us"] > 0
    assert gc.get_threshold() == before  # given back after the run
    row = bench_dispatch(16, "drover", 20, 0, warmup=5, gc_mode="on")
    assert f"thresholds {before[0]}/" in row["gc"]


def test_fresh_copy_is_an_equal_new_snapshot() -> None:
    snapshot = random_snapshot(random.Random(3), "i1", "llama")
    copy = fresh_copy(snapshot)
    assert copy == snapshot and copy is not snapshot
    assert all(a is not b for a, b in zip(copy.running, snapshot.running, strict=True))


def test_attainment_counts_unfinished_and_rejected_as_misses() -> None:
    setting = dataclasses.replace(goodput_settings()[0], duration_s=5.0)
    slo = slo_for(setting)
    result = simulate(setting.config(named_policy("least_loaded")), setting.workload(4.0, 0))
    assert 0.0 <= attainment(result, *slo) <= 1.0
    assert attainment(result, 0.0, 0.0) == 0.0  # nothing meets an impossible SLO
    for record in result.requests:
        record.rejected = True
    assert attainment(result, math.inf, math.inf) == 0.0


def test_goodput_is_the_highest_passing_rate_within_five_percent() -> None:
    setting = dataclasses.replace(goodput_settings()[0], duration_s=10.0)
    slo = slo_for(setting)
    found = goodput(setting, named_policy("llumnix"), 0, slo)
    rate = found["goodput"]
    assert rate > 0
    assert attainment(simulate(setting.config(named_policy("llumnix")), setting.workload(rate, 0)), *slo) >= 0.99


def test_mean_ci_and_named_policies() -> None:
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(ci, 4.30 * 1.0 / math.sqrt(3))
    assert named_policy("infaas++") == named_policy("least_loaded")
    assert named_policy("drover").dispatch_policy == "predictive"


def test_live_gc_benchmark_counts_collections_under_the_product_setting() -> None:
    from scripts.bench_gc_live import run

    before = gc.get_threshold()
    setting, elapsed, log = run(20, 4, "service")
    assert f"thresholds {gc_tuning.YOUNG_THRESHOLD}/" in setting and elapsed > 0
    assert all(count >= 1 and longest <= total for count, total, longest in log.rows.values())
    assert gc.get_threshold() == before  # the control plane gave the setting back when it stopped
