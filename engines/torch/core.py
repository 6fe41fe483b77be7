"""The synchronous engine core: schedule a step, run it through a stage runner, sample, commit.

The three phases are separate methods so the asyncio engine can run only the heavy one
(:meth:`EngineCore.execute`: the forward pass and sampling) in a worker thread while scheduling and
bookkeeping stay on the event loop. The runner is anything that maps a :class:`StageBatch` to logits: one
:class:`~engines.torch.stage.ModelStage` holding every layer, or a
:class:`~engines.torch.pipeline.PipelineGroup` of stages; the core cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engines.torch.batch import StageBatch, StageResult
from engines.torch.sampler import SamplingRow, sample
from engines.torch.scheduler import Scheduler, SchedulerOutput, SeqUpdate


class StageRunner(Protocol):
    """What the core runs steps on and moves KV through (a stage, or a pipeline of stages)."""

    @property
    def num_blocks(self) -> int:
        """Blocks every held layer's pool has: the most block ids the core may hand out."""
        ...

    def held_layers(self) -> list[int]: ...

    def forward(self, batch: StageBatch) -> StageResult: ...

    def export_kv(self, layers: list[int], block_ids: list[int]) -> dict[int, torch.Tensor]: ...

    def import_kv(self, kv: dict[int, torch.Tensor], block_ids: list[int]) -> None: ...

    def move_blocks(self, moves: dict[int, int]) -> None: ...


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One scheduled step: what the scheduler decided and the tensors that carry it."""

    output: SchedulerOutput
    batch: StageBatch
    rows: list[SamplingRow]


def build_batch(output: SchedulerOutput) -> StageBatch:
    """The first stage's input for a scheduled step."""
    token_ids: list[int] = []
    positions: list[int] = []
    starts = [0]
    context_lens: list[int] = []
    logits_indices: list[int] = []
    for chunk in output.chunks:
        token_ids += chunk.token_ids
        positions += range(chunk.start, chunk.start + chunk.num_tokens)
        starts.append(starts[-1] + chunk.num_tokens)
        context_lens.append(chunk.start + chunk.num_tokens)
        if chunk.sample:
            logits_indices.append(starts[-1] - 1)
    width = max(len(c.seq.block_ids) for c in output.chunks)
    tables = [c.seq.block_ids + [0] * (width - len(c.seq.block_ids)) for c in output.chunks]
    return StageBatch(
        positions=torch.tensor(positions, dtype=torch.long),
        query_start=torch.tensor(starts, dtype=torch.long),
        context_lens=torch.tensor(context_lens, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.long),
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
        token_ids=torch.tensor(token_ids, dtype=torch.long),
    )


class EngineCore:
    def __init__(self, runner: StageRunner, scheduler: Scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.num_steps = 0

    def schedule(self) -> StepPlan | None:
        """Decide the next step (event-loop side); None when nothing can run now."""
        output = self.scheduler.schedule()
        if not output.chunks:
            return None
        rows = [
            SamplingRow(c.seq.temperature, c.seq.top_p, c.seq.top_k, c.seq.seed, c.seq.num_output_tokens)
            for c in output.chunks
            if c.sample
        ]
        return StepPlan(output, build_batch(output), rows)

    def execute(self, plan: StepPlan) -> list[int]:
        """The forward pass and sampling (worker-thread side): touches tensors only, no scheduler state."""
        result = self.runner.forward(plan.batch)
        if not plan.rows:
            return []
        assert result.logits is not None, "the runner does not end with the model's last layer"
        return sample(result.logits, plan.rows)

    def commit(self, plan: StepPlan, sampled: list[int]) -> list[SeqUpdate]:
        self.num_steps += 1
        return self.scheduler.commit(plan.output, sampled)

    def step(self) -> list[SeqUpdate]:
        """Schedule, execute and commit one step in the calling thread ([] when idle)."""
        plan = self.schedule()
        if plan is None:
            return []
        return self.commit(plan, self.execute(plan))
