"""`drover sim run|presets|convert|plan`: the cluster simulator as a what-if tool (capacity planning before buying
GPUs). Pure computation in virtual time: no NATS, no engines.

Conventions (the operators' CLI rules, control/apps/cli_common.py): every error is one line on stderr,
``drover: error: ...``, with exit code 2, whether the parser catches it (an unknown choice, a non-number) or
the simulator does (:func:`one_line_errors`); `--help` shows each option's default and choices; `--json`
prints only JSON lines on stdout (one object per policy), progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import typer
from rich.console import Console
from rich.table import Table

from control.apps import cli_common

if TYPE_CHECKING:
    from control.simulator.workload import RequestSpec

sim_app = typer.Typer(
    help="Simulate a cluster in virtual time: what-if runs, presets, trace conversion, capacity planning.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


# A user-facing error: one line, exit code 2 (the shared CLI convention, control/apps/cli_common.py).
CliError = cli_common.CliError

# Choices the parser checks and `--help` lists (typer reads Literal types as choices). The preset names are
# spelled out here rather than read from control.simulator.presets so that `drover --help` does not import
# the simulator (numpy and all); tests/control/simulator/test_sim_cli.py keeps the two lists equal.
Workload = Literal["poisson", "gamma"]
Autoscaler = Literal["fixed", "chiron", "threshold"]
PresetName = Literal[
    "llama7b-a10",
    "llama30b-4xa10",
    "qwen2.5-7b-a10",
    "llama2-13b-a800",
    "llama7b-a100",
    "chiron-llama3.1-8b-a100",
    "kunserve-llama7b-a100-40g",
    "llama3-8b-h200",
    "tiny-cpu",
]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)


def one_line_errors(func: F) -> F:
    """The simulator's ValueErrors (bad input it found) become :class:`CliError`, which the root app prints
    as one ``drover: error:`` line with exit code 2; other errors (a file that cannot be read) reach the
    same boundary unchanged."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValueError as exc:
            raise CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    return wrapper  # type: ignore[return-value]


