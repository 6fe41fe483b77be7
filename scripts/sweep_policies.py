"""Robustness sweep of ``drover`` against INFaaS++ (``least_loaded``) through the public CLI (issue 17).

Every point is one ``drover sim run --policy least_loaded,drover --json ...`` call, exactly as an external
checker calls it (a subprocess of ``python -m control.cli``, which is the ``drover`` entry point's app), so
the sweep measures what the checker sees, not an in-process shortcut.

The grid is fixed before measuring (docs/policies.md, "Robustness sweep"):

* presets: ``llama7b-a10``, ``qwen2.5-7b-a10``, ``llama3-8b-h200``; 8 instances;
* arrivals: Poisson, Gamma CV 4;
* lengths: ``zipf:256:6144`` (Llumnix's), ``uniform:1000:4000`` (long prompts *and* outputs: the CLI's
  ``uniform`` draws both), ``fixed:128:1024`` (decode-heavy), ``fixed:3072:32`` (prefill-heavy);
* loads 0.3, 0.7, 1.0 of the capacity; seeds 0-2; a bounded request count per run.

Rules fixed with the grid, the same for both policies:

* **capacity** of a (preset, lengths): one ``least_loaded`` run of the whole request count arriving at once
  (Poisson at 1000 req/s); capacity = 90 % of the requests / the time by which 90 % had finished (the 10 %
  tail is one long request's decode, not throughput);
* **SLOs** (docs/policies.md, "SLO rule"): SLO_TTFT = max(10x the median request's TTFT alone, 2x the
  99th-percentile prompt's TTFT alone), SLO_TPOT = 5x the median request's TPOT alone; "alone" = a
  one-request ``drover sim run`` on one instance; medians from the capacity run's lengths;
* **flags**: p99 TTFT flagged where drover's seed mean exceeds INFaaS++'s by more than the larger seed
  standard deviation of the two and by more than 1 %; p99 ITL and p99 TPOT where drover's mean is more
  than 5 % worse; attainment where drover's mean is lower by more than the larger standard deviation and
  0.5 points.

``--traces`` adds the shared traces at fixed loads (round 29): Azure conversation on ``llama7b-a10`` and
``qwen2.5-7b-a10`` (16 instances), Mooncake on ``llama3-8b-h200`` (8 instances, vLLM's prefix caching from
its ``hash_ids``), each at 0.25, 0.5 and 1.0 of INFaaS++'s goodput as measured in round 28 (the compressions
are fixed in :data:`TRACES`, not re-bisected), 300 s of arrivals (Mooncake 200 s) after compression, seeds
0-2 (a seeded window of the trace), SLOs by ``scripts/bench_scheduling.py``'s rule for that setting (the
goodput's). ``--no-generated`` leaves the generated grid out.

``--ablate`` reruns the worst points (by ``--ablate-by``: p99 TTFT, TPOT or ITL ratio) in-process with one of
drover's parts switched off at a time (the CLI takes no policy-parameter override); it reports preemptions
and the p99 TPOT of the requests never preempted beside the tails.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("least_loaded", "drover")
PRESETS = ("llama7b-a10", "qwen2.5-7b-a10", "llama3-8b-h200")
WORKLOADS = (("poisson", 1.0), ("gamma", 4.0))
LENGTHS = ("zipf:256:6144", "uniform:1000:4000", "fixed:128:1024", "fixed:3072:32")
LOADS = (0.3, 0.7, 1.0)
SEEDS = (0, 1, 2)
INSTANCES = 8
REQUESTS = 600
METRICS = (("ttft_p99_s", "p99 TTFT s"), ("itl_p99_ms", "p99 ITL ms"), ("tpot_p99_ms", "p99 TPOT ms"))


@dataclasses.dataclass(frozen=True)
class Grid:
    presets: tuple[str, ...] = PRESETS
    workloads: tuple[tuple[str, float], ...] = WORKLOADS
    lengths: tuple[str, ...] = LENGTHS
    loads: tuple[float, ...] = LOADS
    seeds: tuple[int, ...] = SEEDS
    instances: int = INSTANCES
    requests: int = REQUESTS


QUICK = Grid(
    presets=("llama7b-a10",),
    workloads=(("poisson", 1.0),),
    lengths=("fixed:128:64",),
    loads=(0.5,),
    seeds=(0, 1),
    instances=2,
    requests=60,
)


@dataclasses.dataclass(frozen=True)
class TraceSetting:
    """One of ``scripts/bench_scheduling.py``'s goodput settings on a shared trace, at fixed compressions."""

    setting: str
    """bench_scheduling's setting name: its preset, trace, instances, context length and SLO rule."""
    rates: tuple[float, ...]
    """Compressions at :data:`TRACE_LOADS` of INFaaS++'s mean goodput, round 28 (docs/policies.md,
    "Adaptive step budget"): fixed beforehand, not re-measured per sweep."""
    duration_s: float
    """Seconds of arrivals after compression (bench_scheduling's ``--duration`` of the same tails)."""


