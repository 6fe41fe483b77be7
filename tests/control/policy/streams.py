"""A random stream of heartbeats, departures and dispatches that checks a long-lived dispatch index against one
rebuilt from scratch at every choice (test_incremental_equivalence.py, test_kv_aware.py)."""

from __future__ import annotations

import random
from collections.abc import Callable

from control.policy.dispatch import DispatchIndex
from control.policy.snapshots import InstanceSnapshot, RequestDemand


def check_against_rebuilt(
    rng: random.Random,
    index: DispatchIndex,
    rebuild: Callable[[], DispatchIndex],
    *,
    instances: int,
    snapshot: Callable[[str], InstanceSnapshot],
    demand: Callable[[int], RequestDemand],
    heartbeat_below: float,
    departure_below: float,
    other: tuple[float, Callable[[str], None]] | None = None,
    pending_demand: Callable[[str, RequestDemand], RequestDemand] = lambda _, d: d,
    steps: int = 1500,
) -> int:
    """Drive ``index`` through ``steps`` random events on instances ``i0`` .. ``i{instances-1}``, each by a roll
    of ``rng``: a heartbeat (``snapshot(iid)``) below ``heartbeat_below``, a departure below
    ``departure_below``, ``other``'s event below its bound (e.g. a prefix report), else a dispatch of
    ``demand(step)``. Each choice must equal that of ``rebuild()`` fed the current snapshots and the dispatches
    since each one (as ``pending_demand(chosen, demand)`` says it counts, asked before ``index`` learns of it).
    Returns how many requests were dispatched."""
    current: dict[str, InstanceSnapshot] = {}
    pending: dict[str, list[RequestDemand]] = {}  # dispatched since the instance's last heartbeat
    decisions = 0
    for step in range(steps):
        roll = rng.random()
        iid = f"i{rng.randrange(instances)}"
        if roll < heartbeat_below:
            current[iid] = snapshot(iid)
            pending[iid] = []
            index.upsert(current[iid])
        elif roll < departure_below:
            current.pop(iid, None)
            pending.pop(iid, None)
            index.remove(iid)
        elif other is not None and roll < other[0]:
            other[1](iid)
        else:
            d = demand(step)
            rebuilt = rebuild()
            for s in current.values():
                rebuilt.upsert(s)
            for target, sent in pending.items():
                for earlier in sent:
                    rebuilt.on_dispatched(target, earlier)
            chosen = index.choose(d)
            assert chosen == rebuilt.choose(d), f"step {step}"
            if chosen is not None:
                counted = pending_demand(chosen, d)
                index.on_dispatched(chosen, d)
                pending[chosen].append(counted)
                decisions += 1
    return decisions
