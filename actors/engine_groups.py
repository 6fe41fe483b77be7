"""The engine side of live KunServe groups: an engine host executes ``GroupCommand`` steps on its torch engine.

Groups form between engine *processes*: a member drops to its layer range and serves its
:class:`~engines.torch.stage.ModelStage` with a :class:`~engines.torch.remote.StageServer` (TCP); the
leader drops to the first range and computes through a :class:`~engines.torch.pipeline.PipelineGroup` of
its own stage and a :class:`~engines.torch.remote.RemoteStage` per member. The leader alone schedules and
samples (one block allocator for the group), so the group is one dispatch target whose KV capacity is the
pooled one. KV of the leader's running requests for the layers that change owner crosses to the member
(``import_kv`` over the stage connection) while the leader is paused: the live KV exchange; nothing is
recomputed. A member's own requests move into the group with their KV too, as in the KunServe paper (and
the memory simulator, ``control/simulator/memory.py``): at ``join`` the member copies each running request's
KV of every layer aside (parked at its stage server), ends its stream here after the client has every
token sampled so far, and answers the EngineAdd that resumes it; at ``lead`` the leader holds group blocks
for each parked request and takes its KV in over the stage connection (the member writes its own layers'
share into its pools, the rest crosses to the leader's and other members' stages); the memory manager then
adds the requests to the leader, where they continue on that KV: nothing recomputed, each token once. A
request the group has no room for (or whose KV did not arrive) is recomputed on the leader.

Faults: when a step fails because a member is gone, the leader halts, evicts every request (the scheduler
resumes each from its delivered tokens: the failover path, each token once), restores its layers from the
model files and serves alone again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from engines.base import EngineError
from engines.torch.engine import GROUP_KV_KEY, TorchEngine
from engines.torch.pipeline import PipelineGroup, Stage
from engines.torch.remote import ParkedKv, RemoteStage, RemoteStageError, StageServer
from observability import spans
from observability.metrics import metrics
from observability.tracing import tracer
from transport import subjects
from transport.messages import EngineAdd, EngineRequestEnded, GroupCommand, GroupReply

if TYPE_CHECKING:
    from actors.engine_actor import EngineActor

log = logging.getLogger(__name__)


class GroupAgent:
    """Runs group steps for one engine actor's torch engine (every method runs on the bus loop)."""

    def __init__(self, actor: EngineActor, engine: TorchEngine, data_host: str = "127.0.0.1") -> None:
        self.actor = actor
        self.engine = engine
        self.data_host = data_host
        self.server: StageServer | None = None  # as a member
        self.parked: ParkedKv = {}  # as a member: KV of the requests it handed to the leader, until taken
        self.remotes: list[RemoteStage] = []  # as a leader
        self.pipeline: PipelineGroup | None = None
        self._busy = asyncio.Lock()
        self._breaking = False

    @property
    def instance_id(self) -> str:
        return self.engine.instance_id

    async def handle(self, command: GroupCommand, reply: str) -> None:
        """Run one step and answer ``reply`` with a :class:`GroupReply` (errors too: never raises)."""
        with tracer().start_as_current_span(
            f"{spans.MEMORY_GROUP}.{command.op}",
            kind=trace.SpanKind.CONSUMER,
            attributes={spans.INSTANCE_ID: self.instance_id, spans.GROUP_ID: command.group_id},
        ) as span:
            try:
                async with self._busy:
                    answer = await self._run(command)
            except Exception as exc:
                log.warning("engine %s: group %s %s failed: %s", self.instance_id, command.group_id, command.op, exc)
                answer = GroupReply(group_id=command.group_id, ok=False, error=f"{type(exc).__name__}: {exc}")
                span.set_status(trace.StatusCode.ERROR, answer.error)
            for key, value in answer.details.items():
                if isinstance(value, int | float | str):
                    span.set_attribute(f"drover.memory.{key}", value)
        if reply:
            await self.actor.bus.apublish(reply, answer)

    async def _run(self, command: GroupCommand) -> GroupReply:
        ops = {"join": self._join, "lead": self._lead, "dissolve": self._dissolve, "leave": self._leave}
        if command.op == "break":
            evicted = await self._break(command.group_id, "ordered")
            return GroupReply(group_id=command.group_id, ok=True, evicted=evicted)
        op = ops.get(command.op)
        if op is None:
            raise ValueError(f"unknown group op {command.op!r}")
        return await op(command)

    # ------------------------------------------------------------------------------------------ member
    async def _join(self, command: GroupCommand) -> GroupReply:
        engine = self.engine
        first, last = _range(command.layer_range)
        if engine.role != "standalone" or engine.stage.layer_range != (0, engine.config.num_layers):
            raise EngineError(f"{self.instance_id} must hold every layer and be in no group to join one")
        started = time.perf_counter()
        self.parked.clear()
        handed: list[EngineAdd] = []
        try:
            async with engine.paused():
                handed = await self._hand_over_all()
                report = await engine.drop_layers_paused((first, last))
                engine.use_runner(engine.stage, "member")
                engine.group_id, engine.group_members = command.group_id, list(command.members)
                handed += await self._hand_over_all()  # a dispatch that raced the join: a member runs no request
            self.server = StageServer(engine.stage, self.data_host, parked=self.parked)
        except BaseException:
            # The join failed after its requests left this engine: the scheduler resumes them (recomputed).
            self.parked.clear()
            for add in handed:
                await self._report_evicted(add.request_id, list(add.output_token_ids))
            raise
        metrics().memory_event("join", report.freed_weight_bytes, time.perf_counter() - started)
        return GroupReply(
            group_id=command.group_id,
            ok=True,
            address=self.server.address,
            handed=handed,
            details={
                "freed_weight_bytes": report.freed_weight_bytes,
                "kv_blocks_before": report.kv_blocks_before,
                "kv_blocks_after": report.kv_blocks_after,
                "parked_requests": len(self.parked),
                "parked_kv_bytes": sum(t.nbytes for _, kv in self.parked.values() for t in kv.values()),
                "seconds": time.perf_counter() - started,
            },
        )

    async def _hand_over_all(self) -> list[EngineAdd]:
        """Stop every request here to hand it to the group (join): a running one's KV of every layer is parked
        for the leader to take in; each answer resumes its request on the leader after its outputs so far."""
        handed: list[EngineAdd] = []
        for request_id in self.engine.live_request_ids():
            parked = self.engine.park_paused(request_id)
            if parked is None:
                continue
            outputs, num_tokens, kv = parked
            add = await self.actor.hand_over(request_id, outputs, {GROUP_KV_KEY: {"num_tokens": num_tokens}})
            if add is None:  # no stream here (cannot happen for a request the engine streams): resume it anyway
                await self._report_evicted(request_id, outputs)
                continue
            if kv:
                self.parked[request_id] = (num_tokens, kv)
            handed.append(add)
        return handed

    async def _leave(self, command: GroupCommand) -> GroupReply:
        engine = self.engine
        if engine.role != "member" or engine.group_id != command.group_id:
            return GroupReply(group_id=command.group_id, ok=True, details={"noop": 1})
        started = time.perf_counter()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.parked.clear()  # what the leader did not take: those requests were recomputed there or elsewhere
        async with engine.paused():
            engine.use_runner(engine.stage, "standalone")
            report = await engine.restore_layers_paused()
            engine.group_id, engine.group_members = "", []
        metrics().memory_event("leave", 0, time.perf_counter() - started)
        return GroupReply(
            group_id=command.group_id,
            ok=True,
            details={"kv_blocks_after": report.kv_blocks_after, "seconds": time.perf_counter() - started},
        )

    # ------------------------------------------------------------------------------------------ leader
    async def _lead(self, command: GroupCommand) -> GroupReply:
        engine = self.engine
        if engine.role != "standalone" or engine.stage.layer_range != (0, engine.config.num_layers):
            raise EngineError(f"{self.instance_id} must hold every layer and be in no group to lead one")
        keep = _range(command.layer_range)
        started = time.perf_counter()
        remotes = [await asyncio.to_thread(RemoteStage, address, 60.0) for address in command.stage_addresses]
        try:
            async with engine.paused():
                blocks_before = engine.allocator.num_blocks
                moving = engine.requests_with_kv()
                exchange_started = time.perf_counter()
                exchange = tracer().start_span(spans.MEMORY_EXCHANGE, attributes={spans.GROUP_ID: command.group_id})
                payloads = [
                    (remote, engine.export_kv(request_id, remote.held_layers()))
                    for remote in remotes
                    for request_id in moving
                ]
                report = await engine.drop_layers_paused(keep)
                stages: list[Stage] = [engine.stage, *remotes]
                pipeline = PipelineGroup(stages, micro_batches=command.micro_batches or len(stages))
                engine.use_runner(pipeline, "leader")
                moved_bytes = 0
                for _, payload in payloads:  # over each member's stage connection: the live KV exchange
                    await asyncio.to_thread(engine.import_kv, payload["request_id"], payload)
                    moved_bytes += sum(t.nbytes for t in payload["kv"].values())
                adopted, adopted_bytes = await self._take_parked(remotes)
                moved_bytes += adopted_bytes
                exchange_s = time.perf_counter() - exchange_started
                exchange.set_attribute("drover.memory.requests", len(moving) + adopted)
                exchange.set_attribute("drover.memory.bytes", moved_bytes)
                exchange.end()
                engine.group_id, engine.group_members = command.group_id, list(command.members)
                engine.on_step_failure = self._on_step_failure
                blocks_after = engine.allocator.num_blocks
        except BaseException:
            for remote in remotes:
                remote.close()
            raise
        self.remotes, self.pipeline = remotes, pipeline
        seconds = time.perf_counter() - started
        metrics().memory_event("drop", report.freed_weight_bytes, seconds)
        metrics().memory_exchange(moved_bytes, exchange_s)
        return GroupReply(
            group_id=command.group_id,
            ok=True,
            details={
                "freed_weight_bytes": report.freed_weight_bytes,
                "kv_blocks_before": blocks_before,
                "kv_blocks_after": blocks_after,
                "moved_requests": len(moving),
                "adopted_requests": adopted,
                "moved_kv_bytes": moved_bytes,
                "exchange_seconds": exchange_s,
                "seconds": seconds,
            },
        )

    async def _take_parked(self, remotes: list[RemoteStage]) -> tuple[int, int]:
        """Take in the KV the members parked when they joined (the leader, paused, as the pipeline): group
        blocks for each request; each member writes its own layers' share there, the rest crosses here and on
        to the stage that holds it. Returns (requests, bytes that crossed a stage connection)."""
        engine = self.engine
        taken = nbytes = 0
        for remote in remotes:
            try:
                parked = await asyncio.to_thread(remote.parked)
            except RemoteStageError as exc:  # a member from before the keep join parks nothing: its requests resumed
                log.warning("engine %s: no parked KV listed at %s: %s", self.instance_id, remote.address, exc)
                continue
            for request_id, num_tokens in parked:
                blocks = engine.adopt_kv_paused(request_id, num_tokens)  # None: no room, recomputed when added
                try:
                    kv = await asyncio.to_thread(remote.take_parked, request_id, blocks)
                    if blocks is not None:
                        await asyncio.to_thread(engine.import_adopted_kv, request_id, kv)
                except Exception as exc:  # the same tokens, recomputed when the request is added
                    log.warning("engine %s: KV of handed %s not taken in: %s", self.instance_id, request_id, exc)
                    engine.release_adopted(request_id)
                    continue
                if blocks is None:
                    continue
                taken += 1
                nbytes += sum(t.nbytes for t in kv.values())
        return taken, nbytes

    async def _dissolve(self, command: GroupCommand) -> GroupReply:
        engine = self.engine
        if engine.role != "leader" or engine.group_id != command.group_id:
            return GroupReply(group_id=command.group_id, ok=True, details={"noop": 1})
        started = time.perf_counter()
        async with engine.paused():
            blocks_before = engine.allocator.num_blocks
            target = engine.stage.home_num_blocks
            preempted = engine.fit_blocks(target)  # compacts in every stage, so exports see final block ids
            kept = set(engine.stage.held_layers())
            returning = [layer for layer in range(engine.config.num_layers) if layer not in kept]
            moving = engine.requests_with_kv()
            exchange_started = time.perf_counter()
            exchange = tracer().start_span(spans.MEMORY_EXCHANGE, attributes={spans.GROUP_ID: command.group_id})
            payloads = [await asyncio.to_thread(engine.export_kv, request_id, returning) for request_id in moving]
            engine.on_step_failure = None
            engine.use_runner(engine.stage, "standalone")
            report = await engine.restore_layers_paused(target)
            for payload in payloads:
                engine.import_kv(payload["request_id"], payload)
            exchange_s = time.perf_counter() - exchange_started
            exchange.set_attribute("drover.memory.requests", len(moving))
            exchange.end()
            engine.group_id, engine.group_members = "", []
            blocks_after = engine.allocator.num_blocks
        self._close_remotes()
        moved_bytes = sum(sum(t.nbytes for t in p["kv"].values()) for p in payloads)
        seconds = time.perf_counter() - started
        metrics().memory_event("restore", -report.freed_weight_bytes, seconds)
        metrics().memory_exchange(moved_bytes, exchange_s)
        return GroupReply(
            group_id=command.group_id,
            ok=True,
            details={
                "kv_blocks_before": blocks_before,
                "kv_blocks_after": blocks_after,
                "moved_requests": len(moving),
                "moved_kv_bytes": moved_bytes,
                "preempted": len(preempted),
                "seconds": seconds,
            },
        )

    # ------------------------------------------------------------------------------------------ faults
    def _on_step_failure(self, exc: Exception) -> bool:
        """The engine's hook: a pipeline step failed. Take over when a member's stage is gone."""
        if self.engine.role != "leader" or not _is_stage_failure(exc):
            return False
        if not self._breaking:
            log.warning(
                "engine %s: group %s lost a member (%s): breaking it", self.instance_id, self.engine.group_id, exc
            )
            asyncio.get_running_loop().create_task(self._break(self.engine.group_id, "member failed"))
        return True

    async def _break(self, group_id: str, why: str) -> list[str]:
        """End a group whose member is gone: evict every request (the scheduler resumes them), restore."""
        engine = self.engine
        if engine.role != "leader" or (group_id and engine.group_id != group_id) or self._breaking:
            return []
        self._breaking = True
        started = time.perf_counter()
        try:
            with tracer().start_as_current_span(
                spans.MEMORY_BREAK, attributes={spans.GROUP_ID: engine.group_id, "drover.memory.reason": why}
            ):
                async with engine.paused():
                    evicted = await self._evict_all()
                    engine.on_step_failure = None
                    engine.use_runner(engine.stage, "standalone")
                    await engine.restore_layers_paused()
                    engine.group_id, engine.group_members = "", []
                self._close_remotes()
                engine.resume_steps()
            metrics().memory_event("break", 0, time.perf_counter() - started)
            return evicted
        finally:
            self._breaking = False

    async def _evict_all(self) -> list[str]:
        """Hand every request back to the scheduler: its outputs so far reach the client first."""
        evicted: list[str] = []
        for request_id in self.engine.live_request_ids():
            outputs = self.engine.evict_paused(request_id)
            if outputs is None:
                continue
            await self._report_evicted(request_id, outputs)
            evicted.append(request_id)
        return evicted

    async def _report_evicted(self, request_id: str, outputs: list[int]) -> None:
        """The client gets every output token first; then the scheduler resumes the request after them."""
        await self.actor.end_evicted(request_id, outputs)
        await self.actor.bus.apublish(
            subjects.ENGINE_EVENTS,
            EngineRequestEnded(
                instance_id=self.instance_id,
                request_id=request_id,
                finish_reason="evicted",
                num_output_tokens=len(outputs),
                output_token_ids=outputs,
            ),
        )

    def _close_remotes(self) -> None:
        for remote in self.remotes:
            remote.close()
        self.remotes = []
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def close(self) -> None:
        """Stop serving a stage and drop stage connections (the host is going away)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.parked.clear()
        self._close_remotes()


def _range(values: list[int]) -> tuple[int, int]:
    if len(values) != 2:
        raise ValueError(f"a layer range is [first, last), got {values}")
    return int(values[0]), int(values[1])


def _is_stage_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RemoteStageError | ConnectionError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def group_agent_for(actor: EngineActor) -> GroupAgent | None:
    """A group agent when the actor's engine can drop layers (torch), else None. Its stage server binds the
    engine's KV data-plane host (``MigratableTorchEngine.data_host``)."""
    engine = actor.engine
    if not isinstance(engine, TorchEngine):
        return None
    return GroupAgent(actor, engine, str(getattr(engine, "data_host", "127.0.0.1")))
