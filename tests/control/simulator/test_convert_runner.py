"""Trace conversion and the runner's workload and accounting rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from control.simulator.convert import convert
from control.simulator.presets import PRESETS, get_preset
from control.simulator.runner import ROW_KEYS, RunOptions, WorkloadSpec, build_workload, run_policy
from control.simulator.traces import AZURE_CONV, MOONCAKE_SYNTHETIC
from control.simulator.workload import RequestSpec, load_trace


def test_mooncake_jsonl_keeps_hashes(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 3500, "input_length": 600, "output_length": 9, "hash_ids": [0, 7]},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = io.StringIO()
    report = convert(src, out)
    assert report.format == "mooncake" and report.rows == 2 and report.has_hashes
    assert out.getvalue().splitlines() == [
        "timestamp,input_tokens,output_tokens,hash_ids",
        "0.000,1024,5,0 1",
        "2.500,600,9,0 7",
    ]


def test_azure_csv_exact_seven_decimals(tmp_path: Path) -> None:
    src = tmp_path / "azure.csv"
    src.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:00,10,1\n"
    )
    out = io.StringIO()
    convert(src, out)
    assert out.getvalue().splitlines()[1:] == ["0.0000000,374,44", "4.3145790,396,109", "13.3194100,10,1"]


def test_burstgpt_drops_failed_rows_and_filters_model(tmp_path: Path) -> None:
    src = tmp_path / "burst.csv"
    src.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "6,GPT-4,100,0,100,Conversation log\n"
        "7.25,ChatGPT,1087,0,1087,Conversation log\n"
        "9,GPT-4,50,20,70,API log\n"
    )
    out = io.StringIO()
    report = convert(src, out, model="ChatGPT")
    assert report.format == "burstgpt" and report.rows == 1 and report.dropped == 1
    out = io.StringIO()
    report = convert(src, out)
    assert report.rows == 2 and out.getvalue().splitlines()[1:] == ["0.000,472,18", "4.000,50,20"]


def test_unknown_format_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        convert(src, io.StringIO())


def test_shipped_traces_load_with_hashes_and_no_truncation() -> None:
    mooncake = load_trace(MOONCAKE_SYNTHETIC)
    assert len(mooncake) == 3993
    assert all(s.prefix_hashes and s.prefix_block_tokens == 512 for s in mooncake)
    assert max(s.prompt_len for s in mooncake) == 191_378  # the source's maximum: never cut
    assert len(load_trace(AZURE_CONV)) == 19_366


def test_prompts_over_the_context_are_rejected_and_counted() -> None:
    preset = get_preset("llama7b-a10")
    workload = [
        RequestSpec("ok", 0.0, 500, 20),
        RequestSpec("long", 0.1, preset.max_model_len + 5, 20),
        RequestSpec("fits-prompt", 0.2, preset.max_model_len - 10, 500),  # output capped at the context
    ]
    run = run_policy("least_loaded", workload, RunOptions(preset=preset, instances=2))
    assert set(ROW_KEYS) <= set(run.row)
    assert run.row["rejected"] == 1 and run.row["completed"] == 2
    by_id = {r["request_id"]: r for r in run.requests}
    assert by_id["long"]["status"] == "rejected"
    assert by_id["fits-prompt"]["output_tokens"] == 10
    assert run.row["slo_attainment"] <= 2 / 3


def test_hash_ids_reach_the_simulated_requests() -> None:
    workload = build_workload(WorkloadSpec(trace=MOONCAKE_SYNTHETIC, duration=5.0))
    preset = get_preset("llama3-8b-h200")
    from control.simulator.runner import ObservedCluster

    sim = ObservedCluster(preset.cluster_config(2), workload)
    sim.run()
    records = list(sim._records.values())
    assert all(r.sim is not None and r.sim.block_hashes == r.spec.prefix_hashes for r in records)
    assert all(r.sim is not None and r.sim.hash_block_tokens == 512 for r in records)


def test_seeded_trace_windows_differ_and_repeat() -> None:
    a = build_workload(WorkloadSpec(trace=AZURE_CONV, duration=60, seed=1))
    b = build_workload(WorkloadSpec(trace=AZURE_CONV, duration=60, seed=2))
    again = build_workload(WorkloadSpec(trace=AZURE_CONV, duration=60, seed=1))
    assert [s.prompt_len for s in a] == [s.prompt_len for s in again]
    assert [s.prompt_len for s in a] != [s.prompt_len for s in b]


def test_every_preset_holds_its_context() -> None:
    for preset in PRESETS.values():
        assert preset.kv_tokens >= preset.max_model_len, preset.name


@pytest.mark.parametrize(("autoscaler", "kunserve"), [("chiron", False), ("threshold", False), ("fixed", True)])
def test_autoscalers_and_kunserve_give_the_stable_row(autoscaler: str, kunserve: bool) -> None:
    workload = build_workload(WorkloadSpec(kind="gamma", rate=4, cv=2, lengths="zipf:256:2048", requests=200, seed=1))
    options = RunOptions(preset=get_preset("llama7b-a10"), instances=3, autoscaler=autoscaler, kunserve=kunserve)
    row = run_policy("llumnix", workload, options).row
    assert set(ROW_KEYS) <= set(row)
    assert row["submitted"] == 200 and row["completed"] + row["rejected"] + row["unfinished"] == 200
    assert row["kunserve"] is kunserve and row["autoscaler"] == autoscaler
    assert row["instance_seconds"] > 0 and 0 <= row["slo_attainment"] <= 1


def test_kunserve_with_an_autoscaler_is_refused() -> None:
    with pytest.raises(ValueError, match="--kunserve"):
        RunOptions(preset=get_preset("llama7b-a10"), instances=2, autoscaler="chiron", kunserve=True).validate()


def test_request_path_shifts_ttft_and_e2e_only() -> None:
    """A preset's request path (measured presets: NATS and actors outside the engine) is added to every TTFT
    and end-to-end time, counts against the TTFT SLO, and leaves the engine's dynamics and TPOT alone."""
    import dataclasses

    base = dataclasses.replace(get_preset("tiny-cpu"), request_path_ms=0.0)
    shifted = dataclasses.replace(base, request_path_ms=40.0)
    specs = build_workload(WorkloadSpec(kind="poisson", rate=4, lengths="uniform:16:128", requests=40, seed=3))
    a = run_policy("least_loaded", specs, RunOptions(preset=base, instances=2, slo_ttft_s=1.0))
    b = run_policy("least_loaded", specs, RunOptions(preset=shifted, instances=2, slo_ttft_s=1.0))
    assert a.row["completed"] == b.row["completed"] == 40
    for x, y in zip(a.requests, b.requests, strict=True):
        assert y["ttft_s"] == pytest.approx(x["ttft_s"] + 0.040)
        assert y["e2e_s"] == pytest.approx(x["e2e_s"] + 0.040)
        assert y["tpot_ms"] == pytest.approx(x["tpot_ms"])
    tight = max(r["ttft_s"] for r in a.requests) + 0.001  # every request meets it without the path
    met_a = run_policy("least_loaded", specs, RunOptions(preset=base, instances=2, slo_ttft_s=tight))
    met_b = run_policy("least_loaded", specs, RunOptions(preset=shifted, instances=2, slo_ttft_s=tight))
    assert met_a.row["slo_attainment"] == 1.0 > met_b.row["slo_attainment"]