TRACE_LOADS = (0.25, 0.5, 1.0)
TRACES = (
    TraceSetting("a10 azure", (0.47, 0.93, 1.86), 300.0),
    TraceSetting("qwen azure", (1.32, 2.63, 5.27), 300.0),
    TraceSetting("h200 mooncake", (0.26, 0.51, 1.02), 200.0),
)


def drover(args: Sequence[str]) -> str:
    """``drover ARGS`` with this checkout's code; stdout. A failing run raises with its last stderr line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "control.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"drover {' '.join(args)}: exit {proc.returncode}: {last}")
    return proc.stdout


def sim_run(preset: str, instances: int, extra: Sequence[str]) -> list[dict[str, Any]]:
    out = drover(["sim", "run", "--json", "--preset", preset, "-n", str(instances), *extra])
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def calibrate(preset: str, lengths: str, grid: Grid) -> dict[str, float]:
    """Capacity (req/s) and SLOs of (preset, lengths) by the rules in the module docstring."""
    base = ["--workload", "poisson", "--rate", "1000", "--requests", str(grid.requests), "--lengths", lengths]
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "requests.csv"
        sim_run(preset, grid.instances, [*base, "--policy", "least_loaded", "--out", str(csv_path)])
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    finishes = sorted(float(r["arrival_s"]) + float(r["e2e_s"]) for r in rows if r["status"] == "completed")
    k = max(1, int(0.9 * len(rows)))
    capacity = k / finishes[min(k, len(finishes)) - 1]
    prompts = sorted(int(r["prompt_tokens"]) for r in rows)
    outputs = sorted(int(r["output_tokens"]) for r in rows)
    median_in, median_out = prompts[len(prompts) // 2], max(2, outputs[len(outputs) // 2])
    p99_in = prompts[min(len(prompts) - 1, int(0.99 * len(prompts)))]

    def alone(prompt: int, output: int) -> dict[str, Any]:
        one = ["--workload", "poisson", "--rate", "1", "--requests", "1", "--lengths", f"fixed:{prompt}:{output}"]
        return sim_run(preset, 1, [*one, "--policy", "least_loaded"])[0]

    median = alone(median_in, median_out)
    p99 = alone(p99_in, 2)
    return {
        "capacity_rps": capacity,
        "slo_ttft_s": max(10 * median["ttft_p50_s"], 2 * p99["ttft_p50_s"]),
        "slo_tpot_ms": 5 * median["tpot_p50_ms"],
        "median_in": median_in,
        "median_out": median_out,
        "p99_in": p99_in,
    }


def seed_slo_policy_args(seed: int, cal: dict[str, Any]) -> list[str]:
    """The CLI arguments every sweep run ends with: its seed, the point's SLOs and the policies compared."""
    return [
        "--seed",
        str(seed),
        "--slo-ttft-s",
        f"{cal['slo_ttft_s']:.4g}",
        "--slo-tpot-ms",
        f"{cal['slo_tpot_ms']:.4g}",
        "--policy",
        ",".join(POLICIES),
    ]


def point_args(
    workload: str, cv: float, lengths: str, rate: float, seed: int, grid: Grid, cal: dict[str, float]
) -> list[str]:
    args = ["--workload", workload, "--rate", f"{rate:.4g}", "--requests", str(grid.requests), "--lengths", lengths]
    if workload == "gamma":
        args += ["--cv", f"{cv:g}"]
    return [*args, *seed_slo_policy_args(seed, cal)]


