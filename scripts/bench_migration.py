"""Live-migration downtime vs blocking copy vs recompute, on two real vLLM-CPU engines.

    python -m scripts.bench_migration [--lengths 64,256,1024,2048,4096,8192] [--repeats 3] [--threads 1]
                                      [--background 2] [--quick] [--plot DIR]

Model: the generated MIGRATION_BENCH Llama (32 KiB of KV per token in float32, 8k context). For every
sequence length of the grid (fixed before measuring; every point is reported), one request is prefilled
on engine A, decodes a little, then moves three times, each with a different method:

  live       A -> B  multi-stage pre-copy while it decodes, stop, copy the last blocks, resume with KV loaded
  blocking   B -> A  stop, copy every block, resume with KV loaded
  recompute  A -> B  abort, re-prefill prompt + generated tokens on B

Reported per move: *downtime* = from the stop (abort) call to the first token on the destination, and
*gap* = from the last token the source streamed to that first token (the time the request did not decode),
next to the request's normal inter-token gap just before. Other requests (``--background`` per engine)
decode throughout; their inter-token gaps on the source during the live pre-copy stages are compared with
an equally long window just before (mean and 95% CI): the decode slowdown migration causes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engines.base import Engine, EngineRequest
from engines.migration import FrozenRequest, MigratableEngine
from engines.tiny_model import MIGRATION_BENCH, ensure_model
from transport.messages import SamplingParams

BLOCK = 32
MAX_MODEL_LEN = 8192 + 1024
DECODE_BEFORE_MOVE = 24  # tokens each request decodes on its source before a move
LAST_STAGE_MAX_BLOCKS = 1  # stop-and-copy once at most this many new full blocks remain
MAX_STAGES = 8


class BenchEngine(Engine, MigratableEngine, Protocol):
    """Any migratable engine (vLLM here; torch engines in ``scripts/gpu_check.py``, which reuses these moves)."""

    instance_id: str


def prompt_of(seed: int, length: int) -> list[int]:
    return [1] + [3 + (seed * 7919 + i * 104729) % 256 for i in range(length - 1)]


@dataclass
class Stream:
    """A request's outputs as a client sees them, with the arrival time of each token."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def run_on(self, engine: BenchEngine, kv_transfer: dict[str, Any] | None = None) -> None:
        request = EngineRequest(
            self.request_id, self.prompt, self.sampling, output_token_ids=list(self.tokens), kv_transfer=kv_transfer
        )
        stream = engine.generate(request)

        async def consume() -> None:
            async for output in stream:
                now = time.perf_counter()
                self.tokens += output.new_token_ids
                self.times += [now] * len(output.new_token_ids)

        self.task = asyncio.create_task(consume())

    def add_tail(self, frozen: FrozenRequest) -> None:
        tail = frozen.output_token_ids[len(self.tokens) :]
        self.tokens += tail
        self.times += [math.nan] * len(tail)  # sampled at the source, sent at the stop: not a decode

    async def wait_tokens(self, count: int, timeout_s: float = 900.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.tokens) < count:
                await asyncio.sleep(0.001)

    def gaps_between(self, start: float, end: float) -> list[float]:
        times = [t for t in self.times if not math.isnan(t)]
        return [b - a for a, b in itertools.pairwise(times) if start <= a and b <= end]


@dataclass
class Move:
    method: str
    length: int
    downtime_s: float
    gap_s: float
    normal_gap_s: float
    stages: int = 0
    precopy_s: float = 0.0
    blocks: int = 0


