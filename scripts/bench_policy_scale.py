"""Policy cost at scale: dispatch and migration planning at 16 … 10,000 instances (p50/p99 per operation).

    python -m scripts.bench_policy_scale [--sizes 16,64,256,1000,4000,10000] [--ops 5000] [--plot DIR]
                                         [--json FILE]

Pure policy code, no simulator: random instance snapshots (2,560 blocks, 0-40 running requests, 5 %
preempting, 1 % draining, two models), then per size and policy:

* ``decide``    - ``choose`` + ``on_dispatched`` (the dispatch decision and its index update);
* ``heartbeat`` - ``upsert`` of one instance's fresh snapshot (one per decision, as a busy cluster sends);
* ``total``     - decide + heartbeat per decision (what the issue's "dispatch including its index update"
  budget covers: ≤ 20 µs p99 at 1,000 instances, ≤ 50 µs at 10,000);
* ``drain flip`` (round_robin) - an upsert that flips the draining flag (was linear in the ring);

and for the incremental :class:`MigrationPlanner`: ``update`` (one heartbeat re-rated, paid when it arrives)
and ``round`` (``plan`` after 5 % of the instances sent a fresh heartbeat), against the stateless
``plan_migrations`` over the full list (Llumnix's way; the issue's 5 ms budget at 10,000 instances).

How it times (``--clock cpu`` and the defaults mirror the control plane, and the output says so):

* the cyclic GC runs as in the product (``--gc service``, the default): the control plane and the simulator
  freeze what is alive after start-up and raise the young generation's threshold from 700 to 10,000
  (control/gc_tuning.py), taken here before the index is built, as a control plane takes it before instances
  join. ``--gc on``: Python's defaults (what this benchmark measured in rounds 27-28; a young collection
  landed in ~0.5 % of decisions, half of the slowest 1 %); ``--gc off``: disabled while timing. The collections
  that ran inside a timed decision are counted (``gc_collections_timed``) with their longest pause, and the
  decisions they hit are reported apart (``gc n``);
* ``--warmup`` decisions run untimed first (the first read of a model's pool builds it, once in a scheduler's
  life), and the full collection before timing runs before the warm-up, not between it and the timed
  decisions (their first dozen were 2-3x slower: a collection walks every object and empties the caches);
* the heartbeats' snapshots are built at start-up and held, as before round 27, so an upsert never frees the
  snapshot it replaces. ``--fresh-snapshots`` builds each one just before its upsert (untimed) and lets the
  upsert release the previous one, as the scheduler does (actors/scheduler_instances.py): measured +1-1.5 µs
  on the upsert's p50, the release of the old snapshot's objects, long out of the CPU cache;
* in the same run (half before the warm-up, half after the timed decisions: between them they slowed the
  decisions), two controls are timed as often as the decisions: fixed pure-Python work (``cpu control``) and
  a fixed number of cache misses (``mem control``). Their p99 over p50 is the noise floor the machine adds;
* a decision whose wall time exceeds its CPU time by 5 µs was switched out by the OS: counted (``n``), and
  the p99 of the others is reported beside the p99 of all (``uninterr.``), and the p99 of every decision's
  thread CPU time beside its wall time (``cpu p99``: the work, with what a switch-out leaves in it: the
  kernel's time on the thread and cold caches); ``p99.9`` shows where the rare long pauses went;
* what the slowest 1 % were (``slowest_share``): each such decision of every replay put down to a collection,
  a switch-out, the code (slow in every replay) or the machine (slow in one replay only), and the share of the
  machine's CPU time a hypervisor stole meanwhile (``steal``, from /proc/stat): a paused virtual CPU looks to
  both of the thread's clocks like a decision that took longer;
* ``--replays R`` times the same decisions on R identical indexes (the choices must match) and reports the
  p50/p99 of each decision's fastest replay (``min``): the machine's noise lands on different decisions in
  each replay, the policy's own slow decisions (a heap rebuild) are slow in every one.

Absolute µs depend on the machine: compare sizes and policies within one run. ``--clock cpu`` times with the
thread's CPU clock instead of the wall clock: on a shared machine a wall-clock p99 is mostly the time the OS ran
other processes (a 2-core host at load 8 preempts a thread for tens of ms), which CPU time leaves out (each
reading costs ~0.3 µs more than ``perf_counter_ns``, included in the numbers; ``timer_p50_us`` is the cost of
two readings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control import gc_tuning
from control.policy.dispatch import POLICY_NAMES, DispatchIndex, make_dispatch_policy, prefix_block_hashes
from control.policy.migration import MigrationPlanner, plan_migrations
from control.policy.params import PolicyParams
from control.policy.prefix_index import PrefixIndex
from control.policy.recommended import user_policy_params
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot, running_totals

MODELS = ("llama", "qwen")


def random_snapshot(rng: random.Random, iid: str, model: str, *, draining: bool | None = None) -> InstanceSnapshot:
    """5 % of instances host high-priority requests (dispatch packs them, as Llumnix does)."""
    total = 2560
    hosts_high = rng.random() < 0.05
    running = tuple(
        RunningSnapshot(
            f"{iid}/{k}",
            num_tokens=rng.randint(16, 4000),
            num_blocks=rng.randint(1, 250),
            priority=1 if hosts_high and rng.random() < 0.5 else 0,
            decoding=rng.random() < 0.9,
        )
        for k in range(rng.randint(0, 40))
    )
    waiting = rng.randint(0, 3)
    return InstanceSnapshot(
        instance_id=iid,
        num_total_blocks=total,
        num_free_blocks=rng.randint(0, total),
        num_running=len(running),
        num_waiting=waiting,
        waiting_blocks=waiting * rng.randint(1, 60),
        head_waiting_blocks=rng.randint(1, 60) if waiting else 0,
        num_preempted=1 if rng.random() < 0.05 else 0,
        draining=(rng.random() < 0.01) if draining is None else draining,
        model=model,
        block_size=16,
        running=running,
        high_priority_count=sum(1 for r in running if r.priority > 0),  # heartbeat builders count it
        running_totals=running_totals(running, 16),  # and sum these (actors/scheduler_instances.py)
    )


def percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return ordered[len(ordered) // 2] / 1e3, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3


CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
GC_MODES = ("service", "on", "off")
WARMUP = 200
"""Decisions made before timing starts: the first read of a model's pool builds it (O(instances), once in a
scheduler's life), and the first decisions find the heaps without stale items."""


