"""Does vLLM v1 itself thrash when a long prompt is admitted chunk by chunk beside a growing older request?

    flock /tmp/drover-heavy.lock python -m scripts.vllm_thrash_check [--prefix-caching]

The scenario of ``tests/engines/test_sim_fidelity.py`` at vLLM-CPU's block size: 32 blocks of 32 tokens,
a 256-token budget, request A (400-token prompt, 600 output tokens) and request B (700-token prompt, 8
output tokens), both submitted at once to an offline vLLM engine on Drover's tiny model. Prints vLLM's own
preemption counter next to the simulated engine's counts for the same scenario. vLLM v1 admits a waiting
request only when its whole sequence fits (``scheduler_reserve_full_isl``, default on), so it does not thrash.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engines.sim.core import SimEngineConfig, SimEngineCore, SimRequest
from engines.sim.cost_model import TINY_CPU

BLOCK, BLOCKS, BUDGET, CONTEXT = 32, 32, 256, 1024
PROMPTS = ((400, 600), (700, 8))


def simulated(reserve_full_prompt: bool) -> int:
    config = SimEngineConfig(
        block_size=BLOCK,
        num_blocks=BLOCKS,
        max_num_seqs=8,
        max_num_batched_tokens=BUDGET,
        max_model_len=CONTEXT,
        reserve_full_prompt=reserve_full_prompt,
    )
    core = SimEngineCore(config, TINY_CPU)
    for i, (p, o) in enumerate(PROMPTS):
        core.add(SimRequest(f"r{i}", prompt_len=p, max_tokens=o))
    now = 0.0
    while (end := core.plan(now)) is not None:
        core.finish_plan()
        now = end
    return core.num_preemptions


def live(prefix_caching: bool) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from engines.tiny_model import ensure_model

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model_dir = ensure_model(Path.home() / ".cache" / "drover")
    llm = LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=BLOCK,
        # vLLM keeps one block aside (its null block): one more makes the same 32 usable blocks
        num_gpu_blocks_override=BLOCKS + 1,
        kv_cache_memory_bytes=(BLOCKS + 1) * BLOCK * 2 * 4 * 2 * 64 * 4,  # 2 (K,V) x 4 layers x 2 KV heads x 64 x fp32
        max_model_len=CONTEXT,
        max_num_seqs=8,
        max_num_batched_tokens=BUDGET,
        enable_chunked_prefill=True,
        enable_prefix_caching=prefix_caching,
        enforce_eager=True,
        disable_log_stats=False,
    )
    prompts = [
        TokensPrompt(prompt_token_ids=[3 + (k * 7 + i) % 300 for k in range(p)]) for i, (p, _) in enumerate(PROMPTS)
    ]
    params = [SamplingParams(max_tokens=o, ignore_eos=True) for _, o in PROMPTS]
    llm.generate(prompts, params)
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            return float(getattr(metric, "value", 0.0))
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-caching", action="store_true", help="vLLM v1's default; off by default here")
    args = parser.parse_args()
    print(f"simulated engine, full-sequence admission (vLLM's default): {simulated(True)} preemptions")
    print(f"simulated engine, first-chunk admission (older vLLM v1): {simulated(False)} preemptions")
    caching = "on" if args.prefix_caching else "off"
    print(f"vLLM v1 (prefix caching {caching}): {live(args.prefix_caching):.0f} preemptions")


if __name__ == "__main__":
    main()
