"""What ``drover sim run`` does, as plain functions: build a workload, run it per policy, summarise.

* :func:`build_workload` turns a :class:`WorkloadSpec` (a trace, or a generated Poisson/Gamma workload) into
  requests. ``duration`` counts trace seconds before compression; with a trace and a ``duration`` shorter
  than it, seed 0 takes the window at the start and any other seed a window at a seeded offset (the spread
  over seeds). Prompts are never truncated: one longer than the context is rejected by the engine, counted.
* :func:`run_policy` runs one policy on a preset (a fixed fleet, or an autoscaled one: ``chiron`` = Drover's
  hierarchical autoscaler with class-aware dispatch, ``threshold`` = Llumnix's; or the memory simulator in
  KunServe mode) and returns a :class:`PolicyRun`: the JSON row (:data:`ROW_KEYS` at least) and one row per
  request for ``--out``.

Row definitions: percentiles over completed requests; TTFT = arrival to first token; TPOT per request =
(last token - first token) / (output tokens - 1); ITL = every gap between consecutive tokens of a request
(a multi-step decode run's gaps are its mean step); rejected and unfinished requests miss the SLO;
``slo_attainment`` = requests meeting TTFT ≤ ``slo_ttft_s`` and TPOT ≤ ``slo_tpot_ms`` / submitted;
``kv_usage`` and ``batch_occupancy`` = time averages (sampled every scheduler tick) over serving instances
of used KV blocks / blocks and running requests / ``max_num_seqs``; ``busy_fraction`` = the old
"utilisation" (time with any work).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from control import gc_tuning
from control.policy.autoscaling import PerRole, SloParams
from control.policy.recommended import canonical_policy, user_policy_params
from control.simulator.cluster import ClusterConfig, ClusterSimulator
from control.simulator.elastic import ElasticConfig, ElasticSimulator
from control.simulator.hardware import Hardware
from control.simulator.memory import MemSimConfig, MemSimResult
from control.simulator.memory import simulate as simulate_memory
from control.simulator.metrics import RequestMetrics, SimulationResult
from control.simulator.prefix import PrefixClusterSimulator, PrefixTrace
from control.simulator.presets import GIB, Preset
from control.simulator.step_budget import with_slo_step_budget
from control.simulator.traces import TRACES_DIR, resolve_trace
from control.simulator.workload import LengthSpec, RequestSpec, arrival_times, load_trace
from engines.sim.core import SimOutput

SCHEMA_VERSION = 1
ROW_KEYS: tuple[str, ...] = (
    "schema_version",
    "policy",
    "preset",
    "instances",
    "seed",
    "submitted",
    "completed",
    "rejected",
    "unfinished",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "itl_p99_ms",
    "e2e_p99_s",
    "preemptions",
    "migrations",
    "instance_seconds",
    "slo_attainment",
    "wall_s",
)
_SLO = SloParams()
AUTOSCALERS = ("fixed", "chiron", "threshold")
WORKLOADS = ("poisson", "gamma")


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A trace (``trace``) or a generated workload (``kind`` poisson|gamma, ``rate``, ``lengths``, ``requests``)."""

    trace: Path | None = None
    kind: str | None = None
    rate: float | None = None
    cv: float | None = None
    lengths: str | None = None
    requests: int | None = None
    compression: float = 1.0
    duration: float | None = None
    seed: int = 0
    hash_block_tokens: int = 512

    def validate(self) -> None:
        if (self.trace is None) == (self.kind is None):
            raise ValueError("give either --trace FILE.csv or --workload poisson|gamma")
        if self.compression <= 0:
            raise ValueError("--compression must be > 0")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.hash_block_tokens < 1:
            raise ValueError("--hash-block-tokens must be >= 1")
        if self.trace is not None:
            if not resolve_trace(self.trace).is_file():
                raise ValueError(f"trace {self.trace} not found (nor in {TRACES_DIR})")
            return
        if self.kind not in WORKLOADS:
            raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.kind!r}")
        if self.rate is None or self.rate <= 0:
            raise ValueError("--workload needs --rate R > 0 (requests per second)")
        if self.lengths is None:
            raise ValueError("--workload needs --lengths zipf:MEAN:MAX|uniform:LO:HI|fixed:IN:OUT")
        if self.requests is None and self.duration is None:
            raise ValueError("--workload needs --requests N (or --duration S)")
        if self.kind == "poisson" and self.cv is not None and self.cv != 1.0:
            raise ValueError("--cv is for --workload gamma (Poisson arrivals have CV 1)")
        if self.cv is not None and self.cv <= 0:
            raise ValueError("--cv must be > 0")
        parse_lengths(self.lengths)


