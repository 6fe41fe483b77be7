"""vLLM's scheduler with the adaptive step budget (``control/adaptive_budget.py``; runs in vLLM's EngineCore
process).

vLLM v1's ``Scheduler.schedule()`` starts every step from ``self.max_num_scheduled_tokens``, so setting it
before each call changes that step's token budget; the worker's buffers were sized for the configured
``max_num_batched_tokens`` (the rule's ceiling), and a budget at or below it leaves them valid. After each
call the step's scheduled tokens are reported to the rule: decodes (one token of a request whose prompt is
computed) and prompt tokens. vLLM's ``long_prefill_token_threshold`` is not used: it caps one request's chunk
(so that several partial prefills share a step), not the step, and the decodes' gaps are set by the step.

The rule's parameters travel in ``additional_config[ADDITIONAL_CONFIG_KEY]`` (vLLM hands its config to the
EngineCore process). :func:`make_scheduler` is the ``scheduler_cls`` vLLM calls: it builds the subclass of
the scheduler vLLM would have used (the async one when async scheduling is on).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from control.adaptive_budget import AdaptiveStepBudget, BudgetState

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput

ADDITIONAL_CONFIG_KEY = "drover_adaptive_budget"
SCHEDULER_QUALNAME = "engines.vllm.budget_scheduler.make_scheduler"


def rule_config(rule: AdaptiveStepBudget) -> dict[str, Any]:
    """The rule as plain data for vLLM's ``additional_config`` (hashed and sent to the EngineCore)."""
    return dataclasses.asdict(rule)


class _AdaptiveBudget:
    """Mixed into a vLLM scheduler class: sets each step's budget, then reports what the step scheduled."""

    drover_rule: AdaptiveStepBudget
    drover_state: BudgetState

    def _drover_init(self, vllm_config: VllmConfig) -> None:
        extra = vllm_config.additional_config
        if not isinstance(extra, dict) or ADDITIONAL_CONFIG_KEY not in extra:
            raise ValueError(f"the adaptive-budget scheduler needs additional_config[{ADDITIONAL_CONFIG_KEY!r}]")
        self.drover_rule = AdaptiveStepBudget(**extra[ADDITIONAL_CONFIG_KEY])
        self.drover_state = BudgetState()

    def _drover_schedule(self, schedule: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SchedulerOutput:
        self.max_num_scheduled_tokens = self.drover_rule.budget(self.drover_state)
        output: SchedulerOutput = schedule(*args, **kwargs)
        requests = self.requests  # type: ignore[attr-defined]
        decodes = prompt = 0
        for request_id, tokens in output.num_scheduled_tokens.items():
            request = requests.get(request_id)
            # num_computed_tokens already counts this step's tokens (vLLM advances it when scheduling)
            if tokens == 1 and request is not None and request.num_computed_tokens > request.num_prompt_tokens:
                decodes += 1
            else:
                prompt += tokens
        self.drover_state = self.drover_rule.observe(self.drover_state, decodes, prompt)
        return output


class AdaptiveBudgetScheduler(_AdaptiveBudget, Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drover_init(self.vllm_config)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        return self._drover_schedule(super().schedule, args, kwargs)


class AdaptiveBudgetAsyncScheduler(_AdaptiveBudget, AsyncScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drover_init(self.vllm_config)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        return self._drover_schedule(super().schedule, args, kwargs)


def make_scheduler(*, vllm_config: VllmConfig, **kwargs: Any) -> Scheduler:
    """vLLM's ``scheduler_cls``: the adaptive-budget subclass of the scheduler vLLM would have picked."""
    cls = AdaptiveBudgetAsyncScheduler if vllm_config.scheduler_config.async_scheduling else AdaptiveBudgetScheduler
    return cls(vllm_config=vllm_config, **kwargs)


__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "SCHEDULER_QUALNAME",
    "AdaptiveBudgetAsyncScheduler",
    "AdaptiveBudgetScheduler",
    "make_scheduler",
    "rule_config",
]
