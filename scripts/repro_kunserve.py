"""KunServe's headline reproduced in the simulator: tail TTFT under a memory burst, KunServe's parameter drop
against a vLLM-style baseline, Llumnix-style migration and KV swapping to host memory.

    python -m scripts.repro_kunserve [--seeds 0,1] [--bursts 4,8,12] [--budget-gib G] [--json FILE] [--plot DIR]

Reuses scripts.bench_kunserve (its systems, base rate and burst shape) and control.simulator.memory (one
budget for weights and KV per instance; LLaMA-7B fp16 on A100-40GB by default). The grid is fixed before
any run: 4 instances; Poisson at 4 req/s for 30 s, a 20 s burst at 4x, 8x and 12x that rate, 60 s at
4 req/s; prompts uniform 256-2048 tokens, outputs Zipf mean 200 capped at 1000; seeds 0 and 1. Every system
replays the same arrivals per (burst, seed).

``--budget-gib`` is the ablation: the memory each instance has for weights + KV (default 0.9 x 40 GiB,
vLLM's gpu_memory_utilization of an A100-40GB). A smaller budget makes the weights a larger share of
memory, which is what a parameter drop frees.

The paper's numbers (SEEDS.md, KunServe EuroSys 2026, arXiv 2412.18169): up to 27.3x lower tail TTFT than
the baselines (v2 of the paper), up to 72.2x (v5), on BurstGPT and Azure conversation windows against vLLM,
Llumnix and InferCept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.simulator.hardware import DEFAULT_HARDWARE, GIB
from control.simulator.memory import MemSimConfig, MemSimResult, simulate
from control.simulator.memory_workloads import burst_workload
from control.simulator.workload import LengthSpec, RequestSpec
from scripts.bench_kunserve import BASE_RATE, BASELINES, SYSTEMS

BURSTS = (4.0, 8.0, 12.0)
SEEDS = (0, 1)
INSTANCES = 4
PAPER = {"tail TTFT vs baselines, v2 (max)": 27.3, "tail TTFT vs baselines, v5 (max)": 72.2}


def workload(burst: float, seed: int) -> list[RequestSpec]:
    """bench_kunserve's synthetic burst: 30 s quiet, 20 s at ``burst`` x, 60 s quiet."""
    schedule = [(30.0, BASE_RATE), (20.0, BASE_RATE * burst), (60.0, BASE_RATE)]
    return burst_workload(
        schedule, prompt=LengthSpec.uniform(256, 2048), output=LengthSpec.zipf(200, cap=1000), seed=seed
    )


def run_systems(specs: Sequence[RequestSpec], budget_bytes: int | None) -> dict[str, MemSimResult]:
    hardware = DEFAULT_HARDWARE
    if budget_bytes is not None:
        hardware = dataclasses.replace(hardware, budget_bytes=budget_bytes)
    return {
        name: simulate(
            MemSimConfig(mode=mode, num_instances=INSTANCES, kv_on_drop=kv, hardware=hardware),  # type: ignore[arg-type]
            list(specs),
        )
        for name, mode, kv in SYSTEMS
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def row(burst: float, seed: int, results: dict[str, MemSimResult], budget_gib: float) -> dict[str, Any]:
    kun = results["kunserve"]
    out: dict[str, Any] = {
        "burst": burst,
        "seed": seed,
        "budget_gib": budget_gib,
        "requests": kun.completed + kun.unfinished + kun.rejected,
        "vllm_peak_kv_use": results["vllm"].peak_memory_use,
        "kunserve_drops": kun.drops,
    }
    for name, r in results.items():
        out[f"{name}_ttft_p99_s"] = r.ttft_p(99)
        out[f"{name}_completed"] = r.completed
    for name in BASELINES:
        out[f"{name}_over_kunserve"] = _ratio(results[name].ttft_p(99), kun.ttft_p(99))
    return out


def _geomean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in finite) / len(finite)) if finite else math.nan


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    names = [name for name, _, _ in SYSTEMS]
    print(
        f"{'burst':>5} {'seed':>4} {'peak KV':>7} "
        + " ".join(f"{n:>18}" for n in names)
        + " "
        + " ".join(f"{b + '/kun':>12}" for b in BASELINES)
    )
    for r in rows:
        print(
            f"{r['burst']:>4g}x {r['seed']:>4} {r['vllm_peak_kv_use']:>7.0%} "
            + " ".join(f"{r[f'{n}_ttft_p99_s']:>18.2f}" for n in names)
            + " "
            + " ".join(f"{r[f'{b}_over_kunserve']:>11.2f}x" for b in BASELINES),
            flush=True,
        )


