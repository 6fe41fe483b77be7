"""Worker half of the migration connector (runs in vLLM's worker process, next to the KV tensors).

Source role: sends the blocks each :class:`~engines.vllm.connector.SendJob` names straight from the KV
cache memory over the data plane (one sender thread per migration, started before the step's forward so
the copy overlaps decoding), reports each acknowledged stage to the engine, and holds a finished request's
blocks until its sends are done (``finished_sending``). Destination role: runs the data-plane server that
receives blocks into a preallocated staging pool under per-migration reservations, and scatters staged
blocks into a resumed request's blocks in ``start_load_kv``.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engines.vllm import side_channel
from engines.vllm.connector import LoadJob, MigrationMetadata, SendJob
from transport import kv_data

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)

DEFAULT_STAGING_BLOCKS = 256
PLAN_TIMEOUT_S = 2.0  # longest a received stage waits for the engine to say whether it preloads it
PRELOAD_TIMEOUT_S = 10.0  # longest it waits for that preload to run
GROW_TIMEOUT_S = 10.0  # longest a stage that outgrew its reservation waits for the engine to grow it


class _KvCache:
    """The worker's KV tensors seen as blocks of raw bytes.

    A layer's tensor is viewed as ``[outer, num_blocks, inner]`` bytes around its block dimension: on CPU
    the block is outermost (``[num_blocks, kv_heads, block_size, 2*head_dim]``, outer = 1); GPU layouts
    such as ``[2, num_blocks, ...]`` put K and V outside it (outer = 2). A block is then ``num_layers *
    outer`` contiguous segments, copied whole: on CPU, K is packed inside a block in an ISA-dependent
    layout, so a block is opaque bytes.
    """

    def __init__(self, kv_caches: dict[str, torch.Tensor], vllm_config: VllmConfig, num_blocks: int) -> None:
        layers: list[torch.Tensor] = []
        seen: set[int] = set()
        for tensor in kv_caches.values():  # layers sharing a cache (KV sharing) are sent once
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                layers.append(tensor)
        first = layers[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in layers):
            raise ValueError("migration needs every KV layer to have the same shape and dtype")
        if not all(t.is_contiguous() for t in layers):
            raise ValueError("migration needs contiguous KV layer tensors")
        block_dim = list(first.shape).index(num_blocks) if num_blocks in first.shape else 0
        self.device = first.device
        self.num_blocks = int(first.shape[block_dim])
        self.num_layers = len(layers)
        self.outer = math.prod(first.shape[:block_dim])
        self.layers = [t.view(torch.uint8).reshape(self.outer, self.num_blocks, -1) for t in layers]
        self.num_segments = self.num_layers * self.outer
        self.segment_nbytes = int(self.layers[0].shape[2])
        self.block_nbytes = self.segment_nbytes * self.num_segments
        self._host = [t.numpy() for t in self.layers] if self.device.type == "cpu" else None
        self.layout = _layout_string(first, block_dim, self.num_layers, vllm_config)

    def segments(self, block_id: int, bounce: torch.Tensor | None) -> list[memoryview]:
        """The block's bytes (layer-major); off-CPU caches are first copied into the host ``bounce`` buffer."""
        if self._host is not None:
            return [memoryview(layer[o, block_id]) for layer in self._host for o in range(self.outer)]
        assert bounce is not None
        for index, layer in enumerate(self.layers):
            bounce[index * self.outer : (index + 1) * self.outer].copy_(layer[:, block_id])
        return [memoryview(row) for row in bounce.numpy()]

    def scatter(self, staging: torch.Tensor, slots: list[int], block_ids: list[int]) -> None:
        """Copy staging slots (``[slot, segment, bytes]``) into KV blocks: one slice copy per segment and
        run of consecutive ids.

        No gather into a temporary: a fresh tensor page-faults on first touch, which made a 128 MiB
        scatter take 150-450 ms instead of ~15 ms. Slots and new blocks are mostly consecutive, so the
        runs are long.
        """
        for slot_start, block_start, count in _runs(slots, block_ids):
            source = staging[slot_start : slot_start + count]
            for index, layer in enumerate(self.layers):
                for o in range(self.outer):
                    target = layer[o, block_start : block_start + count]
                    target.copy_(source[:, index * self.outer + o], non_blocking=True)


