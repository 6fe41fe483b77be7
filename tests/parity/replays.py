"""Replays for parity (a): feed the core calls a live shell recorded (:class:`~control.core.record.DecisionLog`)
to the simulator's shell and list where its commands differ. Each replay takes a ``deviate`` name that makes
it deliberately wrong in one way, so a test can show that the comparison would catch a shell that deviates.

Used by ``tests/parity/test_replay.py`` and by the live tests whose run is recorded (the autoscaler's
scale-out and scale-in, ``tests/actors/test_autoscaler.py``; KunServe's automatic drop and restore, which
needs torch engines, ``tests/integration/test_kunserve_live.py``): a replay adds no second live run.
:func:`replay_queues` replays the dispatch loop's queue events (``tests/parity/test_replay.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import msgspec

from control.core.dispatch import Dispatcher, Place, Waiting
from control.core.pd import PdCore
from control.core.record import Decision
from control.core.requests import fail_over
from control.core.scaling import LocalSizer
from control.policy.autoscaling import AutoscaleParams, ClusterView, FleetInstance, LocalObservation, RunningBatch
from control.policy.memory import GroupSnapshot, MemoryParams, MemorySnapshot
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.simulator import ClusterSimulator, ElasticConfig
from control.simulator.elastic import ElasticSimulator
from control.simulator.memory import MemorySimulator, MemSimConfig

Mismatch = tuple[str, str, object, object]  # (what, key, live output, replayed output)
Answers = dict[tuple[object, ...], object]  # a shell callable's answers, by arguments (control.core.pd.AnswerLog)

SCHEDULER_CALLS = {"upsert", "remove", "choose", "dispatched", "migration_plan", "fail_over"}
PD_CALLS = {
    "pd_report",
    "pd_set_phase",
    "pd_forget_instance",
    "pd_request",
    "pd_request_ended",
    "pd_handoffs",
    "pd_wants_first_token",
    "pd_first_token_handoffs",
    "pd_balancing_pool",
    "pd_rebalance",
    "pd_handoff_ended",
}


def replay_scheduler(simulator: ClusterSimulator, entries: list[Decision], deviate: str = "") -> list[Mismatch]:
    """The scheduler's core calls, in their order, into the simulator's core objects: its dispatch index
    (``ClusterSimulator.index``: snapshots, removals, choices, dispatches), its migration planner (each round
    with its ``now``), :func:`fail_over` (the simulator has no instance failures: the function any shell calls)
    and, for a :class:`~control.simulator.pd.PdClusterSimulator`, its :class:`PdCore` (phases, the requests
    that may be handed off, each round of handoffs with the shell's answers to ``busy`` / ``overlap`` /
    ``prefix_of``, the split's rebalancing, each handoff's end).

    ``deviate``: ``"skip_dispatched"`` (the index does not learn of a dispatch), ``"skip_pd_request"`` (the
    PD core does not learn of a dispatched request)."""
    index, planner = simulator.index, simulator.planner
    pd = getattr(simulator, "pd", None)
    wrong: list[Mismatch] = []
    for d in entries:
        if d.what in PD_CALLS:
            if not isinstance(pd, PdCore):
                raise AssertionError("PD calls recorded: replay them through a PdClusterSimulator")
            got = _replay_pd(pd, d, deviate, wrong)
        elif d.what in SCHEDULER_CALLS:
            got = d.output
            if d.what == "upsert":
                index.upsert(d.inputs[0])  # type: ignore[arg-type]
            elif d.what == "remove":
                index.remove(d.key)
            elif d.what == "choose":
                got = index.choose(d.inputs[0])  # type: ignore[arg-type]
            elif d.what == "dispatched":
                if deviate != "skip_dispatched":
                    index.on_dispatched(d.inputs[0], d.inputs[1])  # type: ignore[arg-type]
            elif d.what == "migration_plan":
                snapshots, in_flight, now = d.inputs
                planner.sync(list(snapshots))  # type: ignore[call-overload]
                got = tuple(planner.plan(list(in_flight), now=now))  # type: ignore[call-overload, arg-type]
            elif d.what == "fail_over":
                records, max_attempts = d.inputs
                table = [msgspec.structs.replace(r) for r in records]  # type: ignore[attr-defined]
                got = tuple(fail_over(table, d.key, max_attempts))  # type: ignore[arg-type]
        else:
            continue
        if got != d.output:
            wrong.append((d.what, d.key, d.output, got))
    return wrong


def _replay_pd(pd: PdCore, d: Decision, deviate: str, wrong: list[Mismatch]) -> object:
    """One recorded PdCore call into ``pd``; its output (None for the calls that only change state)."""
    if d.what == "pd_report":
        return pd.on_report(d.key, d.inputs[0])  # type: ignore[arg-type]
    if d.what == "pd_set_phase":
        pd.set_phase(d.key, d.inputs[0])  # type: ignore[arg-type]
    elif d.what == "pd_forget_instance":
        pd.forget_instance(d.key)
    elif d.what == "pd_request":
        if deviate != "skip_pd_request":
            pd.on_request(d.key, d.inputs[0])  # type: ignore[arg-type]
    elif d.what == "pd_request_ended":
        pd.on_request_ended(d.key)
    elif d.what == "pd_wants_first_token":
        return pd.wants_first_token(d.key, int(cast(int, d.inputs[0])))
    elif d.what in ("pd_handoffs", "pd_first_token_handoffs"):
        if d.what == "pd_handoffs":
            reports, seen, recorded = d.inputs
        else:
            source, num_blocks, seen, recorded = d.inputs
        busy, overlaps, prefixes = cast(tuple[Answers, Answers | None, Answers | None], recorded)

        def answer(answers: Answers, *args: object) -> Any:
            key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
            if key not in answers:  # the live shell was never asked this: the replay took another path
                wrong.append((d.what, "unasked", key, None))
                return 0
            return answers[key]

        def overlap(iid: str, hashes: Sequence[int]) -> int:
            return int(answer(overlaps or {}, iid, hashes))

        def prefix_of(rid: str) -> Sequence[int]:
            return tuple(answer(prefixes or {}, rid))

        if d.what == "pd_first_token_handoffs":
            assert isinstance(source, InstanceSnapshot)
            return tuple(
                pd.first_token_handoffs(
                    d.key,
                    source,
                    int(cast(int, num_blocks)),
                    _snapshots(seen),
                    lambda rid: bool(answer(busy, rid)),
                    overlap if overlaps is not None else None,
                    prefix_of if prefixes is not None else None,
                )
            )
        return tuple(
            pd.handoffs(
                _snapshots(reports),
                _snapshots(seen),
                lambda rid: bool(answer(busy, rid)),
                overlap if overlaps is not None else None,
                prefix_of if prefixes is not None else None,
            )
        )
    elif d.what == "pd_balancing_pool":
        return tuple(pd.balancing_pool(_snapshots(d.inputs[0])))
    elif d.what == "pd_rebalance":
        return pd.rebalance(_snapshots(d.inputs[0]), _float(d.inputs[1]))
    elif d.what == "pd_handoff_ended":
        pd.on_handoff_ended(d.key, bool(d.inputs[0]))
    return None


def _snapshots(value: object) -> Sequence[InstanceSnapshot]:
    assert isinstance(value, tuple) and all(isinstance(s, InstanceSnapshot) for s in value)
    return value


SCALING_CALLS = {"scaling_clock", "plan_due", "scale_plan", "start_drain", "stop_reason", "drain_forget"}


def replay_scaling(entries: list[Decision], autoscale: AutoscaleParams, deviate: str = "") -> list[Mismatch]:
    """The AutoscalerActor's core calls (its :class:`~control.core.scaling.ScalingClock` and every plan) into an
    :class:`ElasticSimulator`'s clock and :meth:`ElasticSimulator.scale_plan`, the virtual clock started where the
    live monotonic one did.

    ``deviate``: ``"plan_at_start"`` (the first plan at the first tick, the live rule before the core),
    ``"skip_drain"`` (the simulator forgets to track a drain)."""
    calls = [d for d in entries if d.what in SCALING_CALLS]
    if not calls or calls[0].what != "scaling_clock":
        raise AssertionError("no autoscaler clock recorded")
    period_s, drain_timeout_s = calls[0].inputs
    started_at = calls[0].output
    assert isinstance(period_s, float) and isinstance(drain_timeout_s, float) and isinstance(started_at, float)
    simulator = ElasticSimulator(ElasticConfig(autoscale=autoscale, drain_timeout_s=drain_timeout_s), [])
    clock = simulator.scaling_clock
    assert clock.period_s == period_s, "the simulator plans at another period than the live run"
    assert clock.last_plan_at == simulator.now, "the simulator's first plan is not one period after its start"
    # The virtual clock taken to start where the live one did: the same arithmetic as live, bit for bit.
    clock.last_plan_at = -math.inf if deviate == "plan_at_start" else started_at
    wrong: list[Mismatch] = []
    for d in calls[1:]:
        got: object = d.output
        if d.what == "plan_due":
            (now,) = d.inputs
            got = clock.plan_due(_float(now))
        elif d.what == "scale_plan":
            view, params = d.inputs
            assert isinstance(view, ClusterView) and isinstance(params, AutoscaleParams)
            got = simulator.scale_plan(view, params)
        elif d.what == "start_drain":
            now, reason = d.inputs
            got = True if deviate == "skip_drain" else clock.start_drain(d.key, _float(now), str(reason))
        elif d.what == "stop_reason":
            empty, now = d.inputs
            got = clock.stop_reason(d.key, bool(empty), _float(now))
        elif d.what == "drain_forget":
            clock.forget(d.key)
        if got != d.output:
            wrong.append((d.what, d.key, d.output, got))
    return wrong


MEMORY_CALLS = {"memory_poll", "group_formed", "group_ended"}


def replay_memory(entries: list[Decision], params: MemoryParams, deviate: str = "") -> list[Mismatch]:
    """The MemoryManager's core calls (each poll's snapshots and ``now``; each group formed and ended) into a
    :class:`MemorySimulator`'s :class:`~control.core.memory.GroupHysteresis`: the same drops and restores.

    ``deviate``: ``"skip_formed"`` (the simulator does not note a group's formation: no minimum group time,
    no restore); a flipped threshold is other ``params``."""
    simulator = MemorySimulator(MemSimConfig(mode="kunserve", num_instances=1, memory=params), [])
    hysteresis = simulator.hysteresis
    wrong: list[Mismatch] = []
    for d in entries:
        if d.what not in MEMORY_CALLS:
            continue
        got: object = d.output
        if d.what == "group_formed":
            (now,) = d.inputs
            if deviate != "skip_formed":
                hysteresis.formed(d.key, _float(now))
        elif d.what == "group_ended":
            members, now = d.inputs
            assert isinstance(members, tuple)
            hysteresis.ended(d.key, members, _float(now))
        else:
            snapshots, groups, now = d.inputs
            assert isinstance(snapshots, tuple) and isinstance(groups, tuple)
            singles = [s for s in snapshots if isinstance(s, MemorySnapshot)]
            pipelined = [g for g in groups if isinstance(g, GroupSnapshot)]
            got = hysteresis.poll(singles, pipelined, _float(now))
        if got != d.output:
            wrong.append((d.what, d.key, d.output, got))
    return wrong


def _float(value: object) -> float:
    assert isinstance(value, float | int)
    return float(value)


QUEUE_CALLS = {"queue_event", "queue_place", "queue_end", "queue_batch", "queue_fits_now", "view"}


class _TapeView:
    """The live shell's view as the dispatcher saw it: each question answered as it was answered live (the
    ``view`` entries, in order). Asked something else, or more than the live dispatcher asked during an event,
    it notes a mismatch and answers as an empty cluster would."""

    NEUTRAL: dict[str, object] = {"waiting": None, "contains": False}

    def __init__(self, tape: Iterable[tuple[int, Decision]], wrong: list[Mismatch]) -> None:
        self.tape: deque[tuple[int, Decision]] = deque(tape)
        self.wrong = wrong
        self.end = -1  # the current event's end: answers recorded after it belong to later events

    def _ask(self, question: str, args: tuple[object, ...]) -> object:
        if self.tape and self.tape[0][0] < self.end:
            _, d = self.tape.popleft()
            if d.key == question and d.inputs == args:
                return d.output
            self.wrong.append(("view", question, (d.key, d.inputs), args))
        else:
            self.wrong.append(("view", question, "not asked live", args))
        return self.NEUTRAL.get(question, ())

    def unasked(self) -> None:
        """The event ended: whatever the live dispatcher asked and the replay did not is a mismatch."""
        while self.tape and self.tape[0][0] < self.end:
            _, d = self.tape.popleft()
            self.wrong.append(("view", d.key, d.inputs, "not asked in the replay"))

    def waiting(self, request_id: str) -> Waiting | None:
        answer = self._ask("waiting", (request_id,))
        assert answer is None or isinstance(answer, Waiting)
        return answer

    def __contains__(self, request_id: object) -> bool:
        return bool(self._ask("contains", (request_id,)))

    def class_loads(self) -> Sequence[FleetInstance]:
        return cast(Sequence[FleetInstance], self._ask("class_loads", ()))

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        return cast(Sequence[RunningBatch], self._ask("evictable", (instance_id,)))

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        return cast(Iterable[tuple[str, int]], self._ask("serving_waiting", ()))


def replay_queues(dispatcher: Dispatcher, entries: list[Decision]) -> list[Mismatch]:
    """The scheduler's dispatch loop, replayed: every queue event the live :class:`Dispatcher` recorded (a
    submission, a retry at a tick, a batch release, a request run again, one waiting after a restart, one that
    ended, admission's "would it start now?") into ``dispatcher`` (the simulator's, configured as the live one:
    class routing, fair queue), with the index fed the same heartbeats and the live shell's view answering as it
    did. Each placement (``Place``: request, instance, evictions), in order, and each event's end must agree;
    so must the questions the dispatcher asks the view (which request it looks at next is the queues' order).
    A deviating dispatcher is another ``dispatcher`` (e.g. one built without the fair queue)."""
    wrong: list[Mismatch] = []
    view = _TapeView(((k, d) for k, d in enumerate(entries) if d.what == "view"), wrong)
    ends = [k for k, d in enumerate(entries) if d.what == "queue_end"]
    active: Iterator[Place] | None = None
    for k, d in enumerate(entries):
        if d.what == "upsert":
            dispatcher.index.upsert(cast(InstanceSnapshot, d.inputs[0]))
        elif d.what == "remove":
            dispatcher.index.remove(d.key)
        elif d.what == "queue_event":
            if active is not None:
                raise AssertionError(f"queue event {d.inputs[0]} recorded inside another one")
            view.end = next(e for e in ends if e > k)
            active = _start(dispatcher, d, view)
        elif d.what == "queue_place":
            got = next(active, None) if active is not None else None
            if got != d.output:
                wrong.append(("queue_place", d.key, d.output, got))
        elif d.what == "queue_end":
            extra = tuple(active) if active is not None else ()
            if extra:
                wrong.append(("queue_end", d.key, (), extra))
            view.unasked()
            active = None
        elif d.what == "queue_fits_now":
            got_fits = dispatcher.fits_now(cast(RequestDemand, d.inputs[0]))
            if got_fits != d.output:
                wrong.append((d.what, d.key, d.output, got_fits))
        elif d.what == "queue_batch" and active is None:  # a shell's own call (inside an event: the event's)
            dispatcher.queue_batch(cast(Waiting, d.inputs[0]), _float(d.inputs[1]))
    return wrong


def _start(dispatcher: Dispatcher, d: Decision, view: _TapeView) -> Iterator[Place]:
    """The replayed dispatcher's answer to one recorded event, as an iterator of its placements."""
    name = d.inputs[0]
    now = d.inputs[1] if len(d.inputs) > 1 else None
    if name == "submit":
        return dispatcher.submit(d.key, view, _float(now))
    if name == "retry":
        return dispatcher.retry(view, _float(now))
    if name == "release_batch":
        return dispatcher.release_batch(view)
    if name == "dispatch_or_wait":
        place = dispatcher.dispatch_or_wait(d.key, view, _float(now))
        return iter([place] if place is not None else [])
    if name == "wait":
        dispatcher.wait(d.key)
    elif name == "forget":
        dispatcher.forget(d.key)
    else:
        raise AssertionError(f"unknown queue event {name!r}")
    return iter(())


def replay_local(simulator: ElasticSimulator, entries: list[Decision], deviate: str = "") -> list[Mismatch]:
    """Each engine host's local autoscaler, replayed: every window's observation (what the host measured) into a
    :class:`LocalSizer` the simulator builds for an instance (``ElasticSimulator.local_sizer``; the simulator
    configured with the live engines' ``max_num_seqs`` and autoscaling parameters): each batch-size decision
    (limit, capacity, backpressure, reason, what the rule remembers) identical, one instance after another.

    ``deviate``: ``"unclamped"`` (the limits not clamped to the engine's ``max_num_seqs``, as the simulator
    did before its local autoscaler was the core's)."""
    sizers: dict[str, LocalSizer] = {}
    wrong: list[Mismatch] = []
    for d in entries:
        if d.what != "local_batch":
            continue
        observation, engine_max_seqs = d.inputs
        assert isinstance(observation, LocalObservation)
        sizer = sizers.get(d.key)
        if sizer is None:
            if engine_max_seqs != simulator.config.engine.max_num_seqs:
                wrong.append(("engine_max_seqs", d.key, engine_max_seqs, simulator.config.engine.max_num_seqs))
            if deviate == "unclamped":
                sizer = LocalSizer(simulator.as_params, 1 << 30, key=d.key)
            else:
                sizer = simulator.local_sizer(d.key)
            sizers[d.key] = sizer
        got = sizer.decide(observation)
        if got != d.output:
            wrong.append((d.what, d.key, d.output, got))
    return wrong
