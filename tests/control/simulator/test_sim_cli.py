"""`drover sim` through the real CLI (subprocess): JSON-only stdout, one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from control.simulator.runner import ROW_KEYS
from control.simulator.traces import REPO_ROOT

SMALL = ["--workload", "poisson", "--rate", "2", "--lengths", "zipf:64:512", "--requests", "60", "--instances", "2"]


def drover(*args: str, cwd: Path | None = None, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "control.cli", "sim", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO_ROOT,
        timeout=300,
    )


def test_run_json_prints_only_json_lines_one_per_policy() -> None:
    got = drover("run", *SMALL, "--policy", "round_robin,infaas++,llumnix,queue_size,drover", "--json")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["policy"] for r in rows] == ["round_robin", "least_loaded", "llumnix", "queue_size", "drover"]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["submitted"] == 60
        assert row["completed"] + row["rejected"] + row["unfinished"] == 60
        assert row["preset"] == "llama7b-a10" and row["instances"] == 2
    assert "running" in got.stderr  # progress goes to stderr


def test_run_table_fits_and_out_csv(tmp_path: Path) -> None:
    out = tmp_path / "requests.csv"
    got = drover("run", *SMALL, "--policy", "least_loaded", "--out", str(out))
    assert got.returncode == 0, got.stderr
    assert "TTFT p50 / p99 s" in got.stdout
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60
    assert {"request_id", "status", "ttft_s", "preemptions", "recomputed_tokens", "migrations"} <= set(rows[0])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", *SMALL, "--policy", "fastest"], "unknown policy"),
        (["run", *SMALL], "--policy is required"),
        (
            ["run", "--workload", "poisson", "--rate", "2", "--lengths", "zipf:64:512", "--policy", "drover"],
            "--instances",
        ),
        (["run", *SMALL[:-2], "--lengths", "zipf:64", "--instances", "2", "--policy", "drover"], "--lengths"),
        (["run", "--trace", "no/such.csv", "--instances", "2", "--policy", "drover"], "not found"),
        (["run", *SMALL, "--policy", "drover", "--preset", "llama7b-tpu"], "is not one of"),
        (["run", *SMALL, "--policy", "drover", "--max-model-len", "100000"], "KV capacity"),
        (["run", *SMALL, "--policy", "drover", "--autoscaler", "magic"], "--autoscaler"),
        (["convert", "no/such.jsonl"], "not found"),
        (["plan", "--trace", "azure2023_conv", "--slo-ttft-s", "2"], "--slo-tpot-ms"),
        (["plan", *SMALL[:-2], "--slo-ttft-s", "2", "--slo-tpot-ms", "50", "--preset", "a10"], "unknown preset"),
        # values the parser itself refuses (choices, ranges, types): the same one line, never a box
        (["run", *SMALL[:-1], "0", "--policy", "drover"], "--instances"),
        (["run", *SMALL[:-1], "two", "--policy", "drover"], "--instances"),
        (["run", *SMALL, "--policy", "drover", "--workload", "burst"], "'poisson', 'gamma'"),
        (["run", *SMALL, "--policy", "drover", "--requests", "-3"], "--requests"),
        (["run", *SMALL, "--policy", "drover", "--no-such-flag"], "--no-such-flag"),
        (["plan", *SMALL[:-2], "--slo-ttft-s", "2", "--slo-tpot-ms", "50", "--target", "1.5"], "--target"),
    ],
)
def test_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    got = drover(*args)
    assert got.returncode == 2, (got.stdout, got.stderr)
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, got.stderr
    assert lines[0].startswith("drover: error: "), lines[0]  # control/apps/cli_common.py's prefix
    assert needle in lines[0]
    assert "Traceback" not in got.stderr and "╭" not in got.stderr  # no rich box


def test_cli_preset_choices_match_the_presets() -> None:
    """`--preset`'s choices are spelled out in cli_sim (so `drover --help` need not import the simulator)."""
    from control.apps.cli_sim import PRESET_NAMES
    from control.simulator.presets import DEFAULT_PRESET, PRESETS

    assert set(PRESET_NAMES) == set(PRESETS)
    assert DEFAULT_PRESET in PRESET_NAMES


def test_kv_aware_is_accepted_or_refused_in_one_line() -> None:
    from control.policy.dispatch import POLICY_NAMES

    got = drover("run", *SMALL, "--policy", "kv_aware", "--json")
    if "kv_aware" in POLICY_NAMES:
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout.splitlines()[0])["policy"] == "kv_aware"
    else:
        assert got.returncode == 2
        assert len(got.stderr.strip().splitlines()) == 1 and "kv_aware" in got.stderr


def test_trace_found_from_another_directory(tmp_path: Path) -> None:
    """Short trace names resolve in the repository's traces/, whatever the working directory."""
    got = drover(
        "run", "--trace", "mooncake_synthetic", "--duration", "20", "--preset", "llama3-8b-h200",
        "--instances", "2", "--policy", "prefix_affinity", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    row = json.loads(got.stdout)
    assert row["submitted"] > 20 and row["completed"] + row["rejected"] == row["submitted"]


def test_presets_json_names_and_capacity() -> None:
    got = drover("presets", "--json")
    assert got.returncode == 0, got.stderr
    rows = {r["name"]: r for r in map(json.loads, got.stdout.splitlines())}
    for name in ("llama7b-a10", "llama30b-4xa10", "qwen2.5-7b-a10", "llama2-13b-a800", "llama7b-a100",
                 "llama3-8b-h200", "tiny-cpu"):  # fmt: skip
        assert name in rows
    for name, row in rows.items():
        assert name == name.lower() and " " not in name and row["gpu"].split("-")[0] in name
        assert row["kv_tokens"] >= row["max_model_len"]  # vLLM refuses to start otherwise
    assert rows["llama7b-a10"]["default"]


def test_plan_finds_the_fewest_instances() -> None:
    got = drover(
        "plan", "--workload", "poisson", "--rate", "3", "--lengths", "fixed:256:64", "--requests", "120",
        "--slo-ttft-s", "1", "--slo-tpot-ms", "100", "--preset", "llama7b-a10", "--policy", "least_loaded",
        "--json",
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    row = json.loads(got.stdout)
    n = row["instances"]
    assert n is not None and row["slo_attainment"] >= 0.99
    assert row["tried"][str(n)] >= 0.99
    if n > 1:  # the next count down was run and missed
        assert row["tried"][str(n - 1)] < 0.99


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_shows_defaults_and_choices(command: str) -> None:
    got = drover(command, "--help", columns=200)  # wide: choices are not folded mid-word
    assert got.returncode == 0, got.stderr
    text = " ".join(got.stdout.split())
    needles = ["(default: 2)", "<poisson|gamma>", "llama7b-a10", "tiny-cpu", "infaas++", "[default: 0]"]
    needles += ["<fixed|chiron|threshold>", "[default: llama7b-a10]"] if command == "run" else ["[default: 0.99]"]
    for needle in needles:
        assert needle in text, needle
