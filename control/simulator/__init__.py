"""Cluster simulator: simulated instances in virtual time, driven by the live dispatch/migration policies, and
(``elastic``) by the live autoscaling policies."""

from control.simulator.cluster import ClusterConfig, ClusterSimulator, simulate
from control.simulator.elastic import ElasticConfig, ElasticResult, ElasticSimulator, ScaleEvent, simulate_elastic
from control.simulator.metrics import ClassAttainment, RequestMetrics, SimulationResult, Stat, slo_attainment
from control.simulator.workload import (
    LengthSpec,
    RequestSpec,
    batch_backlog,
    generate_scheduled_workload,
    generate_workload,
    load_trace,
    merge,
    warp_arrivals,
)

__all__ = [
    "ClassAttainment",
    "ClusterConfig",
    "ClusterSimulator",
    "ElasticConfig",
    "ElasticResult",
    "ElasticSimulator",
    "LengthSpec",
    "RequestMetrics",
    "RequestSpec",
    "ScaleEvent",
    "SimulationResult",
    "Stat",
    "batch_backlog",
    "generate_scheduled_workload",
    "generate_workload",
    "load_trace",
    "merge",
    "simulate",
    "simulate_elastic",
    "slo_attainment",
    "warp_arrivals",
]
