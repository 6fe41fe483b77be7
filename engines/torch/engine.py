"""``TorchEngine``: the torch Llama engine behind Drover's ``Engine`` protocol.

The event loop owns all scheduling state; only the forward pass and sampling of each step run in a worker
thread (``asyncio.to_thread``), so the loop stays responsive to new requests, aborts and heartbeats while
a step computes. Requests join and leave between steps.

Beyond the protocol it exposes what KunServe needs: :meth:`TorchEngine.drop_layers` /
:meth:`TorchEngine.restore_layers` (parameter-centric memory), :meth:`TorchEngine.export_kv` /
:meth:`TorchEngine.import_kv` (moving a request's KV for layers that change owner), leading a
:class:`~engines.torch.pipeline.PipelineGroup` (see :mod:`engines.torch.group`), and a member's requests
moving into its group with their KV (:meth:`TorchEngine.park_paused` at the member, then
:meth:`TorchEngine.adopt_kv_paused` at the leader; ``actors/engine_groups.py``). Invariant: a request never
computes on missing KV: after layers come back, a running request whose KV for them was not imported is
recomputed (preempted) before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineError, EngineOutput, EngineRequest
from engines.torch.config import LlamaConfig
from engines.torch.core import EngineCore, StageRunner, StepPlan
from engines.torch.kv_cache import BlockAllocator
from engines.torch.sampler import request_seed
from engines.torch.scheduler import Scheduler, SeqStatus, Sequence, SeqUpdate
from engines.torch.stage import MemoryReport, ModelStage
from transport.messages import EngineInfo, EngineMemory, InstanceLoad, RunningRequest

log = logging.getLogger(__name__)

ENGINE_KIND = "torch"
KV_PAYLOAD_VERSION = 1
GROUP_KV_KEY = "torch_group_kv"
"""``EngineRequest.kv_transfer`` key of a request a joining member handed into its group: ``{"num_tokens": n}``,
whose KV the leader took in at ``lead`` (:meth:`TorchEngine.adopt_kv_paused`); without it, recomputed."""


@dataclass(slots=True, eq=False)
class _Live:
    request: EngineRequest
    seq: Sequence
    queue: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    done: bool = False


class TorchEngine:
    """A Llama model (or a contiguous layer range of one) with paged KV, continuous batching, drop/restore."""

    def __init__(
        self,
        instance_id: str,
        model_dir: str | Path,
        *,
        model_name: str,
        block_size: int = 32,
        num_blocks: int | None = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 2048,
        dtype: str = "float32",
        layer_range: tuple[int, int] | None = None,
        memory_budget_bytes: int | None = None,
        seed: int = 0,
        threads: int = 1,
        device: str = "cpu",
    ) -> None:
        """``num_blocks``: KV blocks (default 512); derived from ``memory_budget_bytes`` minus the weights when
        a budget is given. ``layer_range``: hold only layers [first, last) (a pipeline stage; it serves
        requests only as the leader of a group that covers every layer). ``threads``: torch intra-op
        threads, set process-wide at start. ``device``: where weights and KV live and steps compute ("cpu",
        "cuda", "cuda:1"); scheduling stays on the CPU."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or block_size < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        self.instance_id = instance_id
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.seed = seed
        self.threads = threads
        self.device = device
        self.config = LlamaConfig.from_model_dir(self.model_dir)
        self._layer_range = layer_range
        self._num_blocks_arg = num_blocks
        self._budget_arg = memory_budget_bytes
        self._stage: ModelStage | None = None
        self._core: EngineCore | None = None
        self._live: dict[str, _Live] = {}
        self._missing_kv: dict[str, set[int]] = {}  # request -> held layers whose KV it lacks
        # request -> (blocks holding its KV, tokens they cover): handed in by a joining member, waiting for the
        # request itself (an EngineAdd with GROUP_KV_KEY) to take them
        self._adopted: dict[str, tuple[list[int], int]] = {}
        self.group_counters: dict[str, int] = dict.fromkeys(("kv_adopted", "kv_recomputed"), 0)
        """Requests handed in by a joining member since start: resumed on their KV, or recomputed (no room, or
        their KV never arrived)."""
        self.role = "standalone"  # | "leader" (runs a pipeline group) | "member" (a stage of another's group)
        self.group_id = ""  # the KunServe group this engine is in (set by whoever forms it)
        self.group_members: list[str] = []
        self.on_step_failure: Callable[[Exception], bool] | None = None
        """Called when a step fails; True means the callee takes over (a group whose member died): the step's
        requests are kept (their tokens were not committed) and no step runs until :meth:`resume_steps`."""
        self._halted = False
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pause_depth = 0
        self._reshaping = 0  # a stage drop/restore is running in a worker thread
        self._stopped = False
        self._reported_preemptions = 0
        self._load = InstanceLoad(num_total_blocks=0, num_free_blocks=0, num_running=0, num_waiting=0)

    # ------------------------------------------------------------------------------------------ accessors
    @property
    def stage(self) -> ModelStage:
        if self._stage is None:
            raise EngineError(f"torch engine {self.instance_id} is not started")
        return self._stage

    @property
    def core(self) -> EngineCore:
        if self._core is None:
            raise EngineError(f"torch engine {self.instance_id} is not started")
        return self._core

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def allocator(self) -> BlockAllocator:
        return self.core.scheduler.allocator

    @property
    def kv_layout(self) -> str:
        """Equal layouts can exchange KV blocks: dtype, block shape and the model's layer count."""
        c = self.config
        return f"torch/{self.dtype}/blk{self.block_size}/kv{c.num_kv_heads}x{c.head_dim}/L{c.num_layers}"

    # ------------------------------------------------------------------------------------------ Engine
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            instance_id=self.instance_id,
            engine_kind=ENGINE_KIND,
            model=self.model_name,
            dtype=self.dtype,
            block_size=self.block_size,
            num_blocks=self._core.scheduler.allocator.num_blocks if self._core else 0,
            max_model_len=self.max_model_len,
            kv_layout=self.kv_layout,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    def build(self) -> None:
        """Load the weights and allocate the KV pool (blocking; :meth:`start` runs it in a thread)."""
        if self._core is not None:
            return
        torch.set_num_threads(self.threads)
        stage = ModelStage(
            self.model_dir,
            layer_range=self._layer_range,
            block_size=self.block_size,
            num_blocks=self._num_blocks_arg,
            memory_budget_bytes=self._budget_arg,
            dtype=self.dtype,
            config=self.config,
            device=self.device,
        )
        scheduler = Scheduler(
            BlockAllocator(stage.num_blocks),
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self._stage, self._core = stage, EngineCore(stage, scheduler)
        self._publish_load()

    async def start(self) -> None:
        if self._task is not None:
            return
        await asyncio.to_thread(self.build)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"torch-engine-{self.instance_id}")

    async def shutdown(self) -> None:
        for request_id in list(self._live):
            await self.abort(request_id)
        self._stopped = True
        self._kick()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # ends after the step in flight, if any
            self._task = None

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Validate now (raising :class:`EngineError`), then stream outputs."""
        self._validate(request)
        seq = self._sequence(request)
        live = _Live(request, seq)
        if request.remaining_tokens == 0:
            live.done = True
            live.queue.put_nowait(EngineOutput(request.request_id, [], "length"))
        else:
            self._admit(request, seq)
        self._live[request.request_id] = live
        self._publish_load()
        self._kick()
        return self._stream(live)

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is None:
            return
        self.scheduler.abort(request_id)
        self._missing_kv.pop(request_id, None)
        self._finish(live, [], "abort")
        self._publish_load()
        self._kick()

    def load(self) -> InstanceLoad:
        """The snapshot published after the last step (safe from the heartbeat thread)."""
        snapshot = self._load
        total = self._core.scheduler.num_preemptions if self._core else 0
        preempted, self._reported_preemptions = total - self._reported_preemptions, total
        return InstanceLoad(
            num_total_blocks=snapshot.num_total_blocks,
            num_free_blocks=snapshot.num_free_blocks,
            num_running=snapshot.num_running,
            num_waiting=snapshot.num_waiting,
            waiting_blocks=snapshot.waiting_blocks,
            head_waiting_blocks=snapshot.head_waiting_blocks,
            num_preempted=preempted,
            running=snapshot.running,
        )

    # ------------------------------------------------------------------------------------------ requests
    def _validate(self, request: EngineRequest) -> None:
        if self._task is None or self._core is None:
            raise EngineError(f"torch engine {self.instance_id} is not started")
        if self.role == "member":
            raise EngineError(f"{self.instance_id} serves as a stage of a pipeline group; send requests to its leader")
        if not self._runner_complete() and self._pause_depth == 0:  # paused: a group step completes it
            first, last = self.stage.layer_range
            raise EngineError(f"{self.instance_id} holds layers [{first}, {last}) only; it cannot run a request alone")
        if request.request_id in self._live:
            raise EngineError(f"request {request.request_id} is already running on {self.instance_id}")
        if request.kv_transfer and self._reshaping:
            raise EngineError(f"{self.instance_id} is reshaping its memory (layers dropped or restored); retry")
        if not request.prompt_token_ids:
            raise EngineError("empty prompt")
        context = len(request.prompt_token_ids) + len(request.output_token_ids)
        if context >= self.max_model_len:
            raise EngineError(f"{context} context tokens do not fit max_model_len {self.max_model_len}")
        if any(not 0 <= t < self.config.vocab_size for t in request.prompt_token_ids + request.output_token_ids):
            raise EngineError(f"token ids must be in [0, {self.config.vocab_size})")
        longest = min(context + request.remaining_tokens, self.max_model_len)
        if self.scheduler.blocks_for(longest) > self.allocator.num_blocks:
            raise EngineError(
                f"{self.instance_id}: a request of up to {longest} tokens needs "
                f"{self.scheduler.blocks_for(longest)} KV blocks; the pool has {self.allocator.num_blocks}"
            )

    def _sequence(self, request: EngineRequest) -> Sequence:
        sampling = request.sampling
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(self.config.eos_token_ids)
        return Sequence(
            request_id=request.request_id,
            token_ids=[*request.prompt_token_ids, *request.output_token_ids],
            num_prompt_tokens=len(request.prompt_token_ids),
            max_output_tokens=sampling.max_tokens,
            stop_token_ids=frozenset(stop),
            priority=request.priority,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed if sampling.seed is not None else request_seed(self.seed, request.request_id),
        )

    def _admit(self, request: EngineRequest, seq: Sequence) -> None:
        """Queue a validated request: recompute its context, or load KV handed over in ``kv_transfer``."""
        handed = (request.kv_transfer or {}).get(GROUP_KV_KEY)
        if handed is not None:
            self._admit_handed(request.request_id, seq, int(handed.get("num_tokens", 0)))
            return
        payload = (request.kv_transfer or {}).get("torch_kv")
        if payload is None:
            self.scheduler.add(seq)
            return
        num_tokens = int(payload["num_tokens"])
        if num_tokens > seq.num_tokens or sorted(payload["kv"]) != self.core.runner.held_layers():
            raise EngineError(f"KV handed over for {request.request_id} does not cover this engine's layers")
        blocks = self.scheduler.blocks_for(num_tokens)
        if not self.allocator.can_allocate(blocks):
            raise EngineError(f"{self.instance_id}: no room for the {blocks} KV blocks of {request.request_id}")
        seq.block_ids = self.allocator.allocate(blocks)
        self.core.runner.import_kv(payload["kv"], seq.block_ids)
        seq.num_computed = num_tokens
        self.scheduler.add_running(seq)

    def _admit_handed(self, request_id: str, seq: Sequence, num_tokens: int) -> None:
        """A joining member's request resumes here: on the KV this leader took in at ``lead``, else recomputed."""
        adopted = self._adopted.pop(request_id, None)
        if adopted is not None and adopted[1] == num_tokens and 0 < num_tokens <= seq.num_tokens:
            seq.block_ids, seq.num_computed = adopted[0], num_tokens
            self.scheduler.add_running(seq)
            self.group_counters["kv_adopted"] += 1
            return
        if adopted is not None:
            self.allocator.free(adopted[0])
        if num_tokens:
            log.info("torch engine %s: recomputing %s (its handed KV is not here)", self.instance_id, request_id)
            self.group_counters["kv_recomputed"] += 1
        self.scheduler.add(seq)

    async def _stream(self, live: _Live) -> AsyncIterator[EngineOutput]:
        try:
            while True:
                output = await live.queue.get()
                yield output
                if output.finished:
                    return
        finally:
            if not live.done:  # the consumer went away: abort in the engine
                live.done = True
                self.scheduler.abort(live.request.request_id)
                self._missing_kv.pop(live.request.request_id, None)
                self._publish_load()
                self._kick()
            self._live.pop(live.request.request_id, None)

    def _finish(self, live: _Live, tokens: list[int], reason: str) -> None:
        if live.done:
            return
        live.done = True
        live.queue.put_nowait(EngineOutput(live.request.request_id, tokens, reason))

    def _deliver(self, updates: list[SeqUpdate]) -> None:
        for update in updates:
            live = self._live.get(update.seq.request_id)
            if live is None or live.done or live.seq is not update.seq:
                continue
            if update.finish_reason is not None:
                self._missing_kv.pop(update.seq.request_id, None)
                self._finish(live, update.new_token_ids, update.finish_reason)
            else:
                live.queue.put_nowait(EngineOutput(update.seq.request_id, update.new_token_ids))

    # ------------------------------------------------------------------------------------------ step loop
    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _runner_complete(self) -> bool:
        return self._core is not None and self._core.runner.held_layers() == list(range(self.config.num_layers))

    def _can_step(self) -> bool:
        return (
            self._pause_depth == 0
            and not self._halted
            and self.role != "member"
            and self._runner_complete()
            and self.scheduler.has_work
        )

    def resume_steps(self) -> None:
        """Step again after :attr:`on_step_failure` took over."""
        self._halted = False
        self._kick()

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while not self._stopped:
            plan: StepPlan | None = None
            if self._can_step():
                self._recompute_missing_kv()
                plan = self.core.schedule()
                self._deliver([SeqUpdate(seq, [], "abort") for seq in self.scheduler.drain_unfit()])
            if plan is None:
                self._publish_load()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            try:
                sampled = await asyncio.to_thread(self.core.execute, plan)
            except Exception as exc:
                log.exception("torch engine %s: step failed", self.instance_id)
                self._fail_step(plan, exc)
            else:
                self._deliver(self.core.commit(plan, sampled))
            finally:
                self._publish_load()
                self._idle.set()
            # No yield here: consumers read this step's tokens while the next step computes in its thread.

    def _fail_step(self, plan: StepPlan, exc: Exception) -> None:
        """A failed forward leaves the step's KV undefined: end its requests (the client sees an abort),
        unless :attr:`on_step_failure` takes over (then stepping halts; the requests stay for it to move)."""
        if self.on_step_failure is not None and self.on_step_failure(exc):
            self._halted = True
            return
        for chunk in plan.output.chunks:
            live = self._live.get(chunk.seq.request_id)
            self.scheduler.abort(chunk.seq.request_id)
            if live is not None:
                self._finish(live, [], "abort")

    def _recompute_missing_kv(self) -> None:
        for request_id in list(self._missing_kv):
            seq = self.scheduler.requests.get(request_id)
            if seq is not None and seq.status is SeqStatus.RUNNING and seq.block_ids:
                log.info(
                    "torch engine %s: recomputing %s (KV of restored layers missing)", self.instance_id, request_id
                )
                self.scheduler.preempt(seq)
            del self._missing_kv[request_id]

    def _publish_load(self) -> None:
        if self._core is None:
            return
        if self.role == "member":
            self._load = InstanceLoad(num_total_blocks=0, num_free_blocks=0, num_running=0, num_waiting=0)
            return
        scheduler = self.scheduler
        self._load = InstanceLoad(
            num_total_blocks=scheduler.allocator.num_blocks,
            num_free_blocks=scheduler.allocator.num_free,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            waiting_blocks=scheduler.waiting_blocks,
            head_waiting_blocks=scheduler.head_waiting_blocks(),
            running=[
                RunningRequest(
                    request_id=s.request_id,
                    num_tokens=s.num_tokens,
                    num_blocks=len(s.block_ids),
                    priority=s.priority,
                    decoding=s.decoding,
                )
                for s in scheduler.running
            ],
        )

    # ------------------------------------------------------------------------------------------ pausing
    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No step runs inside this block (entered once the step in flight, if any, has committed)."""
        self._pause_depth += 1
        try:
            if self._idle is not None:
                await self._idle.wait()
            yield
        finally:
            self._pause_depth -= 1
            self._publish_load()
            self._kick()

    def _require_paused(self, what: str) -> None:
        if self._task is not None and self._pause_depth == 0:
            raise EngineError(f"{what} needs the engine paused (async with engine.paused(): ...)")

    # ------------------------------------------------------------------------------------------ KV transfer
    def export_kv(self, request_id: str, layers: list[int]) -> dict[str, Any]:
        """A running request's KV for ``layers`` (copied tensors), to hand to the layers' new owner.

        Call inside :meth:`paused` so that the request does not advance between export and import.
        """
        self._require_paused("export_kv")
        seq = self._running_seq(request_id)
        blocks = seq.block_ids[: self.scheduler.blocks_for(seq.num_computed)]
        return {
            "v": KV_PAYLOAD_VERSION,
            "request_id": request_id,
            "num_tokens": seq.num_computed,
            "block_size": self.block_size,
            "layers": sorted(layers),
            "kv": self.core.runner.export_kv(sorted(layers), blocks),
        }

    def import_kv(self, request_id: str, payload: dict[str, Any]) -> None:
        """Write KV exported by :meth:`export_kv` (same request, same token count) into its blocks here."""
        self._require_paused("import_kv")
        seq = self._running_seq(request_id)
        if int(payload["block_size"]) != self.block_size or int(payload["num_tokens"]) != seq.num_computed:
            raise EngineError(
                f"KV of {request_id} covers {payload['num_tokens']} tokens in blocks of {payload['block_size']}; "
                f"here it has {seq.num_computed} in blocks of {self.block_size}"
            )
        kv: dict[int, torch.Tensor] = payload["kv"]
        self.core.runner.import_kv(kv, seq.block_ids[: self.scheduler.blocks_for(seq.num_computed)])
        missing = self._missing_kv.get(request_id)
        if missing is not None:
            missing.difference_update(kv)
            if not missing:
                del self._missing_kv[request_id]

    def evict_paused(self, request_id: str) -> list[int] | None:
        """Stop a request without finishing it, so that it resumes elsewhere from its outputs (recomputed).

        Returns every output token sampled so far (some may not have reached the consumer yet: the caller
        sends those), or None for an unknown or finished request. Its stream ends with ``abort``; its blocks
        are freed. Call inside :meth:`paused`.
        """
        self._require_paused("evict")
        live = self._live.get(request_id)
        if live is None or live.done:
            return None
        outputs = list(live.seq.output_token_ids)
        self.scheduler.abort(request_id)
        self._missing_kv.pop(request_id, None)
        while not live.queue.empty():  # sampled but not yet yielded: part of ``outputs``
            live.queue.get_nowait()
        self._finish(live, [], "abort")
        self._publish_load()
        return outputs

    def park_paused(self, request_id: str) -> tuple[list[int], int, dict[int, torch.Tensor]] | None:
        """:meth:`evict_paused`, but first copy the request's KV of every layer (a member joining a group hands
        its requests to the leader with their KV). Returns (outputs, tokens the KV covers, ``{layer: blocks}``);
        no KV (0, {}) for a request that holds none. Call inside :meth:`paused`."""
        self._require_paused("park")
        live = self._live.get(request_id)
        if live is None or live.done:
            return None
        seq = live.seq
        num_tokens, kv = 0, {}
        complete = self._runner_complete() and request_id not in self._missing_kv
        if complete and seq.status is SeqStatus.RUNNING and seq.block_ids and seq.num_computed > 0:
            num_tokens = seq.num_computed
            blocks = seq.block_ids[: self.scheduler.blocks_for(num_tokens)]
            kv = self.core.runner.export_kv(list(range(self.config.num_layers)), blocks)
        outputs = self.evict_paused(request_id)
        return (outputs, num_tokens, kv) if outputs is not None else None

    def adopt_kv_paused(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Hold blocks for the KV of a request a joining member hands in (the leader, at ``lead``); the request
        takes them when it is added with ``kv_transfer={GROUP_KV_KEY: {"num_tokens": n}}``. None: no room (it
        will be recomputed). Write its KV with :meth:`import_adopted_kv`. Call inside :meth:`paused`."""
        self._require_paused("adopt_kv")
        needed = self.scheduler.blocks_for(num_tokens)
        if num_tokens <= 0 or request_id in self._adopted or not self.allocator.can_allocate(needed):
            return None
        blocks = self.allocator.allocate(needed)
        self._adopted[request_id] = (blocks, num_tokens)
        self._publish_load()
        return blocks

    def import_adopted_kv(self, request_id: str, kv: dict[int, torch.Tensor]) -> None:
        """Write (part of) an adopted request's KV into the blocks held for it (any held layers)."""
        self._require_paused("import_adopted_kv")
        self.core.runner.import_kv(kv, self._adopted[request_id][0])

    def release_adopted(self, request_id: str | None = None) -> None:
        """Free the blocks held for a handed-in request (all of them: None) whose request did not come."""
        for rid in [request_id] if request_id is not None else list(self._adopted):
            adopted = self._adopted.pop(rid, None)
            if adopted is not None:
                self.allocator.free(adopted[0])
        self._publish_load()

    def live_request_ids(self) -> list[str]:
        """Requests this engine streams (running or waiting)."""
        return [rid for rid, live in self._live.items() if not live.done]

    def memory_status(self) -> EngineMemory:
        """Parameter-centric memory for the heartbeat (KunServe): layers held, weights, budget, RSS, group."""
        config, stage = self.config, self.stage
        itemsize = stage.dtype.itemsize
        return EngineMemory(
            num_layers=config.num_layers,
            layer_range=list(stage.layer_range),
            model_weight_bytes=config.weight_bytes(0, config.num_layers, itemsize),
            weight_bytes=stage.weight_bytes,
            kv_block_bytes=config.kv_block_bytes(config.num_layers, self.block_size, itemsize),
            budget_bytes=stage.budget_bytes,
            home_num_blocks=stage.home_num_blocks,
            rss_bytes=_rss_bytes(),
            group_id=self.group_id,
            group_role=self.role,
            group_members=list(self.group_members),
        )

    def _running_seq(self, request_id: str) -> Sequence:
        seq = self._core.scheduler.requests.get(request_id) if self._core else None
        if seq is None or seq.status is not SeqStatus.RUNNING:
            raise EngineError(f"no running request {request_id} on {self.instance_id}")
        return seq

    def requests_with_kv(self) -> list[str]:
        """Running requests that hold KV blocks (those whose KV must move when layers change owner)."""
        return [s.request_id for s in self.scheduler.seqs_holding_blocks()]

    # ------------------------------------------------------------------------------------------ drop/restore
    async def drop_layers(self, keep: tuple[int, int]) -> MemoryReport:
        """Free every layer outside ``keep`` and turn the bytes into KV blocks for the kept layers.

        Running requests keep their KV for the kept layers; their KV for the dropped layers is gone (export
        it first, inside :meth:`paused`, to move it). The engine runs requests again only once its layers
        are complete: restored, or as the leader of a group (:mod:`engines.torch.group`).
        """
        async with self.paused():
            return await self.drop_layers_paused(keep)

    async def drop_layers_paused(self, keep: tuple[int, int]) -> MemoryReport:
        """:meth:`drop_layers` for a caller that already holds :meth:`paused` (a group forming).

        Only the stage's work (freeing weights, regrowing pools) runs in a worker thread; block accounting
        stays on the event loop, where aborts and new requests touch it meanwhile.
        """
        self._require_paused("drop_layers")
        report = await self._reshape(self.stage.drop_layers, keep)
        if self.core.runner is self.stage:
            self.allocator.resize(self.stage.num_blocks)
        self._publish_load()
        return report

    async def restore_layers(self) -> MemoryReport:
        """Reload the layers dropped earlier; the KV pool shrinks back so the budget holds.

        Running requests whose blocks do not fit the smaller pool are preempted (recomputed later);
        the others keep their KV for the layers held throughout and must get the restored layers' KV
        through :meth:`import_kv` before the engine resumes, or they are recomputed.
        """
        async with self.paused():
            return await self.restore_layers_paused()

    async def restore_layers_paused(self, num_blocks: int | None = None) -> MemoryReport:
        """:meth:`restore_layers` for a caller that already holds :meth:`paused` (a group dissolving)."""
        self._require_paused("restore_layers")
        if self.core.runner is not self.stage:
            raise EngineError(f"{self.instance_id} leads a pipeline group: dissolve the group to restore")
        before = set(self.stage.held_layers())
        target = num_blocks if num_blocks is not None else self.stage.home_num_blocks
        self.fit_blocks(target)
        report = await self._reshape(self.stage.restore_layers, None, target)
        self.allocator.resize(self.stage.num_blocks)
        self.mark_missing_kv(set(self.stage.held_layers()) - before)
        self._publish_load()
        return report

    async def _reshape(self, operation: Callable[..., MemoryReport], *args: Any) -> MemoryReport:
        """Run a stage drop/restore in a worker thread; meanwhile no KV may be loaded into the pools."""
        self._reshaping += 1
        try:
            return await asyncio.to_thread(operation, *args)
        finally:
            self._reshaping -= 1

    def fit_blocks(self, num_blocks: int) -> list[str]:
        """Make every used block id fall below ``num_blocks``: preempt the latest, lowest-priority running
        requests until the rest fit, then compact (moving KV in every stage). Returns the preempted ids."""
        scheduler = self.scheduler
        preempted: list[str] = []
        if self._adopted:  # KV handed in for requests that never came: compaction would not remap its blocks
            log.warning(
                "torch engine %s: freeing handed-in KV of %s (never added)", self.instance_id, list(self._adopted)
            )
            self.release_adopted()
        victims = sorted(scheduler.running, key=lambda s: (s.priority, -s.order))
        while self.allocator.num_used > num_blocks and victims:
            victim = victims.pop(0)
            if victim.block_ids:
                scheduler.preempt(victim)
                preempted.append(victim.request_id)
        moves = self.allocator.compaction_plan(num_blocks)
        if moves:  # (a group whose member died has no stage to tell, and nothing to move)
            self.core.runner.move_blocks(moves)
        scheduler.remap_blocks(moves)
        return preempted

    # ------------------------------------------------------------------------------------------ groups
    def use_runner(self, runner: StageRunner, role: str) -> None:
        """Compute on ``runner`` from the next step (a group's pipeline, or this engine's own stage)."""
        self._require_paused("use_runner")
        capacity = runner.num_blocks
        self.fit_blocks(capacity)  # usually a no-op: a group's pools are at least as large as the old ones
        self.core.runner = runner
        self.allocator.resize(capacity)
        self.role = role
        self._publish_load()

    def mark_missing_kv(self, layers: set[int]) -> None:
        """Every request holding blocks lacks KV for ``layers`` (import it, or it is recomputed)."""
        if not layers:
            return
        for seq in self.scheduler.seqs_holding_blocks():
            self._missing_kv.setdefault(seq.request_id, set()).update(layers)


def _rss_bytes() -> int:
    """Resident memory of this process (0 when psutil cannot tell)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0