def fresh_copy(snapshot: InstanceSnapshot) -> InstanceSnapshot:
    """The snapshot built anew, as the scheduler builds one from a decoded heartbeat right before it upserts it
    (actors/scheduler_instances.py): the upsert reads objects that are in the CPU cache, not ones built at
    start-up, and it drops the index's last reference to the instance's previous snapshot, which is freed there
    (its running requests' objects, long out of the CPU cache). Building it is not timed."""
    running = tuple(dataclasses.replace(r) for r in snapshot.running)  # new objects, as decoded
    return dataclasses.replace(snapshot, running=running)


def fixed_work() -> int:
    """The noise floor's first control: the same pure-Python work every call, timed beside every decision. Its
    p99 over its p50 is what the machine adds to the tail of work that stays in the CPU's caches."""
    x = 0
    for k in range(250):
        x += k
    return x


PROBE_TABLE_SIZE = 1 << 20
PROBES = 24


@functools.cache
def probe_table() -> dict[int, int]:
    """The memory control's table, built once per process: about 80 MB, more than this host's last-level cache."""
    return dict.fromkeys(range(PROBE_TABLE_SIZE), 1)


def memory_probes(table: dict[int, int], call: int) -> int:
    """The second control: ``PROBES`` lookups in a dict of a million entries (the size of the prefix index at
    1,000 instances), at keys no recent call probed: the same number of cache misses every call, as a
    decision's reads of instances last touched long ago. Its p99 over its p50 is what the machine adds to the
    tail of memory-bound work (other processes on this host share the last-level cache)."""
    x = 0
    base = call * PROBES * 7919
    for k in range(PROBES):
        x += table[(base + k * 7919) & (PROBE_TABLE_SIZE - 1)]
    return x


OFF_CPU_NS = 5_000
"""A decision whose wall time exceeds its thread CPU time by this much was switched out by the OS: another
process ran on this core (its time is left out of ``--clock cpu``, but the caches it emptied are not). Read
from the two clocks around every decision (the wall clock is a vDSO read, no system call)."""


