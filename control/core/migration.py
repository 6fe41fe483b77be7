"""The stage machine of one live migration (Llumnix's multi-stage protocol), with no I/O and no clock.

Both shells drive it: the MigratorActor (``actors/migrator.py``: each step a request/reply to an engine) and
the cluster simulator (``control/simulator/cluster.py``: each step an event in virtual time). A shell
reports what a step did; the machine answers what to do next, so the two cannot disagree on when to stop,
when to give up or how much to reserve:

* the destination reserves the request's blocks plus ``headroom_blocks`` (tokens decoded meanwhile) before
  the first copy, and grows the reservation whenever the request has outgrown it. A live request keeps
  decoding between the report a reservation is sized from and the next copy's snapshot (the reservation's own
  round trip, the next command's): ``decoded_factor`` times the blocks it wrote during the last round are
  reserved on top, so a fast decoder does not outrun a fixed headroom (vLLM-CPU's tiny model wrote more than
  the default 2 blocks during one round and its copy was refused). That rate is taken only between two sizes
  the source itself reported during the migration (``begin``'s, each stage's: one view, the engine's own),
  never from the first reservation's size: that one is the scheduler's view (a heartbeat), which on vLLM
  counts the tokens its front end has received and lags the EngineCore by up to hundreds of tokens on a
  starved event loop. Taken across the two views, the lag read as one round's writes and the growth after
  ``begin`` asked for 2x it on top (14 blocks reported, 22 at ``begin``: 22 + 2 + 2 * 8 = 40 reserved;
  9 and 49 would ask 49 + 2 + 2 * 40 = 131). The first growth therefore keeps the headroom alone; from the
  first stage on, the margin follows what the request really wrote. The simulator, which knows the exact
  size at each step, keeps the factor at 0. The margin makes a growth at the destination rare, not
  impossible: a stage (the first, which copies the whole request, and the stop's above all) that still
  outgrows the reservation grows it on demand at the destination, from its free blocks, below this machine
  (``transport/kv_data.py``, the sim engine), as ``StagedCopy.stop`` does in the simulators;
* no reservation exceeds ``max_blocks``, the most the request can ever hold (its prompt and every token it
  may generate, within the model's context; :func:`request_max_blocks`), or its size when that is larger:
  blocks beyond it are never written (before the rate above kept to one view, the lag made the first growth
  ask for 131 blocks for a 272 + 1,500-token request that holds at most 56, above the destination's
  128-block staging pool, which refused it);
* after each copy stage: stop-and-copy once at most ``last_stage_max_blocks`` remain; otherwise copy again,
  unless ``max_stages`` stages ran, where ``after_max_stages`` decides (``PolicyParams`` documents the
  measurement behind the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from control.core.record import DecisionLog
from control.policy.params import PolicyParams


class StageStep(StrEnum):
    """What a shell does after a copy stage."""

    COPY = "copy"  # another stage: copy the blocks written since the last one
    STOP_AND_COPY = "stop_and_copy"  # stop the request, copy the rest, resume at the destination
    ABORT = "abort"  # give up: the request stays at its source


@dataclass(slots=True)
class MigrationStages:
    """One migration's progress through its stages; a shell holds one per migration in flight."""

    params: PolicyParams
    headroom_blocks: int = 0
    stages: int = 0
    """Copy stages finished."""
    reserved: int = 0
    """Blocks reserved at the destination so far."""
    log: DecisionLog | None = None
    """Where each decision is recorded with its inputs (parity tests); None: not recorded."""
    key: str = ""
    """What the log names this migration by (its request id)."""
    decoded_factor: float = 0.0
    """Reserve this many times the blocks the request wrote during the last round on top of the headroom."""
    reported: int | None = None
    """The request's size as its source last reported it during this migration (``begin``, a stage); None:
    not yet (the first reservation's size is the scheduler's view, never a base for the rate)."""
    written: int = 0
    """Blocks it wrote between the source's last two reports (one round of the protocol); 0 before two."""
    max_blocks: int = 0
    """The most blocks the request can ever hold (:func:`request_max_blocks`); no reservation exceeds it (or
    the request's size, if larger). 0: unknown, no cap."""

    def margin(self) -> int:
        """Blocks reserved beyond the request's size now."""
        return self.headroom_blocks + math.ceil(self.decoded_factor * self.written)

    def _capped(self, blocks: int, size: int) -> int:
        """``blocks`` to reserve for a request of ``size`` blocks, at most what it can ever hold."""
        return blocks if self.max_blocks <= 0 else min(blocks, max(size, self.max_blocks))

    def first_reservation(self, num_blocks: int) -> int:
        """Blocks to reserve at the destination before anything is copied; ``num_blocks`` is the scheduler's view
        of the request (its source's heartbeat)."""
        self.reserved = self._capped(num_blocks + self.headroom_blocks, num_blocks)
        if self.log is not None:
            inputs = (num_blocks, self.headroom_blocks, self.max_blocks)
            self.log.add("first_reservation", self.key, inputs, self.reserved)
        return self.reserved

    def grow_reservation(self, total_blocks: int) -> int | None:
        """The new reservation total when a request of ``total_blocks`` (as its source reports it: at ``begin``,
        after a stage) has outgrown it, with the margin for what it writes until the next copy; None: it fits.

        The margin's rate is the growth since the source's previous report, one view on both ends; the first
        report has none to compare with and keeps the headroom alone."""
        base = self.reported
        self.written = 0 if base is None else max(0, total_blocks - base)
        self.reported = total_blocks if base is None else max(base, total_blocks)
        need = self._capped(total_blocks + self.margin(), total_blocks)
        grown = None if need <= self.reserved else need
        if self.log is not None:
            inputs = (total_blocks, self.headroom_blocks, self.reserved, base)
            self.log.add("grow_reservation", self.key, inputs, grown)
        if grown is not None:
            self.reserved = grown
        return grown

    def after_stage(self, remaining_blocks: int) -> StageStep:
        """A copy stage finished with ``remaining_blocks`` left to copy: the next step."""
        self.stages += 1
        if remaining_blocks <= self.params.last_stage_max_blocks:
            step = StageStep.STOP_AND_COPY
        elif self.stages >= self.params.max_stages:
            step = StageStep.STOP_AND_COPY if self.params.after_max_stages == "stop_and_copy" else StageStep.ABORT
        else:
            step = StageStep.COPY
        if self.log is not None:
            self.log.add("after_stage", self.key, (self.stages, remaining_blocks), step)
        return step


def request_max_blocks(prompt_tokens: int, max_tokens: int, max_model_len: int, block_size: int) -> int:
    """The most KV blocks a request can ever hold: its prompt and all ``max_tokens`` output tokens (its total,
    resumed ones included), within ``max_model_len`` (0: no limit); 0 when ``block_size`` is unknown."""
    if block_size <= 0:
        return 0
    tokens = prompt_tokens + max_tokens
    if max_model_len > 0:
        tokens = min(tokens, max_model_len)
    return -(-tokens // block_size)
