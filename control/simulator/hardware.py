"""The memory budget of one instance and the links that move bytes, with each constant's source.

One GPU holds the model's parameters and its KV pool in a single budget: whatever the weights do not use
is KV. That is the trade KunServe exploits, so the simulator derives block counts from bytes instead of
taking them as given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from control.policy.memory import group_kv_blocks, instance_kv_blocks
from engines.sim.cost_model import LLAMA7B_A100, CostModel

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Hardware:
    """One instance: model shape, memory budget, links and step cost."""

    name: str
    num_layers: int
    weight_bytes: int
    kv_bytes_per_token: int  # all layers: 2 (K and V) x layers x hidden x dtype bytes
    activation_bytes_per_token: int  # hidden x dtype bytes crossing one pipeline stage boundary
    budget_bytes: int  # memory for weights + KV (vLLM's gpu_memory_utilization share of the GPU)
    block_size: int
    pcie_bytes_per_s: float  # host <-> GPU (KV swap, weight reload)
    interconnect_bytes_per_s: float  # GPU <-> GPU (KV migration, KV exchange, activations)
    hop_latency_ms: float  # fixed cost of one stage-to-stage send
    cost: CostModel

    @property
    def kv_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def instance_blocks(self) -> int:
        """KV blocks beside a full copy of the weights."""
        return instance_kv_blocks(self.budget_bytes, self.weight_bytes, self.kv_block_bytes)

    def group_blocks(self, group_size: int) -> int:
        """KV blocks of a group of ``group_size`` members holding one copy of the weights between them."""
        return group_kv_blocks(self.budget_bytes, self.weight_bytes, self.kv_block_bytes, group_size)

    def kv_seconds(self, num_blocks: int, bytes_per_s: float, fraction: float = 1.0) -> float:
        """Seconds to move ``fraction`` of ``num_blocks`` blocks of KV over a link of ``bytes_per_s``."""
        return num_blocks * self.kv_block_bytes * fraction / bytes_per_s

    def pipelined_cost(self, group_size: int, overhead: float) -> CostModel:
        """Step cost of a g-stage pipeline over the group's whole batch, as one linear model.

        With g micro-batches in flight every stage works on a different one, so one "step" (a token for
        every running request) takes what one instance would take for 1/g of the batch: the fixed weight
        read stays whole (every micro-batch crosses all layers once) while per-token, per-sequence and
        per-context terms divide by g. Each stage boundary adds a hop (latency plus activations over the
        interconnect); ``overhead`` (micro-batch imbalance, bubbles: MemoryParams.pipeline_overhead_per_stage
        times g-1) scales the lot. Throughput-level model: an isolated long prompt is charged a·P/g, as if
        its chunks filled the pipeline.
        """
        base = self.cost
        g = group_size
        act_ms_per_token = (g - 1) / g * self.activation_bytes_per_token / self.interconnect_bytes_per_s * 1000
        scale = 1.0 + overhead
        return replace(
            base,
            name=f"{base.name}-pp{g}",
            fixed_ms=(base.fixed_ms + (g - 1) * self.hop_latency_ms) * scale,
            prefill_ms_per_token=(base.prefill_ms_per_token / g + act_ms_per_token) * scale,
            decode_ms_per_seq=(base.decode_ms_per_seq / g + act_ms_per_token) * scale,
            decode_ms_per_context_token=base.decode_ms_per_context_token / g * scale,
        )


# LLaMA-7B fp16 on one A100-40GB, the model of engines/sim/cost_model.LLAMA7B_A100 (same GPU compute; the
# 40 GB part makes the weights a large share of memory, the regime of KunServe's evaluation).
#   weight_bytes 13.5e9: 6.74e9 parameters x 2 bytes.
#   kv_bytes_per_token 524288: 2 x 32 layers x 4096 x 2 bytes (the cost model's 0.5 MiB per token).
#   activation_bytes_per_token 8192: 4096 x 2 bytes.
#   budget_bytes: vLLM's default gpu_memory_utilization 0.9 of 40 GiB.
#   block_size 16: vLLM's default.
#   pcie 25 GB/s: PCIe 4.0 x16 (32 GB/s peak), pinned-memory copies measure ~25 GB/s.
#   interconnect 50 GB/s: A100 NVLink3 peaks at 300 GB/s per direction; scattered paged-block copies
#       reach far less, so we take a conservative 50 GB/s for KV migration, exchange and activations alike.
#   hop_latency_ms 0.05: one small NCCL send between GPUs of a server (tens of microseconds).
LLAMA7B_A100_40G = Hardware(
    name="llama7b-a100-40g",
    num_layers=32,
    weight_bytes=13_500_000_000,
    kv_bytes_per_token=524_288,
    activation_bytes_per_token=8192,
    budget_bytes=int(0.9 * 40 * GIB),
    block_size=16,
    pcie_bytes_per_s=25e9,
    interconnect_bytes_per_s=50e9,
    hop_latency_ms=0.05,
    cost=LLAMA7B_A100,
)

DEFAULT_HARDWARE = LLAMA7B_A100_40G