def time_controls(count: int, timer: Callable[[], int], out: dict[str, list[int]]) -> None:
    """``count`` timings of each control (and of two clock readings with nothing between them)."""
    table = probe_table()
    empty, control, control_memory = out["timer"], out["control"], out["control_memory"]
    for _ in range(count):
        t0 = timer()
        t1 = timer()
        fixed_work()
        t2 = timer()
        memory_probes(table, len(empty))
        t3 = timer()
        empty.append(t1 - t0)
        control.append(t2 - t1)
        control_memory.append(t3 - t2)


def make_index(name: str) -> DispatchIndex:
    # ``drover``: predictive, late binding and prefix-aware, as control/policy/recommended.py configures it
    if name == "drover":
        return make_dispatch_policy("predictive", user_policy_params("drover").dispatch_params())
    return make_dispatch_policy(name)


def bench_dispatch(
    n: int,
    name: str,
    ops: int,
    seed: int,
    clock: str = "wall",
    *,
    gc_mode: str = "service",
    replays: int = 1,
    warmup: int = WARMUP,
    fresh: bool = False,
) -> dict[str, Any]:
    """Times ``ops`` decisions (after ``warmup`` untimed ones) on ``replays`` identical indexes, one after the
    other; the decisions must be the same in every replay. Besides each replay's percentiles (the first
    replay's under the usual names, every one's in ``reps``), the percentiles of each decision's fastest
    replay (``total_min_*``): what a decision costs without the machine's noise, which lands on different
    decisions in each replay. ``fresh``: each heartbeat's snapshot built just before its upsert (``fresh_copy``)
    and the previous one released inside it, as in the scheduler; else every snapshot is built at start-up and
    held, so no upsert releases one."""
    if gc_mode not in GC_MODES:
        raise ValueError(f"gc_mode must be one of {GC_MODES}, got {gc_mode!r}")
    runs = []
    for _ in range(max(1, replays)):
        # ``service``: the collector as the product sets it, from before the index is built (control/gc_tuning.py)
        with gc_tuning.service_gc() if gc_mode == "service" else contextlib.nullcontext():
            runs.append(_dispatch_once(n, name, ops, seed, clock, gc_mode, warmup, fresh))
    first, choices = runs[0]
    if any(other != choices for _, other in runs[1:]):
        raise RuntimeError(f"{name} at {n} instances chose differently in two replays of the same inputs")
    out = dict(first)
    fastest = [min(samples) for samples in zip(*(r["_total"] for r, _ in runs), strict=True)]
    if len(runs) > 1:
        out["total_min_p50_us"], out["total_min_p99_us"] = percentiles_us(fastest)
    out["slowest_1pct"] = slowest_share([r for r, _ in runs], fastest)
    out["reps"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r, _ in runs]
    for key in [k for k in out if k.startswith("_")]:
        del out[key]
    return out


def slowest_share(runs: list[dict[str, Any]], fastest: list[int]) -> dict[str, int]:
    """What the slowest 1 % of decisions were, over every replay: a collection ran in it (``gc``), else the OS
    switched the thread out (``switched_out``), else the decision is slow in every replay (``own``: its
    fastest replay is in the slowest 1 % of the fastest replays: the code's own slow path, a heap rebuild), else
    ``noise``: slow in this replay only, the machine's (other processes and virtual machines sharing the caches
    and the cores; with one replay every such decision counts as ``own``)."""
    ordered = sorted(fastest)
    own_from = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    share = {"gc": 0, "switched_out": 0, "own": 0, "noise": 0}
    for run in runs:
        total = run["_total"]
        ordered = sorted(total)
        slow_from = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        for k, ns in enumerate(total):
            if ns < slow_from:
                continue
            if run["_gc_hit"][k]:
                share["gc"] += 1
            elif run["_interrupted"][k]:
                share["switched_out"] += 1
            elif fastest[k] >= own_from:
                share["own"] += 1
            else:
                share["noise"] += 1
    return share