def sweep(grid: Grid, jobs: int = 2, log: Any = sys.stderr) -> dict[str, Any]:
    """Every grid point's rows; {"calibration": {...}, "points": [...]}. ``jobs`` subprocesses at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        keys = [(p, length) for p in grid.presets for length in grid.lengths]
        cals = dict(zip(keys, pool.map(lambda k: calibrate(k[0], k[1], grid), keys), strict=True))
        for (p, length), cal in cals.items():
            print(f"calibrated {p} {length}: {cal}", file=log, flush=True)
        specs = [
            (p, w, cv, length, load, seed)
            for p in grid.presets
            for w, cv in grid.workloads
            for length in grid.lengths
            for load in grid.loads
            for seed in grid.seeds
        ]

        def one(spec: tuple[str, str, float, str, float, int]) -> dict[str, Any]:
            p, w, cv, length, load, seed = spec
            cal = cals[(p, length)]
            rate = float(f"{load * cal['capacity_rps']:.4g}")  # what the command line carries, ablate reruns
            rows = sim_run(p, grid.instances, point_args(w, cv, length, rate, seed, grid, cal))
            by = {r["policy"]: r for r in rows}
            return {
                "preset": p,
                "workload": w if w == "poisson" else f"gamma{cv:g}",
                "lengths": length,
                "load": load,
                "rate": rate,
                "seed": seed,
                **{f"{pol}:{m}": by[pol].get(m) for pol in POLICIES for m in (*dict(METRICS), "slo_attainment")},
            }

        points = list(pool.map(one, specs))
    return {
        "grid": dataclasses.asdict(grid),
        "calibration": {f"{p} {length}": cal for (p, length), cal in cals.items()},
        "points": points,
    }


def trace_calibration(ts: TraceSetting) -> dict[str, Any]:
    """The CLI arguments and SLOs of a trace setting (bench_scheduling's, so the goodput's SLO rule)."""
    from scripts.bench_scheduling import cached_slo, goodput_settings

    (setting,) = [s for s in goodput_settings() if s.name == ts.setting]
    assert setting.trace is not None and setting.preset is not None
    slo_ttft_s, slo_tpot_s = cached_slo(setting)
    return {
        "setting": ts.setting,
        "trace": str(setting.trace),
        "preset": setting.preset,
        "instances": setting.instances,
        "max_model_len": setting.engine.max_model_len,
        "duration_s": ts.duration_s,
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_ms": slo_tpot_s * 1000,
    }


def trace_args(cal: dict[str, Any], rate: float, seed: int) -> list[str]:
    """``drover sim run`` arguments of one trace point: ``duration_s`` of arrivals after compression (the
    CLI's ``--duration`` counts trace seconds), a seeded window."""
    return [
        "--trace",
        cal["trace"],
        "--compression",
        f"{rate:g}",
        "--duration",
        f"{cal['duration_s'] * rate:.6g}",
        "--max-model-len",
        str(cal["max_model_len"]),
        *seed_slo_policy_args(seed, cal),
    ]


def sweep_traces(
    traces: Sequence[TraceSetting], seeds: Sequence[int] = SEEDS, jobs: int = 2, log: Any = sys.stderr
) -> dict[str, Any]:
    """The trace points, in :func:`sweep`'s shape (workload ``trace``, lengths = the trace's name)."""
    cals = {ts.setting: trace_calibration(ts) for ts in traces}
    for name, cal in cals.items():
        print(f"calibrated {name}: {cal}", file=log, flush=True)
    specs = [
        (ts, load, rate, seed)
        for ts in traces
        for load, rate in zip(TRACE_LOADS, ts.rates, strict=True)
        for seed in seeds
    ]

    def one(spec: tuple[TraceSetting, float, float, int]) -> dict[str, Any]:
        ts, load, rate, seed = spec
        cal = cals[ts.setting]
        rows = sim_run(cal["preset"], cal["instances"], trace_args(cal, rate, seed))
        by = {r["policy"]: r for r in rows}
        return {
            "preset": cal["preset"],
            "workload": "trace",
            "lengths": Path(cal["trace"]).stem,
            "load": load,
            "rate": rate,
            "seed": seed,
            **{f"{pol}:{m}": by[pol].get(m) for pol in POLICIES for m in (*dict(METRICS), "slo_attainment")},
        }

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        points = list(pool.map(one, specs))
    calibration = {f"{cal['preset']} {Path(cal['trace']).stem}": cal for cal in cals.values()}
    return {"traces": [dataclasses.asdict(ts) for ts in traces], "calibration": calibration, "points": points}


def _mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    xs = [v for v in values if v is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (preset, workload, lengths, load): per-policy mean/sd over seeds, ratios, flags."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for pt in result["points"]:
        groups.setdefault((pt["preset"], pt["workload"], pt["lengths"], pt["load"]), []).append(pt)
    rows = []
    for (preset, workload, lengths, load), pts in groups.items():
        row: dict[str, Any] = {"preset": preset, "workload": workload, "lengths": lengths, "load": load}
        row["rate"] = pts[0]["rate"]
        flags = []
        for metric, _ in (*METRICS, ("slo_attainment", "")):
            ll = _mean_sd([p[f"least_loaded:{metric}"] for p in pts])
            dr = _mean_sd([p[f"drover:{metric}"] for p in pts])
            row[f"least_loaded:{metric}"], row[f"drover:{metric}"] = ll, dr
            ratio = dr[0] / ll[0] if ll[0] else float("nan")
            row[f"ratio:{metric}"] = ratio
            noise = max(ll[1], dr[1])
            if metric == "ttft_p99_s" and dr[0] - ll[0] > noise and ratio > 1.01:
                flags.append("TTFT")
            elif metric in ("itl_p99_ms", "tpot_p99_ms") and ratio > 1.05:
                flags.append("ITL" if metric.startswith("itl") else "TPOT")
            elif metric == "slo_attainment" and ll[0] - dr[0] > max(noise, 0.005):
                flags.append("ATT")
        row["flags"] = flags
        rows.append(row)
    return rows


def print_tables(result: dict[str, Any], out: Any = sys.stdout) -> list[dict[str, Any]]:
    print(
        "| preset | workload | lengths | load | rate | seed | TTFT LL / dr s | ITL LL / dr ms | TPOT LL / dr ms | "
        "attain LL / dr |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for p in result["points"]:
        cells = []
        for metric, _ in (*METRICS, ("slo_attainment", "")):
            a, b = p[f"least_loaded:{metric}"], p[f"drover:{metric}"]
            cells.append(f"{_f(a)} / {_f(b)}")
        print(
            f"| {p['preset']} | {p['workload']} | {p['lengths']} | {p['load']} | {p['rate']:.3g} | {p['seed']} | "
            + " | ".join(cells)
            + " |",
            file=out,
        )
    rows = summarise(result)
    print(file=out)
    print(
        "| preset | workload | lengths | load | rate | p99 TTFT s LL / dr (ratio) | p99 ITL ms LL / dr (ratio) | "
        "p99 TPOT ms LL / dr (ratio) | attainment LL / dr | flags |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        cells = []
        for metric, _ in (*METRICS, ("slo_attainment", "")):
            (lm, ls), (dm, ds) = r[f"least_loaded:{metric}"], r[f"drover:{metric}"]
            cell = f"{_f(lm)}±{_f(ls)} / {_f(dm)}±{_f(ds)}"
            if metric != "slo_attainment":
                cell += f" ({r[f'ratio:{metric}']:.3f})"
            cells.append(cell)
        flag = ",".join(r["flags"]) or "-"
        print(
            f"| {r['preset']} | {r['workload']} | {r['lengths']} | {r['load']} | {r['rate']:.3g} | "
            + " | ".join(cells)
            + f" | {flag} |",
            file=out,
        )
    flagged = [r for r in rows if r["flags"]]
    print(f"\n{len(flagged)} of {len(rows)} points flagged", file=out)
    return rows


def _f(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.3g}"


ABLATIONS: dict[str, dict[str, Any]] = {
    "drover": {},
    "no predict_prefill_blocks": {"predict_prefill_blocks": False},
    "no queue_hold_all": {"queue_hold_all": False},
    "backfill scan 32": {"queue_backfill_scan": 32},
    "no late binding": {"predict_hold": False, "queue_hold_all": False},
    "no prefix": {"predict_prefix": False},
    "no migration": {"migration_enabled": False},
    "decode weight 0": {"predict_decode_weight": 0.0},
    "growth blocks 0": {"predict_growth_blocks": 0},
    "high watermark 1.0": {"predict_high_watermark": 1.0},
    "freeness dispatch": {"dispatch_policy": "freeness"},
    "hold reserve 16": {"predict_hold_growth_blocks": 16},
    "no prefill hold": {"predict_hold_prefill_tokens": 0},
    # round 29: the step budget drover got by default in round 28
    "fixed step budget": {"step_budget_adaptive": False},
    "no step budget": {"step_budget_adaptive": False, "step_budget_slo_share": 0.0},
}


def ablate(result: dict[str, Any], row: dict[str, Any], out: Any = sys.stdout) -> None:
    """``row``'s point in-process with one of drover's parts off at a time, built as ``drover sim run`` builds
    it (the step budget sized from the point's TPOT SLO, the CLI's observer for ITL): p99 TTFT per seed, p99
    TPOT and ITL, attainment."""
    import numpy as np

    from control.policy.recommended import user_policy_params
    from control.simulator.presets import get_preset
    from control.simulator.runner import WorkloadSpec, build_workload, fixed_simulator, weighted_percentile
    from control.simulator.step_budget import with_slo_step_budget

    grid = result["grid"]
    cal = result["calibration"][f"{row['preset']} {row['lengths']}"]
    preset = get_preset(row["preset"])
    path = preset.request_path_ms / 1000
    trace = row["workload"] == "trace"
    instances = cal["instances"] if trace else grid["instances"]
    kind, cv = ("poisson", None) if row["workload"] in ("poisson", "trace") else ("gamma", float(row["workload"][5:]))
    variants = {"least_loaded": user_policy_params("least_loaded")}
    base = user_policy_params("drover")
    variants.update({name: base.with_updates(**change) for name, change in ABLATIONS.items()})
    print(f"\nablation: {row['preset']} {row['workload']} {row['lengths']} load {row['load']}", file=out)
    print(
        "| variant | p99 TTFT s per seed | mean | p99 TPOT ms mean | p99 ITL ms mean | attainment mean | "
        "preemptions mean | p99 TPOT ms never preempted |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|", file=out)
    for name, params in variants.items():
        ttfts, tpots, itls, atts, preempts, clean = [], [], [], [], [], []
        for seed in grid["seeds"]:
            if trace:
                spec = WorkloadSpec(
                    trace=Path(cal["trace"]),
                    compression=row["rate"],
                    duration=float(f"{cal['duration_s'] * row['rate']:.6g}"),
                    seed=seed,
                )
            else:
                spec = WorkloadSpec(
                    kind=kind,
                    rate=float(f"{row['rate']:.4g}"),
                    cv=cv,
                    lengths=row["lengths"],
                    requests=grid["requests"],
                    seed=seed,
                )
            cluster = preset.cluster_config(instances, params, max_model_len=cal.get("max_model_len"))
            # the CLI sizes drover's step budget from the run's TPOT SLO (its SLO argument, rounded as passed)
            cluster = with_slo_step_budget(cluster, float(f"{cal['slo_tpot_ms']:.4g}") / 1000)
            sim = fixed_simulator(cluster, build_workload(spec))
            res = sim.run()
            itl = weighted_percentile(sim.gaps, sim.gap_weights, 99)
            itls.append(float("nan") if itl is None else 1000 * itl)
            done = [r for r in res.requests if r.done]
            ttft = [r.prefill + path for r in done]
            tpot = [d for r in done if (d := r.decode_per_token) is not None]
            # numpy's interpolated percentile, as the CLI's rows: at a knee the top ranks are far apart
            ttfts.append(float(np.percentile(ttft, 99)))
            tpots.append(1000 * float(np.percentile(tpot, 99)) if tpot else float("nan"))
            # a KV-bound point's TPOT tail is its preempted requests' wait to be readmitted (round 28): the
            # count, and the tail without them, say whether a variant changes preemption or decoding speed
            preempts.append(sum(r.sim.num_preemptions for r in done if r.sim is not None))
            kept = [d for r in done if r.sim is not None and not r.sim.num_preemptions and (d := r.decode_per_token)]
            clean.append(1000 * float(np.percentile(kept, 99)) if kept else float("nan"))
            met = sum(
                1
                for r in done
                if r.prefill + path <= cal["slo_ttft_s"]
                and ((d := r.decode_per_token) is None or d * 1000 <= cal["slo_tpot_ms"])
            )
            atts.append(met / max(1, len(res.requests)))
        print(
            f"| {name} | {' '.join(_f(t) for t in ttfts)} | {_f(statistics.fmean(ttfts))} | "
            f"{_f(statistics.fmean(tpots))} | {_f(statistics.fmean(itls))} | {_f(statistics.fmean(atts))} | "
            f"{_f(statistics.fmean(preempts))} | "
            f"{_f(statistics.fmean(clean))} |",
            file=out,
            flush=True,
        )


def worst_points(rows: Sequence[dict[str, Any]], by: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` points with the worst drover / INFaaS++ ratio (> 1.01) of p99 ``by`` (ttft, tpot or itl),
    flagged or inside the seed spread (a 10x TTFT ratio can hide in a wide spread), worst first."""
    key = {"ttft": "ratio:ttft_p99_s", "tpot": "ratio:tpot_p99_ms", "itl": "ratio:itl_p99_ms"}[by]
    return sorted((r for r in rows if r[key] > 1.01), key=lambda r: -r[key])[:n]


def plot(directory: Path, rows: list[dict[str, Any]]) -> None:
    from scripts.plotting import bar_plot

    labels = [f"{r['preset'][:6]} {r['workload'][:4]} {r['lengths'].split(':')[0][:4]} {r['load']}" for r in rows]
    bar_plot(
        directory,
        "sweep_ttft_ratio",
        labels,
        {"drover / least_loaded p99 TTFT": [r["ratio:ttft_p99_s"] for r in rows]},
        ylabel="ratio",
        title="p99 TTFT, drover / INFaaS++",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="A tiny grid (seconds): one preset, one point.")
    parser.add_argument("--jobs", type=int, default=2, help="Subprocesses at a time (default 2).")
    parser.add_argument("--json-out", type=Path, help="Write every point's numbers here.")
    parser.add_argument(
        "--load-json",
        type=Path,
        action="append",
        help="Tabulate (and ablate) a --json-out file; no runs. Repeat to join several sweeps' files.",
    )
    parser.add_argument("--ablate", type=int, default=0, help="Ablate the N worst ratios (> 1.01) of --ablate-by.")
    parser.add_argument(
        "--ablate-by",
        choices=("ttft", "tpot", "itl"),
        default="ttft",
        help="The p99 metric whose worst drover / INFaaS++ ratios --ablate picks (default ttft).",
    )
    parser.add_argument("--plot", type=Path, help="Write a ratio plot (PNG) into this folder.")
    parser.add_argument(
        "--traces", action="store_true", help="Add the shared traces at fixed loads (Azure, Mooncake; TRACES)."
    )
    parser.add_argument("--no-generated", action="store_true", help="Leave the generated grid out (with --traces).")
    parser.add_argument(
        "--presets",
        help=f"Only these of the grid's presets (comma-separated; default all: {','.join(PRESETS)}).",
    )
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else Grid()
    if args.presets:
        chosen = tuple(p.strip() for p in args.presets.split(",") if p.strip())
        unknown = [p for p in chosen if p not in grid.presets]
        if unknown or not chosen:
            parser.error(f"--presets: {','.join(unknown) or '(none)'} not in the grid ({','.join(grid.presets)})")
        grid = dataclasses.replace(grid, presets=chosen)
    if args.no_generated and not args.traces:
        parser.error("--no-generated needs --traces")
    if args.load_json:
        result = json.loads(args.load_json[0].read_text())
        for more in args.load_json[1:]:
            other = json.loads(more.read_text())
            result["calibration"].update(other["calibration"])
            result["points"] += other["points"]
            result.setdefault("traces", other.get("traces"))
    else:
        jobs = max(1, args.jobs)
        result = {"grid": dataclasses.asdict(grid), "calibration": {}, "points": []}
        if not args.no_generated:
            result = sweep(grid, jobs=jobs)
        if args.traces:
            traced = sweep_traces(TRACES, seeds=grid.seeds, jobs=jobs)
            result["traces"] = traced["traces"]
            result["calibration"].update(traced["calibration"])
            result["points"] += traced["points"]
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    rows = print_tables(result)
    for row in worst_points(rows, args.ablate_by, args.ablate):
        ablate(result, row)
    if args.plot:
        plot(args.plot, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
