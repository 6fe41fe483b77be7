"""What a migration should do after ``max_stages`` stages, and which stage knobs to default to, measured in
the cluster simulator (the same stage machine the live MigratorActor runs, control/core/migration.py).

Grid: Llumnix policy (freeness dispatch + migration) on 4 small instances (400 blocks of 16 tokens, so that
memory is tight and migration runs); Zipf-length Gamma-CV2 workloads at three rates; the Azure 2023
conversation trace (first requests, compressed); stage knobs of the Llumnix paper (last_stage_max_blocks=16,
max_stages=3) and of Drover's live defaults (1, 8); KV copy bandwidth 5 GB/s (the simulator's default: a
stage rarely leaves more to copy than the last-stage threshold) and 0.5 and 0.1 GB/s (stages do not
converge, so ``max_stages`` is reached); after_max_stages stop_and_copy vs abort. Prints a table
and a one-line summary.
"""

from __future__ import annotations

import argparse

from control.policy.params import PolicyParams
from control.simulator import ClusterConfig, LengthSpec, SimulationResult, generate_workload, load_trace, simulate
from control.simulator.traces import AZURE_CONV
from control.simulator.workload import RequestSpec
from engines.sim.core import SimEngineConfig

AZURE_TRACE = AZURE_CONV
ENGINE = SimEngineConfig(block_size=16, num_blocks=400, max_num_seqs=64, max_num_batched_tokens=1024)
MAX_MODEL_LEN = 4096
KNOBS = (("paper 16/3", 16, 3), ("live 1/8", 1, 8))
AFTER = ("stop_and_copy", "abort")


def workloads(num_requests: int, seed: int) -> list[tuple[str, list[RequestSpec]]]:
    out = []
    prompt, output = LengthSpec.zipf(200, 2000), LengthSpec.zipf(150, 1500)
    for rate in (20.0, 40.0):
        requests = generate_workload(
            num_requests, rate, prompt=prompt, output=output, cv=2.0, seed=seed, max_total_len=MAX_MODEL_LEN
        )
        out.append((f"gamma2 {rate:g}/s", requests))
    if AZURE_TRACE.exists():
        trace = load_trace(AZURE_TRACE, time_compression=2.0, max_total_len=MAX_MODEL_LEN, limit=num_requests)
        out.append(("azure 2x", trace))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'workload':<14} {'GB/s':>5} {'knobs':<11} {'after':<14} {'req p99':>8} {'pre p99':>8} {'dec p99':>8} "
        f"{'commit':>7} {'abort':>6} {'stages':>6} {'down mean ms':>12} {'down p99 ms':>11}"
    )
    wins = {"stop_and_copy": 0, "abort": 0, "tie": 0}
    for name, requests in workloads(args.requests, args.seed):
        for bandwidth in (5e9, 5e8, 1e8):
            for label, last, stages in KNOBS:
                p99: dict[str, float] = {}
                for after in AFTER:
                    params = PolicyParams(last_stage_max_blocks=last, max_stages=stages, after_max_stages=after)  # type: ignore[arg-type]
                    config = ClusterConfig(num_instances=4, engine=ENGINE, policy=params, migration_bandwidth=bandwidth)
                    r: SimulationResult = simulate(config, requests)
                    p99[after] = r.request.p99
                    print(
                        f"{name:<14} {bandwidth / 1e9:5.1f} {label:<11} {after:<14} {r.request.p99:8.2f} "
                        f"{r.prefill.p99:8.3f} {r.decode.p99 * 1e3:8.1f} {r.migrations_committed:7d} "
                        f"{r.migrations_aborted:6d} {r.abort_reasons.get('stages', 0):6d} "
                        f"{r.downtime.mean * 1e3:12.1f} {r.downtime.p99 * 1e3:11.1f}",
                        flush=True,
                    )
                a, b = p99["stop_and_copy"], p99["abort"]
                wins["tie" if abs(a - b) <= 1e-9 else ("stop_and_copy" if a < b else "abort")] += 1
    print(
        f"summary: lower request p99 with stop_and_copy in {wins['stop_and_copy']} cells, with abort in "
        f"{wins['abort']}, equal in {wins['tie']}"
    )


if __name__ == "__main__":
    main()