def steal_jiffies() -> tuple[int, int] | None:
    """(stolen, all) CPU time of this machine so far (Linux's /proc/stat, in clock ticks of 10 ms, so only a whole
    run's share means anything): time the hypervisor ran other virtual machines on this one's CPUs. A thread's
    CPU clock cannot see it: a decision the host paused looks like one that took longer. None where there is no
    /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None


def _dispatch_once(
    n: int, name: str, ops: int, seed: int, clock: str, gc_mode: str, warmup: int, fresh: bool = False
) -> tuple[dict[str, Any], list[str | None]]:
    rng = random.Random(seed)
    index = make_index(name)
    pool = [random_snapshot(rng, f"i{i}", MODELS[i % 2]) for i in range(n)]
    for snapshot in pool:
        index.upsert(snapshot)
    count = warmup + ops
    # fresh snapshots prepared up front: building them is the engine's cost, not the policy's
    beats = [random_snapshot(rng, f"i{(i := rng.randrange(n))}", MODELS[i % 2]) for _ in range(count)]
    prefixes = [list(range(k * 1000, k * 1000 + 128)) for k in range(100)]
    prefix_index = getattr(index, "prefix_index", None)  # kv_aware, and drover's prefix-aware predictive index
    if isinstance(prefix_index, PrefixIndex):
        _hold_prefixes(prefix_index, pool, prefixes, seed)
    if fresh:
        del pool  # the index holds the only reference to every snapshot: an upsert releases the one it replaces
    demands = []
    for k in range(count):
        prompt = prefixes[rng.randrange(100)] + [rng.randrange(259) for _ in range(rng.randint(0, 64))]
        demands.append(
            RequestDemand(
                f"r{k}",
                num_prompt_tokens=len(prompt),
                num_blocks=-(-len(prompt) // 16),
                priority=1 if rng.random() < 0.05 else 0,
                model=MODELS[k % 2],
                prefix_block_hashes=prefix_block_hashes(prompt, 16),
            )
        )
    # the noise floor, in the same run: half the controls before the warm-up, half after the timed decisions (run
    # between the decisions, even in blocks, they took the decisions' data out of the CPU caches and slowed them)
    controls: dict[str, list[int]] = {"timer": [], "control": [], "control_memory": []}
    time_controls(ops // 2, CLOCKS[clock], controls)
    # a full collection walks every object and leaves the index out of the CPU cache: done before the warm-up,
    # not between it and the timed decisions (their first dozen were 2-3x slower)
    gc.collect()
    choices: list[str | None] = []
    for demand, snapshot in zip(demands[:warmup], beats[:warmup], strict=True):
        chosen = index.choose(demand)
        if chosen is not None:
            index.on_dispatched(chosen, demand)
        index.upsert(fresh_copy(snapshot) if fresh else snapshot)
        choices.append(chosen)
    decide: list[int] = []
    beat: list[int] = []
    total: list[int] = []
    total_cpu: list[int] = []
    interrupted: list[bool] = []
    gc_hit: list[bool] = []
    timer = CLOCKS[clock]
    wall, thread_cpu = time.perf_counter_ns, time.thread_time_ns
    by_cpu = clock == "cpu"
    timed = [False]
    collections = [0, 0]  # started, started while a decision was being timed
    pause = [0, 0]  # when the last collection started, the longest one inside a timed decision (ns)

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections[0] += 1
            collections[1] += timed[0]
            pause[0] = wall()
        elif timed[0]:
            pause[1] = max(pause[1], wall() - pause[0])

    load_before = os.getloadavg()[0]
    collector = gc_tuning.describe()  # what the timed decisions ran under (the product's setting or not)
    if gc_mode == "off":
        gc.disable()
    gc.callbacks.append(on_gc)
    try:
        for demand, snapshot in zip(demands[warmup:], beats[warmup:], strict=True):
            if fresh:
                snapshot = fresh_copy(snapshot)
            timed[0] = True
            seen = collections[1]
            w0 = wall()
            c0 = thread_cpu()
            t0 = c0 if by_cpu else timer()
            chosen = index.choose(demand)
            if chosen is not None:
                index.on_dispatched(chosen, demand)
            t1 = timer()
            index.upsert(snapshot)
            t2 = timer()
            c2 = t2 if by_cpu else thread_cpu()
            w2 = wall()
            timed[0] = False
            interrupted.append(w2 - w0 - (c2 - c0) > OFF_CPU_NS)
            gc_hit.append(collections[1] != seen)
            total_cpu.append(c2 - c0)
            choices.append(chosen)
            decide.append(t1 - t0)
            beat.append(t2 - t1)
            total.append(t2 - t0)
        time_controls(ops - ops // 2, timer, controls)
        flips: list[int] = []
        if name == "round_robin":
            for k in range(min(ops, 2000)):
                i = rng.randrange(n)
                snapshot = random_snapshot(rng, f"i{i}", MODELS[i % 2], draining=k % 2 == 0)
                t0 = timer()
                index.upsert(snapshot)
                index.choose(demands[k])
                flips.append(timer() - t0)
    finally:
        gc.callbacks.remove(on_gc)
        gc.enable()
    out: dict[str, Any] = {}
    for label, samples in (
        ("decide", decide),
        ("heartbeat", beat),
        ("total", total),
        ("drain_flip", flips),
        ("total_uninterrupted", [t for t, hit in zip(total, interrupted, strict=True) if not hit]),
        ("total_cpu", total_cpu),
        ("control", controls["control"]),
        ("control_memory", controls["control_memory"]),
        ("timer", controls["timer"]),
    ):
        if samples:
            out[f"{label}_p50_us"], out[f"{label}_p99_us"] = percentiles_us(samples)
    out["interrupted"] = sum(interrupted)
    out["total_p999_us"] = sorted(total)[min(len(total) - 1, int(len(total) * 0.999))] / 1e3 if total else 0.0
    out["gc_collections"], out["gc_collections_timed"] = collections
    out["gc"] = "gc disabled while timing" if gc_mode == "off" else collector
    out["gc_decisions"] = sum(gc_hit)  # timed decisions a collection ran in
    out["gc_pause_max_us"] = pause[1] / 1e3
    out["load_before"], out["load_after"] = load_before, os.getloadavg()[0]
    out["_total"], out["_gc_hit"], out["_interrupted"] = total, gc_hit, interrupted
    return out, choices


def _hold_prefixes(
    prefix_index: PrefixIndex, pool: list[InstanceSnapshot], prefixes: list[list[int]], seed: int
) -> None:
    """kv_aware and drover are timed with its prefix index filled as engine events would fill it: each instance holds
    two of the benchmark's shared prefixes (their prefix-block hashes) and 1,000 blocks of its own (100 past
    2,000 instances, to stay near 2 M entries), so lookups probe a dict of realistic size. A separate random
    stream: the other policies' inputs stay as they were."""
    rng = random.Random(seed + 1)
    extra = 1000 if len(pool) <= 2000 else 100
    for snapshot in pool:
        held = [h for k in rng.sample(range(len(prefixes)), 2) for h in prefix_block_hashes(prefixes[k], 16)]
        own = [rng.getrandbits(62) for _ in range(extra)]
        prefix_index.apply(snapshot.instance_id, epoch="bench", seq=0, stored=held + own)


