"""``VllmEngine``: Drover's :class:`~engines.base.Engine` over vLLM's ``AsyncLLM`` (CPU or GPU, same code),
with live migration (:class:`~engines.migration.MigratableEngine`) through Drover's KV connector.

The engine gives vLLM token ids and takes token ids back (no tokenizer in vLLM: Drover detokenizes), streams
``DELTA`` outputs, and reads its load from vLLM's own per-step scheduler statistics through a stat logger
(``SchedulerStats.kv_cache_usage``, running and waiting counts), which vLLM emits after every step,
including the step that frees a finished request's blocks. Per-request numbers (tokens, blocks) come from
what this engine streamed. On CPU the KV cache size is passed as ``kv_cache_memory_bytes`` (the
``VLLM_CPU_KVCACHE_SPACE`` variable only takes whole GiB) and the worker runs ``cpu_threads`` OpenMP
threads, unpinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``) since engines share cores.

Migration: the connector's two halves (EngineCore and worker processes) connect back to this engine over a
Unix-socket control channel (:mod:`engines.vllm.side_channel`); requests carry Drover's id (and, when resumed
from migrated KV, the load marker) in ``kv_transfer_params``. As a destination, the engine *preloads* each
received stage: a one-token warm-up request, salted with the migration id, loads the stage's blocks into
vLLM's prefix cache while the source still decodes; the resumed request (same salt) then finds them cached
and loads only the blocks of the last stage. See :mod:`engines.vllm.connector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.adaptive_budget import AdaptiveStepBudget
from control.block_hash import vllm_block_hashes
from engines.base import EngineError, EngineOutput, EngineRequest
from engines.migration import FrozenRequest, KvEndpoint, MigrationAborted, ReservationRefused, StageReport
from engines.prefix_listing import DEFAULT_MAX_BLOCKS
from engines.vllm import side_channel
from engines.vllm.connector import PARAMS_KEY
from transport.messages import EngineInfo, InstanceLoad, PrefixCacheReport, RunningRequest

log = logging.getLogger(__name__)

_GIB = 1 << 30
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_START_LOCK = threading.Lock()  # engine starts mutate os.environ, which vLLM's spawned processes inherit
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
STOPPED_REQUEST_TIMEOUT_S = 600.0
"""Longest a request stopped for migration waits for its migrator's commit or abort."""


