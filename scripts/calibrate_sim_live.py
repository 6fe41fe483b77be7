"""Calibration: the same small workload through a live vLLM-CPU cluster and through the simulator (``tiny-cpu``
preset), TTFT, TPOT and end-to-end latency side by side, and the gap.

    flock /tmp/drover-heavy.lock python -m scripts.calibrate_sim_live [--requests 24] [--rate 1] [--instances 2]
        [--lengths uniform:32:256] [--seed 0] [--fit-seed 1] [--kind vllm|sim] [--probe 0] [--repeats 1]
        [--json FILE] [--from-json FILE] [--fit-mode step|scale|seq] [--plot DIR]

Both sides get the same requests (seeded Poisson arrivals, the given lengths, ``ignore_eos`` so every request
generates exactly its output length) and the same dispatch (``least_loaded``, no migration). The aim stated
in issue 16: medians within 15 %, p99 within 30 %.

``--fit-seed K`` first sends another workload (seed K) through the same live cluster and fits the preset's
two serving constants on it: the per-step overhead (live median TPOT minus the bare forward pass's) and the
request path (live median TTFT minus the simulator's with that overhead); the workload of ``--seed`` is then
compared against the bare forward pass, the committed ``tiny-cpu`` preset and the freshly fitted constants,
so the check is on requests the fit did not see.

``--repeats N`` sends the compared workload N times through the same cluster (one after another): the live
side's spread from run to run is the noise floor any gap has to be read against, and each repeat's gap is
printed. ``--json FILE`` writes every live request's measurements (and the probe's) as JSON, so another fit
can be tried offline without a new live run: ``--from-json FILE`` redoes the comparison from such a file.

``--fit-mode`` picks the serving model fitted on the fit workload (each with the request path fitted after it):
``step`` (default) adds a constant to every step; ``scale`` multiplies every step's cost (a CPU the engines
share with other processes slows the whole step, not a fixed part of it); ``seq`` adds a constant per decoding
sequence on top of the probe's per-step constant (vLLM's per-sequence sampling, output handling and streaming,
growing with the batch; needs ``--probe``).

Before the workloads, ``--probe N`` sends N lone requests one after another (a 16-token prompt, 64 output
tokens; nothing else running) and prints what the ``tiny-cpu`` preset's two serving constants would be from
them: the per-step overhead (median time per output token, minus the bare forward pass of a one-sequence decode
step, :data:`engines.sim.cost_model.TINY_CPU`) and the request path (median TTFT, minus one prefill step
with that overhead). The probe uses different requests from the workload the comparison then runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from control.apps.launcher import local_cluster, wait_ready
from control.client import DroverClient
from control.settings import load_settings
from control.simulator.presets import Preset, get_preset
from control.simulator.runner import RunOptions, WorkloadSpec, build_workload, run_policy
from control.simulator.workload import RequestSpec
from engines.sim.cost_model import TINY_CPU, CostModel
from transport.messages import SamplingParams


async def drive(url: str, specs: list[RequestSpec]) -> dict[str, list[float]]:
    async with DroverClient(url, name="calibrate-sim-live") as client:
        started = time.perf_counter()

        async def one(i: int, spec: RequestSpec) -> tuple[float, float | None, float, tuple[float, ...]]:
            await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - started)))
            prompt = [3 + (i * 31 + k) % 250 for k in range(spec.prompt_len)]
            result = await client.generate(
                prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=spec.output_len, ignore_eos=True)
            )
            times = result.token_times
            tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
            # Where the first token's time went: the control plane's own clock (arrival there to dispatch, and
            # to the first token leaving it) and the first chunk's engine -> client transit.
            timings = result.done.timings if result.done is not None else None
            parts = (
                timings.queue_s if timings else -1.0,
                timings.ttft_s if timings else -1.0,
                result.transit_s[0] if result.transit_s else -1.0,
                float(len(set(times))),  # chunks the output arrived in
            )
            return result.ttft_s, tpot, times[-1] - result.submitted_at, parts

        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    return {
        "ttft_s": [r[0] for r in results],
        "tpot_ms": [r[1] * 1000 for r in results if r[1] is not None],
        "e2e_s": [r[2] for r in results],
        "tpot_all_ms": [r[1] * 1000 if r[1] is not None else -1.0 for r in results],  # per request, in order
        "cp_queue_s": [r[3][0] for r in results],
        "cp_ttft_s": [r[3][1] for r in results],
        "first_transit_s": [r[3][2] for r in results],
        "chunks": [r[3][3] for r in results],
    }


def breakdown(title: str, live: dict[str, list[float]]) -> None:
    """Medians of where a live request's first token went (see :func:`drive`)."""

    def med(key: str) -> float:
        values = [v for v in live.get(key, []) if v >= 0]
        return float(np.median(values)) if values else float("nan")

    print(
        f"{title}: median client TTFT {med('ttft_s') * 1000:.1f} ms; control plane: queue before dispatch "
        f"{med('cp_queue_s') * 1000:.1f} ms, TTFT {med('cp_ttft_s') * 1000:.1f} ms; first chunk engine -> client "
        f"{med('first_transit_s') * 1000:.1f} ms; output in {med('chunks'):.0f} chunks (median)",
        flush=True,
    )


