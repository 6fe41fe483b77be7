"""Live migration between torch engines (the :class:`~engines.migration.MigratableEngine` protocol).

KV moves over the KV data plane (:mod:`transport.kv_data`): one chunk is one block over every layer, sent
straight from the source's pools (one segment per layer, no copy) into the destination's staging pool,
and scattered into the destination's pools when the request resumes there. Pre-copy stages send only the
full blocks written since the last stage while the request keeps decoding at the source (full blocks are
never written again); the stop sends the rest, the partial last block included.

Destination capacity is held for real: a reservation allocates pool blocks (they show as used in the load
report) and staging slots, and the resumed request takes those blocks. A stage that writes past the
reservation (the request decoded on after the reservation was last grown, above all before its stop) grows
it on demand from the free pool, on the engine's loop, before its blocks are taken; only when the pool has
no room is the stage refused and the migration aborted. If the staged KV turns out
incomplete, the request is recomputed instead: slower, same tokens.

Only an engine that computes alone (not in a pipeline group) migrates; layer drops and group changes wait
until its migrations are over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineError, EngineOutput, EngineRequest
from engines.migration import FrozenRequest, KvEndpoint, MigrationAborted, ReservationRefused, StageReport
from engines.torch.core import StageRunner
from engines.torch.engine import TorchEngine
from engines.torch.scheduler import SeqStatus, Sequence
from engines.torch.stage import MemoryReport
from transport import kv_data

log = logging.getLogger(__name__)

MIGRATION_KEY = "torch_migration_id"
GROW_TIMEOUT_S = 10.0
"""Longest a stage that outgrew its reservation waits for the engine's loop to grow it (then it is refused)."""
RESHAPING = "its pools are being reallocated: no capacity to promise now"
"""Why a destination refuses a reservation while a stage change regrows its pools."""


@dataclass(slots=True)
class _Outgoing:
    request_id: str
    seq: Sequence
    destination: KvEndpoint
    sender: kv_data.KvSender
    preemptions: int  # the sequence's count when copying (re)started: a preemption invalidates copied blocks
    copied: int = 0  # leading blocks the destination holds
    stage: int = 0
    stopped: bool = False
    frozen: FrozenRequest | None = None


@dataclass(slots=True)
class _Incoming:
    blocks: list[int] = field(default_factory=list)  # pool blocks held for the resumed request


