"""KunServe group hysteresis: when automatic drops and restores may happen, with no I/O and no clock.

The policy (``control/policy/memory.py``) says *whether* memory calls for a drop or a restore; this says
*when* a shell may act on it, the same way for the live MemoryManager (``actors/memory_manager.py``) and the
memory simulator (``control/simulator/memory.py``):

* a group lives at least ``min_group_s`` before an automatic restore (no flapping);
* a group with nothing in use and nothing waiting restores at once (idle), otherwise when
  :func:`should_restore` says (occupancy low and falling since the last poll);
* an instance that left a group is not grouped again automatically for ``cooldown_s``.

The pool a group returns to (``GroupSnapshot.normal_total_blocks``) is the leader's own pool: after a restore
the leader serves what the group held on its own, so what the group holds must fit there and a restore never
preempts. :func:`restore_snapshot` builds it, for both shells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from control.policy.memory import GroupPlan, GroupSnapshot, MemoryParams, MemorySnapshot, plan_drop, should_restore

FRESH_GROUP_USE = 1.0
"""The occupancy a just-formed group is taken to have had (so its first poll sees use falling)."""


def restore_snapshot(
    group_id: str, num_total_blocks: int, num_free_blocks: int, num_waiting: int, leader_pool_blocks: int
) -> GroupSnapshot:
    """A group as the restore decision reads it; ``leader_pool_blocks``: the leader's pool serving alone."""
    return GroupSnapshot(
        group_id=group_id,
        num_total_blocks=num_total_blocks,
        num_free_blocks=num_free_blocks,
        num_waiting=num_waiting,
        normal_total_blocks=leader_pool_blocks,
    )


@dataclass(frozen=True, slots=True)
class MemoryCommands:
    """What one poll orders: groups to restore (ids), then groups to form (plans, leader first)."""

    restores: tuple[str, ...] = ()
    drops: tuple[GroupPlan, ...] = ()


@dataclass(slots=True)
class _Group:
    formed_at: float
    previous_use: float = FRESH_GROUP_USE


class GroupHysteresis:
    """Per-group formation times and occupancy history, per-instance cooldowns (see the module docstring)."""

    def __init__(self, params: MemoryParams) -> None:
        self.params = params
        self._groups: dict[str, _Group] = {}
        self._cooldown_until: dict[str, float] = {}

    def formed(self, group_id: str, now: float) -> None:
        """The group serves as a pipeline from ``now``."""
        self._groups[group_id] = _Group(now)

    def ended(self, group_id: str, members: Iterable[str], now: float) -> None:
        """The group is gone (restored, failed, dissolved): its members cool down."""
        self._groups.pop(group_id, None)
        until = now + self.params.cooldown_s
        for member in members:
            self._cooldown_until[member] = until

    def may_group(self, instance_id: str, now: float) -> bool:
        """Whether an automatic drop may take this instance now (not cooling down)."""
        until = self._cooldown_until.get(instance_id)
        if until is None:
            return True
        if until <= now:
            del self._cooldown_until[instance_id]
            return True
        return False

    def restore_due(self, snapshot: GroupSnapshot, now: float) -> bool:
        """This poll's automatic restore decision for a pipelined group (unknown groups: no)."""
        group = self._groups.get(snapshot.group_id)
        if group is None or now - group.formed_at < self.params.min_group_s:
            return False
        idle = snapshot.used_blocks == 0 and snapshot.num_waiting == 0
        if idle or should_restore(snapshot, self.params, group.previous_use):
            return True
        group.previous_use = snapshot.memory_use
        return False

    def poll(self, instances: Sequence[MemorySnapshot], groups: Sequence[GroupSnapshot], now: float) -> MemoryCommands:
        """One automatic poll, the same for both shells: which pipelined ``groups`` restore now, and which
        groups form among ``instances`` (those cooling down left out; grouped and draining ones the policy
        skips). Restores are decided first, on the groups as they were before this poll's drops."""
        restores = tuple(g.group_id for g in groups if self.restore_due(g, now))
        free = [s for s in instances if self.may_group(s.instance_id, now)]
        return MemoryCommands(restores, plan_drop(free, self.params).groups)
