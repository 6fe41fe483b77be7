"""Llumnix's headline figure reproduced in the simulator: p99 TTFT (prefill latency) against request rate for
round-robin, INFaaS++ (``least_loaded``) and Llumnix (freeness dispatch + migration), on the paper's setting.

    python -m scripts.repro_llumnix [--requests N] [--seed K] [--json FILE]

Setting: 16 instances of the ``llama7b-a10`` preset (LLaMA-7B on A10-24GB, 12,656 tokens of KV each),
generated Zipf lengths (mean 256, cap 6,144; prompt and output each, as the paper), Poisson and Gamma (CV 4)
arrivals, and the Azure 2023 conversation trace (the first 600 s, time-compressed). The grid was fixed
before any run: rates 2-12 req/s around the onset the issue reports (~8 req/s on this preset), and Azure
compressions 1, 1.5, 2. Every policy sees the same requests (same seed).

The paper's numbers (Llumnix, OSDI 2024, as summarised in SEEDS.md): p99 prefill up to 34.4x better than
round-robin, and 5.5x (real traces) / 14.8x (generated) better than INFaaS++.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from control.simulator.presets import get_preset
from control.simulator.runner import RunOptions, WorkloadSpec, build_workload, run_policy
from control.simulator.traces import AZURE_CONV

POLICIES = ("round_robin", "least_loaded", "llumnix")
RATES = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
AZURE_COMPRESSIONS = (1.0, 1.5, 2.0)
PAPER = {"vs round_robin (max)": 34.4, "vs INFaaS++ generated (max)": 14.8, "vs INFaaS++ real traces (max)": 5.5}


def _ratio(a: Any, b: Any) -> float:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="Requests per generated point.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Write every row here (JSON lines).")
    parser.add_argument("--preset", default="llama7b-a10", help="Ablation: another preset (KV capacity).")
    parser.add_argument(
        "--vllm-v0",
        action="store_true",
        help="Ablation: Llumnix's engine, vLLM v0 (whole-prompt prefill, 1%% watermark) instead of v1's scheduler.",
    )
    parser.add_argument("--no-azure", action="store_true", help="Generated workloads only.")
    args = parser.parse_args()
    preset = get_preset(args.preset)
    if args.vllm_v0:
        # vLLM v0 without chunked prefill needs max_num_batched_tokens >= max_model_len (its default)
        preset = dataclasses.replace(
            preset, chunked_prefill=False, watermark_fraction=0.01, max_num_batched_tokens=preset.max_model_len
        )
    options = RunOptions(preset=preset, instances=16, seed=args.seed)
    points: list[tuple[str, WorkloadSpec]] = []
    for kind, cv in (("poisson", None), ("gamma", 4.0)):
        for rate in RATES:
            spec = WorkloadSpec(
                kind=kind, rate=rate, cv=cv, lengths="zipf:256:6144", requests=args.requests, seed=args.seed
            )
            points.append((f"{kind}{'' if cv is None else f' cv{cv:g}'} {rate:g}/s", spec))
    for compression in () if args.no_azure else AZURE_COMPRESSIONS:
        points.append(
            (f"azure x{compression:g}", WorkloadSpec(trace=AZURE_CONV, duration=600, compression=compression))
        )
    rows: list[dict[str, Any]] = []
    header = (
        f"{'workload':<20} " + " ".join(f"{p:>13}" for p in POLICIES) + f" {'RR/Llumnix':>11} {'INFaaS/Llumnix':>15}"
    )
    print(f"p99 TTFT (s), 16 x {preset.name}" + (" with vLLM v0 scheduling" if args.vllm_v0 else ""))
    print(header)
    ratios_rr, ratios_inf = [], []
    for label, spec in points:
        workload = build_workload(spec)
        p99: dict[str, Any] = {}
        for policy in POLICIES:
            run = run_policy(policy, workload, options)
            run.row["workload"] = label
            rows.append(run.row)
            p99[policy] = run.row["ttft_p99_s"]
        rr = _ratio(p99["round_robin"], p99["llumnix"])
        inf = _ratio(p99["least_loaded"], p99["llumnix"])
        ratios_rr.append(rr)
        ratios_inf.append(inf)
        cells = " ".join(f"{p99[p]:>13.3f}" if p99[p] is not None else f"{'-':>13}" for p in POLICIES)
        print(f"{label:<20} {cells} {rr:>11.2f} {inf:>15.2f}", flush=True)
    finite_inf = [r for r in ratios_inf if math.isfinite(r) and r > 0]
    geo = math.exp(sum(math.log(r) for r in finite_inf) / len(finite_inf)) if finite_inf else math.nan
    print(
        f"\nsummary: Llumnix vs INFaaS++ p99 TTFT ratio max {max(finite_inf, default=math.nan):.2f}x, geomean "
        f"{geo:.2f}x; vs round-robin max {max((r for r in ratios_rr if math.isfinite(r)), default=math.nan):.2f}x. "
        "Paper: " + ", ".join(f"{k} {v}x" for k, v in PAPER.items())
    )
    if args.json is not None:
        with open(args.json, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