def summary(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for b in BASELINES:
        ratios = [r[f"{b}_over_kunserve"] for r in rows]
        finite = [x for x in ratios if math.isfinite(x)]
        parts.append(
            f"{b} {min(finite, default=math.nan):.2f}-{max(finite, default=math.nan):.2f}x "
            f"(geomean {_geomean(finite):.2f}x)"
        )
    return (
        f"summary over {len(rows)} points: baseline p99 TTFT / KunServe p99 TTFT: "
        + ", ".join(parts)
        + ". Paper: "
        + ", ".join(f"{k} {v}x" for k, v in PAPER.items())
    )


def plot(directory: Path, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> Path:
    """p99 TTFT against burst factor, one line per system (mean over seeds)."""
    from scripts.plotting import line_plot

    bursts = sorted({r["burst"] for r in rows})
    series = {}
    for name, _, _ in SYSTEMS:
        ys = [
            sum(r[f"{name}_ttft_p99_s"] for r in rows if r["burst"] == b) / sum(1 for r in rows if r["burst"] == b)
            for b in bursts
        ]
        series[name] = (bursts, ys)
    return line_plot(
        directory,
        "repro_kunserve_ttft_p99",
        series,
        xlabel="burst (x base rate of 4 req/s, 20 s)",
        ylabel="p99 TTFT (s)",
        title=(
            f"KunServe repro: p99 TTFT under a burst, {INSTANCES} x LLaMA-7B, {rows[0]['budget_gib']:.1f} GiB "
            f"for weights+KV (mean of seeds {list(seeds)})"
        ),
        log_y=True,
    )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--seeds", default=",".join(map(str, SEEDS)), help="Comma-separated seeds (default: %(default)s)."
    )
    parser.add_argument(
        "--bursts", default=",".join(f"{b:g}" for b in BURSTS), help="Burst factors (default: %(default)s)."
    )
    parser.add_argument(
        "--budget-gib", type=float, default=None, help="Ablation: weights+KV memory per instance, GiB (default 36)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Write every row here (JSON lines).")
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG plot into this directory.")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
        bursts = _floats(args.bursts)
    except ValueError:
        parser.error("--seeds and --bursts take comma-separated numbers")
    if not seeds or not bursts or (args.budget_gib is not None and args.budget_gib <= 0):
        parser.error("need at least one seed and one burst, and a positive --budget-gib")
    budget = None if args.budget_gib is None else int(args.budget_gib * GIB)
    hardware = DEFAULT_HARDWARE if budget is None else dataclasses.replace(DEFAULT_HARDWARE, budget_bytes=budget)
    if hardware.instance_blocks <= 0:
        parser.error("--budget-gib leaves no KV memory beside the weights")
    budget_gib = hardware.budget_bytes / GIB
    print(
        f"p99 TTFT (s) under a burst, {INSTANCES} instances, {hardware.name} with {budget_gib:.1f} GiB for weights+KV "
        f"({hardware.instance_blocks * hardware.block_size} tokens of KV each)"
    )
    rows = []
    for burst in bursts:
        for seed in seeds:
            rows.append(row(burst, seed, run_systems(workload(burst, seed), budget), budget_gib))
    print_table(rows)
    print(summary(rows))
    if args.json is not None:
        with open(args.json, "w") as handle:
            for r in rows:
                handle.write(json.dumps(r) + "\n")
    if args.plot is not None:
        plot(args.plot, rows, seeds)


if __name__ == "__main__":
    main()
