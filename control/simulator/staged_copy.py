"""One live migration carried out between two simulated engine cores, stage by stage, as the control core's
stage machine (:class:`control.core.migration.MigrationStages`) commands; both simulator shells use it.

The cluster simulator (``control/simulator/cluster.py``) and the memory simulator
(``control/simulator/memory.py``) own their clocks, event heaps and fast-forwarded engine runs, and differ in
all three; what a migration does to the two cores and how long each copy takes is the same in both, so it is
written once here (the live MigratorActor, ``actors/migrator.py``, drives the same stage machine over the
bus):

* before the first copy the destination reserves what the stage machine says (the request's blocks plus
  headroom) and every block the request holds is copied;
* after each stage the stage machine decides from the blocks written meanwhile: copy those (growing the
  reservation first), stop and copy (the source stops the request after the step in progress, keeps its
  blocks until the destination resumes it; the time from the stop to the resume is the downtime), or abort;
* a stage takes ``CopyLink.stage_s`` (bytes over the link's bandwidth plus a per-stage overhead); the last
  one adds ``CopyLink.resume_overhead_s`` (stop, final handshake, re-admission).

A shell calls these methods from its event loop (the simulators are single-threaded). Before a call that
touches a core's blocks it cuts that core's fast-forwarded run at the step in progress (each method names the
cores it touches), so the run's block growth is never planned against blocks taken meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.core.migration import MigrationStages, StageStep
from engines.sim.core import FINISHED, REMOVED, RUNNING, SimEngineCore, SimRequest

STAGE_OVERHEAD_S = 0.001
"""Default fixed cost of one copy stage: its control messages (a bus round trip), in both simulators."""
RESUME_OVERHEAD_S = 0.02
"""Default fixed part of the downtime: stop, final handshake, scatter of the staged KV, re-admission. Llumnix
measured 20-30 ms of downtime for LLaMA-7B, flat in sequence length, so fixed costs dominate it."""


@dataclass(frozen=True, slots=True)
class CopyLink:
    """How long copying KV between two instances takes in a simulator's hardware model."""

    block_bytes: float
    """Bytes of one KV block (all layers)."""
    bytes_per_s: float
    """Bandwidth of one copy between instances."""
    stage_overhead_s: float = 0.0
    """Fixed cost of one stage (its control messages)."""
    resume_overhead_s: float = 0.0
    """Fixed part of the downtime: stop, final handshake, scatter of the staged KV, re-admission."""

    def stage_s(self, blocks: int) -> float:
        """Seconds one stage copying ``blocks`` blocks takes."""
        return self.stage_overhead_s + blocks * self.block_bytes / self.bytes_per_s


@dataclass(slots=True, eq=False)
class StagedCopy:
    """One migration of ``request`` from ``source`` to ``destination`` in flight."""

    request: SimRequest
    source: SimEngineCore
    destination: SimEngineCore
    stages: MigrationStages
    link: CopyLink
    started: float
    preemptions_at_start: int
    copied: int = 0
    """Blocks copied so far."""
    remaining: int = 0
    """Blocks written since the last copy, at the last stage's end."""
    stopped_at: float = -1.0
    """When the source stopped the request (the downtime starts); -1: still running there."""

    @property
    def reserved(self) -> int:
        """Blocks reserved at the destination now."""
        return self.stages.reserved

    def begin(self) -> float | None:
        """Reserve at the destination (touches it) and copy every block the request holds: the first stage's
        seconds; None: the destination refused the reservation (nothing is held, the migration never ran)."""
        blocks = self.request.num_blocks
        if not self.destination.reserve(self.stages.first_reservation(blocks)):
            self.stages.reserved = 0
            return None
        self.copied = blocks
        return self.link.stage_s(blocks)

    def broken(self) -> str | None:
        """Why the migration cannot go on at a stage's end (the request finished or was preempted at its source
        meanwhile); None: it can."""
        request = self.request
        if request.state != RUNNING or request.num_preemptions != self.preemptions_at_start:
            return "finished" if request.state == FINISHED else "preempted"
        return None

    def after_stage(self, now: float) -> StageStep:
        """A stage ended at ``now``: the stage machine's next step, from the blocks written meanwhile (brings the
        source's run up to ``now`` to read them)."""
        self.source.advance_to(now)
        self.remaining = self.request.num_blocks - self.copied
        return self.stages.after_stage(self.remaining)

    def _grow(self, total_blocks: int) -> bool:
        before = self.stages.reserved
        grown = self.stages.grow_reservation(total_blocks)
        if grown is not None and not self.destination.reserve(grown - before):
            self.stages.reserved = before
            return False
        return True

    def copy_again(self) -> float | None:
        """``StageStep.COPY``: grow the reservation (touches the destination) and copy what was written: the
        stage's seconds; None: the reservation could not grow (the shell aborts)."""
        if not self._grow(self.request.num_blocks):
            return None
        self.copied = self.request.num_blocks
        return self.link.stage_s(self.remaining)

    def stop(self, stop_at: float) -> float | None:
        """``StageStep.STOP_AND_COPY``: the source stops the request after its step in progress, which ends at
        ``stop_at`` (it keeps its blocks for now); reserve what it will need then at the destination. Touches
        both cores. Returns when the destination can resume it (the last copy and the resume overhead after
        the stop); None: the reservation could not grow (nothing stopped; the shell aborts)."""
        need = self.source.blocks_for(self.request.context_len + 1)
        if not self._grow(need):
            return None
        self.source.remove(self.request.request_id, keep_blocks=True)
        self.stopped_at = stop_at
        last = max(0, need - self.copied)
        return stop_at + self.link.stage_s(last) + self.link.resume_overhead_s

    def leave_source(self) -> bool:
        """The last copy is done: free the blocks the source kept (touches the source). False: the request
        finished there in its last step instead (the shell aborts, which releases the reservation)."""
        if self.request.state != REMOVED:
            return False
        self.source.release_outgoing(self.request.request_id)
        return True

    def arrive(self, now: float) -> None:
        """After :meth:`leave_source`: resume the request at the destination with its KV, from the reservation
        (touches the destination)."""
        if not self.destination.add_resumed(self.request, now, reservation_blocks=self.reserved):
            self.destination.release_reservation(self.reserved)
            self.destination.add(self.request)  # cannot happen with the reservation above; recompute as a fallback
        self.stages.reserved = 0

    def release(self) -> None:
        """Give back the destination's reservation (an abort; touches the destination)."""
        if self.reserved:
            self.destination.release_reservation(self.reserved)
            self.stages.reserved = 0
