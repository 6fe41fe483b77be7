"""Live migration on the simulated engine: the same engine-side protocol as vLLM (engines/migration.py),
with the KV copy modelled as time (bytes / bandwidth) instead of moved bytes.

Source: stages copy the request's full blocks written since the last stage while it keeps decoding (the
core steps on concurrently); stop removes it from the batch keeping its blocks (``outgoing``) until commit.
Destination: a reservation holds capacity in the core; the resumed request enters the batch holding its
blocks (``add_resumed``), not recomputed, exactly as a request whose KV was loaded.

As on the TCP data plane (``transport/kv_data.py``), a copy to a destination in this process that would
write a block past its reservation first grows the reservation from the destination's free blocks (the
request decoded on since the reservation was last grown, above all before its stop); only when the
destination has no room does the copy fail ("block N exceeds the reservation"). A stop refused that way has
already stopped the request, as on the live engines: the abort hands back its state without KV, to resume
by recompute. ``reserve_latency_s`` models the time a destination takes to set up or grow a reservation
(vLLM's goes through its worker's side channel), during which the source keeps decoding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

from engines.base import EngineError, EngineOutput, EngineRequest
from engines.migration import FrozenRequest, KvEndpoint, ReservationRefused, StageReport
from engines.sim.core import SimRequest
from engines.sim.engine import SimEngine, token_at

# LLaMA-7B in fp16: 2 (K,V) x 32 layers x 4096 hidden x 2 bytes = 512 KiB per token (Llumnix's model).
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2
# A PCIe 4.0 x16 host link moves ~25 GB/s; Llumnix copies GPU->CPU->network->CPU->GPU, so model 10 GB/s.
DEFAULT_TRANSFER_BYTES_PER_S = 10e9

# Data-plane address -> the sim engine that reserved it (in this process): what a copy's blocks are checked
# against, and grown at, as the receiving side of the TCP data plane does. Touched on the one bus loop only.
_DESTINATIONS: dict[str, MigratableSimEngine] = {}


@dataclass(slots=True)
class _Outgoing:
    request_id: str
    destination: KvEndpoint
    copied_blocks: int = 0
    stage: int = 0
    frozen: FrozenRequest | None = None


class MigratableSimEngine(SimEngine):
    """SimEngine plus the MigratableEngine protocol (modelled transfer time)."""

    def __init__(
        self,
        instance_id: str,
        *,
        kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN,
        transfer_bytes_per_s: float = DEFAULT_TRANSFER_BYTES_PER_S,
        reserve_latency_s: float = 0.0,
        **kwargs: object,
    ) -> None:
        super().__init__(instance_id, **kwargs)  # type: ignore[arg-type]
        self.reserve_latency_s = reserve_latency_s  # modelled, scaled by time_scale
        self.block_bytes = kv_bytes_per_token * self.config.block_size
        self.transfer_bytes_per_s = transfer_bytes_per_s
        self._outgoing: dict[str, _Outgoing] = {}
        self._reservations: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ helpers
    async def _copy(self, blocks: int) -> float:
        """Model copying ``blocks``; returns the modelled seconds."""
        seconds = blocks * self.block_bytes / self.transfer_bytes_per_s
        if blocks and self.time_scale > 0:
            await asyncio.sleep(seconds * self.time_scale)
        return seconds

    def _sim(self, request_id: str) -> SimRequest:
        live = self._live.get(request_id)
        if live is None or live.done:
            raise EngineError(f"no running request {request_id} on {self.instance_id}")
        return live.sim

    def _full_blocks(self, sim: SimRequest) -> int:
        return max(0, sim.context_len - 1) // self.config.block_size

    async def _fit_reservation(self, destination: KvEndpoint, num_blocks: int) -> None:
        """Before a copy that leaves the request holding ``num_blocks`` at the destination (when it lives in this
        process): grow its reservation if needed, or refuse the copy when the destination has no room."""
        engine = _DESTINATIONS.get(destination.address)
        if engine is not None:
            await engine._grow_for_copy(destination.migration_id, num_blocks)

    async def _grow_for_copy(self, migration_id: str, num_blocks: int) -> None:
        """Destination: a copy needs the reservation to hold ``num_blocks``; take the rest from the free blocks
        (after the modelled round trip) or raise."""
        held = self._reservations.get(migration_id, 0)
        if num_blocks <= held:
            return
        if self.reserve_latency_s > 0 and self.time_scale > 0:
            await asyncio.sleep(self.reserve_latency_s * self.time_scale)
        if migration_id not in self._reservations:
            raise EngineError(f"block {num_blocks - 1} exceeds the reservation (released meanwhile)")
        held = self._reservations[migration_id]
        if num_blocks > held:
            if not self.core.reserve(num_blocks - held):
                raise EngineError(
                    f"block {num_blocks - 1} exceeds the reservation of {held} blocks "
                    f"({self.instance_id} has {self.core.num_free_blocks} free)"
                )
            self._reservations[migration_id] = num_blocks

    # ------------------------------------------------------------------------------------------ source
    async def migrate_out_begin(self, request_id: str, migration_id: str, destination: KvEndpoint) -> int:
        sim = self._sim(request_id)
        if any(o.request_id == request_id for o in self._outgoing.values()):
            raise EngineError(f"request {request_id} is already migrating")
        self._outgoing[migration_id] = _Outgoing(request_id, destination)
        return sim.num_blocks

    async def migrate_out_stage(self, migration_id: str) -> StageReport:
        out = self._outgoing_state(migration_id)
        live = self._live.get(out.request_id)
        if live is None or live.done:
            return StageReport(out.stage, 0, 0, 0, 0, 0.0, request_finished=True)
        started = time.perf_counter()
        to_copy = max(0, self._full_blocks(live.sim) - out.copied_blocks)
        await self._fit_reservation(out.destination, out.copied_blocks + to_copy)
        await self._copy(to_copy)
        out.copied_blocks += to_copy
        out.stage += 1
        finished = live.done
        remaining = max(0, self._full_blocks(live.sim) - out.copied_blocks) + 1  # + the partial last block
        return StageReport(
            out.stage - 1,
            to_copy,
            to_copy * self.block_bytes,
            remaining,
            live.sim.num_blocks,
            time.perf_counter() - started,
            request_finished=finished,
        )

    async def migrate_out_stop(self, migration_id: str) -> FrozenRequest:
        out = self._outgoing_state(migration_id)
        live = self._live.get(out.request_id)
        if live is None or live.done:
            raise EngineError(f"request {out.request_id} ended before it could stop")
        started = time.perf_counter()
        sim = live.sim
        self.core.remove(sim.request_id, keep_blocks=True)
        while self.core.requests.get(sim.request_id) is sim:  # removal lands when the current step ends
            await asyncio.sleep(0.0005)
        if live.done:  # it finished in that last step
            self.core.release_outgoing(sim.request_id)
            raise EngineError(f"request {out.request_id} finished while stopping")
        blocks = self.core.blocks_for(sim.context_len)  # its blocks moved to the outgoing pool: count them
        to_copy = max(0, blocks - out.copied_blocks)
        tokens = [token_at(live.seed, p) for p in range(sim.num_output)]  # deterministic: same as streamed
        frozen = FrozenRequest(
            request_id=sim.request_id,
            prompt_token_ids=list(live.request.prompt_token_ids),
            output_token_ids=tokens,
            num_blocks=blocks,
            final_stage=StageReport(out.stage, 0, 0, 0, blocks, 0.0),
        )
        try:
            # the stopped request's exact size: the destination grows its reservation to it, or refuses
            await self._fit_reservation(out.destination, blocks)
        except EngineError:
            # Stopped, as on the live engines when their last stage is refused: the stream ends and the
            # abort hands back the state without KV (resumed by recompute).
            live.done = True
            live.queue.put_nowait(EngineOutput(live.request.request_id, [], "migrated"))
            out.frozen = frozen
            raise
        # copied while its stream stays open: the stream ends (as "migrated") only once the state is handed over
        await self._copy(to_copy)
        out.copied_blocks += to_copy
        live.done = True  # no more outputs from here; the stream ends as "migrated"
        live.queue.put_nowait(EngineOutput(live.request.request_id, [], "migrated"))
        out.frozen = dataclasses.replace(
            frozen,
            final_stage=StageReport(
                out.stage, to_copy, to_copy * self.block_bytes, 0, blocks, time.perf_counter() - started
            ),
            kv_transfer={"sim_migration_id": migration_id, "num_blocks": blocks},
        )
        return out.frozen

    async def migrate_out_commit(self, migration_id: str) -> None:
        out = self._outgoing.pop(migration_id, None)
        if out is not None:
            self.core.release_outgoing(out.request_id)
            self._kick()

    async def migrate_out_abort(self, migration_id: str) -> FrozenRequest | None:
        out = self._outgoing.pop(migration_id, None)
        if out is None:
            return None
        if out.frozen is None:
            return None
        self.core.release_outgoing(out.request_id)
        self._kick()
        return dataclasses.replace(out.frozen, kv_transfer={})  # its KV stays behind: resumed by recompute

    def _outgoing_state(self, migration_id: str) -> _Outgoing:
        out = self._outgoing.get(migration_id)
        if out is None:
            raise EngineError(f"no outgoing migration {migration_id} on {self.instance_id}")
        return out

    # ------------------------------------------------------------------------------------------ destination
    async def migrate_in_reserve(self, migration_id: str, num_blocks: int) -> KvEndpoint:
        if self.reserve_latency_s > 0 and self.time_scale > 0:
            await asyncio.sleep(self.reserve_latency_s * self.time_scale)
        held = self._reservations.get(migration_id, 0)
        address = self._address(migration_id)
        if num_blocks > held:
            if not self.core.reserve(num_blocks - held):  # its only limit: no staging pool in between
                free = self.core.num_free_blocks
                raise ReservationRefused(
                    f"{free} KV blocks free, asked {num_blocks - held} more ({num_blocks} in total)"
                )
            self._reservations[migration_id] = num_blocks
            _DESTINATIONS[address] = self
        return KvEndpoint(self.instance_id, address, migration_id)

    def _address(self, migration_id: str) -> str:
        return f"sim://{self.instance_id}/{migration_id}"

    async def migrate_in_release(self, migration_id: str) -> None:
        _DESTINATIONS.pop(self._address(migration_id), None)
        held = self._reservations.pop(migration_id, 0)
        if held:
            self.core.release_reservation(held)
            self._kick()

    def _admit(self, request: EngineRequest, sim: SimRequest) -> None:
        migration_id = (request.kv_transfer or {}).get("sim_migration_id")
        if not isinstance(migration_id, str):
            super()._admit(request, sim)
            return
        held = self._reservations.pop(migration_id, 0)
        _DESTINATIONS.pop(self._address(migration_id), None)
        if not self.core.add_resumed(sim, self.clock, held):
            self.core.release_reservation(held)
            self._live.pop(request.request_id, None)
            raise EngineError(f"{self.instance_id}: no room to resume migrated request {request.request_id}")
