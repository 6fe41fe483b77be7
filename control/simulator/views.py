"""The one engine-view builder of the simulators: what a simulated instance looks like to the policies.

The live scheduler builds its :class:`InstanceSnapshot` from an engine's heartbeat (``InstanceLoad``, which
``engines/sim/engine.py`` fills from the same :class:`SimEngineCore` fields); the simulators build it here,
straight from the core, so that every simulator shows the policies the same view.

Also the part of the dispatch loop's view of a fleet (:class:`control.core.dispatch.FleetView`) that every
simulator without request classes shows the same (:class:`ClasslessFleet`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from control.policy.autoscaling import FleetInstance, RunningBatch
from control.policy.snapshots import InstanceSnapshot, RunningSnapshot
from engines.sim.core import SimEngineCore, SimRequest

# The snapshots' fields in declaration order, as the slot-by-slot builders below set them (see _slot_setters);
# if either class gains, loses or reorders a field, its snapshots are built with its constructor instead.
_FIELDS = (
    "instance_id",
    "num_total_blocks",
    "num_free_blocks",
    "num_running",
    "num_waiting",
    "waiting_blocks",
    "head_waiting_blocks",
    "num_preempted",
    "draining",
    "model",
    "block_size",
    "running",
    "cached_prefix_hashes",
    "high_priority_count",
    "running_totals",
)
_RUNNING_FIELDS = ("request_id", "num_tokens", "num_blocks", "priority", "decoding")
_NO_HASHES: frozenset[int] = frozenset()


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[object, object], None], ...] | None:
    """The ``__set__`` of each of ``cls``'s slot descriptors, in ``names`` order, when ``names`` are exactly its
    dataclass fields (else None: build it with its constructor).

    A frozen dataclass's ``__init__`` sets each field with ``object.__setattr__(self, name, value)``, which
    looks the name up every time; calling the slot's descriptor directly stores the same value in the same
    slot at half the cost. The result is the same frozen object (equal, hashable, immutable afterwards).
    The simulators build one snapshot per running request of every busy instance whose blocks changed, on
    most 50 ms ticks: this was a fifth of the time of an Azure-trace run."""
    if tuple(f.name for f in dataclasses.fields(cls)) != names:
        return None
    return tuple(getattr(cls, name).__set__ for name in names)


_RUNNING_SETTERS = _slot_setters(RunningSnapshot, _RUNNING_FIELDS)
_INSTANCE_SETTERS = _slot_setters(InstanceSnapshot, _FIELDS)


def running_view(requests: Iterable[SimRequest]) -> tuple[RunningSnapshot, ...]:
    """Running requests as migration sees them (admission order; ``decoding`` once past the prefill)."""
    # context_len inlined (prompt + output)
    if _RUNNING_SETTERS is None:
        return tuple(
            [
                RunningSnapshot(
                    r.request_id,
                    r.prompt_len + r.num_output,
                    r.num_blocks,
                    r.priority,
                    r.num_output > 0 and r.num_computed >= r.prompt_len + r.num_output - 1,
                )
                for r in requests
            ]
        )
    set_id, set_tokens, set_blocks, set_priority, set_decoding = _RUNNING_SETTERS
    new = object.__new__
    views = []
    for r in requests:
        view = new(RunningSnapshot)
        set_id(view, r.request_id)
        tokens = r.prompt_len + r.num_output
        set_tokens(view, tokens)
        set_blocks(view, r.num_blocks)
        set_priority(view, r.priority)
        set_decoding(view, r.num_output > 0 and r.num_computed >= tokens - 1)
        views.append(view)
    return tuple(views)


def instance_view(
    instance_id: str,
    core: SimEngineCore,
    *,
    model: str = "",
    draining: bool = False,
    num_preempted: int = 0,
    running: Iterable[SimRequest] = (),
    held: Sequence[SimRequest] = (),
) -> InstanceSnapshot:
    """``core`` as a heartbeat would report it. ``running``: the requests migration may move (none: a view
    for counting only); ``held``: requests outside the core that still wait for it (swapped out)."""
    moving = running_view(running)
    config = core.config
    block_size = config.block_size
    # counted and summed in one pass, as a heartbeat's builder does (InstanceSnapshot.high_priority_count and
    # running_totals, the latter control.policy.snapshots.running_totals inlined), not again in dispatch's upsert
    high = prefilling = to_allocate = decoding = 0
    for r in moving:
        if r.priority > 0:
            high += 1
        if r.decoding:
            decoding += 1
        elif block_size > 0:
            left = r.num_tokens - r.num_blocks * block_size
            if left > 0:
                prefilling += left
                to_allocate += -(-left // block_size)
    totals = (prefilling, to_allocate, decoding) if block_size > 0 else None
    waiting = core.waiting
    waiting_blocks = core.waiting_blocks
    if held:
        waiting_blocks += sum(core.blocks_for(r.context_len) for r in held)
    if _INSTANCE_SETTERS is not None:
        (
            set_id,
            set_total,
            set_free,
            set_running,
            set_waiting,
            set_waiting_blocks,
            set_head,
            set_preempted,
            set_draining,
            set_model,
            set_block_size,
            set_moving,
            set_hashes,
            set_high,
            set_totals,
        ) = _INSTANCE_SETTERS
        view = object.__new__(InstanceSnapshot)
        set_id(view, instance_id)
        set_total(view, config.num_blocks)
        set_free(view, core.num_free_blocks)
        set_running(view, len(core.running))
        set_waiting(view, len(waiting) + len(held))
        set_waiting_blocks(view, waiting_blocks)
        set_head(view, core.head_waiting_blocks())
        set_preempted(view, num_preempted)
        set_draining(view, draining)
        set_model(view, model)
        set_block_size(view, config.block_size)
        set_moving(view, moving)
        set_hashes(view, _NO_HASHES)
        set_high(view, high)
        set_totals(view, totals)
        return view
    return InstanceSnapshot(
        instance_id=instance_id,
        num_total_blocks=config.num_blocks,
        num_free_blocks=core.num_free_blocks,
        num_running=len(core.running),
        num_waiting=len(waiting) + len(held),
        waiting_blocks=waiting_blocks,
        head_waiting_blocks=core.head_waiting_blocks(),
        num_preempted=num_preempted,
        draining=draining,
        model=model,
        block_size=config.block_size,
        running=moving,
        high_priority_count=high,
        running_totals=totals,
    )


class ClasslessFleet:
    """What a simulated fleet without request classes or fair queueing shows the control core's dispatch loop
    beside its waiting requests: no class loads, nothing to evict, no fair-queue room to count."""

    def class_loads(self) -> Sequence[FleetInstance]:
        return ()

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        return ()

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        return ()