class MigratableTorchEngine(TorchEngine):
    """:class:`TorchEngine` plus live migration of running requests' KV to another torch engine."""

    def __init__(
        self,
        instance_id: str,
        model_dir: str | Path,
        *,
        staging_blocks: int | None = None,
        data_host: str = "127.0.0.1",
        **kwargs: Any,
    ) -> None:
        """``staging_blocks``: receive buffer for incoming migrations (default: two max-length requests).
        ``data_host``: the address this engine's KV data-plane server binds and advertises."""
        super().__init__(instance_id, model_dir, **kwargs)
        self.staging_blocks = staging_blocks or 2 * -(-self.max_model_len // self.block_size)
        self.data_host = data_host
        self._outgoing: dict[str, _Outgoing] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._staging: kv_data.StagingPool | None = None
        self._staging_kv: torch.Tensor | None = None  # [slots, layers, 2, block_size, kv_heads, head_dim]
        self._server: kv_data.KvServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the engine's: where on-demand growth runs
        self.migration_counters: dict[str, int] = dict.fromkeys(
            ("stages_sent", "blocks_sent", "bytes_sent", "blocks_loaded", "recomputed"), 0
        )
        """Totals since start (blocks_loaded > 0 proves a resumed request's KV was not recomputed)."""

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over every layer: the data plane's chunk."""
        return self.config.kv_block_bytes(self.config.num_layers, self.block_size, self.stage.dtype.itemsize)

    async def shutdown(self) -> None:
        for out in list(self._outgoing.values()):
            await asyncio.to_thread(out.sender.close)
            if out.stopped:
                self._end_stopped(out)
        self._outgoing.clear()
        for migration_id in list(self._incoming):
            self._release_incoming(migration_id)
        await super().shutdown()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._staging = self._staging_kv = None  # a restarted engine (on another loop) serves afresh

    # ------------------------------------------------------------------------------------------ guards
    def _require_alone(self) -> None:
        if self.role != "standalone" or not self._runner_complete() or self.core.runner is not self.stage:
            raise EngineError(f"{self.instance_id} computes in a pipeline group or without every layer: no migration")

    def _require_no_migrations(self, what: str) -> None:
        if self._outgoing or self._incoming:
            raise EngineError(f"{what} waits until {self.instance_id}'s migrations are over")

    async def drop_layers_paused(self, keep: tuple[int, int]) -> MemoryReport:
        self._require_no_migrations("dropping layers")
        return await super().drop_layers_paused(keep)

    async def restore_layers_paused(self, num_blocks: int | None = None) -> MemoryReport:
        self._require_no_migrations("restoring layers")
        return await super().restore_layers_paused(num_blocks)

    def use_runner(self, runner: StageRunner, role: str) -> None:
        self._require_no_migrations("joining or leaving a group")
        super().use_runner(runner, role)

    # ------------------------------------------------------------------------------------------ source
    def _segments(self, block_ids: list[int]) -> list[list[memoryview]]:
        """Each block over every layer as byte segments: views of the pools on the CPU (sent without a
        copy); on another device (GPU) the blocks are gathered there and copied to the host in one transfer."""
        pools = self.stage.kv.pools
        if self.stage.device.type == "cpu":
            return pool_views(pools, block_ids)
        return gathered_blocks(pools, block_ids)

    def _outgoing_of(self, migration_id: str) -> _Outgoing:
        out = self._outgoing.get(migration_id)
        if out is None:
            raise EngineError(f"no outgoing migration {migration_id} on {self.instance_id}")
        return out

    async def migrate_out_begin(self, request_id: str, migration_id: str, destination: KvEndpoint) -> int:
        self._require_alone()
        live = self._live.get(request_id)
        if live is None or live.done or live.seq.status is SeqStatus.FINISHED:
            raise EngineError(f"no running request {request_id} on {self.instance_id}")
        if any(o.request_id == request_id for o in self._outgoing.values()):
            raise EngineError(f"request {request_id} is already migrating")
        try:
            sender = await asyncio.to_thread(
                kv_data.connect, destination.address, migration_id, self.kv_layout, self.block_nbytes
            )
        except kv_data.KvTransferError as exc:
            raise MigrationAborted(str(exc)) from exc
        seq = live.seq
        self._outgoing[migration_id] = _Outgoing(request_id, seq, destination, sender, seq.num_preemptions)
        return len(seq.block_ids)

    async def _send(self, out: _Outgoing, first: int, last: int) -> tuple[int, int]:
        """Send blocks [first, last) of the request; returns (blocks, bytes) the destination acknowledged."""
        block_ids = out.seq.block_ids[first:last]  # read on the loop, which owns the block tables

        def send() -> kv_data.StageAck:
            blocks = list(zip(range(first, last), self._segments(block_ids), strict=True))
            return out.sender.send_stage(out.stage, blocks, {"request_id": out.request_id}, total_blocks=last)

        try:
            ack = await asyncio.to_thread(send)
        except kv_data.KvTransferError as exc:
            raise MigrationAborted(f"KV transfer of {out.request_id} failed: {exc}") from exc
        out.stage += 1
        counters = self.migration_counters
        counters["stages_sent"] += 1
        counters["blocks_sent"] += ack.num_blocks
        counters["bytes_sent"] += ack.nbytes
        return ack.num_blocks, ack.nbytes

    async def migrate_out_stage(self, migration_id: str) -> StageReport:
        out = self._outgoing_of(migration_id)
        seq = out.seq
        if seq.status is SeqStatus.FINISHED or out.stopped:
            return StageReport(out.stage, 0, 0, 0, 0, 0.0, request_finished=True)
        started = time.perf_counter()
        if seq.num_preemptions != out.preemptions:  # its blocks were freed and recomputed: start over
            out.copied, out.preemptions = 0, seq.num_preemptions
        preemptions = seq.num_preemptions
        full = seq.num_computed // self.block_size if seq.status is SeqStatus.RUNNING else 0
        stage = out.stage
        copied_blocks, copied_bytes = await self._send(out, out.copied, max(out.copied, full))
        if seq.num_preemptions != preemptions:  # preempted while we read its blocks: they may be torn
            out.copied = 0
        else:
            out.copied = max(out.copied, full)
        finished = seq.status is SeqStatus.FINISHED
        remaining = max(0, seq.num_computed // self.block_size - out.copied) + 1  # + the partial last block
        return StageReport(
            stage,
            copied_blocks,
            copied_bytes,
            remaining,
            len(seq.block_ids),
            time.perf_counter() - started,
            request_finished=finished,
        )

    async def migrate_out_stop(self, migration_id: str) -> FrozenRequest:
        out = self._outgoing_of(migration_id)
        seq = out.seq
        started = time.perf_counter()
        async with self.paused():
            live = self._live.get(out.request_id)
            if live is None or live.done or seq.status is SeqStatus.FINISHED:
                raise EngineError(f"request {out.request_id} ended before it could stop")
            self.scheduler.detach(seq)  # keeps its blocks: we read them below
            live.done = True  # nothing more from the source; its stream ends as "migrated" at commit/abort
            while not live.queue.empty():  # sampled but not yet yielded: part of the frozen state
                live.queue.get_nowait()
            out.stopped = True
            self._publish_load()
        if seq.num_preemptions != out.preemptions:
            out.copied = 0
        kv_tokens = seq.num_computed
        num_blocks = self.scheduler.blocks_for(kv_tokens)
        frozen = FrozenRequest(
            request_id=out.request_id,
            prompt_token_ids=list(seq.token_ids[: seq.num_prompt_tokens]),
            output_token_ids=seq.output_token_ids,
            num_blocks=num_blocks,
            final_stage=StageReport(out.stage, 0, 0, 0, num_blocks, 0.0),
        )
        out.frozen = frozen  # without KV: what an abort hands back for a recompute elsewhere
        stage = out.stage
        try:
            copied_blocks, copied_bytes = await self._send(out, min(out.copied, num_blocks), num_blocks)
        finally:
            self.allocator.free(seq.block_ids)  # the source's blocks go as soon as the last stage is done
            seq.block_ids = []
            self._publish_load()
            self._kick()
        out.copied = num_blocks
        out.frozen = dataclasses.replace(
            frozen,
            final_stage=StageReport(stage, copied_blocks, copied_bytes, 0, num_blocks, time.perf_counter() - started),
            kv_transfer={MIGRATION_KEY: migration_id, "kv_tokens": kv_tokens, "num_blocks": num_blocks},
        )
        return out.frozen

    def _end_stopped(self, out: _Outgoing) -> None:
        live = self._live.get(out.request_id)
        if live is not None and live.seq is out.seq:
            live.queue.put_nowait(EngineOutput(out.request_id, [], "migrated"))

    async def migrate_out_commit(self, migration_id: str) -> None:
        out = self._outgoing.pop(migration_id, None)
        if out is None:
            return
        await asyncio.to_thread(out.sender.close)
        if out.stopped:
            self._end_stopped(out)

    async def migrate_out_abort(self, migration_id: str) -> FrozenRequest | None:
        out = self._outgoing.pop(migration_id, None)
        if out is None:
            return None
        await asyncio.to_thread(out.sender.close)
        if not out.stopped:
            return None  # the request never stopped: it goes on here
        self._end_stopped(out)
        frozen = out.frozen
        return dataclasses.replace(frozen, kv_transfer={}) if frozen is not None else None

    # ------------------------------------------------------------------------------------------ destination
    def _ensure_staging(self) -> kv_data.StagingPool:
        if self._staging is None:
            c = self.config
            shape = (self.staging_blocks, c.num_layers, 2, self.block_size, c.num_kv_heads, c.head_dim)
            # Host memory the socket writes into; pinned next to a GPU so that the upload at resume is fast
            # (pageable where the host refuses to pin that much: slower, same bytes).
            try:
                pinned = self.stage.device.type == "cuda"
                self._staging_kv = torch.zeros(shape, dtype=self.stage.dtype, pin_memory=pinned)
            except RuntimeError:
                log.warning("torch engine %s: cannot pin %s staging blocks; pageable", self.instance_id, shape[0])
                self._staging_kv = torch.zeros(shape, dtype=self.stage.dtype)
            staging_rows = byte_rows(self._staging_kv)

            def buffer_of(slot: int) -> memoryview:
                return memoryview(staging_rows[slot])

            self._staging = kv_data.StagingPool(
                self.staging_blocks, self.block_nbytes, self.kv_layout, buffer_of, on_grow=self._grow_on_demand
            )
            self._server = kv_data.transport_for("tcp://").serve(self.data_host, self._staging)
        return self._staging

    async def migrate_in_reserve(self, migration_id: str, num_blocks: int) -> KvEndpoint:
        """Raises :class:`ReservationRefused` naming the limit: the pools being reallocated, this engine's free
        KV blocks, or its staging pool."""
        self._require_alone()
        if self._reshaping:
            raise ReservationRefused(RESHAPING)
        self._loop = asyncio.get_running_loop()
        staging = await asyncio.to_thread(self._ensure_staging)
        assert self._server is not None
        incoming = self._incoming.get(migration_id) or _Incoming()
        extra = num_blocks - len(incoming.blocks)
        if extra > 0:
            refused = self._refusal(staging, migration_id, num_blocks, extra)
            if refused:
                raise ReservationRefused(refused)
            incoming.blocks += self.allocator.allocate(extra)
            self._incoming[migration_id] = incoming
            self._publish_load()
        return KvEndpoint(self.instance_id, self._server.address, migration_id)

    def _grow_on_demand(self, migration_id: str, total_blocks: int) -> str | None:
        """A stage outgrew the reservation (a receiver thread asks): grow it on the engine's loop, which owns
        the allocator. Returns why not, or None once the reservation holds ``total_blocks``."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return f"engine {self.instance_id} is not running"
        coroutine = self._grow_reservation(migration_id, total_blocks)
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError as exc:  # the loop closed meanwhile (shutdown)
            coroutine.close()
            return f"engine {self.instance_id} is not running ({exc})"
        try:
            return future.result(timeout=GROW_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            return f"engine {self.instance_id} did not grow the reservation in {GROW_TIMEOUT_S:.0f} s"
        except Exception as exc:  # e.g. it joined a pipeline group meanwhile: refuse the stage, keep serving
            return f"{type(exc).__name__}: {exc}"

    async def _grow_reservation(self, migration_id: str, total_blocks: int) -> str | None:
        """On the loop, with no await: a release cannot slip in between the check and the allocation."""
        incoming, staging = self._incoming.get(migration_id), self._staging
        if incoming is None or staging is None:  # released (aborted) meanwhile: nothing to grow
            return f"no reservation for migration {migration_id}"
        extra = total_blocks - len(incoming.blocks)
        if extra <= 0:
            return None
        refused = self._refusal(staging, migration_id, total_blocks, extra)
        if refused:
            return f"{self.instance_id} cannot hold {total_blocks} blocks: {refused}"
        incoming.blocks += self.allocator.allocate(extra)
        self._publish_load()
        log.info("torch engine %s: reservation %s grew to %d blocks", self.instance_id, migration_id, total_blocks)
        return None

    def _refusal(self, staging: kv_data.StagingPool, migration_id: str, num_blocks: int, extra: int) -> str:
        """Reserve ``extra`` more staging slots (``num_blocks`` in total) unless a limit refuses; "" when it is
        reserved (the caller then takes ``extra`` KV blocks, on the loop with no await between), else which
        limit refused, with the numbers."""
        if self._reshaping:
            return RESHAPING
        if not self.allocator.can_allocate(extra):
            return f"{self.allocator.num_free} KV blocks free, asked {extra} more ({num_blocks} in total)"
        if not staging.reserve(migration_id, num_blocks):
            return staging.refusal(migration_id, num_blocks)
        return ""

    async def migrate_in_release(self, migration_id: str) -> None:
        self._release_incoming(migration_id)

    def _release_incoming(self, migration_id: str, keep: int = 0) -> list[int]:
        """Drop a reservation, returning its first ``keep`` blocks to the caller and freeing the rest."""
        incoming = self._incoming.pop(migration_id, None)
        if self._staging is not None:
            self._staging.release(migration_id)
        if incoming is None:
            return []
        kept, freed = incoming.blocks[:keep], incoming.blocks[keep:]
        self.allocator.free(freed)
        self._publish_load()
        self._kick()
        return kept

    def _admit(self, request: EngineRequest, seq: Sequence) -> None:
        transfer = request.kv_transfer or {}
        migration_id = transfer.get(MIGRATION_KEY)
        if not isinstance(migration_id, str):
            super()._admit(request, seq)
            return
        kv_tokens = int(transfer.get("kv_tokens", 0))
        needed = self.scheduler.blocks_for(kv_tokens)
        incoming = self._incoming.get(migration_id)
        slots = self._staging.slots_of(migration_id, range(needed)) if self._staging is not None else []
        usable = (
            incoming is not None
            and 0 < kv_tokens <= seq.num_tokens
            and len(incoming.blocks) >= needed
            and len(slots) == needed
            and all(slot is not None for slot in slots)
        )
        if not usable:
            log.warning(
                "torch engine %s: staged KV of %s incomplete; recomputing", self.instance_id, request.request_id
            )
            self.migration_counters["recomputed"] += 1
            self._release_incoming(migration_id)
            self.scheduler.add(seq)
            return
        assert self._staging_kv is not None
        slot_index = torch.tensor([s for s in slots if s is not None], dtype=torch.long)
        staged = self._staging_kv[slot_index]  # a copy [needed, layers, 2, bs, heads, dim], before the slots go
        staged = staged.to(self.stage.device)  # one upload when the pools are on a GPU
        blocks = self._release_incoming(migration_id, keep=needed)
        block_index = torch.tensor(blocks, dtype=torch.long, device=self.stage.device)
        for layer, pool in self.stage.kv.pools.items():
            pool[block_index] = staged[:, layer]
        seq.block_ids = blocks
        seq.num_computed = kv_tokens
        self.scheduler.add_running(seq)
        self.migration_counters["blocks_loaded"] += needed


def pool_views(pools: dict[int, torch.Tensor], block_ids: list[int]) -> list[list[memoryview]]:
    """Each block as one segment per layer (layer order): views of CPU pools, nothing copied."""
    rows = [byte_rows(pools[layer]) for layer in sorted(pools)]
    return [[memoryview(r[block]) for r in rows] for block in block_ids]


def gathered_blocks(pools: dict[int, torch.Tensor], block_ids: list[int]) -> list[list[memoryview]]:
    """Each block as one segment holding every layer (layer order, the same bytes as :func:`pool_views`):
    the blocks are gathered where the pools are (a GPU) and copied to the host in one transfer."""
    if not block_ids:
        return []
    first = next(iter(pools.values()))
    index = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    host = torch.stack([pools[layer].index_select(0, index) for layer in sorted(pools)], dim=1).cpu()
    rows = byte_rows(host)  # [n, layers * block bytes]
    return [[memoryview(rows[i])] for i in range(len(block_ids))]


def byte_rows(tensor: torch.Tensor) -> Any:
    """A ``[rows, bytes]`` numpy view of a contiguous tensor's memory (row i = ``tensor[i]``), shared, not copied."""
    return tensor.view(torch.uint8).reshape(tensor.shape[0], -1).numpy()
