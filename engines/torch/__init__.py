"""A compact Llama inference engine in plain PyTorch that can hold any contiguous layer range.

Unpatched vLLM cannot drop layers from a running engine or run a partial-layer pipeline; KunServe's
parameter-centric memory needs both. Modules, one job each: ``config`` (model shape, byte accounting),
``weights`` (safetensors subsets), ``model`` (the Llama math), ``attention`` (paged attention),
``kv_cache`` (block allocator, per-layer pools), ``batch`` (the stage boundary), ``stage`` (a layer range
with its KV, drop/restore), ``pipeline`` (stages chained), ``scheduler`` (continuous batching, chunked
prefill, preemption), ``sampler``, ``core`` (one step), ``engine`` (the asyncio ``Engine``), ``group``
(KunServe groups of engines), ``migration`` (live migration over the KV data plane), ``remote`` (a stage
in another process).
"""

from engines.torch.batch import StageBatch, StageResult
from engines.torch.engine import TorchEngine
from engines.torch.group import GroupReport, LayerGroup, split_layers
from engines.torch.migration import MigratableTorchEngine
from engines.torch.pipeline import PipelineGroup, serialize_hop
from engines.torch.remote import RemoteStage, StageServer
from engines.torch.stage import MemoryReport, ModelStage

__all__ = [
    "GroupReport",
    "LayerGroup",
    "MemoryReport",
    "MigratableTorchEngine",
    "ModelStage",
    "PipelineGroup",
    "RemoteStage",
    "StageBatch",
    "StageResult",
    "StageServer",
    "TorchEngine",
    "serialize_hop",
    "split_layers",
]
