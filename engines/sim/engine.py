"""``SimEngine``: the simulated engine behind the live ``Engine`` protocol (asyncio, real time).

It drives a :class:`~engines.sim.core.SimEngineCore` one step at a time on the event loop, sleeping each
step's modelled latency times ``time_scale``, and streams deterministic token ids: the token at output
position ``p`` of request ``r`` is a seeded hash of (seed, r, p) in the byte range 3..258 (so it decodes as
text with :class:`engines.tokenizer.ByteTokenizer`). A resumed request (``output_token_ids`` non-empty,
after migration or failover) therefore continues with exactly the tokens it would have produced.

It never emits EOS unless ``stop_probability`` > 0: then each request stops after a geometric number of
tokens drawn from the same seeded hash (the last token is EOS, id 2), identical wherever it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from control.adaptive_budget import AdaptiveStepBudget
from control.block_hash import vllm_block_hashes
from engines.base import EngineError, EngineOutput, EngineRequest
from engines.prefix_listing import DEFAULT_MAX_BLOCKS
from engines.sim.core import SimEngineConfig, SimEngineCore, SimOutput, SimRequest
from engines.sim.cost_model import DEFAULT_COST_MODEL, CostModel
from engines.sim.prefix_cache import PrefixCache, PrefixReporter
from transport.messages import EngineInfo, InstanceLoad, PrefixCacheReport, RunningRequest

log = logging.getLogger(__name__)

TOKEN_LOW = 3  # first byte token id (engines.tokenizer.BYTE_OFFSET)
TOKEN_SPAN = 256
EOS_TOKEN_ID = 2
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seed(seed: int, request_id: str) -> int:
    """Stable 64-bit seed of a request (Python's str hash is salted per process, so use blake2b)."""
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def token_at(req_seed: int, position: int) -> int:
    """The token a request generates at output ``position``: in 3..258."""
    return TOKEN_LOW + _splitmix64(req_seed + position) % TOKEN_SPAN


def stop_length(req_seed: int, stop_probability: float, max_tokens: int) -> int:
    """Output length under a per-token stop probability (geometric), capped at ``max_tokens``."""
    if stop_probability <= 0.0:
        return max_tokens
    if stop_probability >= 1.0:
        return 1
    u = (_splitmix64(req_seed ^ 0x5DEECE66D) >> 11) / float(1 << 53)
    u = max(u, 1e-300)
    return max(1, min(max_tokens, 1 + int(math.log(u) / math.log1p(-stop_probability))))


@dataclass(slots=True, eq=False)
class _Live:
    request: EngineRequest
    sim: SimRequest
    seed: int
    queue: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    done: bool = False


class SimEngine:
    """A simulated instance for live clusters: the ``Engine`` protocol over a cost-model core."""

    def __init__(
        self,
        instance_id: str,
        *,
        model_name: str = "drover-tiny",
        block_size: int = 32,
        num_blocks: int = 512,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 2048,
        time_scale: float = 1.0,
        cost_model: CostModel | None = None,
        seed: int = 0,
        stop_probability: float = 0.0,
        chunked_prefill: bool = True,
        prefix_caching: bool = False,
        prefix_full_every_s: float = 10.0,
        adaptive_budget: AdaptiveStepBudget | None = None,
    ) -> None:
        """``adaptive_budget``: choose each step's token budget by recent pressure
        (``control/adaptive_budget.py``; its ceiling should be ``max_num_batched_tokens``)."""
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.instance_id = instance_id
        self.time_scale = time_scale
        self.seed = seed
        self.stop_probability = stop_probability
        self.cost_model = cost_model or DEFAULT_COST_MODEL
        self.config = SimEngineConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            chunked_prefill=chunked_prefill,
            adaptive_budget=adaptive_budget,
        )
        self.core = SimEngineCore(self.config, self.cost_model)
        self._info = EngineInfo(
            instance_id=instance_id,
            engine_kind="sim",
            model=model_name,
            dtype="float16",
            block_size=block_size,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            kv_layout=f"sim:{self.cost_model.name}",
        )
        self._live: dict[str, _Live] = {}
        # Copies whose id the core still holds: an abort during a step takes effect when the step ends
        # (SimEngineCore.remove), so a copy started again under that id is admitted only then.
        self._deferred: list[_Live] = []
        self._clock = 0.0  # modelled seconds since start
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported_preemptions = 0
        self._stopped = False
        # vLLM's automatic prefix caching, reported in heartbeats like vLLM's KV events (docs/kv_routing.md);
        # off by default: prompts that repeat would otherwise prefill faster in every existing sim test.
        self._prefix: PrefixReporter | None = None
        if prefix_caching:
            self.core.prefix_cache = PrefixCache(block_size)
            self._prefix = PrefixReporter(
                self.core.prefix_cache, full_every_s=prefix_full_every_s, wake=self._collect_soon
            )
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------------ protocol
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def clock(self) -> float:
        """Modelled seconds this engine has run (the sum of its step latencies and idle gaps)."""
        return self._clock

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._stopped = False
        loop = self._loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"sim-engine-{self.instance_id}")

    async def shutdown(self) -> None:
        for request_id in list(self._live):
            await self.abort(request_id)
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Validate now (raising EngineError), then stream outputs through an async generator."""
        if self._task is None:
            raise EngineError(f"sim engine {self.instance_id} is not started")
        if request.request_id in self._live:
            raise EngineError(f"request {request.request_id} is already running on {self.instance_id}")
        context = len(request.prompt_token_ids) + len(request.output_token_ids)
        reason = self.core.can_ever_fit(context, request.remaining_tokens)
        if reason is not None:
            raise EngineError(f"{self.instance_id}: {reason}")
        req_seed = request_seed(self.seed, request.request_id)
        stop_p = 0.0 if request.sampling.ignore_eos else self.stop_probability
        target = stop_length(req_seed, stop_p, request.sampling.max_tokens)
        num_output = len(request.output_token_ids)
        sim = SimRequest(
            request_id=request.request_id,
            prompt_len=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            target_output=max(target, num_output + 1),
            num_output=num_output,
            priority=request.priority,
            arrival_time=self._clock,
            # the hashes vLLM would give the prompt's full blocks: what the control plane's index is keyed by
            block_hashes=vllm_block_hashes(request.prompt_token_ids, self.config.block_size)
            if self._prefix is not None
            else (),
        )
        live = _Live(request, sim, req_seed)
        self._live[request.request_id] = live
        if request.remaining_tokens == 0:
            live.done = True
            live.queue.put_nowait(EngineOutput(request.request_id, [], "length"))
        elif request.request_id in self.core.requests:
            # its last copy ended (aborted) but leaves the core only when the step under way ends: two
            # requests under one id in the core would both stream into this copy (the Engine contract: an
            # ended iterator's id may run again, and nothing of the old copy reaches the new one)
            self._deferred.append(live)
        else:
            self._admit(request, sim)
            self._kick()
        return self._stream(live)

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is None:
            return
        self.core.remove(request_id)
        self._finish(live, [], "abort")
        self._kick()

    def load(self) -> InstanceLoad:
        core = self.core
        preempted = core.num_preemptions - self._reported_preemptions
        self._reported_preemptions = core.num_preemptions
        return InstanceLoad(
            num_total_blocks=core.config.num_blocks,
            num_free_blocks=core.num_free_blocks,
            num_running=len(core.running),
            num_waiting=len(core.waiting),
            waiting_blocks=core.waiting_blocks,
            head_waiting_blocks=core.head_waiting_blocks(),
            num_preempted=preempted,
            running=[
                RunningRequest(
                    request_id=r.request_id,
                    num_tokens=r.context_len,
                    num_blocks=r.num_blocks,
                    priority=r.priority,
                    decoding=r.num_output > 0 and r.num_computed >= r.context_len - 1,
                )
                for r in core.running
            ],
        )

    def prefix_cache_report(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> PrefixCacheReport | None:
        """This beat's prefix-cache report, at most ``max_blocks`` hashes (None: prefix caching off).
        Heartbeater thread."""
        prefix = self._prefix
        return prefix.report(max_blocks=max_blocks) if prefix is not None and self._task is not None else None

    def request_prefix_resync(self) -> None:
        """The control plane lost track of this engine's cache: send a full listing (any thread)."""
        if self._prefix is not None:
            self._prefix.request_full()

    # ------------------------------------------------------------------------------------------ internals
    def _collect_soon(self) -> None:
        """From any thread: collect cache events on the engine's loop (the only thread touching the cache)."""
        loop, prefix = self._loop, self._prefix
        if loop is not None and prefix is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(prefix.collect)

    def _admit(self, request: EngineRequest, sim: SimRequest) -> None:
        """Put a validated request into the core (recompute); live migration overrides this to load KV."""
        self.core.add(sim)

    async def _stream(self, live: _Live) -> AsyncIterator[EngineOutput]:
        try:
            while True:
                output = await live.queue.get()
                yield output
                if output.finished:
                    return
        finally:
            if not live.done:  # the consumer went away: abort in the engine
                self.core.remove(live.request.request_id)
                live.done = True
                self._kick()
            self._live.pop(live.request.request_id, None)

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _finish(self, live: _Live, tokens: list[int], reason: str) -> None:
        if live.done:
            return
        live.done = True
        live.queue.put_nowait(EngineOutput(live.request.request_id, tokens, reason))

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while not self._stopped:
            end = self.core.plan(self._clock, 1) if self.core.has_work else None
            if end is None:
                self._wake.clear()
                await self._wake.wait()
                self._clock += (loop.time() - idle_since) / self.time_scale if self.time_scale > 0 else 0.0
                idle_since = loop.time()
                continue
            await asyncio.sleep((end - self._clock) * self.time_scale)
            self._clock = end
            idle_since = loop.time()
            self._deliver(self.core.finish_plan())
            if self._deferred:
                self._admit_deferred()
            if self._prefix is not None:
                self._prefix.collect()

    def _admit_deferred(self) -> None:
        """Admit the copies that waited for an earlier copy of their id to leave the core (at a step's end)."""
        waiting, self._deferred = self._deferred, []
        for live in waiting:
            if live.done:  # aborted, or its consumer went away, while it waited
                continue
            if live.request.request_id in self.core.requests:
                self._deferred.append(live)
                continue
            try:
                self._admit(live.request, live.sim)
            except (EngineError, ValueError) as exc:  # the caller is past generate(): end it here
                log.warning("%s: %s could not be admitted: %s", self.instance_id, live.request.request_id, exc)
                self._finish(live, [], "abort")

    def _deliver(self, outputs: list[SimOutput]) -> None:
        for out in outputs:
            live = self._live.get(out.request.request_id)
            if live is None or live.done or live.sim is not out.request:
                continue  # gone, or an earlier copy under the same id (aborted during the step): not this one's
            sim = out.request
            start = sim.num_output - out.new_tokens
            tokens = [token_at(live.seed, p) for p in range(start, sim.num_output)]
            reason: str | None = None
            stop_ids = live.request.sampling.stop_token_ids
            if stop_ids:
                for k, token in enumerate(tokens):
                    if token in stop_ids:
                        tokens = tokens[: k + 1]
                        reason = "stop"
                        break
            if reason is None and out.finished:
                if sim.num_output < sim.max_tokens:  # the stop probability fired: end with EOS
                    tokens[-1] = EOS_TOKEN_ID
                    reason = "stop"
                else:
                    reason = "length"
            if reason is not None:
                if not out.finished:
                    self.core.remove(sim.request_id)
                self._finish(live, tokens, reason)
            else:
                live.queue.put_nowait(EngineOutput(sim.request_id, tokens))
