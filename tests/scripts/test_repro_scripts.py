"""The Chiron, KunServe and Llumnix-README reproduction scripts run end to end at a tiny grid, a row per point.

Real simulator, no doubles; no timing asserts (only which rows exist and that the numbers are sane)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts import repro_chiron, repro_kunserve, repro_llumnix


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_repro_kunserve_tiny_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.jsonl"
    repro_kunserve.main(
        ["--seeds", "0,1", "--bursts", "4", "--budget-gib", "21.6", "--json", str(out), "--plot", str(tmp_path)]
    )
    rows = read_rows(out)
    assert [(r["burst"], r["seed"]) for r in rows] == [(4.0, 0), (4.0, 1)]
    for r in rows:
        assert r["budget_gib"] == pytest.approx(21.6, rel=1e-3)
        for name, _, _ in repro_kunserve.SYSTEMS:
            assert r[f"{name}_completed"] > 0
            assert r[f"{name}_ttft_p99_s"] > 0
        for baseline in repro_kunserve.BASELINES:
            assert math.isfinite(r[f"{baseline}_over_kunserve"])
    printed = capsys.readouterr().out
    assert printed.count("\n   4x ") == 2  # one table row per (burst, seed)
    assert "summary over 2 points" in printed
    assert (tmp_path / "repro_kunserve_ttft_p99.png").stat().st_size > 0


def test_repro_kunserve_rejects_a_budget_without_kv(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        repro_kunserve.main(["--budget-gib", "5"])
    assert exc.value.code == 2
    assert "no KV memory" in capsys.readouterr().err


def test_repro_chiron_tiny_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.jsonl"
    repro_chiron.main(
        [
            "--seeds",
            "0,1",
            "--rate",
            "1",
            "--batch",
            "40",
            "--pilot-requests",
            "20",
            "--json",
            str(out),
            "--plot",
            str(tmp_path),
        ]
    )
    rows = read_rows(out)
    expected = [
        (deadline, seed, policy)
        for deadline, _ in repro_chiron.DEADLINES
        for seed in (0, 1)
        for policy in repro_chiron.POLICIES
    ]
    assert [(r["deadline"], r["seed"], r["policy"]) for r in rows] == expected
    for r in rows:
        for key in ("interactive_slo", "batch_slo", "overall_slo"):
            assert 0.0 <= r[key] <= 1.0
        assert r["instance_seconds"] > 0
        assert r["peak_instances"] >= 1
    printed = capsys.readouterr().out
    assert "drover vs llumnix" in printed
    assert "summary: drover vs llumnix overall SLO" in printed
    for stem in ("repro_chiron_slo", "repro_chiron_cost"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0


def test_repro_llumnix_readme_tiny_grid_under_vllm_v0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.jsonl"
    repro_llumnix.main(["--readme", "--vllm-v0", "--requests", "60", "--rates", "54", "--json", str(out)])
    rows = read_rows(out)
    assert [r["policy"] for r in rows] == list(repro_llumnix.README_POLICIES)
    for r in rows:
        assert r["preset"] == "qwen2.5-7b-a10" and r["rate"] == 54.0
        assert r["completed"] + r["rejected"] + r["unfinished"] == r["submitted"] == 60
        assert r["completed"] > 0 and r["ttft_p99_s"] > 0
    printed = capsys.readouterr().out
    assert "(vLLM v0 scheduling)" in printed
    assert "vs round_robin: TTFT mean" in printed and "vs queue_size : TTFT mean" in printed