def parse_lengths(text: str) -> tuple[LengthSpec, LengthSpec]:
    """``zipf:MEAN:MAX`` (prompt and output each Llumnix's power law of that mean, capped), ``uniform:LO:HI``
    (both uniform), ``fixed:IN:OUT``. ValueError with the expected form otherwise."""
    form = "--lengths must be zipf:MEAN:MAX, uniform:LO:HI or fixed:IN:OUT"
    parts = text.strip().lower().split(":")
    if len(parts) != 3:
        raise ValueError(f"{form}, got {text!r}")
    kind, a, b = parts
    try:
        if kind == "zipf":
            mean, cap = float(a), int(b)
            if not 1.0 <= mean <= (cap + 1) / 2:
                raise ValueError(f"zipf MEAN must lie in [1, (MAX+1)/2] = [1, {(cap + 1) / 2:g}]")
            spec = LengthSpec.zipf(mean, cap)
            return spec, spec
        lo, hi = int(a), int(b)
    except ValueError as exc:
        if "zipf MEAN" in str(exc):
            raise ValueError(f"--lengths {text!r}: {exc}") from None
        raise ValueError(f"{form}, got {text!r}") from None
    if lo < 1 or hi < 1:
        raise ValueError(f"--lengths {text!r}: lengths must be >= 1")
    if kind == "uniform":
        if lo > hi:
            raise ValueError(f"--lengths {text!r}: LO must be <= HI")
        spec = LengthSpec.uniform(lo, hi)
        return spec, spec
    if kind == "fixed":
        return LengthSpec.fixed(lo), LengthSpec.fixed(hi)
    raise ValueError(f"{form}, got {text!r}")


def trace_span(path: Path) -> float:
    """Last timestamp of a trace CSV (seconds)."""
    last = 0.0
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            last = float(row["timestamp"])
    return last