def _progress(message: str, quiet: bool = False) -> None:
    if not quiet:
        err.print(message, markup=False, highlight=False, soft_wrap=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


POLICY_HELP = (
    "Policies, comma-separated: round_robin, least_loaded (alias infaas++), llumnix, prefix_affinity, kv_aware, "
    "queue_size, drover (the recommended default)."
)

# The workload options `run` and `plan` share, declared once.
TRACE_OPT = typer.Option(
    None, "--trace", help="Trace CSV: timestamp,input_tokens,output_tokens[,hash_ids] (see traces/README.md)."
)
WORKLOAD_OPT = typer.Option(None, "--workload", help="Generated arrivals (instead of --trace).")
RATE_OPT = typer.Option(None, "--rate", help="Generated: mean requests per second.")
CV_OPT = typer.Option(None, "--cv", help="Gamma arrivals' coefficient of variation (default: 2).")
LENGTHS_OPT = typer.Option(None, "--lengths", help="Generated lengths: zipf:MEAN:MAX, uniform:LO:HI or fixed:IN:OUT.")
REQUESTS_OPT = typer.Option(None, "--requests", min=1, help="Generated: how many requests (trace: a cap).")
COMPRESSION_OPT = typer.Option(1.0, "--compression", help="Replay time compression (2 = twice as fast).")
DURATION_OPT = typer.Option(
    None, "--duration", help="Seconds of arrivals, trace seconds before compression (default: all)."
)
SEED_OPT = typer.Option(0, "--seed", help="Seeds generated arrivals/lengths, or a trace window's offset.")
HASH_BLOCK_OPT = typer.Option(
    512, "--hash-block-tokens", min=1, help="Tokens per prefix block of the trace's hash_ids."
)
MAX_MODEL_LEN_OPT = typer.Option(
    None, "--max-model-len", min=1, help="Context length (default: the preset's); longer prompts are rejected."
)


def _workload(
    trace: Path | None,
    workload: str | None,
    rate: float | None,
    cv: float | None,
    lengths: str | None,
    requests: int | None,
    compression: float,
    duration: float | None,
    seed: int,
    hash_block_tokens: int,
) -> list[RequestSpec]:
    """The requests the workload options describe (a trace window or a generated workload); never empty."""
    from control.simulator.runner import WorkloadSpec, build_workload

    spec = WorkloadSpec(
        trace=trace,
        kind=workload,
        rate=rate,
        cv=cv,
        lengths=lengths,
        requests=requests,
        compression=compression,
        duration=duration,
        seed=seed,
        hash_block_tokens=hash_block_tokens,
    )
    specs = build_workload(spec)
    if not specs:
        raise CliError("the workload is empty (check --duration and the trace)")
    return specs


@sim_app.command("run")
@one_line_errors
def run(
    trace: Path | None = TRACE_OPT,
    workload: Workload | None = WORKLOAD_OPT,
    rate: float | None = RATE_OPT,
    cv: float | None = CV_OPT,
    lengths: str | None = LENGTHS_OPT,
    requests: int | None = REQUESTS_OPT,
    compression: float = COMPRESSION_OPT,
    duration: float | None = DURATION_OPT,
    instances: int | None = typer.Option(
        None, "--instances", "-n", min=1, help="Instances (initial fleet when autoscaled); required."
    ),
    policy: str | None = typer.Option(None, "--policy", help=POLICY_HELP + " Required."),
    preset: PresetName = typer.Option("llama7b-a10", "--preset", help="Hardware x model (`drover sim presets`)."),
    max_model_len: int | None = MAX_MODEL_LEN_OPT,
    slo_ttft_s: float = typer.Option(2.0, "--slo-ttft-s", help="TTFT SLO, seconds."),
    slo_tpot_ms: float = typer.Option(100.0, "--slo-tpot-ms", help="Per-request TPOT SLO, milliseconds."),
    autoscaler: Autoscaler = typer.Option("fixed", "--autoscaler", help="Fleet sizing (threshold: Llumnix's)."),
    kunserve: bool = typer.Option(False, "--kunserve", help="KunServe parameter drop under memory pressure."),
    seed: int = SEED_OPT,
    as_json: bool = typer.Option(False, "--json", help="Only JSON lines on stdout, one object per policy."),
    out_csv: Path | None = typer.Option(None, "--out", help="Write one row per request (all policies) here."),
    plot: Path | None = typer.Option(None, "--plot", help="Write TTFT and TPOT CDF plots (PNG) into this folder."),
    hash_block_tokens: int = HASH_BLOCK_OPT,
) -> None:
    """Run a workload through a simulated cluster under one or more policies; print the headline numbers."""
    from control.policy.recommended import canonical_policy, user_policy_params
    from control.simulator.presets import get_preset
    from control.simulator.runner import RunOptions, run_policy
    from control.simulator.workload import describe

    if instances is None:
        raise CliError("--instances N is required")
    if not policy:
        raise CliError(f"--policy is required. {POLICY_HELP}")
    policies = [canonical_policy(p) for p in policy.split(",") if p.strip()]
    if not policies:
        raise CliError(f"--policy is empty. {POLICY_HELP}")
    for name in policies:
        user_policy_params(name)  # unknown or unregistered: fail before any run
    options = RunOptions(
        preset=get_preset(preset),
        instances=instances,
        max_model_len=max_model_len,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_ms=slo_tpot_ms,
        autoscaler=autoscaler,
        kunserve=kunserve,
        seed=seed,
    )
    options.validate()
    specs = _workload(trace, workload, rate, cv, lengths, requests, compression, duration, seed, hash_block_tokens)
    _progress(f"workload: {describe(specs)}; preset {options.preset.name}, {instances} instances")
    rows: list[dict[str, Any]] = []
    per_request: list[dict[str, Any]] = []
    ttfts: dict[str, list[float]] = {}
    for name in policies:
        _progress(f"running {name} ...")
        result = run_policy(name, specs, options)
        rows.append(result.row)
        per_request.extend(result.requests)
        ttfts[name] = result.ttfts
        speed = result.row.get("speed_x")
        _progress(f"{name}: done in {result.row['wall_s']:.1f} s" + (f" ({speed:.0f}x real time)" if speed else ""))
        if as_json:
            sys.stdout.write(json.dumps(result.row) + "\n")
            sys.stdout.flush()
    if out_csv is not None:
        _write_requests(out_csv, per_request)
        _progress(f"requests: {out_csv}")
    if plot is not None:
        _plot(plot, ttfts, per_request)
    if not as_json:
        out.print(_table(rows))


def _write_requests(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise CliError("--out: no per-request rows (KunServe mode records none)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(directory: Path, ttfts: dict[str, list[float]], per_request: list[dict[str, Any]]) -> None:
    try:
        from scripts.plotting import cdf_plot
    except ImportError as exc:  # matplotlib is in the dev extras
        raise CliError(f"--plot needs matplotlib (pip install 'drover[dev]'): {exc}") from None
    tpots: dict[str, list[float]] = {}
    for row in per_request:
        if row["tpot_ms"] is not None:
            tpots.setdefault(row["policy"], []).append(row["tpot_ms"])
    with contextlib.redirect_stdout(sys.stderr):  # plotting prints paths; stdout stays JSON-only
        cdf_plot(directory, "ttft_cdf", ttfts, xlabel="TTFT (s)", title="time to first token", log_x=True)
        if tpots:
            cdf_plot(directory, "tpot_cdf", tpots, xlabel="TPOT (ms)", title="time per output token")


def _table(rows: list[dict[str, Any]]) -> Table:
    """Metrics down, policies across: fits 80 columns for a handful of policies."""
    table = Table(title="drover sim run")
    table.add_column("metric", no_wrap=True)
    for row in rows:
        table.add_column(str(row["policy"]), justify="right")
    metrics = [
        ("completed / submitted", lambda r: f"{r['completed']}/{r['submitted']}"),
        ("rejected / unfinished", lambda r: f"{r['rejected']}/{r['unfinished']}"),
        ("TTFT p50 / p99 s", lambda r: f"{_fmt(r['ttft_p50_s'])} / {_fmt(r['ttft_p99_s'])}"),
        ("TPOT p50 / p99 ms", lambda r: f"{_fmt(r['tpot_p50_ms'])} / {_fmt(r['tpot_p99_ms'])}"),
        ("ITL p99 ms", lambda r: _fmt(r["itl_p99_ms"])),
        ("E2E p99 s", lambda r: _fmt(r["e2e_p99_s"])),
        ("SLO attainment", lambda r: _fmt(r["slo_attainment"])),
        ("preemptions", lambda r: _fmt(r["preemptions"])),
        ("recomputed tokens", lambda r: _fmt(r.get("recomputed_tokens"))),
        ("migrations", lambda r: _fmt(r["migrations"])),
        ("KV usage / batch occupancy", lambda r: f"{_fmt(r.get('kv_usage'), 2)} / {_fmt(r.get('batch_occupancy'), 2)}"),
        ("instance-seconds", lambda r: _fmt(r["instance_seconds"])),
        ("wall s (x real time)", lambda r: f"{r['wall_s']:.1f} ({_fmt(r.get('speed_x'))})"),
    ]
    for label, get in metrics:
        table.add_row(label, *(get(row) for row in rows))
    return table


@sim_app.command("presets")
@one_line_errors
def presets(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show each preset's derivation and sources."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one per preset."),
) -> None:
    """List the hardware x model presets with their KV capacity and context."""
    from control.simulator.presets import DEFAULT_PRESET, PRESETS

    if as_json:
        for p in PRESETS.values():
            row = {
                "name": p.name,
                "model": p.model.name,
                "gpu": p.gpu.name,
                "tensor_parallel": p.tp,
                "kv_blocks": p.num_blocks,
                "block_size": p.block_size,
                "kv_tokens": p.kv_tokens,
                "max_model_len": p.max_model_len,
                "migration_gbps": p.migration_bandwidth / 1e9,
                "default": p.name == DEFAULT_PRESET,
                "summary": p.summary,
            }
            sys.stdout.write(json.dumps(row) + "\n")
        return
    if verbose:
        for p in PRESETS.values():
            out.print(p.describe(), markup=False, highlight=False)
            out.print()
        return
    table = Table(title=f"simulator presets (default {DEFAULT_PRESET})")
    table.add_column("name", no_wrap=True)
    for column in ("GPU", "KV blocks", "KV tokens", "context", "decode ms"):
        table.add_column(column, overflow="fold")
    for p in PRESETS.values():
        gpu = f"{p.tp} x {p.gpu.name}" if p.tp > 1 else p.gpu.name
        decode = p.cost_model.step_ms(0, 1, 1024)
        table.add_row(
            p.name,
            gpu,
            f"{p.num_blocks:,}",
            f"{p.kv_tokens:,}",
            f"{p.max_model_len:,}",
            f"{decode:.1f}",
        )
    out.print(table)
    out.print("decode ms: one decode step of one 1k-token sequence. Derivations: drover sim presets --verbose")


@sim_app.command("convert")
@one_line_errors
def convert_cmd(
    source: Path = typer.Argument(..., help="Mooncake JSONL, Azure LLM trace CSV or BurstGPT CSV."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write the CSV (default: stdout)."),
    fmt: str = typer.Option("auto", "--format", help="auto, mooncake, azure or burstgpt."),
    model: str | None = typer.Option(None, "--model", help="BurstGPT: keep only this Model column (e.g. ChatGPT)."),
) -> None:
    """Convert a public trace to `timestamp,input_tokens,output_tokens[,hash_ids]`."""
    from control.simulator.convert import convert

    if output is None:
        report = convert(source, sys.stdout, fmt.lower(), model=model)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", newline="") as handle:
            report = convert(source, handle, fmt.lower(), model=model)
    _progress(
        f"{report.format}: {report.rows} rows over {report.duration_s:.1f} s"
        + (f", {report.dropped} dropped (0 tokens)" if report.dropped else "")
        + (", hash_ids kept" if report.has_hashes else "")
        + (f" -> {output}" if output else "")
    )


@sim_app.command("plan")
@one_line_errors
def plan_cmd(
    trace: Path | None = TRACE_OPT,
    workload: Workload | None = WORKLOAD_OPT,
    rate: float | None = RATE_OPT,
    cv: float | None = CV_OPT,
    lengths: str | None = LENGTHS_OPT,
    requests: int | None = REQUESTS_OPT,
    compression: float = COMPRESSION_OPT,
    duration: float | None = DURATION_OPT,
    slo_ttft_s: float | None = typer.Option(None, "--slo-ttft-s", help="TTFT SLO, seconds; required."),
    slo_tpot_ms: float | None = typer.Option(None, "--slo-tpot-ms", help="TPOT SLO, milliseconds; required."),
    target: float = typer.Option(0.99, "--target", min=0.0, max=1.0, help="SLO attainment to reach (fraction)."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help=f"Presets to plan for, comma-separated: {', '.join(PRESET_NAMES)} (default: every GPU preset).",
    ),
    policy: str = typer.Option("drover", "--policy", help=POLICY_HELP.replace("comma-separated", "one")),
    max_instances: int = typer.Option(256, "--max-instances", min=1, help="Give up above this many instances."),
    max_model_len: int | None = MAX_MODEL_LEN_OPT,
    seed: int = SEED_OPT,
    as_json: bool = typer.Option(False, "--json", help="Only JSON lines on stdout, one per preset."),
    hash_block_tokens: int = HASH_BLOCK_OPT,
) -> None:
    """The fewest instances (and instance-hours) per preset that meet the SLOs on the workload."""
    from control.policy.recommended import canonical_policy, user_policy_params
    from control.simulator.plan import fmt_hours, plan_capacity
    from control.simulator.presets import PRESETS, get_preset

    if slo_ttft_s is None or slo_tpot_ms is None:
        raise CliError("--slo-ttft-s and --slo-tpot-ms are required")
    if slo_ttft_s <= 0 or slo_tpot_ms <= 0:
        raise CliError("--slo-ttft-s and --slo-tpot-ms must be > 0")
    name = canonical_policy(policy)
    user_policy_params(name)
    chosen = (
        [get_preset(p) for p in preset.split(",") if p.strip()]
        if preset
        else [p for p in PRESETS.values() if p.gpu.name != "cpu"]
    )
    specs = _workload(trace, workload, rate, cv, lengths, requests, compression, duration, seed, hash_block_tokens)
    results = []
    for p in chosen:
        if (max_model_len or p.max_model_len) > p.kv_tokens:
            raise CliError(f"--max-model-len exceeds preset {p.name}'s KV capacity of {p.kv_tokens} tokens")
        result = plan_capacity(
            specs,
            p,
            policy=name,
            slo_ttft_s=slo_ttft_s,
            slo_tpot_ms=slo_tpot_ms,
            target=target,
            max_instances=max_instances,
            max_model_len=max_model_len,
            progress=_progress,
        )
        results.append(result)
        if as_json:
            sys.stdout.write(json.dumps(result.row()) + "\n")
            sys.stdout.flush()
    if as_json:
        return
    table = Table(title=f"capacity plan: {name}, SLO TTFT {slo_ttft_s} s / TPOT {slo_tpot_ms} ms at {target:.0%}")
    for column in ("preset", "instances", "instance-hours", "SLO attainment", "note"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.preset, _fmt(r.instances), fmt_hours(r.instance_hours), _fmt(r.slo_attainment), r.reason)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app, name="sim")