def bench_planning(n: int, rounds: int, seed: int, params: PolicyParams, clock: str = "wall") -> dict[str, float]:
    rng = random.Random(seed)
    snapshots = [random_snapshot(rng, f"i{i}", "llama") for i in range(n)]
    planner = MigrationPlanner(params)
    planner.sync(snapshots)
    changed_per_round = max(1, n // 20)
    updates: list[int] = []
    round_ns: list[int] = []
    stateless: list[int] = []
    timer = CLOCKS[clock]
    fresh_rounds = [
        [random_snapshot(rng, f"i{rng.randrange(n)}", "llama") for _ in range(changed_per_round)] for _ in range(rounds)
    ]
    now = 0.0
    gc.collect()
    gc.disable()
    try:
        for fresh in fresh_rounds:
            now += 0.05
            for snapshot in fresh:
                t0 = timer()
                planner.update(snapshot)
                updates.append(timer() - t0)
                snapshots[int(snapshot.instance_id[1:])] = snapshot
            t0 = timer()
            planner.plan([], now=now)
            round_ns.append(timer() - t0)
        for _ in range(min(rounds, 20)):
            t0 = timer()
            plan_migrations(snapshots, [], params, now=now)
            stateless.append(timer() - t0)
    finally:
        gc.enable()
    u50, u99 = percentiles_us(updates)
    r50, r99 = percentiles_us(round_ns)
    s50, s99 = percentiles_us(stateless)
    return {
        "update_p50_us": u50,
        "update_p99_us": u99,
        "round_p50_us": r50,
        "round_p99_us": r99,
        "changed_per_round": changed_per_round,
        "full_scan_p50_us": s50,
        "full_scan_p99_us": s99,
    }


def _pair(row: dict[str, Any], label: str) -> str:
    return f"{row[label + '_p50_us']:.1f}/{row[label + '_p99_us']:.1f}".rjust(11)


def _tail(row: dict[str, Any]) -> str:
    """cpu p99, p99.9 and gc n/max of a dispatch row."""
    gc_hits = f"{row['gc_decisions']}/{row['gc_pause_max_us']:.0f}"
    return f"{row['total_cpu_p99_us']:>7.1f} {row['total_p999_us']:>7.1f} {gc_hits:>10}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256,1000,4000,10000", help="instance counts, comma-separated")
    parser.add_argument(
        "--policies",
        default=",".join((*POLICY_NAMES, "drover")),
        help="dispatch policies, comma-separated, and drover (predictive as `drover` configures it; default: all)",
    )
    parser.add_argument("--ops", type=int, default=5000, help="decisions timed per size and policy")
    parser.add_argument("--rounds", type=int, default=200, help="migration rounds timed per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall clock, or the thread's CPU time (shared hosts)"
    )
    parser.add_argument(
        "--gc",
        choices=GC_MODES,
        default="service",
        help="the cyclic GC while timing: service = as the control plane and simulator set it (control/gc_tuning.py, "
        "default), on = Python's default thresholds, off = disabled",
    )
    parser.add_argument(
        "--replays",
        type=int,
        default=1,
        help="time the same decisions on this many identical indexes, and report each decision's fastest too",
    )
    parser.add_argument(
        "--fresh-snapshots",
        action="store_true",
        help="build each heartbeat's snapshot just before its upsert, which releases the previous one (the scheduler)",
    )
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed decisions first (pools built)")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots here")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes expects integers, got {args.sizes!r}")
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICY_NAMES and p != "drover"]
    if unknown:
        parser.error(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICY_NAMES)}, drover")
    results: dict[str, Any] = {"clock": args.clock, "gc": args.gc, "dispatch": {}, "planning": {}}
    print(f"== dispatch, µs, {args.clock} clock (decide = choose + on_dispatched; heartbeat = upsert; total = both)")
    gc_modes = {
        "service": "as the control plane and simulator run (control/gc_tuning.py: start-up frozen, young threshold "
        f"{gc_tuning.YOUNG_THRESHOLD})",
        "on": f"Python's default thresholds {gc.get_threshold()}, nothing frozen (not the product's setting)",
        "off": "disabled while timing (not the product's setting)",
    }
    print(
        f"   gc {args.gc}: {gc_modes[args.gc]}"
        + f"; {args.warmup} untimed decisions first; "
        + (
            "snapshots built just before their upsert, which releases the previous one (as the scheduler does)"
            if args.fresh_snapshots
            else "snapshots built at start-up and held (no upsert releases one; --fresh-snapshots: as the scheduler)"
        )
        + f"; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "   slowest 1 % = over every replay, how many of the slowest 1 % of decisions a collection ran in (gc), the "
        "OS switched out (out), are slow in every replay (own: the code's) or only in one (noise: the machine's)"
    )
    print(
        "   uninterr. = decisions the OS did not switch out (n = how many it did); cpu p99 = the p99 of each "
        "decision's thread CPU time; gc n/max = timed decisions a collection ran in / its longest pause, µs; "
        "cpu / mem control = fixed compute / fixed cache misses timed in the same run (the noise floor); min = "
        "each decision's fastest of the replays"
    )
    print(
        f"{'instances':>9} {'policy':<13} {'decide p50':>10} {'decide p99':>10} {'hb p50':>6} {'hb p99':>6} "
        f"{'total p50':>9} {'total p99':>9} {'uninterr. p99':>13} {'n':>4} {'cpu p99':>7} {'p99.9':>7} "
        f"{'gc n/max':>10} {'cpu control':>11} {'mem control':>11} {'min p50/p99':>11} {'load':>5} {'flip p99':>8} "
        f"{'slowest 1 %: gc/out/own/noise':>29}"
    )
    steal_before = steal_jiffies()
    for n in sizes:
        for name in policies:
            r = bench_dispatch(
                n,
                name,
                args.ops,
                args.seed,
                args.clock,
                gc_mode=args.gc,
                replays=args.replays,
                warmup=args.warmup,
                fresh=args.fresh_snapshots,
            )
            results["dispatch"][f"{n}/{name}"] = r
            flip = f"{r['drain_flip_p99_us']:>8.1f}" if "drain_flip_p99_us" in r else f"{'-':>8}"
            fastest = f"{r['total_min_p50_us']:.1f}/{r['total_min_p99_us']:.1f}" if "total_min_p99_us" in r else "-"
            print(
                f"{n:>9} {name:<13} {r['decide_p50_us']:>10.1f} {r['decide_p99_us']:>10.1f} "
                f"{r['heartbeat_p50_us']:>6.1f} {r['heartbeat_p99_us']:>6.1f} {r['total_p50_us']:>9.1f} "
                f"{r['total_p99_us']:>9.1f} {r['total_uninterrupted_p99_us']:>13.1f} {r['interrupted']:>4} "
                f"{_tail(r)} {_pair(r, 'control')} {_pair(r, 'control_memory')} {fastest:>11} {r['load_after']:>5.1f} "
                f"{flip} {'/'.join(str(v) for v in r['slowest_1pct'].values()):>29}",
                flush=True,
            )
            for k, rep in enumerate(r["reps"][1:], 2):
                print(
                    f"{'':>9} {'replay ' + str(k):<13} {rep['decide_p50_us']:>10.1f} {rep['decide_p99_us']:>10.1f} "
                    f"{rep['heartbeat_p50_us']:>6.1f} {rep['heartbeat_p99_us']:>6.1f} {rep['total_p50_us']:>9.1f} "
                    f"{rep['total_p99_us']:>9.1f} {rep['total_uninterrupted_p99_us']:>13.1f} {rep['interrupted']:>4} "
                    f"{_tail(rep)} {_pair(rep, 'control')} {_pair(rep, 'control_memory')} {'':>11} "
                    f"{rep['load_after']:>5.1f}",
                    flush=True,
                )
    steal_after = steal_jiffies()
    if steal_before is not None and steal_after is not None and steal_after[1] > steal_before[1]:
        results["steal_pct"] = 100 * (steal_after[0] - steal_before[0]) / (steal_after[1] - steal_before[1])
        print(
            f"   steal: {results['steal_pct']:.1f} % of this machine's CPU time went to other virtual machines while "
            "the dispatch rows ran (/proc/stat; a paused virtual CPU looks like a slower decision to both clocks)"
        )
    print("\n== migration planning, µs (drover parameters; round = plan after 5 % fresh heartbeats)")
    print(
        f"{'instances':>9} {'update p50':>10} {'update p99':>10} {'round p50':>10} {'round p99':>10} "
        f"{'full scan p50':>13} {'full scan p99':>13}"
    )
    for n in sizes:
        r = bench_planning(n, args.rounds, args.seed, user_policy_params("drover"), args.clock)
        results["planning"][str(n)] = r
        print(
            f"{n:>9} {r['update_p50_us']:>10.1f} {r['update_p99_us']:>10.1f} {r['round_p50_us']:>10.1f} "
            f"{r['round_p99_us']:>10.1f} {r['full_scan_p50_us']:>13.1f} {r['full_scan_p99_us']:>13.1f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        from scripts import plotting

        series = {
            name: (sizes, [results["dispatch"][f"{n}/{name}"]["total_p99_us"] for n in sizes]) for name in policies
        }
        plotting.line_plot(
            args.plot,
            "policy_scale_dispatch",
            series,
            xlabel="instances",
            ylabel="p99 µs per decision (decide + heartbeat)",
            title="Dispatch cost at scale",
            log_x=True,
            log_y=True,
        )
        plotting.line_plot(
            args.plot,
            "policy_scale_planning",
            {
                "incremental round": (sizes, [results["planning"][str(n)]["round_p99_us"] for n in sizes]),
                "full scan": (sizes, [results["planning"][str(n)]["full_scan_p99_us"] for n in sizes]),
            },
            xlabel="instances",
            ylabel="p99 µs per migration round",
            title="Migration planning at scale",
            log_x=True,
            log_y=True,
        )


if __name__ == "__main__":
    main()
