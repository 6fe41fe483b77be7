"""Replays for parity (a): feed the core calls a live shell recorded (:class:`~control.core.record.DecisionLog`)
to the simulator's shell and list where its commands differ. Each replay takes a ``deviate`` name that makes
it deliberately wrong in one way, so a test can show that the comparison would catch a shell that deviates.

Used by ``tests/parity/test_replay.py`` and by the live tests whose run is recorded (the autoscaler's
scale-out and scale-in, ``tests/actors/test_autoscaler.py``; KunServe's automatic drop and restore, which
needs torch engines, ``tests/integration/test_kunserve_live.py``): a replay adds no second live run.
"""

from __future__ import annotations

import math

from control.core.record import Decision
from control.policy.autoscaling import AutoscaleParams, ClusterView
from control.policy.memory import GroupSnapshot, MemoryParams, MemorySnapshot
from control.simulator import ElasticConfig
from control.simulator.elastic import ElasticSimulator
from control.simulator.memory import MemorySimulator, MemSimConfig

Mismatch = tuple[str, str, object, object]  # (what, key, live output, replayed output)

SCALING_CALLS = {"scaling_clock", "plan_due", "scale_plan", "start_drain", "stop_reason", "drain_forget"}


def replay_scaling(entries: list[Decision], autoscale: AutoscaleParams, deviate: str = "") -> list[Mismatch]:
    """The AutoscalerActor's core calls (its :class:`~control.core.scaling.ScalingClock` and every plan) into an
    :class:`ElasticSimulator`'s clock and :meth:`ElasticSimulator.scale_plan`, the live monotonic clock mapped
    onto the simulator's virtual one (0 where the live clock started).

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
    if deviate == "plan_at_start":
        clock.last_plan_at = -math.inf
    wrong: list[Mismatch] = []
    for d in calls[1:]:
        got: object = d.output
        if d.what == "plan_due":
            (now,) = d.inputs
            got = clock.plan_due(_float(now) - started_at)
        elif d.what == "scale_plan":
            view, params = d.inputs
            assert isinstance(view, ClusterView) and isinstance(params, AutoscaleParams)
            got = simulator.scale_plan(view, params)
        elif d.what == "start_drain":
            now, reason = d.inputs
            got = True if deviate == "skip_drain" else clock.start_drain(d.key, _float(now) - started_at, str(reason))
        elif d.what == "stop_reason":
            empty, now = d.inputs
            got = clock.stop_reason(d.key, bool(empty), _float(now) - started_at)
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