def build_workload(spec: WorkloadSpec) -> list[RequestSpec]:
    """The requests of ``spec`` (validated first), in arrival order."""
    spec.validate()
    if spec.trace is not None:
        path = resolve_trace(spec.trace)
        start = 0.0
        if spec.duration is not None and spec.seed != 0:
            span = trace_span(path)
            if span > spec.duration:
                start = float(np.random.default_rng(spec.seed).uniform(0.0, span - spec.duration))
        return load_trace(
            path,
            time_compression=spec.compression,
            start=start,
            duration=spec.duration,
            limit=spec.requests,
            hash_block_tokens=spec.hash_block_tokens,
        )
    assert spec.rate is not None and spec.lengths is not None and spec.kind is not None
    prompt, output = parse_lengths(spec.lengths)
    rng = np.random.default_rng(spec.seed)
    cv = 1.0 if spec.kind == "poisson" else (spec.cv if spec.cv is not None else 2.0)
    n = spec.requests
    if n is None:  # enough arrivals to cover the duration, cut below
        assert spec.duration is not None
        n = int(spec.duration * spec.rate * 1.5) + 16
    times = arrival_times(n, spec.rate, rng, cv=cv)
    prompts, outputs = prompt.sample(n, rng), output.sample(n, rng)
    specs = []
    for i in range(n):
        t = float(times[i])
        if spec.duration is not None and t >= spec.duration:
            break
        specs.append(RequestSpec(f"req-{i}", t / spec.compression, int(prompts[i]), int(outputs[i])))
    return specs


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything but the policy and the workload."""

    preset: Preset
    instances: int
    max_model_len: int | None = None
    slo_ttft_s: float = _SLO.ttft_s
    slo_tpot_ms: float = _SLO.itl_s * 1000
    autoscaler: str = "fixed"
    kunserve: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.instances < 1:
            raise ValueError("--instances must be >= 1")
        if self.autoscaler not in AUTOSCALERS:
            raise ValueError(f"--autoscaler must be one of {', '.join(AUTOSCALERS)}, got {self.autoscaler!r}")
        if self.kunserve and self.autoscaler != "fixed":
            raise ValueError("--kunserve runs a fixed fleet; drop --autoscaler")
        if self.slo_ttft_s <= 0 or self.slo_tpot_ms <= 0:
            raise ValueError("--slo-ttft-s and --slo-tpot-ms must be > 0")
        mml = self.max_model_len or self.preset.max_model_len
        if mml < 2:
            raise ValueError("--max-model-len must be >= 2")
        if mml > self.preset.kv_tokens:
            # vLLM refuses to start when one sequence of max_model_len cannot fit the KV cache
            raise ValueError(
                f"--max-model-len {mml} exceeds preset {self.preset.name}'s KV capacity of "
                f"{self.preset.kv_tokens} tokens (vLLM would refuse to start)"
            )


@dataclass(slots=True)
class PolicyRun:
    row: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


class _Observer:
    """Mixin for the cluster simulators: per-token gaps (ITL) and time-averaged KV usage and occupancy."""

    instances: list[Any]
    _live: list[int]
    now: float

    def _observe_init(self) -> None:
        self.gaps: list[float] = []
        self.gap_weights: list[int] = []
        self._last_token: dict[str, tuple[float, int]] = {}  # request -> (time, tokens) of its last output
        self.kv_area = self.occupancy_area = self.sampled_s = 0.0
        self._last_sample = 0.0

    def _on_outputs(self, inst: Any, outputs: list[SimOutput]) -> None:
        # Token counts come from the request, not ``new_tokens``: a multi-step run materialised part-way (a
        # tick, a dispatch) has produced tokens that its final output does not count again.
        now = self.now
        last = self._last_token
        for out in outputs:
            request = out.request
            rid = request.request_id
            if out.first:
                before = last.get(rid)
                t0, n0 = (request.first_token_time, 1) if before is None else before
            else:
                t0, n0 = last[rid]
            tokens = request.num_output - n0
            if tokens > 0:
                self.gaps.append((now - t0) / tokens)
                self.gap_weights.append(tokens)
            if out.finished:
                last.pop(rid, None)
            else:
                last[rid] = (now, request.num_output)
        super()._on_outputs(inst, outputs)  # type: ignore[misc]

    def _after_tick(self) -> None:
        dt = self.now - self._last_sample
        if dt > 0 and self._live:
            kv = occ = 0.0
            for index in self._live:
                core = self.instances[index].core
                kv += core.allocated_blocks / core.config.num_blocks
                occ += len(core.running) / core.config.max_num_seqs
            n = len(self._live)
            self.kv_area += dt * kv / n
            self.occupancy_area += dt * occ / n
            self.sampled_s += dt
        self._last_sample = self.now
        super()._after_tick()  # type: ignore[misc]


class ObservedCluster(_Observer, ClusterSimulator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observe_init()


class ObservedElastic(_Observer, ElasticSimulator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observe_init()


class ObservedPrefixCluster(_Observer, PrefixClusterSimulator):
    """The prefix-caching simulator (engines with vLLM's prefix cache, a prefix index fed by their events)
    with the same observations (per-token gaps) as :class:`ObservedCluster`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observe_init()


def _pct(values: Sequence[float], q: float, scale: float = 1.0) -> float | None:
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) * scale


