"""Engine-side live-migration protocol (Llumnix multi-stage pre-copy), driven by the MigratorActor.

Source side, in order: ``migrate_out_begin`` -> ``migrate_out_stage`` (repeat while the request keeps
decoding; each copies only blocks filled since the last stage) -> ``migrate_out_stop`` (stop the request,
copy the remaining blocks, return the exact token state) -> ``migrate_out_commit`` (free the source's
blocks; the request's ``generate`` iterator there ends with ``finish_reason="migrated"``).
``migrate_out_abort`` at any point before commit leaves the request running (or, after stop, returns the
frozen state so the caller can resume it).

Destination side: ``migrate_in_reserve`` holds capacity (and a staging buffer) before each stage;
KV arrives over the data plane; ``generate(EngineRequest(..., kv_transfer=handle))`` resumes the request
loading that KV instead of recomputing it; ``migrate_in_release`` drops a reservation on every abort path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class StageReport:
    """What one copy stage did."""

    stage: int
    copied_blocks: int
    copied_bytes: int
    remaining_blocks: int  # full blocks written since this stage's snapshot (what the next stage would copy)
    total_blocks: int  # blocks the request holds now
    duration_s: float
    request_finished: bool = False  # the request ended at the source while we copied


@dataclass(frozen=True, slots=True)
class FrozenRequest:
    """Exact state of a stopped request: everything the destination needs to resume it."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_blocks: int
    final_stage: StageReport
    kv_transfer: dict[str, Any] = field(default_factory=dict)  # handle for the destination's generate()


@dataclass(frozen=True, slots=True)
class KvEndpoint:
    """Where a destination receives KV blocks (data-plane address)."""

    instance_id: str
    address: str  # e.g. "tcp://127.0.0.1:45123" or a NATS subject
    migration_id: str


@runtime_checkable
class MigratableEngine(Protocol):
    async def migrate_out_begin(self, request_id: str, migration_id: str, destination: KvEndpoint) -> int:
        """Start migrating ``request_id`` out; returns the blocks it holds now. Raises if unknown."""
        ...

    async def migrate_out_stage(self, migration_id: str) -> StageReport: ...

    async def migrate_out_stop(self, migration_id: str) -> FrozenRequest: ...

    async def migrate_out_commit(self, migration_id: str) -> None: ...

    async def migrate_out_abort(self, migration_id: str) -> FrozenRequest | None: ...

    async def migrate_in_reserve(self, migration_id: str, num_blocks: int) -> KvEndpoint | None:
        """Hold ``num_blocks`` (cumulative for this migration); None if the capacity is not there."""
        ...

    async def migrate_in_release(self, migration_id: str) -> None: ...
