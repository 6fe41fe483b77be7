"""Chiron's headline reproduced in the simulator: SLO attainment and instance cost of Drover's Chiron-style
hierarchical autoscaler against Llumnix's threshold autoscaler, on an interactive + batch mix with tight and
loose batch deadlines.

    python -m scripts.repro_chiron [--seeds 0,1] [--rate R] [--batch N] [--json FILE] [--plot DIR]

Reuses scripts.bench_autoscaling (Azure lengths, its sizing pilot, its Gamma workload and its policy
configurations) and control.simulator.elastic. The grid is fixed before any run:

* interactive: bench_autoscaling's Gamma (CV 2) rate steps r, 3r, r, 2r, r at a quarter of their length
  (300 s in all), r = 8 req/s, Azure lengths;
* batch: one job of 3,000 requests (Azure lengths) submitted at t = 0, due 240 s later (tight) or 900 s
  later (loose);
* seeds 0 and 1 (arrivals and lengths; the pilot uses seed 0 for every point, so both policies and both
  seeds start from the same sizing).

Policies: ``drover`` (class-aware dispatch, interactive evicts batch on mixed instances, local batch-size
autoscaler, global plan_scaling: Chiron's design) and ``llumnix`` (freeness dispatch + migration, classes
ignored, threshold autoscaler). Both start from the same warm fleet and pay for an instance from the moment
it is asked for. SLOs: interactive TTFT <= 2 s and mean inter-token latency <= 100 ms; batch: done by its
deadline. ``overall`` is attainment over every request.

The paper's numbers (SEEDS.md, Chiron arXiv 2501.08090, vs Llumnix tuned and untuned, up to 50 A100s, a batch
queue of ~700k requests): up to 90% higher SLO attainment, up to 70% better GPU efficiency, up to 3x
throughput.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.simulator.elastic import ElasticResult, simulate_elastic
from control.simulator.workload import RequestSpec, batch_backlog, merge
from scripts.bench_autoscaling import Capacity, azure_lengths, configs, gamma_workload, pilot

POLICIES = ("drover", "llumnix")
DEADLINES = (("tight", 240.0), ("loose", 900.0))
SEEDS = (0, 1)
RATE = 8.0
BATCH = 3000
SCHEDULE_SCALE = 0.25  # bench_autoscaling's 1,200 s Gamma schedule at a quarter: 300 s
PILOT_REQUESTS = 300
PAPER = {
    "SLO attainment (max gain)": "up to 90% higher",
    "GPU efficiency": "up to 70% better",
    "throughput": "up to 3x",
}


def workload(
    lengths: Sequence[tuple[int, int]], rate: float, batch: int, deadline_s: float, seed: int
) -> list[RequestSpec]:
    interactive = gamma_workload(rate, lengths, seed, scale=SCHEDULE_SCALE)
    job = batch_backlog(batch, at=0.0, deadline_s=deadline_s, seed=seed, lengths=lengths, prefix="job")
    return merge(interactive, job)


def overall(result: ElasticResult) -> float:
    met = sum(a.attainment * a.total for a in result.attainment.values())
    total = sum(a.total for a in result.attainment.values())
    return met / total if total else math.nan


def row(deadline: str, seed: int, policy: str, result: ElasticResult) -> dict[str, Any]:
    return {
        "deadline": deadline,
        "seed": seed,
        "policy": policy,
        "interactive_slo": result.class_attainment("interactive"),
        "batch_slo": result.class_attainment("batch"),
        "overall_slo": overall(result),
        "instance_seconds": result.instance_seconds,
        "peak_instances": result.peak_instances,
        "requests_per_instance_s": result.requests_per_instance_s,
        "evictions": result.evictions,
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"{'deadline':<8} {'seed':>4} {'policy':<8} {'int SLO':>7} {'batch':>6} {'overall':>7} {'inst-s':>8} "
        f"{'peak':>5} {'req/inst-s':>10} {'evict':>6}"
    )
    for r in rows:
        print(
            f"{r['deadline']:<8} {r['seed']:>4} {r['policy']:<8} {r['interactive_slo']:>7.3f} {r['batch_slo']:>6.3f} "
            f"{r['overall_slo']:>7.3f} {r['instance_seconds']:>8.0f} {r['peak_instances']:>5} "
            f"{r['requests_per_instance_s']:>10.3f} {r['evictions']:>6}"
        )


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """drover vs llumnix per (deadline, seed): attainment deltas in points, cost and efficiency ratios."""
    by = {(r["deadline"], r["seed"], r["policy"]): r for r in rows}
    out = []
    for deadline, seed in dict.fromkeys((r["deadline"], r["seed"]) for r in rows):
        ours, base = by[(deadline, seed, "drover")], by[(deadline, seed, "llumnix")]
        out.append(
            {
                "deadline": deadline,
                "seed": seed,
                "overall_pts": 100 * (ours["overall_slo"] - base["overall_slo"]),
                "interactive_pts": 100 * (ours["interactive_slo"] - base["interactive_slo"]),
                "batch_pts": 100 * (ours["batch_slo"] - base["batch_slo"]),
                "cost": ours["instance_seconds"] / base["instance_seconds"],
                "efficiency": ours["requests_per_instance_s"] / base["requests_per_instance_s"],
            }
        )
    return out


def print_comparisons(comps: Sequence[dict[str, Any]]) -> None:
    print("\ndrover vs llumnix: SLO deltas in points (>0 drover better), cost (<1 cheaper), req/inst-s (>1 better)")
    print(f"{'deadline':<8} {'seed':>4} {'overall':>8} {'int':>8} {'batch':>8} {'cost':>6} {'req/is':>7}")
    for c in comps:
        print(
            f"{c['deadline']:<8} {c['seed']:>4} {c['overall_pts']:>+8.1f} {c['interactive_pts']:>+8.1f} "
            f"{c['batch_pts']:>+8.1f} {c['cost']:>5.2f}x {c['efficiency']:>6.2f}x"
        )
    print(
        "summary: drover vs llumnix overall SLO "
        f"{min(c['overall_pts'] for c in comps):+.1f} to {max(c['overall_pts'] for c in comps):+.1f} pts, cost "
        f"{min(c['cost'] for c in comps):.2f}-{max(c['cost'] for c in comps):.2f}x, req/inst-s "
        f"{min(c['efficiency'] for c in comps):.2f}-{max(c['efficiency'] for c in comps):.2f}x. Paper: "
        + ", ".join(f"{k} {v}" for k, v in PAPER.items())
    )


def plot(directory: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Overall SLO attainment and instance-seconds per (deadline, seed), one bar per policy."""
    from scripts.plotting import bar_plot

    groups = list(dict.fromkeys(f"{r['deadline']} s{r['seed']}" for r in rows))
    for key, label, stem in (
        ("overall_slo", "SLO attainment (all requests)", "repro_chiron_slo"),
        ("instance_seconds", "instance-seconds", "repro_chiron_cost"),
    ):
        series = {
            p: [next(r[key] for r in rows if r["policy"] == p and f"{r['deadline']} s{r['seed']}" == g) for g in groups]
            for p in POLICIES
        }
        bar_plot(directory, stem, groups, series, ylabel=label, title=f"Chiron repro: {label}, drover vs llumnix")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--seeds", default=",".join(map(str, SEEDS)), help="Comma-separated seeds (default: %(default)s)."
    )
    parser.add_argument("--rate", type=float, default=RATE, help="Interactive base rate, req/s (default: %(default)s).")
    parser.add_argument("--batch", type=int, default=BATCH, help="Batch job size (default: %(default)s).")
    parser.add_argument("--pilot-requests", type=int, default=PILOT_REQUESTS, help="Requests per pilot rate.")
    parser.add_argument("--json", type=Path, default=None, help="Write every row here (JSON lines).")
    parser.add_argument("--plot", type=Path, default=None, help="Write PNG plots into this directory.")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        parser.error("--seeds takes comma-separated integers")
    if not seeds or args.rate <= 0 or args.batch < 2 or args.pilot_requests < 10:
        parser.error("need a seed, --rate > 0, --batch >= 2 and --pilot-requests >= 10")
    lengths = azure_lengths()
    cap: Capacity = pilot(lengths, 0, args.pilot_requests)
    print(
        f"\ninteractive Gamma CV 2 at r={args.rate:g} req/s (steps r,3r,r,2r,r over 300 s) + batch job of "
        f"{args.batch} due {', '.join(f'{s:g} s ({n})' for n, s in DEADLINES)}; seeds {list(seeds)}"
    )
    rows = []
    for name, deadline_s in DEADLINES:
        for seed in seeds:
            specs = workload(lengths, args.rate, args.batch, deadline_s, seed)
            cfgs = configs(specs, cap)
            for policy in POLICIES:
                rows.append(row(name, seed, policy, simulate_elastic(cfgs[policy], specs)))
    print_table(rows)
    print_comparisons(comparisons(rows))
    if args.json is not None:
        with open(args.json, "w") as handle:
            for r in rows:
                handle.write(json.dumps(r) + "\n")
    if args.plot is not None:
        plot(args.plot, rows)


if __name__ == "__main__":
    main()
