"""The live shell of the control core's dispatch loop: the scheduler's tables as the loop reads them, and its
placements carried out.

``control/core/dispatch.py`` decides which waiting request goes where; it reads the shell's state through a
:class:`control.core.dispatch.FleetView`. :class:`SchedulerView` is the live shell's: the SchedulerActor's
instance registry and request table, and its request-class bookkeeping (``actors/request_classes.py``). It is
built for one event (with that event's ``now``) on the scheduler's thread and only reads: :class:`Placements`
carries out each placement (evictions first, then an ``EngineAdd`` the engine acknowledges, sent again while
it does not) before the core reads again, so every decision sees the tables as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from actors.control_state import ControlState
from actors.request_classes import RequestClasses
from actors.scheduler_instances import InstanceRegistry
from control.core.dispatch import Dispatcher, Place, Waiting
from control.core.pd import PdCore
from control.core.requests import InstanceRecord, RequestRecord, record_takes_no_dispatch
from control.policy.autoscaling import FleetInstance, RunningBatch
from control.policy.block_hash import vllm_block_hashes
from control.policy.dispatch import prefix_block_hashes, reads_engine_block_hashes
from control.policy.params import PolicyParams
from control.policy.snapshots import RequestDemand
from observability import spans
from observability.tracing import extract_context, inject_headers, tracer
from transport import subjects
from transport.bus import Bus
from transport.messages import EngineAbort, EngineAdd, RequestClass, SubmitRequest, encode, peer_version

log = logging.getLogger(__name__)


class SchedulerView:
    """A read-only :class:`control.core.dispatch.FleetView` over the scheduler's state."""

    def __init__(
        self,
        instances: Mapping[str, InstanceRecord],
        requests: Mapping[str, RequestRecord],
        classes: RequestClasses,
        demand: Callable[[RequestRecord], RequestDemand],
        now: float,
        blocked: Callable[[str], bool] = lambda _instance_id: False,
    ) -> None:
        """``blocked(instance_id)``: the instance takes no dispatch for another reason than its own record (a
        KunServe group's member, see ``InstanceRegistry.blocks_dispatch``); with the record it is the core's
        ``takes_no_dispatch`` rule, as the registry's snapshots (the dispatch index) read it.

        Thread: the scheduler actor's thread."""
        self.instances = instances
        self.requests = requests
        self.classes = classes
        self.demand = demand
        self.now = now
        self.blocked = blocked

    def waiting(self, request_id: str) -> Waiting | None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        if record is None:
            return None
        submit = record.submit
        cost = len(record.prompt_token_ids) + submit.sampling.max_tokens
        deadline = 0.0
        if submit.request_class == RequestClass.BATCH:
            deadline, cost = self.classes.deadline_of(request_id, self.now, cost)
        return Waiting(
            demand=self.demand(record),
            request_class=str(submit.request_class),
            client=submit.client_id or subjects.ANONYMOUS,
            cost=cost,
            deadline=deadline,
            queued=record.state == "queued" and record.instance_id is None,
        )

    def __contains__(self, request_id: object) -> bool:
        """Thread: the scheduler actor's thread."""
        return request_id in self.requests

    def class_loads(self) -> Sequence[FleetInstance]:
        """Thread: the scheduler actor's thread."""
        return self.classes.loads(self.instances, self.requests, self.blocked)

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        """Thread: the scheduler actor's thread."""
        return self.classes.evictable(instance_id, self.instances, self.requests)

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        """Thread: the scheduler actor's thread."""
        # only instances that take dispatch give the fair queue room: one draining or held by a KunServe
        # group would lend room that only the others can fill, past their fairness_max_waiting
        blocked = self.blocked
        return [
            (i, r.load.num_waiting) for i, r in self.instances.items() if not record_takes_no_dispatch(r, blocked(i))
        ]


@dataclass(frozen=True, slots=True)
class AddUnacked:
    """An EngineAdd got no acknowledgement (lost with a NATS node, or nobody subscribed yet)."""

    instance_id: str
    add: EngineAdd
    headers: dict[str, str]
    attempt: int


