"""KunServe live: two torch-engine processes under a burst that exhausts their KV pools, without and with
parameter drop, on real NATS through the whole control plane.

Each engine is a separate ``drover engine serve --kind torch`` process holding a generated Llama model whose
weights are more than half of its memory budget (weights + KV pool). The same burst (same seed: prompt
tokens and lengths) runs twice on fresh processes:

* ``baseline``: no special handling: requests queue in the engines, which preempt and recompute (as vLLM);
* ``drop``: the scheduler's memory manager (``memory.auto``) sees the drop trigger (KV use >= 95 % and the
  queue's blocks >= the free blocks), groups the two engines (each keeps half the layers, the freed weights
  become KV blocks, running requests' KV moves by live exchange, the group serves as a two-stage pipeline
  over TCP), and restores when the burst is over.

Prints TTFT (p50/p90/p99/max), end-to-end latency and throughput both ways with the ratios, and a
timeline (from the engines' heartbeats) of each engine's layers, weight bytes, KV capacity and use, RSS and
queue; ``--plot DIR`` also writes ``kunserve_live.png``. CPU figures: both engines and the control plane
share this machine's cores, and the pipeline runs one micro-batch at a time.

    python -m scripts.bench_kunserve_live [--requests 32] [--prompt-tokens 192] [--max-tokens 64] [--plot DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from actors.control_plane import ControlPlane
from control.client import DroverClient, RequestResult
from control.settings import Settings, load_settings
from engines.tiny_model import ModelSpec, ensure_model
from engines.tokenizer import ByteTokenizer
from engines.torch.config import LlamaConfig
from transport import subjects
from transport.bus import Bus, BusOptions
from transport.messages import InstanceHeartbeat, SamplingParams, decode
from transport.nats_server import EmbeddedNatsServer

BENCH_MODEL = ModelSpec(
    name="drover-kunserve-bench",
    hidden_size=256,
    intermediate_size=640,
    num_layers=8,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
)
"""8 layers of 0.75 M parameters (24 MiB of float32 weights); 16 KiB of KV per token, so a pool of a few
hundred tokens per request fills with a handful of requests: the weights are the larger share of the budget."""
INSTANCES = ("kb-0", "kb-1")
MIB = 2**20


@dataclass(slots=True)
class Sample:
    t: float
    instance: str
    layers: str
    weight_bytes: int
    total_blocks: int
    used_blocks: int
    rss_bytes: int
    running: int
    waiting: int
    role: str


@dataclass(slots=True)
class ModeResult:
    mode: str
    results: list[RequestResult]
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # group id -> what status showed
    budget_bytes: int = 0
    weight_bytes: int = 0
    home_blocks: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def engine_env(args: argparse.Namespace, model_dir: Path, url: str, auto: bool) -> dict[str, str]:
    return {
        **os.environ,
        "DROVER_NATS__URL": url,
        "DROVER_MODEL__PATH": str(model_dir),
        "DROVER_MODEL__NAME": BENCH_MODEL.name,
        "DROVER_MODEL__MAX_MODEL_LEN": "2048",
        "DROVER_ENGINE__KIND": "torch",
        "DROVER_ENGINE__KV_CACHE_GIB": repr(args.kv_mib / 1024),
        "DROVER_ENGINE__BLOCK_SIZE": str(args.block_size),
        "DROVER_ENGINE__MAX_NUM_SEQS": str(args.max_num_seqs),
        "DROVER_ENGINE__CPU_THREADS": str(args.threads),
        "DROVER_ENGINE__HEARTBEAT_INTERVAL_S": "0.1",
        "DROVER_ENGINE__DRAIN_TIMEOUT_S": "1",
        "DROVER_OBSERVABILITY__EXPORTER": "none",
        "DROVER_OBSERVABILITY__LOG_LEVEL": "WARNING",
    }


def control_settings(url: str, auto: bool) -> Settings:
    return load_settings(
        overrides={
            "nats": {"url": url},
            "model": {"name": BENCH_MODEL.name},
            "policy": {"migration_enabled": False},  # isolate parameter drop from Llumnix migration
            "scheduler": {"instance_stale_after_s": 10.0},
            "memory": {"auto": auto, "max_group_size": 2},
            "observability": {"exporter": "none"},
        }
    )


async def run_mode(mode: str, args: argparse.Namespace, model_dir: Path, prompts: list[list[int]]) -> ModeResult:
    server = EmbeddedNatsServer()
    server.start()
    url = server.url
    auto = mode == "drop"
    bus = Bus(BusOptions(url=url, name="bench-control")).start()
    plane = ControlPlane(control_settings(url, auto), bus, ByteTokenizer()).start()
    command = [sys.executable, "-m", "control.apps.cli", "engine", "serve", "--kind", "torch"]
    processes = [
        subprocess.Popen(
            [*command, "--instance-id", name], env=engine_env(args, model_dir, url, auto), stdout=subprocess.DEVNULL
        )
        for name in INSTANCES
    ]
    out = ModeResult(mode, [], 0.0)
    watcher = await nats.connect(url)
    started = time.perf_counter()

    async def on_beat(msg: Any) -> None:
        beat = decode(msg.data)
        if not isinstance(beat, InstanceHeartbeat) or beat.memory is None:
            return
        memory, load = beat.memory, beat.load
        if memory.group_role == "member":  # a member's pool is the leader's: report the stage's own figures
            total, used = 0, 0
        else:
            total, used = load.num_total_blocks, load.num_total_blocks - load.num_free_blocks
        out.samples.append(
            Sample(
                time.perf_counter() - started,
                beat.info.instance_id,
                f"{memory.layer_range[0]}-{memory.layer_range[1]}",
                memory.weight_bytes,
                total,
                used,
                memory.rss_bytes,
                load.num_running,
                load.num_waiting,
                memory.group_role,
            )
        )
        out.budget_bytes, out.weight_bytes, out.home_blocks = (
            memory.budget_bytes,
            memory.model_weight_bytes,
            memory.home_num_blocks,
        )

    await watcher.subscribe(subjects.heartbeat("*"), cb=on_beat)
    client = await DroverClient(url, name=f"bench-{mode}").connect()
    try:
        await client.wait_for_instances(len(INSTANCES), timeout_s=120)
        warm = SamplingParams(max_tokens=4, ignore_eos=True)
        await asyncio.gather(*(client.generate(prompt_token_ids=prompts[0][:16], sampling=warm) for _ in INSTANCES))
        await asyncio.sleep(1.0)
        out.samples.clear()
        started = time.perf_counter()
        sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        streams = []
        for i, prompt in enumerate(prompts):
            streams.append(await client.submit(prompt_token_ids=prompt, sampling=sampling, request_id=f"{mode}-{i}"))
            if args.spread_s > 0:
                await asyncio.sleep(args.spread_s / len(prompts))

        async def watch_groups() -> None:
            while True:
                status = await client.status(timeout_s=10)
                now = time.perf_counter() - started
                for g in status.groups:
                    seen = out.groups.setdefault(g.group_id, {"members": ",".join(g.members), "extra": 0})
                    if g.state == "pipelined":
                        seen.setdefault("pipelined_at", now)
                        seen["extra"] = max(int(seen["extra"]), g.extra_kv_blocks)
                    seen["last_seen"] = now
                await asyncio.sleep(0.25)

        watch = asyncio.create_task(watch_groups())
        out.results = list(await asyncio.gather(*(s.result() for s in streams)))
        out.wall_s = time.perf_counter() - started
        await asyncio.sleep(args.tail_s)  # the timeline shows the restore
        watch.cancel()
    finally:
        await client.close()
        await watcher.drain()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        plane.stop()
        bus.stop()
        server.stop()
    return out


def summary_rows(result: ModeResult) -> dict[str, float]:
    ttft = [r.ttft_s for r in result.results]
    e2e = [r.token_times[-1] - r.submitted_at for r in result.results if r.token_times]
    tokens = sum(len(r.token_ids) for r in result.results)
    return {
        "TTFT p50 s": percentile(ttft, 50),
        "TTFT p90 s": percentile(ttft, 90),
        "TTFT p99 s": percentile(ttft, 99),
        "TTFT max s": max(ttft),
        "E2E p50 s": percentile(e2e, 50),
        "E2E p99 s": percentile(e2e, 99),
        "TBT mean ms": 1000 * statistics.fmean(g for r in result.results for g in r.inter_token_s),
        "throughput tok/s": tokens / result.wall_s,
        "wall s": result.wall_s,
    }


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {metric: statistics.median(r[metric] for r in rows) for metric in rows[0]}


def print_summary(results: dict[str, ModeResult]) -> None:
    print_summary_rows({mode: summary_rows(r) for mode, r in results.items()})


def print_summary_rows(rows: dict[str, dict[str, float]]) -> None:
    modes = list(rows)
    header = f"{'metric':<18}" + "".join(f"{m:>12}" for m in modes)
    if {"baseline", "drop"} <= set(modes):
        header += f"{'base/drop':>12}"
    print(header)
    for metric in rows[modes[0]]:
        line = f"{metric:<18}" + "".join(f"{rows[m][metric]:>12.3f}" for m in modes)
        if {"baseline", "drop"} <= set(modes) and rows["drop"][metric]:
            line += f"{rows['baseline'][metric] / rows['drop'][metric]:>11.2f}x"
        print(line)
    if {"baseline", "drop"} <= set(modes):
        print("(base/drop > 1: drop is better for times; for throughput drop is better when < 1)")


def timeline(result: ModeResult, step_s: float) -> list[tuple[float, dict[str, Sample]]]:
    """The last sample of each instance in each step, from t=0 to the end of the samples."""
    if not result.samples:
        return []
    end = max(s.t for s in result.samples)
    rows = []
    t = 0.0
    while t <= end + step_s:
        latest: dict[str, Sample] = {}
        for s in result.samples:
            if s.t <= t:
                latest[s.instance] = s
        if latest:
            rows.append((t, latest))
        t += step_s
    return rows


def print_timeline(result: ModeResult, step_s: float) -> None:
    print(f"\n-- timeline: {result.mode} (per engine: layers held, weights MiB, KV blocks used/total, RSS MiB, queue)")
    head = f"{'t s':>6}"
    for name in INSTANCES:
        head += f" | {name + ' layers':>10} {'wMiB':>5} {'KV used/total':>13} {'RSS':>5} {'run':>3} {'wait':>4}"
    print(head)
    for t, latest in timeline(result, step_s):
        line = f"{t:>6.1f}"
        for name in INSTANCES:
            s = latest.get(name)
            if s is None:
                line += " | " + " " * 47
                continue
            kv = f"{s.used_blocks}/{s.total_blocks}" if s.role != "member" else "(stage)"
            line += (
                f" | {s.layers:>10} {s.weight_bytes / MIB:>5.1f} {kv:>13} {s.rss_bytes / MIB:>5.0f}"
                f" {s.running:>3} {s.waiting:>4}"
            )
        print(line)


def plot(results: dict[str, ModeResult], directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, len(results), figsize=(6 * len(results), 9), squeeze=False, sharex="col")
    for col, (mode, result) in enumerate(results.items()):
        for name in INSTANCES:
            samples = [s for s in result.samples if s.instance == name]
            ts = [s.t for s in samples]
            axes[0][col].plot(ts, [s.total_blocks for s in samples], label=f"{name} KV capacity")
            axes[0][col].plot(ts, [s.used_blocks for s in samples], "--", label=f"{name} KV used")
            axes[1][col].plot(ts, [s.weight_bytes / MIB for s in samples], label=f"{name} weights")
            axes[1][col].plot(ts, [s.rss_bytes / MIB for s in samples], "--", label=f"{name} RSS")
            axes[2][col].plot(ts, [s.waiting for s in samples], label=f"{name} waiting")
        ttft = sorted(r.ttft_s for r in result.results)
        axes[0][col].set_title(f"{mode}: TTFT p99 {percentile(ttft, 99):.2f}s")
        axes[0][col].set_ylabel("KV blocks")
        axes[1][col].set_ylabel("MiB")
        axes[2][col].set_ylabel("requests waiting")
        axes[2][col].set_xlabel("seconds since the burst")
        for row in axes:
            row[col].legend(fontsize=7)
    fig.tight_layout()
    path = directory / "kunserve_live.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests in the burst")
    parser.add_argument("--prompt-tokens", type=int, default=192, help="mean prompt length (uniform ±50%%)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--spread-s", type=float, default=0.0, help="seconds over which the burst is submitted")
    parser.add_argument("--kv-mib", type=float, default=20.0, help="KV pool per engine (MiB); weights are 24 MiB")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--tail-s", type=float, default=4.0, help="seconds watched after the burst (restore)")
    parser.add_argument("--step-s", type=float, default=1.0, help="timeline row spacing")
    parser.add_argument("--modes", default="baseline,drop")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every mode (all reported, then medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "drover-models")
    parser.add_argument("--plot", type=Path, default=None, help="write kunserve_live.png into this directory")
    args = parser.parse_args()

    model_dir = ensure_model(args.cache, BENCH_MODEL)
    config = LlamaConfig.from_model_dir(model_dir)
    weights = config.weight_bytes(0, config.num_layers, 4)
    block = config.kv_block_bytes(config.num_layers, args.block_size, 4)
    blocks = int(args.kv_mib * MIB) // block
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.prompt_tokens // 2, args.prompt_tokens * 3 // 2) for _ in range(args.requests)]
    prompts = [[rng.randrange(3, 259) for _ in range(n)] for n in lengths]
    demand = sum(-(-(n + args.max_tokens) // args.block_size) for n in lengths)
    print(
        f"model {BENCH_MODEL.name}: {config.num_layers} layers, weights {weights / MIB:.1f} MiB; per engine KV pool "
        f"{blocks} blocks x {args.block_size} tokens = {blocks * block / MIB:.1f} MiB -> weights are "
        f"{weights / (weights + blocks * block):.0%} of the budget"
    )
    print(
        f"burst: {args.requests} requests, prompts {min(lengths)}-{max(lengths)} tokens, {args.max_tokens} out; "
        f"KV demand {demand} blocks vs {2 * blocks} in both pools; torch threads {args.threads}/engine, "
        f"{os.cpu_count()} CPUs"
    )
    runs: list[dict[str, ModeResult]] = []
    for repeat in range(args.repeats):
        results: dict[str, ModeResult] = {}
        modes = args.modes.split(",")
        for mode in modes if repeat % 2 == 0 else modes[::-1]:  # alternate the order: the machine's load drifts
            results[mode] = asyncio.run(run_mode(mode, args, model_dir, prompts))
            done = sum(1 for r in results[mode].results if r.done is not None)
            print(f"run {repeat + 1} {mode}: {done}/{len(prompts)} requests finished in {results[mode].wall_s:.1f}s")
            for group_id, g in results[mode].groups.items():
                print(
                    f"  group {group_id} ({g['members']}): pipelined at t={g.get('pipelined_at', float('nan')):.1f}s, "
                    f"last seen t={g['last_seen']:.1f}s, up to {g['extra']} extra KV blocks"
                )
        if {"baseline", "drop"} <= set(results):
            same = sum(
                a.token_ids == b.token_ids
                for a, b in zip(results["baseline"].results, results["drop"].results, strict=True)
            )
            print(f"  greedy outputs identical with and without drop: {same}/{len(prompts)}")
        runs.append({m: results[m] for m in modes})
        print(f"\n== run {repeat + 1}")
        print_summary(runs[-1])
    if len(runs) > 1:
        print("\n== median over runs")
        print_summary_rows({m: median_rows([summary_rows(r[m]) for r in runs]) for m in runs[0]})
    for result in runs[-1].values():
        print_timeline(result, args.step_s)
    if args.plot is not None:
        print(f"\nplot (last run): {plot(runs[-1], args.plot)}")


if __name__ == "__main__":
    main()
