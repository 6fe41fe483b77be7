"""What a migration should do after ``max_stages`` stages, and which stage knobs to default to, measured in
the cluster simulator (the same stage machine the live MigratorActor runs, control/core/migration.py).

Grid: Llumnix policy (freeness dispatch + migration), 16 instances; Zipf-length Gamma-CV4 workloads at two
rates and the Azure 2023 conversation trace compressed 8x; stage knobs of the Llumnix paper
(last_stage_max_blocks=16, max_stages=3) and of Drover's live defaults (1, 8); after_max_stages
stop_and_copy vs abort. Prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from control.policy.params import PolicyParams
from control.simulator import ClusterConfig, LengthSpec, SimulationResult, generate_workload, load_trace, simulate
from control.simulator.workload import RequestSpec

AZURE_TRACE = Path("/work/shared/traces/azure2023_conv.csv")
LENGTHS = LengthSpec.zipf(256, 6144)
MAX_MODEL_LEN = ClusterConfig().engine.max_model_len
KNOBS = (("paper 16/3", 16, 3), ("live 1/8", 1, 8))
AFTER = ("stop_and_copy", "abort")


def workloads(num_requests: int, seed: int) -> list[tuple[str, list[RequestSpec]]]:
    out = []
    for rate in (55.0, 75.0):
        out.append(
            (
                f"gamma4 {rate:g}/s",
                generate_workload(
                    num_requests, rate, prompt=LENGTHS, output=LENGTHS, cv=4.0, seed=seed, max_total_len=MAX_MODEL_LEN
                ),
            )
        )
    if AZURE_TRACE.exists():
        out.append(
            ("azure 8x", load_trace(AZURE_TRACE, time_compression=8.0, max_total_len=MAX_MODEL_LEN, limit=num_requests))
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'workload':<14} {'knobs':<11} {'after':<14} {'req p99':>8} {'pre p99':>8} {'dec p99':>8} "
        f"{'commit':>7} {'abort':>6} {'stages':>6} {'down mean ms':>12} {'down p99 ms':>11}"
    )
    wins = {after: 0 for after in AFTER}
    for name, requests in workloads(args.requests, args.seed):
        for label, last, stages in KNOBS:
            p99: dict[str, float] = {}
            for after in AFTER:
                params = PolicyParams(last_stage_max_blocks=last, max_stages=stages, after_max_stages=after)  # type: ignore[arg-type]
                r: SimulationResult = simulate(dataclasses.replace(ClusterConfig(), policy=params), requests)
                p99[after] = r.request.p99
                print(
                    f"{name:<14} {label:<11} {after:<14} {r.request.p99:8.2f} {r.prefill.p99:8.3f} "
                    f"{r.decode.p99 * 1e3:8.1f} {r.migrations_committed:7d} {r.migrations_aborted:6d} "
                    f"{r.abort_reasons.get('stages', 0):6d} {r.downtime.mean * 1e3:12.1f} {r.downtime.p99 * 1e3:11.1f}"
                )
            wins[min(p99, key=lambda k: p99[k])] += 1
    print(f"summary: lower request p99 in {wins['stop_and_copy']} cells with stop_and_copy, {wins['abort']} with abort")


if __name__ == "__main__":
    main()
