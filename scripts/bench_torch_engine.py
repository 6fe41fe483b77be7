"""Throughput of the torch engine against transformers, and the memory a KunServe drop frees.

Same process, same model, same prompts, same thread count, run side by side:
  transformers - ``LlamaForCausalLM.generate`` (greedy, static batch of equal-length prompts, KV cache on);
  torch engine - ``TorchEngine`` through its asyncio ``generate`` (paged KV, continuous batching), all
                 requests submitted at once.
Output tokens per second at batch 1 and 8 (decode-dominated: short prompts, long outputs; best of
``--repeat`` alternating runs), and how many sequences came out token-identical (greedy float32: a random
model can hit near-ties, ~1e-6 apart, where batch shape alone decides, in transformers as well). Then the
memory side: an engine with a fixed budget drops to 1/g of the layers (g = 2, 4) and reports weight bytes and KV blocks
before and after, and a 2-engine group forms and dissolves around a running request (time, KV moved).

    python -m scripts.bench_torch_engine [--model tiny|migration-bench] [--prompt-len 32] [--new-tokens 128]
                                         [--threads 1] [--repeat 3] [--kv-mib 64] [--quick] [--plot DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from engines.base import EngineRequest
from engines.tiny_model import SPECS, ModelSpec, ensure_model
from engines.torch import LayerGroup, TorchEngine, split_layers
from transport.messages import SamplingParams

MIB = 1024 * 1024


def make_prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [[1, *torch.randint(3, 259, (length - 1,), generator=generator).tolist()] for _ in range(count)]


def bench_transformers(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, eos_token_id=None, pad_token_id=0, **kwargs)
        seconds = time.perf_counter() - started
    return seconds, out[:, ids.shape[1] :].tolist()


async def bench_engine(engine: TorchEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    async def run(rid: str, prompt: list[int], max_tokens: int) -> list[int]:
        tokens: list[int] = []
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for out in engine.generate(EngineRequest(rid, prompt, sampling)):
            tokens += out.new_token_ids
        return tokens

    await run("warm-up", prompts[0][:8], 4)
    started = time.perf_counter()
    outputs = await asyncio.gather(*(run(f"b{i}", p, new_tokens) for i, p in enumerate(prompts)))
    return time.perf_counter() - started, list(outputs)


async def throughput(
    model_dir: Path, spec: ModelSpec, args: argparse.Namespace, console: Console
) -> tuple[list[float], dict[str, list[float]]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = TorchEngine("bench", model_dir, model_name=spec.name, num_blocks=1024, threads=args.threads)
    await engine.start()
    table = Table(title=f"Output tokens/s, {spec.name}, float32, {args.threads} thread(s), CPU")
    for column in ("batch", "prompt", "new", "transformers tok/s", "torch engine tok/s", "ratio", "identical outputs"):
        table.add_column(column, justify="right")
    ratios: list[float] = []
    tokens_per_s: dict[str, list[float]] = {"transformers": [], "torch engine": []}
    try:
        for batch in (1, 8):
            prompts = make_prompts(batch, args.prompt_len)
            hf_s, eng_s = float("inf"), float("inf")
            for _ in range(args.repeat):  # alternate the two, keep each one's best (shared, noisy CPUs)
                seconds, hf_tokens = bench_transformers(model, prompts, args.new_tokens)
                hf_s = min(hf_s, seconds)
                seconds, eng_tokens = await bench_engine(engine, prompts, args.new_tokens)
                eng_s = min(eng_s, seconds)
            total = batch * args.new_tokens
            ratio = hf_s / eng_s
            ratios.append(ratio)
            tokens_per_s["transformers"].append(total / hf_s)
            tokens_per_s["torch engine"].append(total / eng_s)
            table.add_row(
                str(batch),
                str(args.prompt_len),
                str(args.new_tokens),
                f"{total / hf_s:,.0f}",
                f"{total / eng_s:,.0f}",
                f"{ratio:.2f}x",
                f"{sum(a == b for a, b in zip(hf_tokens, eng_tokens, strict=True))}/{batch}",
            )
    finally:
        await engine.shutdown()
    console.print(table)
    return ratios, tokens_per_s


async def memory(model_dir: Path, spec: ModelSpec, args: argparse.Namespace, console: Console) -> dict[str, int]:
    """Prints the drop table and the group round trip; returns KV blocks per group size ("g=1" ...)."""
    probe = TorchEngine("probe", model_dir, model_name=spec.name, num_blocks=1)
    probe.build()
    weights = probe.stage.weight_bytes
    budget = weights + args.kv_mib * MIB
    table = Table(title=f"Drop: budget {budget / MIB:.1f} MiB (weights {weights / MIB:.1f} MiB + {args.kv_mib} MiB KV)")
    for column in ("g", "kept layers", "weights MiB", "KV blocks", "tokens of KV", "freed weights MiB", "drop ms"):
        table.add_column(column, justify="right")
    num_layers = spec.num_layers
    base = TorchEngine("m0", model_dir, model_name=spec.name, memory_budget_bytes=budget)
    base.build()
    blocks0 = base.stage.num_blocks
    kv_blocks = {"g=1": blocks0}
    table.add_row(
        "1", f"0-{num_layers}", f"{weights / MIB:.2f}", str(blocks0), f"{blocks0 * base.block_size:,}", "-", "-"
    )
    for groups in (2, 4):
        if groups > num_layers:
            continue
        engine = TorchEngine(f"m{groups}", model_dir, model_name=spec.name, memory_budget_bytes=budget)
        engine.build()
        keep = split_layers(num_layers, groups)[0]
        report = await engine.drop_layers(keep)
        kv_blocks[f"g={groups}"] = report.kv_blocks_after
        table.add_row(
            str(groups),
            f"{keep[0]}-{keep[1]}",
            f"{report.weight_bytes_after / MIB:.2f}",
            str(report.kv_blocks_after),
            f"{report.kv_blocks_after * engine.block_size:,}",
            f"{report.freed_weight_bytes / MIB:.2f}",
            f"{report.seconds * 1e3:.1f}",
        )
    console.print(table)

    # A running request through form -> decode -> dissolve on two engines.
    engines = [
        TorchEngine(f"grp{r}", model_dir, model_name=spec.name, memory_budget_bytes=budget, threads=args.threads)
        for r in range(2)
    ]
    for engine in engines:
        await engine.start()
    try:
        prompt = make_prompts(1, 256)[0]
        stream = engines[0].generate(EngineRequest("g", prompt, SamplingParams(max_tokens=64, ignore_eos=True)))
        await anext(stream)
        group, formed = await LayerGroup.form(engines)
        for _ in range(8):
            await anext(stream)
        restored = await group.dissolve()
        async for _ in stream:
            pass
    finally:
        for engine in engines:
            await engine.shutdown()
    console.print(
        f"group of 2: KV blocks {formed.kv_blocks_before} -> {formed.kv_blocks_after}; "
        f"form {formed.seconds * 1e3:.1f} ms "
        f"(moved {formed.moved_kv_bytes / MIB:.2f} MiB of KV), dissolve {restored.seconds * 1e3:.1f} ms "
        f"(moved {restored.moved_kv_bytes / MIB:.2f} MiB back, preempted {len(restored.preempted)})"
    )
    return kv_blocks


def plot(directory: Path, spec: ModelSpec, tokens_per_s: dict[str, list[float]], kv_blocks: dict[str, int]) -> None:
    """Output tokens/s per batch size (transformers vs torch engine), and KV blocks after a drop per g."""
    from scripts.plotting import bar_plot

    bar_plot(
        directory,
        "torch_engine_throughput",
        ["batch 1", "batch 8"],
        tokens_per_s,
        ylabel="output tokens/s",
        title=f"Torch engine vs transformers, {spec.name}, float32, CPU",
    )
    bar_plot(
        directory,
        "torch_engine_drop_kv_blocks",
        list(kv_blocks),
        {"KV blocks": list(kv_blocks.values())},
        ylabel="KV blocks in the same memory budget",
        title=f"KunServe drop to 1/g of the layers, {spec.name}",
    )


async def amain(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "drover-bench-models"
    model_dir = ensure_model(cache, spec)
    console = Console()
    ratios, tokens_per_s = await throughput(model_dir, spec, args, console)
    kv_blocks = await memory(model_dir, spec, args, console)
    console.print(
        f"summary: torch engine / transformers throughput = {ratios[0]:.2f}x at batch 1, {ratios[1]:.2f}x at batch 8"
    )
    if args.plot:
        plot(args.plot, spec, tokens_per_s, kv_blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="tiny")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best one counts")
    parser.add_argument("--kv-mib", type=int, default=64, help="KV memory beside the weights in the drop budget")
    parser.add_argument("--cache", default="", help="model cache directory (default: a temp directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, one repeat")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this directory")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeat = 32, 1
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
