"""The per-seed tails ablation counts stretched decode gaps (the p99 ITL cliff) and tabulates every variant."""

from __future__ import annotations

import dataclasses
import io

from control.policy.recommended import user_policy_params
from control.simulator.runner import WorkloadSpec
from scripts.ablate_tails import ablation_table, point_result
from scripts.sweep_policies import QUICK


def test_a_prompt_beside_decodes_stretches_their_gaps_and_one_alone_does_not() -> None:
    params = user_policy_params("least_loaded")
    alone = WorkloadSpec(kind="poisson", rate=1.0, lengths="fixed:3072:32", requests=1, seed=0)
    one = point_result("qwen2.5-7b-a10", params, alone, 170.0, instances=1)
    assert one["stretched"] == 0.0  # every gap is a decode-only step
    # eight prompts at once on one instance: each later prompt's chunks share steps with the earlier decodes
    burst = dataclasses.replace(alone, rate=1000.0, requests=8)
    many = point_result("qwen2.5-7b-a10", params, burst, 170.0, instances=1)
    assert many["stretched"] > 1.0
    assert many["itl"] > 2 * one["itl"]  # past 1 % stretched, p99 ITL is a chunk step


def test_table_has_a_row_per_variant_and_a_cell_per_seed() -> None:
    grid = dataclasses.replace(QUICK, seeds=(0, 1), requests=40)
    out = io.StringIO()
    table = ablation_table(
        "llama7b-a10", "fixed:128:64", 0.5, grid.seeds, ["drover", "least_loaded placement"], grid=grid, out=out
    )
    assert list(table) == ["INFaaS++", "drover", "least_loaded placement"]
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 3
    for name, runs in table.items():
        assert len(runs) == 2, name
        for run in runs:
            assert run["ttft"] > 0 and run["itl"] > 0 and 0.0 <= run["stretched"] <= 100.0