PROBE_PROMPT, PROBE_OUTPUT = 16, 64


async def probe(url: str, count: int) -> dict[str, float]:
    """Lone requests (the cluster otherwise idle): median TTFT and median time per output token."""
    ttfts: list[float] = []
    tpots: list[float] = []
    async with DroverClient(url, name="calibrate-sim-live-probe") as client:
        for i in range(count + 1):  # the first one warms the path up and is dropped
            prompt = [5 + (i * 17 + k) % 240 for k in range(PROBE_PROMPT)]
            result = await client.generate(
                prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=PROBE_OUTPUT, ignore_eos=True)
            )
            if i == 0:
                continue
            ttfts.append(result.ttft_s)
            times = result.token_times  # per request: tokens may reach the client several to a message
            tpots.append((times[-1] - times[0]) / (len(times) - 1))
    cost = TINY_CPU
    step_ms = float(np.median(tpots)) * 1000
    bare_decode = cost.step_ms(0, 1, PROBE_PROMPT + PROBE_OUTPUT // 2)
    overhead_ms = step_ms - bare_decode
    ttft_ms = float(np.median(ttfts)) * 1000
    path_ms = ttft_ms - (cost.step_ms(PROBE_PROMPT, 0, 0) + overhead_ms)
    return {
        "ttft_ms": ttft_ms,
        "step_ms": step_ms,
        "bare_decode_ms": bare_decode,
        "step_overhead_ms": overhead_ms,
        "request_path_ms": path_ms,
    }


def simulated(specs: list[RequestSpec], instances: int, preset: Preset) -> dict[str, list[float]]:
    run = run_policy("least_loaded", specs, RunOptions(preset=preset, instances=instances))
    done = [r for r in run.requests if r["status"] == "completed"]
    return {
        "ttft_s": [r["ttft_s"] for r in done],
        "tpot_ms": [r["tpot_ms"] for r in done if r["tpot_ms"] is not None],
        "e2e_s": [r["e2e_s"] for r in done],
    }


def bare_preset() -> Preset:
    """``tiny-cpu`` as the bare forward pass: no serving overhead per step, no request path."""
    return dataclasses.replace(get_preset("tiny-cpu"), cost=TINY_CPU, request_path_ms=0.0)


def fit(
    specs: list[RequestSpec],
    live: dict[str, list[float]],
    instances: int,
    mode: str = "step",
    probe_step_ms: float = 0.0,
) -> tuple[Preset, str]:
    """A ``tiny-cpu`` whose serving constants make the simulator's medians meet ``live``'s: first the step
    model (``mode``, see the module docstring) from the median TPOT (one token per sequence per step), then the
    request path from the median TTFT with that step model in. Returns the preset and what was fitted."""
    target = float(np.median(live["tpot_ms"]))
    if mode == "step":
        bare = simulated(specs, instances, bare_preset())
        overhead = target - float(np.median(bare["tpot_ms"]))
        cost, what = dataclasses.replace(TINY_CPU, fixed_ms=TINY_CPU.fixed_ms + overhead), f"step +{overhead:.2f} ms"
    elif mode == "scale":
        k = _bisect(lambda k: _median_tpot(specs, instances, _scaled(k)) - target, 0.25, 64.0)
        cost, what = _scaled(k), f"step cost x{k:.2f}"
    else:
        fixed = TINY_CPU.fixed_ms + probe_step_ms
        b = _bisect(lambda b: _median_tpot(specs, instances, _per_seq(fixed, b)) - target, 0.0, 50.0)
        cost, what = _per_seq(fixed, b), f"step +{probe_step_ms:.2f} ms (probe) and +{b:.3f} ms per sequence"
    stepped = dataclasses.replace(get_preset("tiny-cpu"), cost=cost, request_path_ms=0.0)
    path = float(np.median(live["ttft_s"]) - np.median(simulated(specs, instances, stepped)["ttft_s"])) * 1000
    return dataclasses.replace(stepped, request_path_ms=path), f"{what}, request path {path:.1f} ms"


def _scaled(k: float) -> CostModel:
    c = TINY_CPU
    return dataclasses.replace(
        c,
        fixed_ms=c.fixed_ms * k,
        prefill_ms_per_token=c.prefill_ms_per_token * k,
        decode_ms_per_seq=c.decode_ms_per_seq * k,
        decode_ms_per_context_token=c.decode_ms_per_context_token * k,
        weight_read_ms=c.weight_read_ms * k,
        prefill_attention_ms_per_pair=c.prefill_attention_ms_per_pair * k,
    )


def _per_seq(fixed_ms: float, per_seq_ms: float) -> CostModel:
    return dataclasses.replace(TINY_CPU, fixed_ms=fixed_ms, decode_ms_per_seq=TINY_CPU.decode_ms_per_seq + per_seq_ms)


def _median_tpot(specs: list[RequestSpec], instances: int, cost: CostModel) -> float:
    preset = dataclasses.replace(get_preset("tiny-cpu"), cost=cost, request_path_ms=0.0)
    return float(np.median(simulated(specs, instances, preset)["tpot_ms"]))


def _bisect(f: Callable[[float], float], lo: float, hi: float, steps: int = 30) -> float:
    """The root of an increasing ``f`` in [lo, hi] (an end when it has none there)."""
    if f(lo) >= 0:
        return lo
    if f(hi) <= 0:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def table(title: str, live: dict[str, list[float]], sim: dict[str, list[float]]) -> dict[str, float]:
    print(title)
    print(f"{'metric':<10} {'stat':>4} {'live':>10} {'sim':>10} {'sim/live':>9}")
    gaps: dict[str, float] = {}
    for metric in ("ttft_s", "tpot_ms", "e2e_s"):
        for q in (50, 99):
            a = float(np.percentile(live[metric], q))
            b = float(np.percentile(sim[metric], q))
            gaps[f"{metric} p{q}"] = b / a if a > 0 else float("nan")
            print(f"{metric:<10} p{q:<3} {a:>10.4f} {b:>10.4f} {gaps[f'{metric} p{q}']:>9.2f}")
    print("summary: sim/live " + ", ".join(f"{k} {v:.2f}" for k, v in gaps.items()), flush=True)
    return gaps


def run_live(
    args: argparse.Namespace, specs: list[RequestSpec], fit_specs: list[RequestSpec] | None
) -> tuple[dict[str, float] | None, dict[str, list[float]] | None, list[dict[str, list[float]]]]:
    """Start the live cluster; send the probe, the fit workload and the compared one (``--repeats`` times);
    write them to ``--json``."""
    settings = load_settings(
        overrides={
            "engine": {"kind": args.kind},
            "policy": {"dispatch_policy": "least_loaded", "migration_enabled": False},
            "observability": {"exporter": "none"},
        }
    )
    with local_cluster(settings, args.instances) as cluster:
        asyncio.run(wait_ready(cluster, args.instances, timeout_s=600))
        probed = asyncio.run(probe(cluster.url, args.probe)) if args.probe > 0 else None
        fit_live = asyncio.run(drive(cluster.url, fit_specs)) if fit_specs is not None else None
        lives = [asyncio.run(drive(cluster.url, specs)) for _ in range(args.repeats)]
    if args.json is not None:
        dump: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "specs": [[s.arrival, s.prompt_len, s.output_len] for s in specs],
            "fit_specs": [[s.arrival, s.prompt_len, s.output_len] for s in fit_specs] if fit_specs else None,
            "probe": probed,
            "fit_live": fit_live,
            "live": lives,
        }
        args.json.write_text(json.dumps(dump))
    return probed, fit_live, lives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--lengths", default="uniform:32:256")
    parser.add_argument("--seed", type=int, default=0, help="the workload compared")
    parser.add_argument(
        "--fit-seed", type=int, default=None, help="first run a workload of this seed and fit the two constants on it"
    )
    parser.add_argument("--kind", default="vllm", choices=["vllm", "sim"], help="live engine kind")
    parser.add_argument("--probe", type=int, default=0, help="lone requests measuring the serving constants (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="live runs of the compared workload (spread)")
    parser.add_argument("--json", type=Path, default=None, help="write the live measurements here")
    parser.add_argument("--from-json", type=Path, default=None, help="compare from a --json file (no live run)")
    parser.add_argument("--fit-mode", default="step", choices=["step", "scale", "seq"], help="serving model fitted")
    parser.add_argument("--plot", type=Path, default=None, help="write TTFT, TPOT and E2E CDFs (PNG) here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    def workload(seed: int) -> list[RequestSpec]:
        return build_workload(
            WorkloadSpec(kind="poisson", rate=args.rate, lengths=args.lengths, requests=args.requests, seed=seed)
        )

    if args.fit_mode == "seq" and not args.probe and args.from_json is None:
        parser.error("--fit-mode seq needs --probe N (the per-step constant comes from lone requests)")
    if args.from_json is not None:
        dump: dict[str, Any] = json.loads(args.from_json.read_text())
        for key in ("requests", "rate", "instances", "lengths", "seed", "fit_seed", "probe"):
            setattr(args, key, dump["args"][key])
        specs = [RequestSpec(f"req-{i}", *row) for i, row in enumerate(dump["specs"])]
        fit_rows = dump["fit_specs"]
        fit_specs = [RequestSpec(f"req-{i}", *row) for i, row in enumerate(fit_rows)] if fit_rows else None
        probed, fit_live, lives = dump["probe"], dump["fit_live"], dump["live"]
        if args.fit_mode == "seq" and probed is None:
            parser.error("--fit-mode seq needs a probe in the --from-json file")
    else:
        specs = workload(args.seed)
        fit_specs = workload(args.fit_seed) if args.fit_seed is not None else None
        probed, fit_live, lives = run_live(args, specs, fit_specs)
    live = lives[0]
    print(f"{len(specs)} requests, Poisson {args.rate}/s, lengths {args.lengths}, {args.instances} instances")
    if fit_live is not None:
        breakdown(f"fit workload (seed {args.fit_seed})", fit_live)
    for n, one_live in enumerate(lives):
        breakdown(f"compared workload (seed {args.seed}), repeat {n + 1}", one_live)
    if probed is not None:
        print(f"probe ({args.probe} lone requests, {PROBE_PROMPT}-token prompt, {PROBE_OUTPUT} tokens): "
              + ", ".join(f"{k} {v:.2f}" for k, v in probed.items()))  # fmt: skip
    table(f"seed {args.seed} against the bare forward pass (TINY_CPU, no request path):", live,
          simulated(specs, args.instances, bare_preset()))  # fmt: skip
    committed = get_preset("tiny-cpu")
    table(
        f"seed {args.seed} against tiny-cpu as committed (+{committed.cost_model.fixed_ms - TINY_CPU.fixed_ms:g} ms "
        f"a step, {committed.request_path_ms:g} ms request path):",
        live,
        simulated(specs, args.instances, committed),
    )
    if fit_specs is not None and fit_live is not None:
        probe_step = probed["step_overhead_ms"] if probed else 0.0
        preset, what = fit(fit_specs, fit_live, args.instances, args.fit_mode, probe_step)
        print(f"fitted on seed {args.fit_seed} ({args.fit_mode}): {what}")
        fitted = simulated(specs, args.instances, preset)
        table(f"seed {args.seed} against the constants fitted on seed {args.fit_seed}:", live, fitted)
        if len(lives) > 1:
            spread(lives, fitted, f"the constants fitted on seed {args.fit_seed}")
    else:
        fitted = None
    as_committed = simulated(specs, args.instances, committed)
    if len(lives) > 1:
        spread(lives, as_committed, "tiny-cpu as committed")
    if args.plot is not None:
        from scripts.plotting import cdf_plot  # matplotlib only when plotting

        for metric, unit in (("ttft_s", "s"), ("tpot_ms", "ms"), ("e2e_s", "s")):
            series = {f"live, repeat {n + 1}": one[metric] for n, one in enumerate(lives)}
            series["sim, tiny-cpu as committed"] = as_committed[metric]
            if fitted is not None:
                series[f"sim, fitted on seed {args.fit_seed} ({args.fit_mode})"] = fitted[metric]
            name = metric.rsplit("_", 1)[0].upper()
            cdf_plot(args.plot, f"calibration_{metric}", series, xlabel=f"{name} ({unit})",
                     title=f"{name}: live vLLM-CPU against the simulator, seed {args.seed}", log_x=True)  # fmt: skip


def spread(lives: list[dict[str, list[float]]], sim: dict[str, list[float]], what: str) -> None:
    """Each live repeat's percentiles and sim/live gap, and their range over the repeats."""
    print(f"{len(lives)} live repeats of the compared workload against {what}:")
    print(f"{'metric':<10} {'stat':>4} {'sim':>10} {'live per repeat':>30} {'live max/min':>12} {'sim/live range':>16}")
    for metric in ("ttft_s", "tpot_ms", "e2e_s"):
        for q in (50, 99):
            b = float(np.percentile(sim[metric], q))
            values = [float(np.percentile(live[metric], q)) for live in lives]
            gaps = [b / a if a > 0 else float("nan") for a in values]
            cells = " ".join(f"{v:.4f}" for v in values)
            print(
                f"{metric:<10} p{q:<3} {b:>10.4f} {cells:>30} {max(values) / min(values):>12.2f} "
                f"{min(gaps):>7.2f}-{max(gaps):<7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
