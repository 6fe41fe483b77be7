"""Immutable snapshots the pure policies read. No I/O, no actors: the live scheduler and the simulator
build these from what they know and call the same policy functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunningSnapshot:
    request_id: str
    num_tokens: int
    num_blocks: int
    priority: int = 0
    decoding: bool = True


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """One instance's load as last reported (plus what the scheduler dispatched since).

    ``running`` is in admission order (oldest first), which the ``last_come`` migration pick relies on.
    ``cached_prefix_hashes`` is optional: engines that can report the prefix-block hashes they hold fill
    it; otherwise prefix-affinity dispatch learns holders from its own dispatch history.
    """

    instance_id: str
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    waiting_blocks: int = 0  # KV blocks every waiting request needs
    head_waiting_blocks: int = 0  # KV blocks the first waiting request needs
    num_preempted: int = 0
    draining: bool = False
    model: str = ""
    block_size: int = 32
    running: tuple[RunningSnapshot, ...] = ()
    cached_prefix_hashes: frozenset[int] = frozenset()
    high_priority_count: int = -1
    """Running requests with priority > 0 when the builder counted them; -1: count ``running``."""
    running_totals: tuple[int, int, int] | None = None
    """:func:`running_totals` of ``running`` when the builder summed them; None: dispatch sums ``running``. A
    builder walks the running requests anyway, while they are in the CPU cache; dispatch would walk them again on
    the heartbeat's upsert, which is timed as part of a decision (issue 17)."""

    @property
    def num_high_priority(self) -> int:
        if self.high_priority_count >= 0:
            return self.high_priority_count
        return sum(1 for r in self.running if r.priority > 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def is_empty(self) -> bool:
        return self.num_running == 0 and self.num_waiting == 0


def running_totals(running: Iterable[RunningSnapshot], block_size: int) -> tuple[int, int, int]:
    """(prompt tokens that running requests still in their prefill have left to compute past the blocks they
    hold, the blocks those tokens will take, requests decoding): what ``predictive`` dispatch reads of an
    instance's running requests. ``block_size`` > 0."""
    prefilling = to_allocate = decoding = 0
    for r in running:
        if not r.decoding:
            left = r.num_tokens - r.num_blocks * block_size
            if left > 0:
                prefilling += left
                to_allocate += -(-left // block_size)
        else:
            decoding += 1
    return prefilling, to_allocate, decoding


@dataclass(frozen=True, slots=True)
class RequestDemand:
    """What dispatch knows of a new request."""

    request_id: str
    num_prompt_tokens: int
    num_blocks: int
    priority: int = 0
    model: str = ""
    prefix_block_hashes: tuple[int, ...] = ()
