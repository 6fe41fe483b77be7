"""Engine-side live-migration protocol (Llumnix multi-stage pre-copy), driven by the MigratorActor.

Order of calls (the MigratorActor's): ``dst.migrate_in_reserve`` (capacity + staging, returns the KV data
address) -> ``src.migrate_out_begin`` -> ``src.migrate_out_stage`` (repeat while the request keeps decoding;
each copies only the full blocks written since the last stage; grow the reservation between stages) ->
``src.migrate_out_stop`` -> ``dst.generate(EngineRequest(..., output_token_ids=frozen.output_token_ids,
kv_transfer=frozen.kv_transfer))`` -> ``src.migrate_out_commit``.

Source side semantics:
- ``migrate_out_stage`` returns a :class:`StageReport` once the destination acknowledged the stage's blocks;
  ``request_finished=True`` when the request ended at the source meanwhile (the migration is then over).
- ``migrate_out_stop`` stops the request (it no longer decodes at the source), copies the remaining blocks
  (the partial last one included) and returns the exact token state, taken from the engine's own state:
  ``output_token_ids`` may hold tokens the source's ``generate`` iterator never yielded (sampled before the
  stop, not yet streamed): the caller sends the client ``output_token_ids[already_sent:]``.
- After stop the source's ``generate`` iterator yields nothing more; it ends with ``finish_reason="migrated"``
  at ``migrate_out_commit`` (or at ``migrate_out_abort``). Commit frees nothing that is not already freed:
  the source's blocks are released as soon as the last stage is acknowledged.
- ``migrate_out_abort`` at any point: before stop the request goes on at the source and it returns None;
  after stop it returns the frozen state (with an empty ``kv_transfer``) so the caller can resume the request
  elsewhere by recompute.

Destination side: ``migrate_in_reserve`` holds capacity (and staging) for ``num_blocks`` in total; KV arrives
over the data plane (:mod:`transport.kv_data`) at ``KvEndpoint.address``. A stage that writes past the
reservation (the request decoded on since it was last grown, above all before its stop) grows it on demand
from the destination's free capacity, counted as used like the rest; only a destination without the room
refuses it ("exceeds the reservation") and the migration aborts; ``generate`` with the frozen
``kv_transfer`` handle loads the staged KV instead of recomputing it and releases the reservation itself;
``migrate_in_release`` drops a reservation on every abort path (idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engines.base import EngineError


class MigrationAborted(EngineError):
    """A migration cannot complete; the message says why (the request keeps running where it was)."""

    default_code = "migration_aborted"


class ReservationRefused(EngineError):
    """A destination cannot hold the blocks a migration asks for; the message names the limit that refused
    (its free KV blocks, or its staging pool, which receives a stage before the request resumes) with the
    numbers. A refusal that only said "N blocks are not free" sent a reader to the KV cache of a destination
    with 1,023 free blocks when its 128-slot staging pool was the limit."""

    default_code = "reservation_refused"


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
    """Where a destination receives KV blocks (data-plane address, see :mod:`transport.kv_data`)."""

    instance_id: str
    address: str  # e.g. "tcp://127.0.0.1:45123"
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

    async def migrate_in_reserve(self, migration_id: str, num_blocks: int) -> KvEndpoint:
        """Hold ``num_blocks`` (cumulative for this migration); raises :class:`ReservationRefused` naming the
        limit (free KV blocks, staging pool) when the capacity is not there."""
        ...

    async def migrate_in_release(self, migration_id: str) -> None: ...