class Background:
    """Requests that decode on an engine for the whole run (restarted when they finish)."""

    def __init__(self, engine: BenchEngine, count: int, seed: int) -> None:
        self.engine = engine
        self.streams: list[Stream] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._slot(seed * 100 + i)) for i in range(count)]

    async def _slot(self, seed: int) -> None:
        for round_ in range(10_000):
            if self._stop.is_set():
                return
            stream = Stream(
                f"bg-{self.engine.instance_id}-{seed}-{round_}",
                prompt_of(seed * 31 + round_, 64),
                SamplingParams(max_tokens=2000, ignore_eos=True),
            )
            self.streams.append(stream)
            stream.run_on(self.engine)
            assert stream.task is not None
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stream.task, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self._stop.is_set():
                await self.engine.abort(stream.request_id)
                await stream.task
                return

    def gaps_between(self, start: float, end: float) -> list[float]:
        return [g for s in self.streams for g in s.gaps_between(start, end)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def normal_gap(stream: Stream, last: int = 12) -> float:
    times = [t for t in stream.times[-last - 1 :] if not math.isnan(t)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(gaps) if gaps else math.nan


async def first_token_after(stream: Stream, count: int) -> float:
    await stream.wait_tokens(count + 1)
    return stream.times[count]


async def move_live(
    src: BenchEngine,
    dst: BenchEngine,
    stream: Stream,
    length: int,
    bg: Background,
    slowdown: tuple[list[float], list[float]],
) -> Move:
    mid = uuid.uuid4().hex[:12]
    before = normal_gap(stream)
    endpoint = await dst.migrate_in_reserve(mid, -(-(length + len(stream.tokens)) // BLOCK) + 2)
    assert endpoint is not None, "destination has no room"
    begin = time.perf_counter()
    await src.migrate_out_begin(stream.request_id, mid, endpoint)
    blocks = stages = 0
    for _ in range(MAX_STAGES):
        report = await src.migrate_out_stage(mid)
        stages += 1
        blocks += report.copied_blocks
        await dst.migrate_in_reserve(mid, report.total_blocks + 2)
        if report.remaining_blocks <= LAST_STAGE_MAX_BLOCKS:
            break
    stop = time.perf_counter()
    # Decode slowdown of the source's other requests: pre-copy window vs an equally long one just before.
    window = max(stop - begin, 0.25)
    slowdown[0].extend(bg.gaps_between(begin - window, begin))
    slowdown[1].extend(bg.gaps_between(begin, stop))
    last_token = stream.times[-1]
    frozen = await src.migrate_out_stop(mid)
    stream.add_tail(frozen)
    count = len(stream.tokens)
    stream.run_on(dst, frozen.kv_transfer)
    first = await first_token_after(stream, count)
    await src.migrate_out_commit(mid)
    return Move(
        "live",
        length,
        first - stop,
        first - last_token,
        before,
        stages,
        stop - begin,
        blocks + frozen.final_stage.copied_blocks,
    )


async def move_blocking(src: BenchEngine, dst: BenchEngine, stream: Stream, length: int) -> Move:
    mid = uuid.uuid4().hex[:12]
    before = normal_gap(stream)
    endpoint = await dst.migrate_in_reserve(mid, -(-(length + len(stream.tokens)) // BLOCK) + 2)
    assert endpoint is not None
    await src.migrate_out_begin(stream.request_id, mid, endpoint)
    last_token = stream.times[-1]
    stop = time.perf_counter()
    frozen = await src.migrate_out_stop(mid)  # no pre-copy: the stop copies every block
    stream.add_tail(frozen)
    count = len(stream.tokens)
    stream.run_on(dst, frozen.kv_transfer)
    first = await first_token_after(stream, count)
    await src.migrate_out_commit(mid)
    return Move("blocking", length, first - stop, first - last_token, before, 0, 0.0, frozen.final_stage.copied_blocks)


async def move_recompute(src: BenchEngine, dst: BenchEngine, stream: Stream, length: int) -> Move:
    before = normal_gap(stream)
    last_token = stream.times[-1]
    stop = time.perf_counter()
    await src.abort(stream.request_id)
    assert stream.task is not None
    await stream.task
    count = len(stream.tokens)
    stream.run_on(dst)  # prompt + generated, no KV: prefilled again
    first = await first_token_after(stream, count)
    return Move("recompute", length, first - stop, first - last_token, before)


def mean_ci(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


async def bench(
    lengths: list[int], repeats: int, threads: int, background: int, kv_gib: float, cache: Path
) -> list[list[Move]]:
    from engines.vllm.engine import VllmEngine  # imports vllm: only this benchmark's own run needs it

    model = ensure_model(cache, MIGRATION_BENCH)
    common = dict(
        model_name=MIGRATION_BENCH.name,
        block_size=BLOCK,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        kv_cache_gib=kv_gib,
        cpu_threads=threads,
        staging_blocks=MAX_MODEL_LEN // BLOCK + 8,
    )
    a, b = VllmEngine("A", model, **common), VllmEngine("B", model, **common)  # type: ignore[arg-type]
    started = time.perf_counter()
    await a.start()
    await b.start()
    print(
        f"# engines up in {time.perf_counter() - started:.0f} s; KV layout {a.info.kv_layout}; "
        f"{MIGRATION_BENCH.kv_bytes_per_token // 1024} KiB KV/token; {threads} thread(s) per engine; "
        f"{background} background request(s) per engine; grid {lengths} x {repeats} repeats",
        flush=True,
    )
    bg_a, bg_b = Background(a, background, 1), Background(b, background, 2)
    runs: list[list[Move]] = []
    slowdown: dict[int, tuple[list[float], list[float]]] = {length: ([], []) for length in lengths}
    try:
        for rep in range(repeats):
            moves: list[Move] = []
            for length in lengths:
                t0 = time.perf_counter()
                stream = Stream(
                    f"req-{length}-{rep}",
                    prompt_of(length * 10 + rep, length),  # a new prompt per repeat: no prefix-cache hits
                    SamplingParams(max_tokens=MAX_MODEL_LEN - length - 8, ignore_eos=True),
                )
                stream.run_on(a)
                await stream.wait_tokens(DECODE_BEFORE_MOVE)
                moves.append(await move_live(a, b, stream, length, bg_a, slowdown[length]))
                await stream.wait_tokens(len(stream.tokens) + DECODE_BEFORE_MOVE)
                moves.append(await move_blocking(b, a, stream, length))
                await stream.wait_tokens(len(stream.tokens) + DECODE_BEFORE_MOVE)
                moves.append(await move_recompute(a, b, stream, length))
                await stream.wait_tokens(len(stream.tokens) + 4)
                await b.abort(stream.request_id)
                assert stream.task is not None
                await stream.task
                print(f"# repeat {rep}, length {length}: done in {time.perf_counter() - t0:.1f} s", flush=True)
            runs.append(moves)
    finally:
        await bg_a.stop()
        await bg_b.stop()
        await a.shutdown()
        await b.shutdown()
    report(lengths, runs, slowdown)
    return runs


def table(lengths: list[int], moves: list[Move], title: str) -> None:
    by = {(m.method, m.length): m for m in moves}
    print()
    print(title)
    header = (
        f"{'tokens':>7} {'KV MiB':>7} | {'normal gap':>10} | {'live down':>9} {'live gap':>8} {'stages':>6} "
        f"{'precopy':>8} | {'block down':>10} {'block gap':>9} | {'recomp down':>11} {'recomp gap':>10} | "
        f"{'block/live':>10} {'recomp/live':>11}"
    )
    print(header)
    print("-" * len(header))
    for length in lengths:
        live, blocking, recompute = by[("live", length)], by[("blocking", length)], by[("recompute", length)]
        kv_mib = length * MIGRATION_BENCH.kv_bytes_per_token / (1 << 20)
        print(
            f"{length:>7} {kv_mib:>7.0f} | {live.normal_gap_s * 1e3:>10.1f} | {live.downtime_s * 1e3:>9.1f} "
            f"{live.gap_s * 1e3:>8.1f} {live.stages:>6} {live.precopy_s * 1e3:>8.1f} | "
            f"{blocking.downtime_s * 1e3:>10.1f} {blocking.gap_s * 1e3:>9.1f} | "
            f"{recompute.downtime_s * 1e3:>11.1f} {recompute.gap_s * 1e3:>10.1f} | "
            f"{blocking.downtime_s / live.downtime_s:>9.1f}x {recompute.downtime_s / live.downtime_s:>10.1f}x"
        )


def median_moves(lengths: list[int], runs: list[list[Move]]) -> list[Move]:
    """Per method and length, the median of every field over the repeats."""
    medians = []
    for length in lengths:
        for method in ("live", "blocking", "recompute"):
            points = [m for run in runs for m in run if m.method == method and m.length == length]
            medians.append(
                Move(
                    method,
                    length,
                    statistics.median(m.downtime_s for m in points),
                    statistics.median(m.gap_s for m in points),
                    statistics.median(m.normal_gap_s for m in points),
                    round(statistics.median(m.stages for m in points)),
                    statistics.median(m.precopy_s for m in points),
                    round(statistics.median(m.blocks for m in points)),
                )
            )
    return medians


def report(lengths: list[int], runs: list[list[Move]], slowdown: dict[int, tuple[list[float], list[float]]]) -> None:
    print()
    print(
        "Downtime = stop (abort) call -> first token on the destination; gap = last token the source streamed -> "
        "first token on the destination; normal gap = the request's median inter-token gap before; all in ms"
    )
    for rep, moves in enumerate(runs):
        table(lengths, moves, f"Repeat {rep}:")
    medians = median_moves(lengths, runs)
    table(lengths, medians, f"Median of {len(runs)} repeats:")
    print()
    print("Decode gaps of the source's other requests (ms, mean +- 95% CI): before vs during the live pre-copy")
    all_before: list[float] = []
    all_during: list[float] = []
    for length in lengths:
        before, during = slowdown[length]
        all_before += before
        all_during += during
        (mb, cb), (md, cd) = mean_ci(before), mean_ci(during)
        print(
            f"{length:>7}: {mb * 1e3:7.2f} +- {cb * 1e3:5.2f} (n={len(before):3})  vs  "
            f"{md * 1e3:7.2f} +- {cd * 1e3:5.2f} (n={len(during):3})"
        )
    (mb, cb), (md, cd) = mean_ci(all_before), mean_ci(all_during)
    print(
        f"{'all':>7}: {mb * 1e3:7.2f} +- {cb * 1e3:5.2f} (n={len(all_before):3})  vs  "
        f"{md * 1e3:7.2f} +- {cd * 1e3:5.2f} (n={len(all_during):3})  -> slowdown {100 * (md / mb - 1):+.1f}%"
    )
    by = {(m.method, m.length): m for m in medians}
    longest = lengths[-1]
    live, blocking, recompute = by[("live", longest)], by[("blocking", longest)], by[("recompute", longest)]
    print()
    print(
        f"Summary (medians): at {longest} tokens live-migration downtime {live.downtime_s * 1e3:.1f} ms "
        f"(normal gap {live.normal_gap_s * 1e3:.1f} ms) vs blocking copy {blocking.downtime_s * 1e3:.1f} ms "
        f"({blocking.downtime_s / live.downtime_s:.1f}x) and recompute {recompute.downtime_s * 1e3:.1f} ms "
        f"({recompute.downtime_s / live.downtime_s:.1f}x); live downtime from {lengths[0]} to {longest} tokens: "
        f"{by[('live', lengths[0])].downtime_s * 1e3:.1f} -> {live.downtime_s * 1e3:.1f} ms"
    )


def plot(directory: Path, lengths: list[int], runs: list[list[Move]]) -> None:
    """Downtime and gap vs sequence length, one line per method (medians over the repeats)."""
    from scripts.plotting import line_plot

    by = {(m.method, m.length): m for m in median_moves(lengths, runs)}
    methods = ("live", "blocking", "recompute")
    for field_name, what in (("downtime_s", "downtime (stop -> first token on destination)"), ("gap_s", "token gap")):
        series = {
            method: (lengths, [getattr(by[(method, n)], field_name) * 1e3 for n in lengths]) for method in methods
        }
        series["normal inter-token gap"] = (lengths, [by[("live", n)].normal_gap_s * 1e3 for n in lengths])
        line_plot(
            directory,
            f"migration_{field_name.removesuffix('_s')}_vs_length",
            series,
            xlabel="sequence length (tokens)",
            ylabel="ms",
            title=f"Migration {what}, median of {len(runs)} repeat(s), vLLM-CPU",
            log_x=True,
            log_y=True,
            xticks=lengths,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,256,1024,2048,4096,8192", help="sequence lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="times the whole grid runs (all reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--background", type=int, default=2, help="other decoding requests per engine")
    parser.add_argument("--kv-gib", type=float, default=1.0, help="KV cache per engine (GiB)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "drover-models")
    parser.add_argument("--quick", action="store_true", help="smoke run: lengths 64,256, one repeat, 1 background")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.background = "64,256", 1, 1
    lengths = [int(x) for x in args.lengths.split(",")]
    if max(lengths) + 4 * DECODE_BEFORE_MOVE + 16 > MAX_MODEL_LEN:
        parser.error(f"lengths must leave room for decoding within {MAX_MODEL_LEN} tokens")
    runs = asyncio.run(bench(lengths, args.repeats, args.threads, args.background, args.kv_gib, args.cache))
    if args.plot:
        plot(args.plot, lengths, runs)


if __name__ == "__main__":
    main()