def weighted_percentile(values: Sequence[float], weights: Sequence[int], q: float) -> float | None:
    if not values:
        return None
    order = np.argsort(np.asarray(values))
    v = np.asarray(values)[order]
    w = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(v[min(len(v) - 1, int(np.searchsorted(w, q / 100 * w[-1])))])


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def memsim_hardware(preset: Preset) -> Hardware:
    """The memory simulator's view of a preset (weights and KV in one budget)."""
    budget = preset.gpu.memory_bytes * preset.gpu_memory_utilization * preset.tp
    budget -= preset.tp * preset.activation_reserve_bytes
    return Hardware(
        name=preset.name,
        num_layers=preset.model.layers,
        weight_bytes=preset.model.weight_bytes,
        kv_bytes_per_token=preset.kv_bytes_per_token,
        activation_bytes_per_token=preset.model.hidden * 2,
        budget_bytes=int(budget) if budget > 0 else int(GIB),
        block_size=preset.block_size,
        pcie_bytes_per_s=25e9,  # PCIe 4.0 x16 pinned copies (control/simulator/hardware.py)
        interconnect_bytes_per_s=preset.migration_bandwidth,
        hop_latency_ms=0.05,
        cost=preset.cost_model,
    )


def run_policy(policy: str, workload: Sequence[RequestSpec], options: RunOptions) -> PolicyRun:
    """One policy on ``workload`` under ``options`` (see the module docstring)."""
    options.validate()
    name = canonical_policy(policy)
    params = user_policy_params(name)
    if params.queue_ttft_slo_s < 0:  # the goodput-first queue order reads the run's TTFT SLO
        params = dataclasses.replace(params, queue_ttft_slo_s=options.slo_ttft_s)
    preset = options.preset
    if options.kunserve:
        return _run_kunserve(name, workload, options)
    cluster = preset.cluster_config(options.instances, params, max_model_len=options.max_model_len)
    cluster = with_slo_step_budget(cluster, options.slo_tpot_ms / 1000)  # drover reads the run's TPOT SLO
    # the collector as a long-running service sets it (control/gc_tuning.py): the workload and the cluster's
    # set-up are frozen, young collections come 14x less often (`drover sim run` on the Azure trace with
    # least_loaded and drover: the process's young collections 436 -> 196, generation-1 39 -> 16, the rest
    # outside the runs; per-request results byte-identical)
    with gc_tuning.service_gc():
        return _run_fixed_or_elastic(name, workload, options, cluster)


