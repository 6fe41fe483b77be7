"""Simulated engine: a cost-model core (virtual time, for the cluster simulator) and a live ``Engine``."""

from engines.sim.core import SimEngineConfig, SimEngineCore, SimOutput, SimRequest
from engines.sim.cost_model import DEFAULT_COST_MODEL, LLAMA7B_A100, TINY_CPU, CostModel
from engines.sim.engine import SimEngine, token_at

__all__ = [
    "DEFAULT_COST_MODEL",
    "LLAMA7B_A100",
    "TINY_CPU",
    "CostModel",
    "SimEngine",
    "SimEngineConfig",
    "SimEngineCore",
    "SimOutput",
    "SimRequest",
    "token_at",
]
