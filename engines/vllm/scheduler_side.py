"""Scheduler half of the migration connector (runs in vLLM's EngineCore process).

It knows what the worker cannot: which request is which (vLLM renames them; Drover's id travels in
``kv_transfer_params``), each request's block ids and computed-token count at every step, and the exact
token list at the moment a stopped request finishes. It turns the engine's commands into per-step
:class:`~engines.vllm.connector.SendJob` / :class:`~engines.vllm.connector.LoadJob` metadata for the worker.

Threading: commands arrive on the control channel's reader thread; everything that reads vLLM state runs
on the scheduler thread inside vLLM's hooks. A lock guards the shared tables; a command that needs request
state (a stage plan) is queued and answered from the next ``build_metadata``. Commands about a request this
engine does not run are refused at once, so none waits for a step that an idle engine would never take.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.vllm import side_channel
from engines.vllm.connector import PARAMS_KEY, LoadJob, MigrationMetadata, SendJob

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    """A migration out of this engine, as the scheduler side tracks it."""

    migration_id: str
    request_id: str  # Drover's id
    destination: str
    vllm_request_id: str  # vLLM's id of the request being migrated (Drover's id can be reused later)
    next_stage: int = 0
    sent_blocks: int = 0  # logical blocks [0, sent_blocks) are sent or queued
    stopping: bool = False
    preempted: bool = False  # preempted while stopping: its blocks were freed, the copied KV is void


class SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, extra: dict[str, Any]) -> None:
        self.block_size = vllm_config.cache_config.block_size
        self._manager: KVCacheManager | None = None
        self._lock = threading.Lock()
        self._live: dict[str, Request] = {}  # Drover id -> vLLM request
        self._outgoing: dict[str, _Outgoing] = {}  # migration id -> state
        self._stage_commands: deque[side_channel.Stage] = deque()
        self._pending = MigrationMetadata()
        self._loads_started: set[str] = set()  # vLLM ids of requests that took their staged KV already
        self._control = side_channel.ControlClient(
            extra["control_path"], side_channel.Hello(role="scheduler", pid=os.getpid()), self._on_command
        )

    def bind(self, manager: KVCacheManager) -> None:
        self._manager = manager

    def shutdown(self) -> None:
        self._control.close()

    # Commands (control channel thread) --------------------------------------------------------------------

    def _on_command(self, frame: side_channel.Frame) -> None:
        with self._lock:
            error = self._apply(frame)
        if error is not None:
            self._control.reply(frame, ok=False, error=error)

    def _apply(self, frame: side_channel.Frame) -> str | None:
        """Apply a command under the lock; returns an error, or None once answered or queued."""
        if isinstance(frame, side_channel.Begin):
            request = self._live.get(frame.request_id)
            if request is None:
                return f"request {frame.request_id} is not running here"
            if any(m.request_id == frame.request_id for m in self._outgoing.values()):
                return f"request {frame.request_id} is already migrating"
            self._outgoing[frame.migration_id] = _Outgoing(
                frame.migration_id, frame.request_id, frame.destination, request.request_id
            )
            self._control.reply(frame, num_blocks=self._blocks_for(request.num_computed_tokens))
            return None
        if isinstance(frame, side_channel.Stage | side_channel.Stop):
            migration = self._outgoing.get(frame.migration_id)
            if migration is None or migration.stopping:
                return f"migration {frame.migration_id} is not in progress (the request may have ended)"
            if isinstance(frame, side_channel.Stop):
                migration.stopping = True  # request_finished of the abort that follows freezes it
                self._control.reply(frame)
            else:
                self._stage_commands.append(frame)
            return None
        if isinstance(frame, side_channel.Cancel):
            migration = self._outgoing.pop(frame.migration_id, None)
            if migration is not None:
                self._pending.cancels.append(frame.migration_id)
            self._control.reply(frame, cancelled=migration is not None)
            return None
        return f"the scheduler side does not handle {type(frame).__name__}"

    # vLLM hooks (scheduler thread) ------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        params = _drover_params(request)
        if params is not None and "rid" in params:
            with self._lock:
                self._live[str(params["rid"])] = request

    def num_loadable_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens of a resumed request whose KV waits in staging, beyond what the prefix cache has."""
        params = _drover_params(request)
        if params is None or "load" not in params or request.request_id in self._loads_started:
            return 0
        # vLLM must compute at least one token itself, so the last one is never loaded.
        kv_tokens = min(int(params["kv_tokens"]), request.num_tokens - 1)
        return max(0, kv_tokens - num_computed_tokens)

    def after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        params = _drover_params(request)
        if params is None or "load" not in params or request.request_id in self._loads_started:
            return
        # Once only: if the request is preempted later it recomputes (its staging is gone by then).
        self._loads_started.add(request.request_id)
        pairs: list[tuple[int, int]] = []
        if num_external_tokens > 0:
            kv_tokens = min(int(params["kv_tokens"]), request.num_tokens - 1)
            first = (kv_tokens - num_external_tokens) // self.block_size
            pairs = [(i, block_ids[i]) for i in range(first, self._blocks_for(kv_tokens))]
        job = LoadJob(str(params["load"]), request.request_id, pairs, release=not params.get("preload", False))
        with self._lock:
            self._pending.loads.append(job)

    def build_metadata(self, scheduler_output: SchedulerOutput) -> MigrationMetadata:
        with self._lock:
            self._abort_preempted(scheduler_output.preempted_req_ids or set())
            while self._stage_commands:
                self._plan_stage(self._stage_commands.popleft())
            metadata, self._pending = self._pending, MigrationMetadata()
        if metadata.loads and scheduler_output.new_block_ids_to_zero:
            # Loaded blocks are overwritten whole before the forward: zeroing them first is wasted time.
            loaded = {block_id for job in metadata.loads for _, block_id in job.blocks}
            scheduler_output.new_block_ids_to_zero = [
                b for b in scheduler_output.new_block_ids_to_zero if b not in loaded
            ] or None
        return metadata

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        """Freeze a stopped request (send its last blocks, report its tokens); True delays the block free."""
        params = _drover_params(request)
        rid = str(params["rid"]) if params and "rid" in params else None
        self._loads_started.discard(request.request_id)
        with self._lock:
            if rid is not None and self._live.get(rid) is request:
                del self._live[rid]
            migration = next((m for m in self._outgoing.values() if m.vllm_request_id == request.request_id), None)
            if migration is None:
                return False
            del self._outgoing[migration.migration_id]
            self._pending.releases.append(request.request_id)
            if migration.stopping and request.status.name == "FINISHED_ABORTED":
                self._freeze(migration, request, block_ids)
            else:
                self._pending.cancels.append(migration.migration_id)
                self._control.send(
                    side_channel.MigrationEnded(
                        migration_id=migration.migration_id,
                        reason=f"the request finished at the source ({request.status.name})",
                        request_finished=True,
                    )
                )
        return True  # sends of its blocks may be in flight: the worker frees them once done

    # Internals (lock held) --------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_ids(self, request: Request) -> list[int]:
        assert self._manager is not None
        return list(self._manager.get_block_ids(request.request_id)[0])

    def _plan_stage(self, command: side_channel.Stage) -> None:
        migration = self._outgoing.get(command.migration_id)
        if migration is None or migration.stopping:
            self._control.reply(command, ok=False, error=f"migration {command.migration_id} ended")
            return
        request = self._live.get(migration.request_id)
        if request is None or request.request_id != migration.vllm_request_id or request.status.name != "RUNNING":
            self._end(migration, "the request is not running at the source (preempted or finished)")
            self._control.reply(command, ok=False, error="the request is not running at the source")
            return
        # KV of tokens [0, num_computed_tokens) was written by the steps before this one: those full blocks
        # are final, and the worker starts sending them before this step's forward.
        block_ids = self._block_ids(request)
        full = min(request.num_computed_tokens // self.block_size, len(block_ids))
        blocks = [(i, block_ids[i]) for i in range(migration.sent_blocks, full)]
        stage = migration.next_stage
        migration.next_stage += 1
        migration.sent_blocks = max(migration.sent_blocks, full)
        # The tokens of the copied full blocks (and the next one) let the destination preload them.
        tokens = list(request.all_token_ids[: full * self.block_size + 1])
        self._pending.sends.append(
            SendJob(
                migration.migration_id,
                request.request_id,
                stage,
                migration.destination,
                blocks,
                meta={"tokens": tokens},
            )
        )
        self._control.reply(
            command,
            stage=stage,
            num_blocks=len(blocks),
            total_blocks=len(block_ids),
            sent_blocks=migration.sent_blocks,
            num_computed_tokens=request.num_computed_tokens,
        )

    def _freeze(self, migration: _Outgoing, request: Request, block_ids: list[int]) -> None:
        # An abort lands between steps or right after a forward: KV covers num_computed_tokens tokens, and
        # all_token_ids may hold one token more (sampled, not yet computed), which the destination computes.
        num_computed = 0 if migration.preempted else request.num_computed_tokens  # 0: destination recomputes
        num_blocks = min(self._blocks_for(num_computed), len(block_ids))
        final = [(i, block_ids[i]) for i in range(min(migration.sent_blocks, num_blocks), num_blocks)]
        stage = migration.next_stage
        self._pending.sends.append(
            SendJob(migration.migration_id, request.request_id, stage, migration.destination, final, final=True)
        )
        self._control.send(
            side_channel.Frozen(
                migration_id=migration.migration_id,
                token_ids=list(request.all_token_ids),
                num_computed_tokens=num_computed,
                num_blocks=num_blocks,
                final_stage=stage,
                final_blocks=len(final),
            )
        )

    def _abort_preempted(self, preempted: set[str]) -> None:
        if not preempted:
            return
        for migration in list(self._outgoing.values()):
            if migration.vllm_request_id not in preempted:
                continue
            if migration.stopping:  # the stop's abort is on its way: freeze it without KV
                migration.preempted = True
            else:
                self._end(migration, "the request was preempted at the source")

    def _end(self, migration: _Outgoing, reason: str) -> None:
        self._outgoing.pop(migration.migration_id, None)
        self._pending.cancels.append(migration.migration_id)
        self._control.send(side_channel.MigrationEnded(migration_id=migration.migration_id, reason=reason))


def _drover_params(request: Request) -> dict[str, Any] | None:
    params = request.kv_transfer_params
    if not params:
        return None
    value = params.get(PARAMS_KEY)
    return value if isinstance(value, dict) else None