class _LoadLogger:
    """A vLLM stat logger that keeps the latest scheduler statistics for :meth:`VllmEngine.load`."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.num_preemptions = 0
        self.updated_at = 0.0
        self.kv_events: Any = None  # KvEventListener: gets vLLM's prefix-cache counters too

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        owner = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                owner.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.num_running = scheduler_stats.num_running_reqs
            self.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            self.updated_at = time.monotonic()
        if iteration_stats is not None:
            self.num_preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None and self.kv_events is not None and prefix.queries:
            self.kv_events.record_stats(prefix.queries, prefix.hits)


def estimate_held_blocks(
    used_blocks: int, running: list[tuple[int, bool]], block_size: int, cached: list[int] | None = None
) -> list[int]:
    """KV blocks each running request holds, for the load report: ``running`` is (tokens, decoding) in
    admission order, ``used_blocks`` what vLLM's KV usage says is allocated.

    A decoding request holds all its tokens' blocks. One still in its prefill holds only the blocks of the
    chunks scheduled so far, and the rest of its prompt is work queued on the instance (what ``predictive``
    dispatch and its prefill-backlog hold read: ``running_totals``; the simulator and the sim and torch
    engines report exactly that). vLLM's front end does not see a request's computed tokens, so the blocks
    used beyond the decoding requests' are given to the prefilling ones oldest first (vLLM schedules running
    requests in order, so the oldest prompt's chunks come first); without that a prompt being prefilled
    counted as done, and the hold let requests through behind a long prompt that the simulator holds.

    ``cached`` (per running request, the blocks of its prompt's prefix that the engine's prefix cache held
    when it was admitted) is a floor for a prompt not decoding yet: vLLM takes those blocks at its first
    schedule without computing them. vLLM's usage comes from its last step, so until the first step after
    admission a prompt whose prefix is cached showed no blocks held, i.e. its whole prompt as work queued
    on the instance that holds its prefix, and prefix-aware dispatch sent the next request with that
    prefix elsewhere (CI, ``test_kv_routing_vllm``)."""
    full = [-(-tokens // block_size) for tokens, _ in running]
    left = used_blocks - sum(b for b, (_, decoding) in zip(full, running, strict=True) if decoding)
    floors = cached if cached is not None else [0] * len(running)
    held = []
    for blocks, (_, decoding), floor in zip(full, running, floors, strict=True):
        if decoding:
            held.append(blocks)
        else:
            take = max(0, min(floor, blocks), min(blocks, left))
            held.append(take)
            left -= take
    return held


@dataclass
class _Request:
    """A request this engine runs, as the front end tracks it."""

    request: EngineRequest
    context_len: int  # prompt + resumed output tokens given to vLLM
    cached_blocks: int = 0  # blocks of its context's prefix in the prefix cache at admission (load's floor)
    arrival: float = field(default_factory=time.monotonic)
    streamed: int = 0  # tokens generated here and yielded
    migration_id: str | None = None  # migrating out
    stopped: bool = False  # stopped for migration: its iterator waits for commit/abort
    end: asyncio.Future[str] | None = None  # resolved with the final finish reason after a stop

    @property
    def num_tokens(self) -> int:
        return self.context_len + self.streamed


@dataclass
class _Outgoing:
    migration_id: str
    request_id: str
    destination: KvEndpoint
    ended: asyncio.Future[side_channel.MigrationEnded]
    frozen: asyncio.Future[side_channel.Frozen]
    stages: dict[int, asyncio.Future[side_channel.StageSent]] = field(default_factory=dict)
    stop_armed: bool = False
    aborted: bool = False
    result: FrozenRequest | None = None

    def stage_future(self, stage: int) -> asyncio.Future[side_channel.StageSent]:
        if stage not in self.stages:
            self.stages[stage] = asyncio.get_running_loop().create_future()
        return self.stages[stage]


class VllmEngine:
    """A vLLM instance (``AsyncLLM``) serving one model, on CPU or GPU, with live migration."""

    def __init__(
        self,
        instance_id: str,
        model_dir: Path,
        *,
        model_name: str,
        block_size: int = 32,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 2048,
        kv_cache_gib: float = 0.25,
        dtype: str = "float32",
        cpu_threads: int = 1,
        seed: int = 0,
        enable_migration: bool = True,
        enable_prefix_caching: bool = True,
        executor: str | None = None,
        staging_blocks: int | None = None,
        data_host: str = "127.0.0.1",
        stage_timeout_s: float = 120.0,
        enable_preload: bool = True,
        kv_events: bool = True,
        adaptive_budget: AdaptiveStepBudget | None = None,
    ) -> None:
        """``staging_blocks``: receive buffer for incoming migrations (default: two max-length requests).
        ``data_host``: address this engine's KV data-plane server binds and advertises (use a routable one
        across hosts). ``enable_preload``: as stages arrive, load their blocks into the prefix cache (a
        one-token warm-up request per stage), so that resuming loads only the last blocks.
        ``adaptive_budget``: choose each step's token budget by recent pressure (``control/adaptive_budget.py``,
        in vLLM's scheduler: ``engines/vllm/budget_scheduler.py``); ``max_num_batched_tokens`` is then its
        ceiling."""
        self.instance_id = instance_id
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens if adaptive_budget is None else adaptive_budget.ceiling
        self.adaptive_budget = adaptive_budget
        self.kv_cache_gib = kv_cache_gib
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.seed = seed
        self.enable_migration = enable_migration
        # vLLM's distributed executor (None: vLLM's choice). On CPU vLLM always uses "mp" (it rewrites "uni").
        self.executor = executor
        self.enable_prefix_caching = enable_prefix_caching
        self.staging_blocks = staging_blocks or 2 * math.ceil(max_model_len / block_size)
        self.data_host = data_host
        self.stage_timeout_s = stage_timeout_s
        self.enable_preload = enable_preload and enable_prefix_caching
        # vLLM's own KV-event publisher (engines/vllm/kv_events.py): what the prefix cache holds, for routing.
        self.kv_events = kv_events and enable_prefix_caching
        self._kv_listener: Any = None
        self._kv_events_dir: str | None = None
        self._preloads: dict[str, _Preload] = {}  # incoming migration id -> warm-ups submitted
        self._llm: Any = None
        self._num_blocks = 0
        self._stats = _LoadLogger()
        self._requests: dict[str, _Request] = {}
        self._outgoing: dict[str, _Outgoing] = {}
        self._reserved: dict[str, int] = {}  # incoming migration id -> blocks held
        self._growing: set[asyncio.Future[None]] = set()  # on-demand growths in flight (kept from the GC)
        self._control: side_channel.ControlServer | None = None
        self._control_dir: str | None = None
        self._eos_token_ids = _eos_token_ids(self.model_dir)
        self._kv_layout = ""
        self.migration_counters: dict[str, int] = dict.fromkeys(
            ("stages_sent", "blocks_sent", "bytes_sent", "blocks_loaded", "blocks_preloaded", "blocks_missing"), 0
        )
        """Totals since start, for observability and tests (blocks_loaded > 0 proves KV was not recomputed)."""

    # ------------------------------------------------------------------------------------------ Engine
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            instance_id=self.instance_id,
            engine_kind="vllm",
            model=self.model_name,
            dtype=self.dtype,
            block_size=self.block_size,
            num_blocks=self._num_blocks,
            max_model_len=self.max_model_len,
            kv_layout=self._kv_layout,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    async def start(self) -> None:
        if self._llm is not None:
            return
        extra: dict[str, Any] = {}
        if self.enable_migration:
            self._control_dir = tempfile.mkdtemp(prefix="drover-vllm-")
            self._control = side_channel.ControlServer(
                os.path.join(self._control_dir, "control.sock"), self._on_connector_event, self._on_connector_lost
            )
            await self._control.start()
            extra = {
                "control_path": self._control.path,
                "staging_blocks": self.staging_blocks,
                "data_host": self.data_host,
                "preload": self.enable_preload,
            }
        args = self._engine_args(extra)
        try:
            self._llm = await asyncio.to_thread(self._construct, args)
            config = self._llm.vllm_config
            self._num_blocks = max(0, int(config.cache_config.num_gpu_blocks or 0) - 1)  # block 0 is reserved
            if self._kv_listener is not None:
                self._kv_listener.capacity_blocks = max(1, self._num_blocks)
            if self._control is not None:
                await self._control.wait_joined(timeout_s=60.0)
                self._kv_layout = f"{self._control.hello('worker').kv_layout}/blk{self.block_size}"
            else:
                self._kv_layout = f"vllm/{self.dtype}/blk{self.block_size}/no-migration"
        except BaseException:
            await self.shutdown()
            raise

    def _engine_args(self, extra: dict[str, Any]) -> Any:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        kv_transfer = None
        if self.enable_migration:
            kv_transfer = KVTransferConfig(
                kv_connector="DroverMigrationConnector",
                kv_connector_module_path="engines.vllm.connector",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",  # a block missing from staging is recomputed
                kv_connector_extra_config=extra,
            )
        dtype: Any = self.dtype
        kv_events_config = None
        if self.kv_events:
            from vllm.config import KVEventsConfig

            from engines.vllm.kv_events import KvEventListener

            # ipc in a private temp dir: reachable from this host's processes only, no port to pick
            self._kv_events_dir = tempfile.mkdtemp(prefix="drover-kvev-")
            endpoint = f"ipc://{self._kv_events_dir}/events.sock"
            kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint)
            self._kv_listener = KvEventListener(endpoint)
            self._kv_listener.start()  # a SUB may connect before the PUB binds; ZMQ reconnects by itself
            self._stats.kv_events = self._kv_listener
        budget_args: dict[str, Any] = {}
        if self.adaptive_budget is not None:
            from engines.vllm.budget_scheduler import ADDITIONAL_CONFIG_KEY, SCHEDULER_QUALNAME, rule_config

            budget_args = {
                "scheduler_cls": SCHEDULER_QUALNAME,
                "additional_config": {ADDITIONAL_CONFIG_KEY: rule_config(self.adaptive_budget)},
            }
        return AsyncEngineArgs(
            model=str(self.model_dir),
            served_model_name=self.model_name,
            skip_tokenizer_init=True,
            dtype=dtype,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_bytes=int(self.kv_cache_gib * _GIB),
            enforce_eager=True,
            seed=self.seed,
            enable_prefix_caching=self.enable_prefix_caching,
            disable_log_stats=True,  # our stat logger still gets the stats; vLLM's periodic log does not run
            kv_transfer_config=kv_transfer,
            distributed_executor_backend=self.executor,
            kv_events_config=kv_events_config,
            **budget_args,
        )

    def _construct(self, args: Any) -> Any:
        """Build ``AsyncLLM`` (blocking, 15-25 s on CPU) with the environment its processes inherit."""
        from vllm.v1.engine.async_llm import AsyncLLM

        with _START_LOCK:
            # vLLM's spawned processes import our connector: make the repo importable there.
            path = os.environ.get("PYTHONPATH", "")
            if _REPO_ROOT not in path.split(os.pathsep):
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, path) if p)
            # CPU: a fixed thread count, no pinning (engines share cores), KV size from kv_cache_memory_bytes.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            os.environ["OMP_NUM_THREADS"] = str(self.cpu_threads)
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
            return AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.factory])

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        for state in list(self._requests.values()):
            if state.end is not None and not state.end.done():
                state.end.set_result("abort")
        if self._control is not None:
            self._control.expect_disconnect()
        if llm is not None:
            with contextlib.suppress(Exception):
                await llm.abort(list(self._requests))
            handler = getattr(llm, "output_handler", None)
            if handler is not None:  # else it logs the engine's exit as a failure
                handler.cancel()
                with contextlib.suppress(BaseException):
                    await handler
            await asyncio.to_thread(llm.shutdown)
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None
        if self._kv_listener is not None:
            listener, self._kv_listener = self._kv_listener, None
            self._stats.kv_events = None
            await asyncio.to_thread(listener.stop)
        if self._kv_events_dir is not None:
            shutil.rmtree(self._kv_events_dir, ignore_errors=True)
            self._kv_events_dir = None

    def cached_block_hashes(self) -> set[int]:
        """The prefix-cache block hashes vLLM's KV events say this engine holds (empty without events)."""
        listener = self._kv_listener
        return listener.cached_hashes() if listener is not None else set()

    def prefix_cache_report(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> PrefixCacheReport | None:
        """This beat's prefix-cache report, at most ``max_blocks`` hashes (None: no KV events from this
        engine). Heartbeater thread."""
        listener = self._kv_listener
        if listener is None or self._llm is None:
            return None
        return listener.report(max_blocks=max_blocks)

    def request_prefix_resync(self) -> None:
        """The control plane lost track of this engine's cache: the next report lists all of it."""
        listener = self._kv_listener
        if listener is not None:
            listener.request_full()

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._validate(request)
        return self._generate(request)

    def _validate(self, request: EngineRequest) -> None:
        if self._llm is None:
            raise EngineError(f"engine {self.instance_id} is not started")
        context = len(request.prompt_token_ids) + len(request.output_token_ids)
        if not request.prompt_token_ids:
            raise EngineError("empty prompt")
        if context >= self.max_model_len:
            raise EngineError(f"{context} context tokens do not fit max_model_len {self.max_model_len}")
        if request.request_id in self._requests:
            raise EngineError(f"request {request.request_id} is already running on {self.instance_id}")
        if request.kv_transfer and not self.enable_migration:
            raise EngineError(f"engine {self.instance_id} cannot load migrated KV (migration disabled)")

    async def _generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        if request.remaining_tokens == 0:
            yield EngineOutput(rid, [], "length")
            return
        from vllm.inputs import TokensPrompt

        context = [*request.prompt_token_ids, *request.output_token_ids]
        prompt = TokensPrompt(prompt_token_ids=context)
        load_id = str(request.kv_transfer["migration_id"]) if request.kv_transfer else None
        if load_id is not None:
            # The migrated KV is the source's bytes; a per-migration salt keeps other cached prefixes out
            # (and lets the preloaded blocks, cached under the same salt, be found).
            prompt["cache_salt"] = load_id
            # Warm-ups still in flight are not awaited: vLLM schedules them first (FCFS), so the resume
            # finds their blocks cached, or loads the rest from staging itself.
            self._preloads.pop(load_id, None)
        state = _Request(request, len(context), cached_blocks=self._cached_prefix_blocks(context, load_id))
        self._requests[rid] = state
        try:
            outputs = self._llm.generate(prompt, self._sampling_params(request, load_id), request_id=rid)
            held: list[int] = []  # produced after a stop: part of the frozen state, never yielded here
            async for output in outputs:
                completion = output.outputs[0]
                new = list(completion.token_ids)
                state.streamed += len(new)
                reason = _FINISH_REASONS.get(completion.finish_reason or "", "abort") if output.finished else None
                if state.stopped and reason != "stop" and reason != "length":
                    held += new
                    if output.finished:  # the stop's abort: silent until commit/abort ends it here
                        yield EngineOutput(rid, [], await self._stopped_end(state))
                        return
                    continue
                # (A natural finish that raced a stop ends normally; the stop then fails.)
                yield EngineOutput(rid, held + new, reason)
                held = []
                if output.finished:
                    return
        finally:
            if self._requests.get(rid) is state:
                del self._requests[rid]
            if load_id is not None and load_id in self._reserved:
                await self._release_staging(load_id)

    async def _stopped_end(self, state: _Request) -> str:
        """How a stopped request ends here: at commit or abort, or (if neither comes, its migrator gone) after
        a long timeout as "migrated", since its destination may well be running it."""
        assert state.end is not None
        try:
            async with asyncio.timeout(STOPPED_REQUEST_TIMEOUT_S):
                return await state.end
        except TimeoutError:
            log.warning(
                "request %s: no commit or abort %.0f s after its stop",
                state.request.request_id,
                STOPPED_REQUEST_TIMEOUT_S,
            )
            if self._requests.get(state.request.request_id) is state:
                del self._requests[state.request.request_id]
            return "migrated"

    def _sampling_params(self, request: EngineRequest, load_id: str | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        stop_ids = list(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids += [t for t in self._eos_token_ids if t not in stop_ids]  # vLLM has no tokenizer to ask
        extra: dict[str, Any] | None = None
        if self.enable_migration:
            params: dict[str, Any] = {"rid": request.request_id}
            if load_id is not None and request.kv_transfer is not None:
                params.update(load=load_id, kv_tokens=int(request.kv_transfer["kv_tokens"]))
            extra = {"kv_transfer_params": {PARAMS_KEY: params}}
        return SamplingParams(
            n=1,
            max_tokens=request.remaining_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            seed=sampling.seed,
            stop_token_ids=stop_ids,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            extra_args=extra,
        )

    async def abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None or self._llm is None:
            return
        if state.stopped:
            if state.end is not None and not state.end.done():
                state.end.set_result("abort")
            return
        await self._llm.abort(request_id)

    def load(self) -> InstanceLoad:
        stats = self._stats
        free = self._free_blocks() - sum(self._reserved.values())
        active = [s for s in self._requests.values() if not s.stopped]
        waiting = sorted((s for s in active if s.streamed == 0), key=lambda s: s.arrival)
        waiting = waiting[len(waiting) - min(stats.num_waiting, len(waiting)) :]  # FCFS: the newest wait
        waiting_blocks = [self._blocks(s.context_len + 1) for s in waiting]
        running = [s for s in active if s not in waiting]
        # a request still in its prefill holds only its computed chunks' blocks (the front end does not see
        # vLLM's num_computed_tokens; the KV usage says how many blocks they hold together)
        held = estimate_held_blocks(
            self._num_blocks - self._free_blocks(),
            [(s.num_tokens, s.streamed > 0) for s in running],
            self.block_size,
            [s.cached_blocks for s in running],
        )
        return InstanceLoad(
            num_total_blocks=self._num_blocks,
            num_free_blocks=max(0, free),
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            waiting_blocks=sum(waiting_blocks),
            head_waiting_blocks=waiting_blocks[0] if waiting_blocks else 0,
            num_preempted=stats.num_preemptions,
            running=[
                RunningRequest(
                    request_id=s.request.request_id,
                    num_tokens=s.num_tokens,
                    num_blocks=blocks,
                    priority=s.request.priority,
                    decoding=s.streamed > 0,
                )
                for s, blocks in zip(running, held, strict=True)
            ],
        )

    def _cached_prefix_blocks(self, context: list[int], load_id: str | None) -> int:
        """Blocks of ``context``'s prefix the prefix cache holds now, as its KV events say (0 without events,
        and for a migrated request, whose blocks are cached under a salt of their own). vLLM computes at
        least a prompt's last token, so a fully cached prompt counts one block less."""
        listener = self._kv_listener
        if listener is None or load_id is not None:
            return 0
        usable = (len(context) - 1) // self.block_size
        # most prompts miss at their first block: hash one block before hashing them all (once per admission)
        if usable == 0 or not listener.cached_prefix_blocks(vllm_block_hashes(context, self.block_size, max_blocks=1)):
            return 0
        return listener.cached_prefix_blocks(vllm_block_hashes(context, self.block_size, max_blocks=usable))

    def _free_blocks(self) -> int:
        return round((1.0 - self._stats.kv_cache_usage) * self._num_blocks)

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------ migration
    def _channel(self) -> side_channel.ControlServer:
        if self._control is None:
            raise EngineError(f"engine {self.instance_id} runs without migration")
        return self._control

    def _on_connector_event(self, frame: side_channel.Frame) -> None:
        if isinstance(frame, side_channel.StageSent):
            if not frame.error:
                self._count(stages_sent=1, blocks_sent=frame.num_blocks, bytes_sent=frame.nbytes)
            outgoing = self._outgoing.get(frame.migration_id)
            if outgoing is not None:
                _resolve(outgoing.stage_future(frame.stage), frame)
        elif isinstance(frame, side_channel.Frozen):
            outgoing = self._outgoing.get(frame.migration_id)
            if outgoing is not None:
                _resolve(outgoing.frozen, frame)
        elif isinstance(frame, side_channel.MigrationEnded):
            outgoing = self._outgoing.get(frame.migration_id)
            if outgoing is not None:
                _resolve(outgoing.ended, frame)
        elif isinstance(frame, side_channel.StageReceived):
            self._preload(frame)
        elif isinstance(frame, side_channel.GrowReservation):
            task = asyncio.ensure_future(self._grow_on_demand(frame.migration_id, frame.num_blocks))
            self._growing.add(task)
            task.add_done_callback(self._growing.discard)
        elif isinstance(frame, side_channel.Loaded):
            if frame.preload:
                self._count(blocks_preloaded=frame.num_blocks)
            else:
                self._reserved.pop(frame.migration_id, None)
                self._count(blocks_loaded=frame.num_blocks)
            self._count(blocks_missing=frame.missing_blocks)
            if frame.missing_blocks:
                log.warning(
                    "migration %s: %d blocks were missing and are recomputed", frame.migration_id, frame.missing_blocks
                )

    def _on_connector_lost(self, role: str) -> None:
        """vLLM's process died (or shut down): no migration out of this engine can complete."""
        for outgoing in self._outgoing.values():
            reason = f"engine {self.instance_id} lost its connector's {role} side"
            _resolve(outgoing.ended, side_channel.MigrationEnded(migration_id=outgoing.migration_id, reason=reason))

    def _count(self, **increments: int) -> None:
        for key, value in increments.items():
            self.migration_counters[key] += value

    def _outgoing_of(self, migration_id: str) -> _Outgoing:
        outgoing = self._outgoing.get(migration_id)
        if outgoing is None:
            raise MigrationAborted(f"no migration {migration_id} out of {self.instance_id}")
        return outgoing

    async def _wait(self, outgoing: _Outgoing, future: asyncio.Future[Any], what: str) -> Any:
        """Wait for ``future`` unless the migration ends first (raises :class:`MigrationAborted`)."""
        try:
            async with asyncio.timeout(self.stage_timeout_s):
                await asyncio.wait([future, outgoing.ended], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise MigrationAborted(
                f"migration {outgoing.migration_id}: no {what} in {self.stage_timeout_s} s"
            ) from None
        if future.done():
            return future.result()
        raise MigrationAborted(outgoing.ended.result().reason)

    async def migrate_out_begin(self, request_id: str, migration_id: str, destination: KvEndpoint) -> int:
        channel = self._channel()
        state = self._requests.get(request_id)
        if state is None or state.stopped:
            raise EngineError(f"request {request_id} is not running on {self.instance_id}")
        if state.migration_id is not None:
            raise EngineError(f"request {request_id} is already migrating ({state.migration_id})")
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(migration_id, request_id, destination, loop.create_future(), loop.create_future())
        self._outgoing[migration_id] = outgoing
        try:
            reply = await channel.call(
                "scheduler",
                side_channel.Begin(migration_id=migration_id, request_id=request_id, destination=destination.address),
            )
        except side_channel.ControlError as exc:
            del self._outgoing[migration_id]
            raise MigrationAborted(str(exc)) from exc
        state.migration_id = migration_id
        return int(reply.data["num_blocks"])

    async def migrate_out_stage(self, migration_id: str) -> StageReport:
        outgoing = self._outgoing_of(migration_id)
        start = time.perf_counter()
        if outgoing.ended.done():
            return self._finished_report(outgoing, start)
        try:
            reply = await self._channel().call("scheduler", side_channel.Stage(migration_id=migration_id))
        except side_channel.ControlError as exc:
            if outgoing.ended.done():
                return self._finished_report(outgoing, start)
            raise MigrationAborted(str(exc)) from exc
        plan = reply.data
        try:
            sent: side_channel.StageSent = await self._wait(outgoing, outgoing.stage_future(plan["stage"]), "stage ack")
        except MigrationAborted:
            if outgoing.ended.done() and outgoing.ended.result().request_finished:
                return self._finished_report(outgoing, start)
            raise
        if sent.error:
            raise MigrationAborted(f"stage {sent.stage} of {migration_id} failed: {sent.error}")
        state = self._requests.get(outgoing.request_id)
        # Full blocks now: KV covers all tokens but the last sampled one (this engine's streamed view).
        full_now = (state.num_tokens - 1) // self.block_size if state is not None else plan["sent_blocks"]
        return StageReport(
            stage=sent.stage,
            copied_blocks=sent.num_blocks,
            copied_bytes=sent.nbytes,
            remaining_blocks=max(0, full_now - int(plan["sent_blocks"])),
            total_blocks=max(int(plan["total_blocks"]), self._blocks(state.num_tokens) if state else 0),
            duration_s=time.perf_counter() - start,
        )

    def _finished_report(self, outgoing: _Outgoing, start: float) -> StageReport:
        reason = outgoing.ended.result()
        if not reason.request_finished:
            raise MigrationAborted(reason.reason)
        return StageReport(
            stage=len(outgoing.stages),
            copied_blocks=0,
            copied_bytes=0,
            remaining_blocks=0,
            total_blocks=0,
            duration_s=time.perf_counter() - start,
            request_finished=True,
        )

    async def migrate_out_stop(self, migration_id: str) -> FrozenRequest:
        outgoing = self._outgoing_of(migration_id)
        state = self._requests.get(outgoing.request_id)
        if state is None or outgoing.ended.done():
            reason = outgoing.ended.result().reason if outgoing.ended.done() else "the request ended"
            raise MigrationAborted(reason)
        start = time.perf_counter()
        try:
            await self._channel().call("scheduler", side_channel.Stop(migration_id=migration_id))
        except side_channel.ControlError as exc:
            raise MigrationAborted(str(exc)) from exc
        if outgoing.aborted:  # an abort raced in: nothing was stopped, the request goes on here
            raise MigrationAborted(f"migration {migration_id} was aborted")
        # From here the iterator yields nothing: whatever it has not yielded is in the frozen state's tail.
        outgoing.stop_armed = True
        state.stopped = True
        state.end = asyncio.get_running_loop().create_future()
        assert self._llm is not None
        await self._llm.abort(outgoing.request_id)
        frozen: side_channel.Frozen = await self._wait(outgoing, outgoing.frozen, "frozen state")
        outgoing.result = self._frozen_request(outgoing, state, frozen, start, None)
        final = outgoing.stage_future(frozen.final_stage)
        sent: side_channel.StageSent = await self._wait(outgoing, final, "final ack")
        if sent.error:
            raise MigrationAborted(f"final stage of {migration_id} failed: {sent.error}")
        if outgoing.aborted:
            raise MigrationAborted(f"migration {migration_id} was aborted")
        outgoing.result = self._frozen_request(outgoing, state, frozen, start, sent)
        return outgoing.result

    def _frozen_request(
        self,
        outgoing: _Outgoing,
        state: _Request,
        frozen: side_channel.Frozen,
        start: float,
        sent: side_channel.StageSent | None,
    ) -> FrozenRequest:
        prompt = list(state.request.prompt_token_ids)
        report = StageReport(
            stage=frozen.final_stage,
            copied_blocks=sent.num_blocks if sent else 0,
            copied_bytes=sent.nbytes if sent else 0,
            remaining_blocks=0,
            total_blocks=frozen.num_blocks,
            duration_s=time.perf_counter() - start,
        )
        kv_transfer: dict[str, Any] = {}
        if sent is not None and frozen.num_computed_tokens > 0:  # the destination holds every block
            kv_transfer = {
                "migration_id": outgoing.migration_id,
                "kv_tokens": frozen.num_computed_tokens,
                "source": self.instance_id,
                "kv_layout": self._kv_layout,
            }
        return FrozenRequest(
            request_id=outgoing.request_id,
            prompt_token_ids=prompt,
            output_token_ids=list(frozen.token_ids[len(prompt) :]),
            num_blocks=frozen.num_blocks,
            final_stage=report,
            kv_transfer=kv_transfer,
        )

    async def migrate_out_commit(self, migration_id: str) -> None:
        outgoing = self._outgoing.pop(migration_id, None)
        if outgoing is None:
            return
        self._end_stopped(outgoing.request_id, "migrated")

    def _end_stopped(self, request_id: str, reason: str) -> None:
        """End a stopped request's iterator; forget it now, so that the id can be resumed here at once."""
        state = self._requests.get(request_id)
        if state is None or not state.stopped:
            return
        del self._requests[request_id]
        if state.end is not None and not state.end.done():
            state.end.set_result(reason)

    async def migrate_out_abort(self, migration_id: str) -> FrozenRequest | None:
        outgoing = self._outgoing.get(migration_id)
        if outgoing is None:
            return None
        outgoing.aborted = True  # a stop in flight sees it and backs off (or fails once it stopped)
        aborted = side_channel.MigrationEnded(migration_id=migration_id, reason="aborted")
        state = self._requests.get(outgoing.request_id)
        try:
            if not outgoing.stop_armed:
                if state is not None:
                    state.migration_id = None
                with contextlib.suppress(side_channel.ControlError):
                    await self._channel().call("scheduler", side_channel.Cancel(migration_id=migration_id))
                return None
            # Stopped (or stopping): the request no longer runs here; hand back its state for a recompute.
            # No Cancel: the scheduler side must still see the stop's abort through, to report the state.
            result = outgoing.result
            if result is None and state is not None:
                with contextlib.suppress(MigrationAborted):
                    frozen = await self._wait(outgoing, outgoing.frozen, "frozen state")
                    result = self._frozen_request(outgoing, state, frozen, time.perf_counter(), None)
            self._end_stopped(outgoing.request_id, "migrated")
            if result is None:  # it finished on its own before it stopped
                return None
            return FrozenRequest(
                request_id=result.request_id,
                prompt_token_ids=result.prompt_token_ids,
                output_token_ids=result.output_token_ids,
                num_blocks=result.num_blocks,
                final_stage=result.final_stage,
                kv_transfer={},
            )
        finally:
            _resolve(outgoing.ended, aborted)
            self._outgoing.pop(migration_id, None)

    def _preload(self, received: side_channel.StageReceived) -> None:
        """Warm the prefix cache with a received stage's full blocks (a one-token request that loads them),
        and tell the worker whether it should hold the stage's ack until that ran."""
        if "tokens" not in received.meta:
            return
        submitted = self._submit_preload(received.migration_id, received.meta["tokens"])
        if self._control is not None:
            self._control.notify(
                "worker",
                side_channel.PreloadPlan(migration_id=received.migration_id, stage=received.stage, preload=submitted),
            )

    def _submit_preload(self, migration_id: str, tokens: list[int]) -> bool:
        if not self.enable_preload or migration_id not in self._reserved or self._llm is None:
            return False
        full = (len(tokens) - 1) // self.block_size
        preload = self._preloads.setdefault(migration_id, _Preload())
        if full <= preload.blocks:
            return False
        preload.blocks = full
        kv_tokens = full * self.block_size
        request_id = f"drover-preload-{migration_id}-{len(preload.tasks)}"
        preload.tasks.append(
            asyncio.ensure_future(self._warm_up(request_id, migration_id, tokens[: kv_tokens + 1], kv_tokens))
        )
        return True

    async def _warm_up(self, request_id: str, migration_id: str, prompt_ids: list[int], kv_tokens: int) -> None:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = {"rid": request_id, "load": migration_id, "kv_tokens": kv_tokens, "preload": True}
        sampling = VllmSamplingParams(
            max_tokens=1,
            temperature=0.0,
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,
            extra_args={"kv_transfer_params": {PARAMS_KEY: params}},
        )
        prompt = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=migration_id)
        try:
            async for _ in self._llm.generate(prompt, sampling, request_id=request_id):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed warm-up only costs the resume a larger load
            log.warning("preload %s failed: %s", request_id, exc)

    async def migrate_in_reserve(self, migration_id: str, num_blocks: int) -> KvEndpoint:
        """Raises :class:`ReservationRefused` naming the limit: this engine's free KV blocks, or its worker's
        staging pool (``staging_blocks`` slots: two max-length requests by default)."""
        channel = self._channel()
        held = self._reserved.get(migration_id, 0)
        others = sum(self._reserved.values()) - held
        free = self._free_blocks() - others
        if num_blocks > held and num_blocks > free:
            raise ReservationRefused(f"{max(0, free)} KV blocks free, asked {num_blocks}")
        try:
            await channel.call("worker", side_channel.Reserve(migration_id=migration_id, num_blocks=num_blocks))
        except side_channel.ControlError as exc:  # the worker's staging pool (its text names it) or no worker
            log.info("engine %s cannot reserve %d blocks: %s", self.instance_id, num_blocks, exc)
            raise ReservationRefused(str(exc)) from exc
        if held and migration_id not in self._reserved:
            # Released while the worker reserved (an abort raced a growth): drop what the worker holds again
            # rather than count a reservation nobody will release.
            with contextlib.suppress(side_channel.ControlError):
                await channel.call("worker", side_channel.Release(migration_id=migration_id))
            raise ReservationRefused(f"migration {migration_id} was released while its reservation grew")
        self._reserved[migration_id] = max(held, num_blocks)
        return KvEndpoint(self.instance_id, channel.hello("worker").data_address, migration_id)

    async def _grow_on_demand(self, migration_id: str, num_blocks: int) -> None:
        """The worker received a stage that outgrew the reservation (the request decoded on since it was last
        grown, above all before its stop): grow it from the free blocks, as a reservation, or tell why not."""
        error = ""
        if migration_id not in self._reserved:  # released (aborted) meanwhile: nothing to grow
            error = f"no reservation for migration {migration_id}"
        else:
            try:
                await self.migrate_in_reserve(migration_id, num_blocks)
                log.info("engine %s: reservation %s grew to %d blocks", self.instance_id, migration_id, num_blocks)
            except ReservationRefused as exc:
                error = f"{self.instance_id} cannot hold {num_blocks} blocks: {exc}"
        if self._control is not None:
            self._control.notify(
                "worker", side_channel.ReservationGrown(migration_id=migration_id, num_blocks=num_blocks, error=error)
            )

    async def migrate_in_release(self, migration_id: str) -> None:
        if self._control is None:
            return
        await self._release_staging(migration_id)

    async def _release_staging(self, migration_id: str) -> None:
        self._reserved.pop(migration_id, None)
        preload = self._preloads.pop(migration_id, None)
        if preload is not None:
            for task in preload.tasks:
                task.cancel()  # aborts the warm-up in vLLM
            await asyncio.gather(*preload.tasks, return_exceptions=True)
        if self._control is not None:
            with contextlib.suppress(side_channel.ControlError):
                await self._control.call("worker", side_channel.Release(migration_id=migration_id))


@dataclass
class _Preload:
    blocks: int = 0  # full blocks preloaded (or being preloaded)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _eos_token_ids(model_dir: Path) -> list[int]:
    """EOS ids from the model's config (vLLM runs without a tokenizer, so it cannot know them)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in ids:
                    ids.append(token)
    return ids
