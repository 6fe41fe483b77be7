"""Per-seed ablation of ``drover``'s parts at a robustness-sweep point (issue 17: p99 ITL and p99 TPOT).

The sweep (``scripts/sweep_policies.py``) flags a point on the mean over seeds; p99 ITL and p99 TPOT are
cliffs (p99 ITL is a chunk step as soon as more than 1 % of the decode gaps share a step with a prompt's
chunk), so a flag is often one or two seeds. This script reruns one point of the sweep in-process exactly as
``drover sim run`` builds it (the sweep's calibration: capacity and SLOs; the rate rounded as the command line
carries it; drover's step budget sized from the point's TPOT SLO) with one of drover's parts changed at a
time, and prints, **per seed**, p99 TTFT, p99 ITL, p99 TPOT and the share of decode gaps that are stretched
(longer than twice the median gap): the number the p99 ITL cliff reads.

    python scripts/ablate_tails.py --preset qwen2.5-7b-a10 --lengths fixed:3072:32 --loads 0.3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from control.policy.params import PolicyParams
from control.policy.recommended import user_policy_params
from control.simulator.presets import get_preset
from control.simulator.runner import WorkloadSpec, build_workload, fixed_simulator, weighted_percentile
from control.simulator.step_budget import with_slo_step_budget
from scripts.sweep_policies import Grid, calibrate

VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "drover": {},
    "no prefill hold": {"predict_hold_prefill_tokens": 0},
    "no late binding": {"predict_hold": False, "queue_hold_all": False},
    "decode weight 0": {"predict_decode_weight": 0.0},
    "fixed step budget": {"step_budget_adaptive": False},
    "no step budget": {"step_budget_adaptive": False, "step_budget_slo_share": 0.0},
    "least_loaded placement": {"dispatch_policy": "least_loaded"},
    "freeness placement": {"dispatch_policy": "freeness"},
    "+ decode stall 1": {"predict_decode_stall": 1.0},
}
"""drover with one part changed (names as the docs' tables); INFaaS++ (``least_loaded``) is always run first.
``least_loaded placement`` keeps drover's step budget and queue but places as INFaaS++ does: placement
against local control."""

STRETCH = 2.0
"""A gap counts as stretched when it is longer than this many times the run's median gap (a prompt's chunk
shared the step: a decode-only step is the median)."""


def point_result(
    preset_name: str, params: PolicyParams, spec: WorkloadSpec, slo_tpot_ms: float, instances: int
) -> dict[str, float]:
    """One run: p99 TTFT (s), p99 ITL and p99 TPOT (ms), stretched gap share (%), as ``drover sim run``."""
    preset = get_preset(preset_name)
    cluster = preset.cluster_config(instances, params)
    cluster = with_slo_step_budget(cluster, float(f"{slo_tpot_ms:.4g}") / 1000)  # the CLI passes the SLO rounded
    sim = fixed_simulator(cluster, build_workload(spec))
    result = sim.run()
    path = preset.request_path_ms / 1000
    done = [r for r in result.requests if r.done]
    tpot = [d for r in done if (d := r.decode_per_token) is not None]
    itl = weighted_percentile(sim.gaps, sim.gap_weights, 99)
    median = weighted_percentile(sim.gaps, sim.gap_weights, 50)
    gaps, weights = np.asarray(sim.gaps), np.asarray(sim.gap_weights, dtype=np.float64)
    stretched = float(weights[gaps > STRETCH * (median or 0.0)].sum() / weights.sum()) if len(gaps) else 0.0
    return {
        "ttft": float(np.percentile([r.prefill + path for r in done], 99)),
        "itl": 1000 * (itl or float("nan")),
        "tpot": 1000 * float(np.percentile(tpot, 99)) if tpot else float("nan"),
        "stretched": 100 * stretched,
    }


def ablation_table(
    preset: str,
    lengths: str,
    load: float,
    seeds: Sequence[int],
    variants: Sequence[str],
    workload: str = "poisson",
    cv: float = 4.0,
    grid: Grid | None = None,
    out: Any = sys.stdout,
) -> dict[str, list[dict[str, float]]]:
    """Print (and return) the per-seed table of one sweep point for INFaaS++ and ``variants``."""
    grid = grid or Grid()
    cal = calibrate(preset, lengths, grid)
    rate = float(f"{load * cal['capacity_rps']:.4g}")
    base = user_policy_params("drover")
    runs: dict[str, PolicyParams] = {"INFaaS++": user_policy_params("least_loaded")}
    runs.update({name: base.with_updates(**VARIANTS[name]) for name in variants})
    print(
        f"\n{preset} {workload} {lengths} load {load} ({rate:g} req/s, {grid.instances} instances, "
        f"{grid.requests} requests; SLO TTFT {cal['slo_ttft_s']:.3g} s, TPOT {cal['slo_tpot_ms']:.3g} ms)",
        file=out,
    )
    seed_cols = " / ".join(str(s) for s in seeds)
    print(
        f"| variant | p99 TTFT s ({seed_cols}) | p99 ITL ms | p99 TPOT ms | stretched gaps % |",
        file=out,
    )
    print("|---|---|---|---|---|", file=out)
    table: dict[str, list[dict[str, float]]] = {}
    for name, params in runs.items():
        rows = []
        for seed in seeds:
            spec = WorkloadSpec(
                kind=workload,
                rate=rate,
                cv=cv if workload == "gamma" else None,
                lengths=lengths,
                requests=grid.requests,
                seed=seed,
            )
            rows.append(point_result(preset, params, spec, cal["slo_tpot_ms"], grid.instances))
        table[name] = rows

        def cells(key: str, fmt: str, rows: list[dict[str, float]] = rows) -> str:
            return " / ".join(format(r[key], fmt) for r in rows)

        print(
            f"| {name} | {cells('ttft', '.3f')} | {cells('itl', '.1f')} | {cells('tpot', '.2f')} | "
            f"{cells('stretched', '.2f')} |",
            file=out,
            flush=True,
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", required=True, help="A sweep preset (drover sim presets).")
    parser.add_argument("--lengths", required=True, help="The sweep's --lengths, e.g. fixed:3072:32.")
    parser.add_argument("--loads", default="0.3", help="Fractions of the capacity, comma-separated (default 0.3).")
    parser.add_argument("--workload", choices=("poisson", "gamma"), default="poisson")
    parser.add_argument("--cv", type=float, default=4.0, help="Gamma arrivals' CV (the sweep's 4).")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds, comma-separated (default the sweep's 0,1,2).")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"drover variants, comma-separated (default all: {', '.join(VARIANTS)}).",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    for load in (float(x) for x in args.loads.split(",")):
        ablation_table(args.preset, args.lengths, load, seeds, variants, args.workload, args.cv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