def _runs(slots: list[int], block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs (slot, block, length) where both slot and block id advance by one."""
    runs: list[tuple[int, int, int]] = []
    for slot, block in sorted(zip(slots, block_ids, strict=True)):
        if runs:
            first_slot, first_block, count = runs[-1]
            if slot == first_slot + count and block == first_block + count:
                runs[-1] = (first_slot, first_block, count + 1)
                continue
        runs.append((slot, block, 1))
    return runs


def _layout_string(tensor: torch.Tensor, block_dim: int, num_layers: int, vllm_config: VllmConfig) -> str:
    """Identifies the bytes of a block: engines migrate only between equal layouts."""
    isa = "native"
    if tensor.device.type == "cpu":
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            cache = vllm_config.cache_config
            isa = _get_attn_isa(tensor.dtype, cache.block_size, None, cache.cache_dtype)
        except Exception:  # a vLLM without that helper: fall back to the platform name
            isa = "cpu"
    shape = "x".join("B" if i == block_dim else str(d) for i, d in enumerate(tensor.shape))
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"vllm/{tensor.device.type}/{isa}/{dtype}/L{num_layers}/{shape}"


@dataclass
class _PreloadGate:
    decided: threading.Event = field(default_factory=threading.Event)
    preload: bool = False
    preloaded: threading.Event = field(default_factory=threading.Event)


@dataclass
class _GrowGate:
    answered: threading.Event = field(default_factory=threading.Event)
    num_blocks: int = 0
    error: str = ""


class _Sender:
    """One migration's outgoing stream: a thread sending its jobs in order."""

    def __init__(self, side: WorkerSide, migration_id: str, destination: str) -> None:
        self.side = side
        self.migration_id = migration_id
        self.destination = destination
        self.jobs: queue.Queue[SendJob | None] = queue.Queue()
        self.cancelled = False
        self._stream: kv_data.KvSender | None = None
        self._error = ""
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{migration_id}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self.cancelled = True
        self.jobs.put(None)

    def _run(self) -> None:
        cache = self.side.cache
        assert cache is not None
        bounce = None
        if cache.device.type != "cpu":
            bounce = torch.empty((cache.num_segments, cache.segment_nbytes), dtype=torch.uint8, pin_memory=True)
        try:
            while True:
                job = self.jobs.get()
                if job is not None:
                    try:
                        self._send(job, cache, bounce)
                    finally:
                        self.side.job_done(job)
                # Retire after the final stage or a cancel, unless jobs raced in (they still get job_done).
                if (job is None or job.final) and self.side.retire(self):
                    return
        finally:
            if self._stream is not None:
                self._stream.close()

    def _send(self, job: SendJob, cache: _KvCache, bounce: torch.Tensor | None) -> None:
        start = time.perf_counter()
        if self.cancelled:
            self._error = self._error or "migration cancelled"
        if not self._error:
            try:
                if self._stream is None:
                    self._stream = kv_data.connect(
                        self.destination, self.migration_id, cache.layout, cache.block_nbytes
                    )
                blocks = [(index, cache.segments(block_id, bounce)) for index, block_id in job.blocks]
                # the request's size once this stage is in: the destination grows its reservation to it
                total = max((index for index, _ in job.blocks), default=-1) + 1
                ack = self._stream.send_stage(job.stage, blocks, job.meta, total_blocks=total)
                self.side.report(
                    side_channel.StageSent(
                        migration_id=self.migration_id,
                        stage=job.stage,
                        num_blocks=ack.num_blocks,
                        nbytes=ack.nbytes,
                        seconds=time.perf_counter() - start,
                        final=job.final,
                    )
                )
                return
            except kv_data.KvTransferError as exc:
                self._error = str(exc)
        self.side.report(
            side_channel.StageSent(migration_id=self.migration_id, stage=job.stage, final=job.final, error=self._error)
        )


class WorkerSide:
    def __init__(self, vllm_config: VllmConfig, extra: dict[str, Any], num_blocks: int) -> None:
        self.vllm_config = vllm_config
        self.num_blocks = num_blocks
        self.extra = extra
        self.cache: _KvCache | None = None
        self.staging: torch.Tensor | None = None
        self.pool: kv_data.StagingPool | None = None
        self._server: kv_data.KvServer | None = None
        self._control: side_channel.ControlClient | None = None
        self._lock = threading.Lock()
        self._senders: dict[str, _Sender] = {}
        self._in_flight: dict[str, int] = {}  # vLLM request id -> send jobs queued or running
        self._to_release: set[str] = set()
        self._finished_seen: set[str] = set()
        self._load_errors: set[int] = set()
        self._gates: dict[tuple[str, int], _PreloadGate] = {}
        self._grows: dict[str, _GrowGate] = {}  # migration id -> a receiver waiting for the engine to grow it
        self._preloaded: set[str] = set()  # migrations preloaded in this step (worker thread only)

    # Setup ------------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.cache = cache = _KvCache(kv_caches, self.vllm_config, self.num_blocks)
        num_slots = int(self.extra.get("staging_blocks", DEFAULT_STAGING_BLOCKS))
        # zeros(), not empty(): touch every page now, not while receiving (page faults are ~25x slower).
        self.staging = torch.zeros((num_slots, cache.num_segments, cache.segment_nbytes), dtype=torch.uint8)
        staging_rows = self.staging.numpy().reshape(num_slots, -1)
        self.pool = kv_data.StagingPool(
            num_slots,
            cache.block_nbytes,
            cache.layout,
            buffer_of=lambda slot: memoryview(staging_rows[slot]),
            on_stage=self._stage_received,
            on_grow=self._grow,
        )
        transport = kv_data.transport_for(str(self.extra.get("data_scheme", "tcp")) + "://")
        self._server = transport.serve(str(self.extra.get("data_host", "127.0.0.1")), self.pool)
        self._control = side_channel.ControlClient(
            self.extra["control_path"],
            side_channel.Hello(
                role="worker",
                pid=os.getpid(),
                data_address=self._server.address,
                kv_layout=cache.layout,
                block_nbytes=cache.block_nbytes,
                staging_blocks=num_slots,
            ),
            self._on_command,
        )

    def shutdown(self) -> None:
        with self._lock:
            senders = list(self._senders.values())
        for sender in senders:
            sender.cancel()
        if self._server is not None:
            self._server.close()
        if self._control is not None:
            self._control.close()

    # Commands from the engine (control thread) ------------------------------------------------------------

    def _on_command(self, frame: side_channel.Frame) -> None:
        assert self._control is not None and self.pool is not None
        if isinstance(frame, side_channel.Reserve):
            if self.pool.reserve(frame.migration_id, frame.num_blocks):
                self._control.reply(frame)
            else:
                self._control.reply(frame, ok=False, error=self.pool.refusal(frame.migration_id, frame.num_blocks))
        elif isinstance(frame, side_channel.Release):
            self._control.reply(frame, freed=self.pool.release(frame.migration_id))
            self._open_gates(frame.migration_id)
        elif isinstance(frame, side_channel.ReservationGrown):
            with self._lock:
                grow = self._grows.get(frame.migration_id)
            if grow is not None:
                grow.num_blocks, grow.error = frame.num_blocks, frame.error
                grow.answered.set()
        elif isinstance(frame, side_channel.PreloadPlan):
            with self._lock:
                gate = self._gates.get((frame.migration_id, frame.stage))
            if gate is not None:
                gate.preload = frame.preload
                gate.decided.set()
        else:
            self._control.reply(frame, ok=False, error=f"the worker side does not handle {type(frame).__name__}")

    def report(self, frame: side_channel.Frame) -> None:
        if self._control is not None:
            self._control.send(frame)

    def _grow(self, migration_id: str, total_blocks: int) -> str | None:
        """A stage outgrew its reservation (receiver thread): the engine, which knows this engine's free blocks
        and counts reservations in its load, grows it (its Reserve reaches the pool on the control thread) or
        says why not. One stream per migration, so at most one receiver waits per migration."""
        gate = _GrowGate()
        with self._lock:
            self._grows[migration_id] = gate
        try:
            self.report(side_channel.GrowReservation(migration_id=migration_id, num_blocks=total_blocks))
            if not gate.answered.wait(GROW_TIMEOUT_S):
                return f"the engine did not answer in {GROW_TIMEOUT_S:.0f} s"
            return gate.error or None
        finally:
            with self._lock:
                if self._grows.get(migration_id) is gate:
                    del self._grows[migration_id]

    def _stage_received(self, migration_id: str, stage: int, num_blocks: int, meta: dict[str, Any]) -> None:
        """A stage is in staging (receiver thread). If the engine preloads it, hold the source's ack until
        that preload ran: the source then stops the request while this engine is free to resume it."""
        if not meta.get("tokens") or not self.extra.get("preload", False):
            self.report(side_channel.StageReceived(migration_id=migration_id, stage=stage, num_blocks=num_blocks))
            return
        gate = _PreloadGate()
        with self._lock:
            self._gates[(migration_id, stage)] = gate
        try:
            self.report(
                side_channel.StageReceived(migration_id=migration_id, stage=stage, num_blocks=num_blocks, meta=meta)
            )
            if gate.decided.wait(PLAN_TIMEOUT_S) and gate.preload:
                gate.preloaded.wait(PRELOAD_TIMEOUT_S)
        finally:
            with self._lock:
                self._gates.pop((migration_id, stage), None)

    def _open_gates(self, migration_id: str) -> None:
        with self._lock:
            gates = [gate for (mid, _), gate in self._gates.items() if mid == migration_id]
        for gate in gates:
            gate.decided.set()
            gate.preloaded.set()

    # Per step (worker thread) -----------------------------------------------------------------------------

    def on_step_metadata(self, metadata: MigrationMetadata) -> None:
        with self._lock:
            for job in metadata.sends:
                sender = self._senders.get(job.migration_id)
                if sender is None:
                    sender = self._senders[job.migration_id] = _Sender(self, job.migration_id, job.destination)
                self._in_flight[job.request_id] = self._in_flight.get(job.request_id, 0) + 1
                sender.jobs.put(job)
            for migration_id in metadata.cancels:
                cancelled = self._senders.get(migration_id)
                if cancelled is not None:
                    cancelled.cancel()
            self._to_release.update(metadata.releases)

    def job_done(self, job: SendJob) -> None:
        with self._lock:
            left = self._in_flight.get(job.request_id, 0) - 1
            if left > 0:
                self._in_flight[job.request_id] = left
            else:
                self._in_flight.pop(job.request_id, None)

    def retire(self, sender: _Sender) -> bool:
        """Forget a sender whose stream ended; False if new jobs arrived meanwhile (it must go on)."""
        with self._lock:
            if not sender.jobs.empty():
                return False
            if self._senders.get(sender.migration_id) is sender:
                del self._senders[sender.migration_id]
            return True

    def finished_sending(self, finished_req_ids: set[str]) -> set[str] | None:
        """Finished requests whose blocks we held and no longer need (vLLM frees them)."""
        with self._lock:
            self._finished_seen.update(finished_req_ids)
            done = {rid for rid in self._to_release if rid in self._finished_seen and rid not in self._in_flight}
            self._to_release -= done
            self._finished_seen -= done
        return done or None

    def load(self, jobs: list[LoadJob]) -> None:
        """Scatter staged blocks into resumed requests' blocks; runs before the step's forward."""
        for job in jobs:
            assert self.pool is not None and self.cache is not None and self.staging is not None
            start = time.perf_counter()
            indices = [index for index, _ in job.blocks]
            slots = self.pool.slots_of(job.migration_id, indices)
            present = [
                (slot, block_id) for slot, (_, block_id) in zip(slots, job.blocks, strict=True) if slot is not None
            ]
            missing = [block_id for slot, (_, block_id) in zip(slots, job.blocks, strict=True) if slot is None]
            if present:
                self.cache.scatter(self.staging, [s for s, _ in present], [b for _, b in present])
            if missing:  # vLLM recomputes from the first missing block (kv_load_failure_policy="recompute")
                log.warning("migration %s: %d blocks missing from staging", job.migration_id, len(missing))
                self._load_errors.update(missing)
            if job.release:
                self.pool.release(job.migration_id)
            else:
                self._preloaded.add(job.migration_id)
            self.report(
                side_channel.Loaded(
                    migration_id=job.migration_id,
                    num_blocks=len(present),
                    seconds=time.perf_counter() - start,
                    missing_blocks=len(missing),
                    preload=not job.release,
                )
            )

    def after_forward(self) -> None:
        """The step's forward ran: preloads loaded in it are complete; release the stages waiting on them."""
        for migration_id in self._preloaded:
            self._open_gates(migration_id)
        self._preloaded.clear()

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