def _run_fixed_or_elastic(
    name: str, workload: Sequence[RequestSpec], options: RunOptions, cluster: ClusterConfig
) -> PolicyRun:
    """``run_policy``'s run and summary, timed (its set-up and the collector's tuning are not)."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    sim: ObservedCluster | ObservedElastic | ObservedPrefixCluster
    if options.autoscaler == "fixed":
        sim = fixed_simulator(cluster, workload)
        result = sim.run()
        instance_seconds = options.instances * _horizon(result)
        extra: dict[str, Any] = {}
    else:
        if options.autoscaler == "chiron":
            config = ElasticConfig(
                cluster=cluster,
                dispatch="class_aware",
                scaling="hierarchical",
                initial=PerRole(options.instances, 0, 0),
            )
        else:
            config = ElasticConfig(
                cluster=cluster, dispatch="llumnix", scaling="threshold", initial=PerRole(0, options.instances, 0)
            )
        config.validate()
        sim = ObservedElastic(config, workload)
        elastic = sim.run_elastic()
        result = elastic.sim
        instance_seconds = elastic.instance_seconds
        extra = {"peak_instances": elastic.peak_instances, "mean_instances": elastic.mean_instances}
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    run = _summarise(name, workload, options, result, instance_seconds, wall, sim)
    run.row.update(extra)
    if isinstance(sim, ObservedPrefixCluster):  # an added key: the cluster's prefix-cache hit rate
        run.row["prefix_hit_rate"] = sim.prefix_summary().hit_rate
    # on a shared, oversubscribed machine wall time overstates the simulator's cost; CPU time does not
    run.row["cpu_s"] = cpu
    run.row["speed_cpu_x"] = result.virtual_s / cpu if cpu > 0 else None
    return run


def fixed_simulator(cluster: ClusterConfig, workload: Sequence[RequestSpec]) -> ObservedCluster | ObservedPrefixCluster:
    """A fixed fleet's simulator. A trace with prefix hashes (``hash_ids``) runs with vLLM's automatic prefix
    caching in every engine, as vLLM v1 serves by default, whatever the policy (so INFaaS++ and ``drover``
    are compared on the same caching); the policies that keep a prefix index are fed the engines' cache
    events, as live. Without hashes: the plain simulator."""
    first = next((s for s in workload if s.prefix_hashes), None)
    if first is None:
        return ObservedCluster(cluster, workload)
    hashes = {s.request_id: s.prefix_hashes for s in workload if s.prefix_hashes}
    return ObservedPrefixCluster(cluster, PrefixTrace(list(workload), hashes, first.prefix_block_tokens))


def _horizon(result: SimulationResult) -> float:
    finishes = [r.sim.finish_time for r in result.requests if r.done and r.sim is not None]
    return max(finishes) if finishes else result.virtual_s


def _status(record: RequestMetrics) -> str:
    if record.rejected:
        return "rejected"
    return "completed" if record.done else "unfinished"


def _summarise(
    policy: str,
    workload: Sequence[RequestSpec],
    options: RunOptions,
    result: SimulationResult,
    instance_seconds: float,
    wall: float,
    sim: ObservedCluster | ObservedElastic | ObservedPrefixCluster,
) -> PolicyRun:
    records = result.requests
    done = [r for r in records if r.done]
    path = options.preset.request_path_ms / 1000  # outside the engine: shifts TTFT and E2E (see Preset)
    ttft = [r.prefill + path for r in done]
    tpot = [d for r in done if (d := r.decode_per_token) is not None]
    e2e = [r.e2e + path for r in done]
    slo_ttft, slo_tpot = options.slo_ttft_s, options.slo_tpot_ms / 1000
    met = sum(1 for r in done if r.prefill + path <= slo_ttft and ((d := r.decode_per_token) is None or d <= slo_tpot))
    sims = [r.sim for r in records if r.sim is not None]
    submitted = len(workload)
    horizon = _horizon(result)
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "policy": policy,
        "preset": options.preset.name,
        "instances": options.instances,
        "seed": options.seed,
        "submitted": submitted,
        "completed": len(done),
        "rejected": result.rejected,
        "unfinished": result.unfinished,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50, 1000),
        "tpot_p99_ms": _pct(tpot, 99, 1000),
        "itl_p99_ms": _scale(weighted_percentile(sim.gaps, sim.gap_weights, 99), 1000),
        "e2e_p99_s": _pct(e2e, 99),
        "preemptions": result.preemptions,
        "migrations": result.migrations_committed,
        "instance_seconds": instance_seconds,
        "slo_attainment": met / submitted if submitted else None,
        "wall_s": wall,
        # beyond the stable keys
        "ttft_mean_s": float(np.mean(ttft)) if ttft else None,
        "tpot_mean_ms": float(np.mean(tpot)) * 1000 if tpot else None,
        "e2e_p50_s": _pct(e2e, 50),
        "itl_p50_ms": _scale(weighted_percentile(sim.gaps, sim.gap_weights, 50), 1000),
        "slo_ttft_s": options.slo_ttft_s,
        "slo_tpot_ms": options.slo_tpot_ms,
        "goodput_rps": met / horizon if horizon > 0 else None,
        "recomputed_tokens": result.recomputed_tokens,
        "preempted_requests": result.preempted_requests,
        "max_preemptions_per_request": max((s.num_preemptions for s in sims), default=0),
        "migrated_requests": sum(1 for r in records if r.migrations),
        "max_migrations_per_request": max((r.migrations for r in records), default=0),
        "migration_aborts": result.migrations_aborted,
        "kv_usage": sim.kv_area / sim.sampled_s if sim.sampled_s > 0 else None,
        "batch_occupancy": sim.occupancy_area / sim.sampled_s if sim.sampled_s > 0 else None,
        "busy_fraction": result.utilisation,
        "virtual_s": result.virtual_s,
        "speed_x": result.virtual_s / wall if wall > 0 else None,
        "autoscaler": options.autoscaler,
        "kunserve": False,
        "max_model_len": options.max_model_len or options.preset.max_model_len,
        "kv_blocks_per_instance": options.preset.num_blocks,
    }
    per_request = [
        {
            "policy": policy,
            "request_id": r.spec.request_id,
            "arrival_s": r.spec.arrival,
            "prompt_tokens": r.spec.prompt_len,
            "output_tokens": r.sim.num_output if r.sim is not None else 0,
            "status": _status(r),
            "ttft_s": r.prefill + path if r.done else None,
            "tpot_ms": (d * 1000 if (d := r.decode_per_token) is not None else None) if r.done else None,
            "e2e_s": r.e2e + path if r.done else None,
            "preemptions": r.sim.num_preemptions if r.sim is not None else 0,
            "recomputed_tokens": r.sim.recomputed_tokens if r.sim is not None else 0,
            "migrations": r.migrations,
            "instances": " ".join(str(i) for i in r.instances),
        }
        for r in records
    ]
    return PolicyRun({k: _finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}, per_request, ttft)


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _run_kunserve(policy: str, workload: Sequence[RequestSpec], options: RunOptions) -> PolicyRun:
    """The memory simulator in KunServe mode (parameter drop under memory pressure). Its dispatch is its own
    (Llumnix freeness), so every policy name gives the same run; TPOT per request is not recorded there."""
    preset = options.preset
    config = MemSimConfig(
        mode="kunserve",
        num_instances=options.instances,
        hardware=memsim_hardware(preset),
        max_num_seqs=preset.max_num_seqs,
        max_num_batched_tokens=preset.max_num_batched_tokens,
        max_model_len=options.max_model_len or preset.max_model_len,
    )
    started = time.perf_counter()
    result: MemSimResult = simulate_memory(config, list(workload))
    wall = time.perf_counter() - started
    submitted = len(workload)
    met = sum(1 for t in result.ttft if t <= options.slo_ttft_s)  # TTFT only: no per-request TPOT here
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "policy": policy,
        "preset": preset.name,
        "instances": options.instances,
        "seed": options.seed,
        "submitted": submitted,
        "completed": result.completed,
        "rejected": result.rejected,
        "unfinished": result.unfinished,
        "ttft_p50_s": _finite_or_none(result.ttft_p(50)),
        "ttft_p99_s": _finite_or_none(result.ttft_p(99)),
        "tpot_p50_ms": None,
        "tpot_p99_ms": None,
        "itl_p99_ms": _scale(_finite_or_none(result.tbt_p(99)), 1000),
        "e2e_p99_s": None,
        "preemptions": result.preemptions,
        "migrations": result.migrations,
        "instance_seconds": options.instances * result.makespan_s,
        "slo_attainment": met / submitted if submitted else None,
        "wall_s": wall,
        "recomputed_tokens": result.recomputed_tokens,
        "drops": result.drops,
        "restores": result.restores,
        "autoscaler": "fixed",
        "kunserve": True,
        "slo_note": "KunServe mode: SLO attainment counts TTFT only",
    }
    return PolicyRun(row, [], list(result.ttft))


def with_seed(spec: WorkloadSpec, seed: int) -> WorkloadSpec:
    return dataclasses.replace(spec, seed=seed)
