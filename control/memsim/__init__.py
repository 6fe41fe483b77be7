"""Memory simulator: parameters and KV in one budget per instance, and four ways to survive a burst
(vLLM recompute, Llumnix migration, InferCept-style swap, KunServe parameter drop). See simulator.py."""

from control.memsim.hardware import DEFAULT_HARDWARE, LLAMA7B_A100_40G, Hardware
from control.memsim.simulator import MODES, MemorySimulator, MemSimConfig, MemSimResult, simulate, with_mode

__all__ = [
    "DEFAULT_HARDWARE",
    "LLAMA7B_A100_40G",
    "MODES",
    "Hardware",
    "MemSimConfig",
    "MemSimResult",
    "MemorySimulator",
    "simulate",
    "with_mode",
]