class Placements:
    """Runs the core's dispatch loop for the scheduler and carries out its placements.

    Collaborators: the bus, the core's ``dispatch`` loop, the scheduler's instance ``registry``, request
    table (``requests``), request ``classes``, prefill/decode core (``pd``) and state store (``state``);
    ``params()`` the policy parameters in force (an operator may change them); ``tell(message)`` hands a
    message to the scheduler actor from another thread (an unacknowledged EngineAdd, :class:`AddUnacked`)."""

    # An EngineAdd is acknowledged by the engine; one that is not (lost on the way with a NATS node that
    # died, or sent while the instance was resubscribing) is sent again, a few times, while the request is
    # still meant to run there. The engine ignores a copy of what it already runs.
    ADD_ATTEMPTS = 6

    def __init__(
        self,
        bus: Bus,
        request_timeout_s: float,
        dispatch: Dispatcher,
        registry: InstanceRegistry,
        requests: Mapping[str, RequestRecord],
        classes: RequestClasses,
        pd: PdCore,
        state: ControlState,
        params: Callable[[], PolicyParams],
        tell: Callable[[object], None],
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.bus = bus
        self.request_timeout_s = request_timeout_s
        self.dispatch = dispatch
        self.registry = registry
        self.requests = requests
        self.classes = classes
        self.pd = pd
        self.state = state
        self.params = params
        self.tell = tell

    # ------------------------------------------------------------------------------------------- events in
    def demand(self, request_id: str, token_ids: list[int], submit: SubmitRequest) -> RequestDemand:
        """What a request asks of an instance, as the dispatch index reads it (block hashes only for the
        policies that use them).

        Thread: the scheduler actor's thread."""
        instances = self.registry.records
        block_size = next(iter(instances.values())).info.block_size if instances else 32
        params = self.params()
        return RequestDemand(
            request_id=request_id,
            num_prompt_tokens=len(token_ids),
            num_blocks=-(-len(token_ids) // block_size),
            priority=submit.priority,
            model=submit.model or "",
            prefix_block_hashes=prefix_block_hashes(token_ids, block_size)
            if params.dispatch_policy == "prefix_affinity"
            else vllm_block_hashes(token_ids, block_size)  # kv_aware and drover index vLLM's own hashes
            if reads_engine_block_hashes(params.dispatch_params(), params.dispatch_policy)
            else (),
        )

    def fits_now(self, request_id: str, token_ids: list[int], submit: SubmitRequest) -> bool:
        """Whether the request would start at once (admission asks when a queue is at its limit).

        Thread: the scheduler actor's thread."""
        return self.dispatch.fits_now(self.demand(request_id, token_ids, submit))

    def view(self, now: float) -> SchedulerView:
        """The scheduler's tables as the core's dispatch loop reads them.

        Thread: the scheduler actor's thread."""
        return SchedulerView(
            self.registry.records,
            self.requests,
            self.classes,
            lambda r: self.demand(r.request_id, r.prompt_token_ids, r.submit),
            now,
            blocked=self.registry.blocks_dispatch,
        )

    def on_acknowledged(self, request_id: str, now: float) -> None:
        """The submission is stored and acknowledged: dispatch it now, or queue it.

        Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        if record is None or record.state != "queued" or record.instance_id is not None:
            return  # cancelled (or ended by its deadline) meanwhile
        self.classes.hold(record, now)  # its class's counters; a batch request's deadline
        self.run(self.dispatch.submit(request_id, self.view(now), now))

    def dispatch_or_wait(self, record: RequestRecord, now: float) -> None:
        """Run a request again (failover, a KunServe group handed it back): the core places it now, or it
        waits (and is stored as waiting).

        Thread: the scheduler actor's thread."""
        place = self.dispatch.dispatch_or_wait(record.request_id, self.view(now), now)
        if place is not None:
            self.run_one(place)
        else:
            self.state.save_request(record)

    def retry(self, now: float) -> None:
        """The core retries what waits (fair queue, then the queue from its head).

        Thread: the scheduler actor's thread."""
        self.run(self.dispatch.retry(self.view(now), now))

    def release_batch(self, now: float) -> None:
        """The global batch queue's head into spare batch slots (a tick).

        Thread: the scheduler actor's thread."""
        self.run(self.dispatch.release_batch(self.view(now)))

    # ------------------------------------------------------------------------------------------- commands out
    def run(self, places: Iterator[Place]) -> None:
        """Carry out the core's placements one by one (it reads the tables again between them).

        Thread: the scheduler actor's thread."""
        for place in places:
            self.run_one(place)

    def run_one(self, place: Place) -> None:
        """Start a request where the core placed it: evict first what it names, then send the EngineAdd (the
        index has counted the placement already).

        Thread: the scheduler actor's thread."""
        record = self.requests[place.request_id]
        instance_id = place.instance_id
        if place.evict:
            self.classes.evicting_for(instance_id, place.evict, record.request_id)
        instance = self.registry.records[instance_id]
        submit = record.submit
        with tracer().start_as_current_span(
            spans.SCHEDULER_DISPATCH,
            context=extract_context(record.headers),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                spans.REQUEST_ID: record.request_id,
                spans.INSTANCE_ID: instance_id,
                spans.DISPATCH_POLICY: self.dispatch.index.name,
                spans.PRIORITY: submit.priority,
                spans.REQUEST_CLASS: str(submit.request_class),
                spans.GEN_AI_USAGE_INPUT_TOKENS: len(record.prompt_token_ids),
                spans.MESSAGING_SYSTEM: "nats",
                "drover.queue_s": time.time() - record.arrival,
            },
        ):
            headers = inject_headers()
        if "traceparent" not in record.headers and "traceparent" in headers:
            # the client sent no trace context: the first dispatch roots the request's one trace, which a
            # later move (migration, failover) joins
            record.headers = dict(headers)
        self.send_add(
            instance_id,
            EngineAdd(
                v=peer_version(instance.info.protocol_version),
                client_v=peer_version(submit.v),
                request_id=record.request_id,
                prompt_token_ids=record.prompt_token_ids,
                sampling=submit.sampling,
                reply_to=submit.reply_to,
                priority=submit.priority,
                request_class=submit.request_class,
                arrival_time=record.arrival,
                stream_text=submit.stream_text,
                output_token_ids=record.resume_tokens,
                served_by=list(record.served_by),
                client_id=submit.client_id or "",
                report_first_token=self.pd.wants_first_token(instance_id, len(record.prompt_token_ids)),
            ),
            headers,
        )
        self.pd.on_request(record.request_id, len(record.prompt_token_ids))
        instance.dispatched += 1
        record.instance_id, record.state = instance_id, "running"
        record.served_by.append(instance_id)
        self.state.save_request(record)
        self.classes.on_dispatched(record, instance_id)

    def evict(self, instance_id: str, request_id: str) -> None:
        """Stop a batch request so an interactive one gets its slot (it resumes from the batch queue).

        Thread: the scheduler actor's thread."""
        version = self.registry.version(instance_id)
        self.bus.publish(subjects.engine(instance_id), EngineAbort(request_id=request_id, reason="evicted", v=version))

    def send_add(self, instance_id: str, add: EngineAdd, headers: dict[str, str], attempt: int = 1) -> None:
        """Thread: the scheduler actor's thread."""
        self.bus.run(self.request_add(instance_id, add, headers, attempt))

    async def request_add(self, instance_id: str, add: EngineAdd, headers: dict[str, str], attempt: int) -> None:
        """Send the EngineAdd and wait for the engine's acknowledgement; without one, tell the scheduler.

        Thread: the bus loop."""
        try:
            await self.bus.nc.request(
                subjects.engine(instance_id),
                encode(add),
                timeout=self.request_timeout_s,
                headers=headers or None,
            )
        except Exception as exc:  # timeout, no responders, reconnecting
            log.info("engine_add of %s to %s unacknowledged (%s)", add.request_id, instance_id, type(exc).__name__)
            await asyncio.sleep(min(2.0, 0.25 * 2**attempt))  # "no responders" comes back at once: back off
            self.tell(AddUnacked(instance_id, add, headers, attempt))

    def on_add_unacked(self, unacked: AddUnacked) -> None:
        """Send an unacknowledged EngineAdd again while the request is still meant to run there.

        Thread: the scheduler actor's thread."""
        record = self.requests.get(unacked.add.request_id)
        if record is None or record.instance_id != unacked.instance_id or record.state != "running":
            return  # ended, failed over or migrated meanwhile
        if unacked.attempt >= self.ADD_ATTEMPTS or unacked.instance_id not in self.registry.records:
            return  # the heartbeat timeout decides whether the instance is gone
        self.send_add(unacked.instance_id, unacked.add, unacked.headers, unacked.attempt + 1)
