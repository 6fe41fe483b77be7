"""Presets of hardware x model for the simulator, each derived from first principles and measured data.

A preset fixes what decides a simulated cluster's behaviour under memory pressure: the KV capacity of an
instance (GPU memory x vLLM's ``gpu_memory_utilization`` - weights - activation reserve, in blocks), the
context length, the step-cost model and the bandwidth of a KV copy between instances. Every number is
computed here from the GPU's and the model's published specifications and, where it exists, from Vidur's
measured operator profiles (microsoft/vidur, MIT licence, MLSys 2024: ``data/profiling/compute/<gpu>/
<model>/mlp.csv`` and ``data/profiling/network/*/send_recv.csv``; read at commit 7d47513).

How the step cost is derived (:func:`derive_cost`; the form is :class:`engines.sim.cost_model.CostModel`):

* ``weight_read_ms``: the linear layers' time at 1-8 tokens (memory-bound). Measured by Vidur where the
  GPU and model were profiled (sum of the per-layer operator medians x layers); otherwise the weights'
  bytes / (HBM bandwidth x the bandwidth efficiency Vidur measured on the closest profiled GPU).
* ``prefill_ms_per_token`` = ``decode_ms_per_seq``: the linear layers' slope per token above ~512 tokens
  (compute-bound), Vidur's least-squares fit where profiled; otherwise 2 x parameters FLOPs per token /
  (peak FP16 tensor FLOPs x the FLOPs efficiency Vidur measured on the closest profiled GPU). A decode
  sequence is one token through the same layers.
* attention, from first principles (Vidur's public copy has no attention profiles: its ``attention.csv``
  files are empty): decode reads each context token's KV once, ``kv_bytes_per_token`` / (HBM bandwidth x
  the measured bandwidth efficiency); prefill does 4 x layers x (query heads x head dim) FLOPs per
  (query, key) pair at the measured FLOPs efficiency.
* tensor parallelism: weights, KV and FLOPs divide by the degree; each layer adds two all-reduces of the
  hidden state (2 x (tp-1)/tp x hidden x 2 bytes per token over the GPUs' link, plus a fixed latency).
* ``fixed_ms``: vLLM's per-step CPU work (scheduling, input preparation, sampling, kernel launches). Not
  in Vidur's public profiles; stand-in 2.5 ms (vLLM v1 with CUDA graphs), the same for every GPU preset.

KV capacity: blocks = ⌊(GPU memory x utilisation x tp - weights - tp x activation reserve) / block bytes⌋.
The reserve (activations at 2,048 batched tokens, CUDA graphs, allocator slack) is not published per
model; stand-in 1.5 GiB per GPU for 7-8B models and for 30B under 4-way tensor parallelism (activations
split across the GPUs), 2 GiB for 13B.
Precision is FP16/BF16 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from control.policy.params import PolicyParams
from control.simulator.cluster import ClusterConfig
from engines.sim.core import SimEngineConfig
from engines.sim.cost_model import TINY_CPU, CostModel

GIB = 1 << 30
VLLM_STEP_OVERHEAD_MS = 2.5
"""Per-step CPU work of vLLM v1 with CUDA graphs (stand-in: not in Vidur's public profiles)."""


@dataclass(frozen=True, slots=True)
class Gpu:
    """One accelerator's published specifications."""

    name: str
    memory_bytes: int  # what the driver reports as total
    hbm_bytes_per_s: float  # peak memory bandwidth
    fp16_flops: float  # peak dense FP16/BF16 tensor FLOPs
    tp_link_bytes_per_s: float  # between GPUs of one tensor-parallel instance (all-reduce)
    tp_link_latency_ms: float  # fixed cost of one all-reduce
    source: str


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A decoder-only transformer's shape (from its config.json)."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    context: int  # native max_position_embeddings

    @property
    def weight_bytes(self) -> int:
        return int(self.params * 2)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, FP16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


@dataclass(frozen=True, slots=True)
class Measured:
    """Vidur's measured linear-layer profile of a (GPU, model, tp) it profiled: the time at 1 token and the
    slope above 512 tokens (sum of per-layer operator medians x layers, ms)."""

    weight_read_ms: float
    ms_per_token: float
    source: str


# ---------------------------------------------------------------------------------------------- hardware
# Memory as nvidia-smi reports it; bandwidth and FLOPs from NVIDIA's data sheets (dense, no sparsity).
A10 = Gpu("a10", 23_028 << 20, 600e9, 125e12, 12e9, 0.03, "NVIDIA A10 data sheet: 24 GB GDDR6, 600 GB/s, 125 TF")
A40 = Gpu("a40", 46_068 << 20, 696e9, 149.7e12, 4.0e9, 0.03, "NVIDIA A40 data sheet: 48 GB GDDR6, 696 GB/s")
A100_80G = Gpu("a100", 81_920 << 20, 2.039e12, 312e12, 285e9, 0.02, "NVIDIA A100-80GB SXM: 2,039 GB/s, 312 TF")
A100_40G = Gpu("a100-40g", 40_960 << 20, 1.555e12, 312e12, 285e9, 0.02, "NVIDIA A100-40GB SXM: 1,555 GB/s")
A800_80G = Gpu("a800", 81_920 << 20, 2.039e12, 312e12, 200e9, 0.02, "A800: A100-80GB with NVLink cut to 400 GB/s")
H100 = Gpu("h100", 81_559 << 20, 3.35e12, 989e12, 285e9, 0.02, "NVIDIA H100 SXM: 3.35 TB/s, 989 TF")
H200 = Gpu("h200", 143_771 << 20, 4.8e12, 989e12, 285e9, 0.02, "NVIDIA H200 SXM: 141 GB HBM3e, 4.8 TB/s, 989 TF")

# Efficiencies Vidur measured (Llama-2-7B, tp 1): bandwidth = weight bytes / peak / t(1 token); FLOPs =
# 2·params / peak / slope. A100: 13.48 GB in 9.28 ms (71 %), 64.1 µs per token (67 %). A40 (GA102, the A10's
# die family): 23.94 ms (81 %), 123.6 µs per token (73 %). H100: 5.60 ms (72 %), 20.2 µs per token (67 %).
EFFICIENCY = {
    "a100": (0.71, 0.67),
    "a100-40g": (0.71, 0.67),
    "a800": (0.71, 0.67),
    "a40": (0.81, 0.73),
    "a10": (0.81, 0.73),  # no Vidur profile: the A40's, the same Ampere GA102 family
    "h100": (0.72, 0.67),
    "h200": (0.72, 0.67),  # no Vidur profile: the H100's, the same Hopper die with faster HBM
}

# ---------------------------------------------------------------------------------------------- models
LLAMA_7B = ModelShape("LLaMA-7B", 6.74e9, 32, 4096, 32, 128, 2048)
LLAMA_30B = ModelShape("LLaMA-30B", 32.5e9, 60, 6656, 52, 128, 2048)
QWEN25_7B = ModelShape("Qwen2.5-7B", 7.62e9, 28, 3584, 4, 128, 32768)
LLAMA2_13B = ModelShape("Llama-2-13B", 13.0e9, 40, 5120, 40, 128, 4096)
LLAMA3_8B = ModelShape("Llama-3.1-8B", 8.03e9, 32, 4096, 8, 128, 131072)

VIDUR = "microsoft/vidur data/profiling/compute"
MEASURED: dict[tuple[str, str, int], Measured] = {
    ("a100", "LLaMA-7B", 1): Measured(9.28, 0.0641, f"{VIDUR}/a100/meta-llama/Llama-2-7b-hf/mlp.csv"),
    ("a800", "LLaMA-7B", 1): Measured(9.28, 0.0641, f"{VIDUR}/a100/meta-llama/Llama-2-7b-hf (A800 = A100)"),
    ("a100-40g", "LLaMA-7B", 1): Measured(9.28, 0.0641, f"{VIDUR}/a100/meta-llama/Llama-2-7b-hf (same SMs)"),
    ("a100", "Llama-3.1-8B", 1): Measured(9.70, 0.0661, f"{VIDUR}/a100/meta-llama/Meta-Llama-3-8B/mlp.csv"),
    ("a40", "LLaMA-7B", 1): Measured(23.94, 0.1236, f"{VIDUR}/a40/meta-llama/Llama-2-7b-hf/mlp.csv"),
    ("h100", "LLaMA-7B", 1): Measured(5.60, 0.0202, f"{VIDUR}/h100/meta-llama/Llama-2-7b-hf/mlp.csv"),
}


def derive_cost(name: str, gpu: Gpu, model: ModelShape, tp: int = 1) -> tuple[CostModel, list[str]]:
    """The step-cost model of ``model`` on ``tp`` x ``gpu`` (see the module docstring) and, per constant,
    where it came from."""
    bw_eff, flops_eff = EFFICIENCY[gpu.name]
    sources: list[str] = []
    measured = MEASURED.get((gpu.name, model.name, tp))
    if measured is not None:
        weight_read_ms, ms_per_token = measured.weight_read_ms, measured.ms_per_token
        sources.append(f"weight_read_ms, prefill_ms_per_token: Vidur measured ({measured.source})")
    else:
        weight_read_ms = model.weight_bytes / tp / (gpu.hbm_bytes_per_s * bw_eff) * 1000
        ms_per_token = 2 * model.params / tp / (gpu.fp16_flops * flops_eff) * 1000
        sources.append(
            f"weight_read_ms, prefill_ms_per_token: first principles at Vidur's measured efficiency on "
            f"{gpu.name} class ({bw_eff:.0%} of HBM bandwidth, {flops_eff:.0%} of FP16 FLOPs)"
        )
    fixed_ms = VLLM_STEP_OVERHEAD_MS
    if tp > 1:
        # two all-reduces of the hidden state per layer: latency per step, bytes per token
        fixed_ms += 2 * model.layers * gpu.tp_link_latency_ms
        ring_bytes = 2 * (tp - 1) / tp * model.hidden * 2
        ms_per_token += 2 * model.layers * ring_bytes / gpu.tp_link_bytes_per_s * 1000
        sources.append(f"tensor parallel {tp}: 2 all-reduces per layer over {gpu.tp_link_bytes_per_s / 1e9:g} GB/s")
    sources.append(f"fixed_ms: vLLM per-step CPU work, stand-in {VLLM_STEP_OVERHEAD_MS} ms")
    kv_ms = model.kv_bytes_per_token / tp / (gpu.hbm_bytes_per_s * bw_eff) * 1000
    q_width = model.hidden  # query heads x head dim
    pair_ms = 4 * model.layers * q_width / tp / (gpu.fp16_flops * flops_eff) * 1000
    sources.append("attention: first principles (Vidur publishes no attention profile)")
    cost = CostModel(
        name=name,
        fixed_ms=round(fixed_ms, 4),
        prefill_ms_per_token=round(ms_per_token, 6),
        decode_ms_per_seq=round(ms_per_token, 6),
        decode_ms_per_context_token=round(kv_ms, 8),
        weight_read_ms=round(weight_read_ms, 4),
        prefill_attention_ms_per_pair=pair_ms,
    )
    return cost, sources


@dataclass(frozen=True, slots=True)
class Preset:
    """One simulated instance type. ``num_blocks`` is derived (see the module docstring)."""

    name: str
    summary: str
    model: ModelShape
    gpu: Gpu
    tp: int
    max_model_len: int
    activation_reserve_bytes: int
    migration_bandwidth: float
    migration_source: str
    gpu_memory_utilization: float = 0.9  # vLLM's default
    block_size: int = 16  # vLLM's default on GPU
    max_num_seqs: int = 256  # vLLM's default
    max_num_batched_tokens: int = 2048  # vLLM v1's online-serving default
    cost: CostModel | None = None
    cost_sources: tuple[str, ...] = ()
    notes: str = ""
    chunked_prefill: bool = True  # vLLM v1; False with a 1 % watermark reproduces vLLM v0 (Llumnix's engine)
    watermark_fraction: float = 0.0  # blocks kept free at admission, as a fraction (vLLM v0: 0.01)
    fixed_blocks: int | None = None  # measured presets: the live engine's configured block count
    block_bytes_override: int | None = None
    request_path_ms: float = 0.0
    """Latency outside the engine's steps, added to every request's TTFT and end-to-end time: client ->
    control plane -> engine, and the first token's way back (NATS, actors, the engine's output handling).
    A constant shift of every arrival leaves the queueing unchanged, so it is added to the results rather
    than simulated. Measured presets only; the GPU presets model the engine alone (0)."""

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def block_bytes(self) -> int:
        return self.block_bytes_override or self.kv_bytes_per_token * self.block_size

    @property
    def num_blocks(self) -> int:
        if self.fixed_blocks is not None:
            return self.fixed_blocks
        budget = self.gpu.memory_bytes * self.gpu_memory_utilization * self.tp
        free = budget - self.model.weight_bytes - self.tp * self.activation_reserve_bytes
        return max(0, int(free // self.block_bytes))

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def cost_model(self) -> CostModel:
        assert self.cost is not None
        return self.cost

    def engine_config(self, max_model_len: int | None = None) -> SimEngineConfig:
        return SimEngineConfig(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len or self.max_model_len,
            chunked_prefill=self.chunked_prefill,
            watermark_blocks=int(self.watermark_fraction * self.num_blocks),
        )

    def cluster_config(
        self, num_instances: int, policy: PolicyParams | None = None, *, max_model_len: int | None = None
    ) -> ClusterConfig:
        return ClusterConfig(
            num_instances=num_instances,
            engine=self.engine_config(max_model_len),
            cost_model=self.cost_model,
            policy=policy or PolicyParams(),
            model=self.model.name,
            kv_bytes_per_token=self.kv_bytes_per_token,
            migration_bandwidth=self.migration_bandwidth,
        )

    def describe(self) -> str:
        """Multi-line derivation (``drover sim presets --verbose``)."""
        lines = [
            f"{self.name}: {self.summary}",
            f"  model {self.model.name}: {self.model.params / 1e9:.2f}B params = {self.model.weight_bytes / GIB:.2f} "
            f"GiB FP16; KV {self.kv_bytes_per_token:,} B/token (2 x {self.model.layers} layers x "
            f"{self.model.kv_heads} KV heads x {self.model.head_dim} x 2 B); native context {self.model.context:,}",
            f"  GPU {self.tp} x {self.gpu.name}: {self.gpu.source}",
            f"  KV: {self.gpu.memory_bytes / GIB:.1f} GiB x {self.gpu_memory_utilization} x {self.tp} - weights - "
            f"{self.tp} x {self.activation_reserve_bytes / GIB:.1f} GiB reserve = {self.num_blocks:,} blocks of "
            f"{self.block_size} = {self.kv_tokens:,} tokens",
            f"  migration: {self.migration_bandwidth / 1e9:g} GB/s ({self.migration_source})",
        ]
        cost = self.cost_model
        lines.append(
            f"  step cost: fixed {cost.fixed_ms:g} ms + max(weights {cost.weight_read_ms:g} ms, "
            f"{cost.prefill_ms_per_token * 1000:.1f} us/token) + {cost.decode_ms_per_context_token * 1e6:.1f} ns "
            f"per decode context token + {cost.prefill_attention_ms_per_pair * 1e9:.2f} ps per prefill pair"
        )
        lines.extend(f"    {s}" for s in self.cost_sources)
        if self.request_path_ms:
            lines.append(f"  request path: {self.request_path_ms:g} ms added to TTFT and end-to-end")
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        return "\n".join(lines)


def _gpu_preset(
    name: str,
    summary: str,
    model: ModelShape,
    gpu: Gpu,
    *,
    tp: int = 1,
    max_model_len: int | None = None,
    reserve_gib: float = 1.5,
    migration: tuple[float, str] | None = None,
    notes: str = "",
) -> Preset:
    cost, sources = derive_cost(name, gpu, model, tp)
    bandwidth, source = migration or (
        (285e9, "Vidur send_recv a100_pairwise_nvlink: 64 MiB in 0.235 ms; same-server pairs")
        if gpu.tp_link_bytes_per_s >= 100e9
        else (4.0e9, "Vidur send_recv a40_pairwise_nvlink: 64 MiB in 16.9 ms (PCIe-class GA102 GPUs)")
    )
    return Preset(
        name=name,
        summary=summary,
        model=model,
        gpu=gpu,
        tp=tp,
        max_model_len=max_model_len or model.context,
        activation_reserve_bytes=int(reserve_gib * GIB),
        migration_bandwidth=bandwidth,
        migration_source=source,
        cost=cost,
        cost_sources=tuple(sources),
        notes=notes,
    )


_LLUMNIX_LEN = (
    "max_model_len 12,288: Llumnix's generated lengths reach 6,144 prompt + 6,144 output tokens (its Zipf "
    "cap), beyond LLaMA-7B's native 2,048; the paper runs them, so the preset allows them"
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _gpu_preset(
            "llama7b-a10",
            "LLaMA-7B on one A10-24GB: the Llumnix paper's setting",
            LLAMA_7B,
            A10,
            max_model_len=12288,
            notes=_LLUMNIX_LEN,
        ),
        _gpu_preset(
            "llama30b-4xa10",
            "LLaMA-30B, tensor parallel over 4 A10-24GB: Llumnix's 30B migration runs",
            LLAMA_30B,
            A10,
            tp=4,
            max_model_len=8192,
            notes="all-reduce over PCIe 4.0 x16 (A10 has no NVLink), NCCL bus bandwidth stand-in 12 GB/s; "
            "max_model_len 8,192: Llumnix migrates 8k-token 30B sequences, and 12,288 would not fit the KV",
        ),
        _gpu_preset(
            "qwen2.5-7b-a10",
            "Qwen2.5-7B on one A10-24GB: Llumnix README's benchmark (GQA: 56 KiB of KV per token)",
            QWEN25_7B,
            A10,
        ),
        _gpu_preset(
            "llama2-13b-a800",
            "Llama-2-13B on one A800-80GB: Llumnix README's benchmark",
            LLAMA2_13B,
            A800_80G,
            reserve_gib=2.0,
            migration=(200e9, "A800 NVLink 400 GB/s bidirectional; Vidur's A100 pairwise measurement capped"),
        ),
        _gpu_preset(
            "llama7b-a100",
            "LLaMA-7B on one A100-80GB",
            LLAMA_7B,
            A100_80G,
            max_model_len=12288,
            notes=_LLUMNIX_LEN,
        ),
        _gpu_preset(
            "chiron-llama3.1-8b-a100",
            "Chiron's setting: an 8B model per A100-80GB (the paper: up to 50 A100s)",
            LLAMA3_8B,
            A100_80G,
            max_model_len=32768,
            notes="Chiron (arXiv 2501.08090) states A100 GPUs; its exact model and context could not be found "
            "offline: stand-in Llama-3.1-8B with a 32k context",
        ),
        _gpu_preset(
            "kunserve-llama7b-a100-40g",
            "KunServe's regime: weights a large share of memory (LLaMA-7B on A100-40GB)",
            LLAMA_7B,
            A100_40G,
            max_model_len=4096,
            notes="KunServe (arXiv 2412.18169) runs its own engine; the models and GPUs of its tables could not be "
            "found offline: stand-in the memory simulator's LLaMA-7B / A100-40GB (control/simulator/hardware.py), "
            "the regime where dropping parameters frees the most KV",
        ),
        _gpu_preset(
            "llama3-8b-h200",
            "Llama-3.1-8B on one H200-141GB: long contexts (the Mooncake trace)",
            LLAMA3_8B,
            H200,
            notes="GQA (128 KiB of KV per token) and 141 GB: over a million tokens of KV; 128k context",
        ),
    )
}

_TINY_CPU_BLOCKS = 512
# What a live vLLM-CPU instance under Drover adds to the bare forward pass (TINY_CPU), fitted by
# `python -m scripts.calibrate_sim_live --fit-seed 1` on a workload other than the one it is then checked on
# (docs/simulator.md, "Calibration against live vLLM-CPU"): per step, vLLM's scheduler, input preparation,
# sampling and output handoff plus the engine actor's NATS streaming; per request, the path
# client -> control plane -> engine and back. The values are the medians of four independent estimates on
# 100-request workloads, none from the workloads they were then checked on: the step overhead 0.68 and 1.84 ms
# (fits on seeds 1 and 0) and 1.70 and 2.01 ms (lone-request probes); the request path 71.1 and 48.2 ms (fits)
# and 100.4 and 77.5 ms (probes). The live side moves with the shared machine's load by more than the fit's
# precision (median TPOT 3.5-5.1 ms over five runs of 100 requests), so more digits would mean nothing.
VLLM_CPU_STEP_OVERHEAD_MS = 1.8
VLLM_CPU_REQUEST_PATH_MS = 75.0
PRESETS["tiny-cpu"] = Preset(
    name="tiny-cpu",
    summary="Drover's tiny model on one CPU thread (measured): the live vLLM-CPU test cluster",
    model=ModelShape("drover-tiny", 4 * 12 * 256 * 256 + 2 * 32000 * 256, 4, 256, 4, 64, 2048),
    gpu=Gpu("cpu", 0, 0.0, 0.0, 0.0, 0.0, "one CPU thread"),
    tp=1,
    max_model_len=2048,
    activation_reserve_bytes=0,
    migration_bandwidth=1e9,
    migration_source="loopback NATS KV transfer, order of magnitude",
    block_size=32,
    max_num_seqs=16,
    max_num_batched_tokens=2048,
    cost=replace(TINY_CPU, name="drover-tiny-vllm-cpu", fixed_ms=TINY_CPU.fixed_ms + VLLM_CPU_STEP_OVERHEAD_MS),
    cost_sources=(
        "forward pass measured: python -m engines.sim.calibrate (engines/sim/cost_model.py TINY_CPU)",
        f"+ {VLLM_CPU_STEP_OVERHEAD_MS:g} ms per step of vLLM-CPU serving overhead, fitted against live runs: "
        "python -m scripts.calibrate_sim_live --fit-seed 1",
    ),
    request_path_ms=VLLM_CPU_REQUEST_PATH_MS,
    notes="blocks, seats and budget are the live engine's settings (SimEngineConfig defaults), not derived",
    fixed_blocks=_TINY_CPU_BLOCKS,
)

DEFAULT_PRESET = "llama7b-a10"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the choices otherwise."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]


def with_overrides(preset: Preset, **changes: object) -> Preset:
    """A copy with fields replaced (e.g. ``max_num_seqs``), for ablations."""
    return replace(preset, **changes)  # type: ignore[arg-type]
