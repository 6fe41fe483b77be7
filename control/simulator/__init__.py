"""Cluster simulator: simulated instances in virtual time, driven by the live dispatch/migration policies."""

from control.simulator.cluster import ClusterConfig, ClusterSimulator, simulate
from control.simulator.metrics import RequestMetrics, SimulationResult, Stat
from control.simulator.workload import LengthSpec, RequestSpec, generate_workload, load_trace

__all__ = [
    "ClusterConfig",
    "ClusterSimulator",
    "LengthSpec",
    "RequestMetrics",
    "RequestSpec",
    "SimulationResult",
    "Stat",
    "generate_workload",
    "load_trace",
    "simulate",
]
