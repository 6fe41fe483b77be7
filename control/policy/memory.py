"""KunServe parameter-centric memory policy: when to drop layers, how to group, when to restore.

Under a burst an instance's KV pool fills while its weights sit idle in the same memory. KunServe
(EuroSys 2026, arXiv 2412.18169; code SJTU-IPADS/kunserve) lets g instances of one model each drop all
but 1/g of the layers (member r keeps [r·L/g, (r+1)·L/g)) and serve as a g-stage pipeline; the freed
weight memory, ≈ W·(g-1)/g per member, becomes KV blocks. When the burst is over the weights are
reloaded and the instances serve alone again.

Pure functions over frozen snapshots (no I/O, no actors, no engines): the memory simulator
(``control.simulator.memory``) and a live coordinator call the same code. Defaults are those of KunServe's public
code as summarised in the project's design notes; every knob is a documented field of :class:`MemoryParams`.

"Memory use" is KV-pool occupancy (used blocks / total blocks): the weights are a fixed part of the
budget and the KV pool takes the rest, so block occupancy is what reaches 95 % under a burst.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemoryParams:
    """Knobs of the drop/restore policy."""

    drop_memory_use: float = 0.95
    """An instance votes to drop when its KV-pool occupancy is at least this (KunServe code: 95 %)."""
    restore_memory_use: float = 0.50
    """A group restores when its occupancy is at most this and falling, with nothing pending (KunServe: 50 %)."""
    poll_period_s: float = 0.1
    """How often the coordinator polls the votes (KunServe code: every 0.1 s)."""
    max_group_size: int = 4
    """Largest g considered. KunServe's code fixes g statically (2 in its main setting); we pick the smallest
    g in [2, max_group_size] whose freed memory covers the queued demand."""
    pipeline_overhead_per_stage: float = 0.05
    """Modelled slowdown of one step per extra pipeline stage (activation transfer and micro-batch bubbles),
    relative to running alone. An assumption, not a KunServe figure: the paper reports the pipelined
    execution costs a few percent of throughput."""
    max_pipeline_overhead: float = 0.25
    """Never form a group whose modelled overhead, (g-1)·pipeline_overhead_per_stage, exceeds this."""
    min_group_s: float = 1.0
    """A group lives at least this long before an automatic restore (avoids flapping; ours, not KunServe's)."""
    cooldown_s: float = 2.0
    """An instance that left a group is not grouped again automatically for this long (ours)."""

    def validate(self) -> None:
        """Raise ValueError with an actionable message when a value is out of range."""
        if not 0.0 < self.restore_memory_use < self.drop_memory_use <= 1.0:
            raise ValueError("need 0 < restore_memory_use < drop_memory_use <= 1")
        if self.max_group_size < 2:
            raise ValueError("max_group_size must be >= 2 (a group of one drops nothing)")
        if self.poll_period_s <= 0:
            raise ValueError("poll_period_s must be > 0")
        if self.pipeline_overhead_per_stage < 0 or self.max_pipeline_overhead < 0:
            raise ValueError("pipeline overheads must be >= 0")
        if self.min_group_s < 0 or self.cooldown_s < 0:
            raise ValueError("min_group_s and cooldown_s must be >= 0")


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    """One instance's memory as last reported.

    ``kv_block_bytes`` is one block of KV across *all* layers; ``weight_bytes`` the whole model's weights.
    ``compat_key`` names what must match for two instances to pool layers (model, dtype, GPU kind):
    instances with different keys never group.
    """

    instance_id: str
    num_layers: int
    weight_bytes: int
    kv_block_bytes: int
    num_total_blocks: int
    num_free_blocks: int
    pending_blocks: int = 0  # KV blocks every waiting (queued or preempted) request needs
    num_waiting: int = 0
    draining: bool = False
    grouped: bool = False  # already a member of a group
    compat_key: str = ""

    @property
    def memory_use(self) -> float:
        """KV-pool occupancy in [0, 1] (see the module docstring)."""
        if self.num_total_blocks <= 0:
            return 1.0
        return (self.num_total_blocks - self.num_free_blocks) / self.num_total_blocks

    @property
    def deficit_blocks(self) -> int:
        """Blocks the queue needs beyond what is free (0 when it fits)."""
        return max(0, self.pending_blocks - self.num_free_blocks)


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """A formed group's pooled KV as last reported, with the pool its members would have alone."""

    group_id: str
    num_total_blocks: int
    num_free_blocks: int
    num_waiting: int
    normal_total_blocks: int  # the leader's own pool in the normal layout (control.core.memory.restore_snapshot)

    @property
    def memory_use(self) -> float:
        if self.num_total_blocks <= 0:
            return 1.0
        return (self.num_total_blocks - self.num_free_blocks) / self.num_total_blocks

    @property
    def used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """One group to form: ``members[r]`` keeps layers ``layer_ranges[r]``."""

    members: tuple[str, ...]
    layer_ranges: tuple[tuple[int, int], ...]
    freed_blocks: int  # extra KV blocks the drop creates across the group
    pipeline_overhead: float

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True, slots=True)
class DropPlan:
    """Groups to form this poll (empty: nothing to do)."""

    groups: tuple[GroupPlan, ...] = ()


def split_layers(num_layers: int, group_size: int) -> tuple[tuple[int, int], ...]:
    """KunServe's static split: member r keeps [r·L/g, (r+1)·L/g); together exactly one copy of every layer."""
    if not 1 <= group_size <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {group_size} stages")
    return tuple((r * num_layers // group_size, (r + 1) * num_layers // group_size) for r in range(group_size))


def freed_weight_bytes(weight_bytes: int, group_size: int) -> int:
    """Weight bytes a group of ``group_size`` frees in total: g copies become one, W·(g-1)."""
    return weight_bytes * (group_size - 1)


def freed_blocks(weight_bytes: int, kv_block_bytes: int, group_size: int) -> int:
    """Whole KV blocks (full-model layout) the freed weights hold: ≈ W·(g-1)/g per member, summed."""
    if kv_block_bytes <= 0:
        return 0
    return freed_weight_bytes(weight_bytes, group_size) // kv_block_bytes


def pipeline_overhead(group_size: int, params: MemoryParams) -> float:
    """Modelled relative slowdown of a g-stage pipeline over running alone."""
    return (group_size - 1) * params.pipeline_overhead_per_stage


def should_drop(snapshot: MemorySnapshot, params: MemoryParams) -> bool:
    """KunServe's vote: memory use ≥ threshold AND the queue's blocks ≥ the free blocks.

    Both are needed: a full pool with an empty queue is just a well-used instance (so an empty queue never
    votes, even with 0 free blocks, where "0 >= 0" would), and a queue that fits in the free blocks is served
    without help. Draining or already-grouped instances never vote.
    """
    if snapshot.draining or snapshot.grouped:
        return False
    return (
        snapshot.memory_use >= params.drop_memory_use
        and snapshot.pending_blocks > 0
        and snapshot.pending_blocks >= snapshot.num_free_blocks
    )


def should_restore(group: GroupSnapshot, params: MemoryParams, previous_memory_use: float) -> bool:
    """KunServe's restore: nothing pending, memory use ≤ threshold and falling since the last poll.

    We also require that what the group holds fits the members' normal pools, so restoring never preempts.
    """
    use = group.memory_use
    return (
        group.num_waiting == 0
        and use <= params.restore_memory_use
        and use < previous_memory_use
        and group.used_blocks <= group.normal_total_blocks
    )


def compatible(a: MemorySnapshot, b: MemorySnapshot) -> bool:
    """Instances can pool layers only when they hold the same model the same way."""
    return (
        a.compat_key == b.compat_key
        and a.num_layers == b.num_layers
        and a.weight_bytes == b.weight_bytes
        and a.kv_block_bytes == b.kv_block_bytes
    )


def choose_group_size(
    deficit_blocks: int, available: int, template: MemorySnapshot, params: MemoryParams
) -> int | None:
    """Smallest g whose freed blocks cover ``deficit_blocks``; else the largest allowed. None: no group fits.

    g is bounded by the members available, the layer count (each member keeps ≥ 1 layer) and the overhead cap.
    """
    limit = min(params.max_group_size, available, template.num_layers)
    allowed = [g for g in range(2, limit + 1) if pipeline_overhead(g, params) <= params.max_pipeline_overhead]
    if not allowed:
        return None
    for g in allowed:
        if freed_blocks(template.weight_bytes, template.kv_block_bytes, g) >= deficit_blocks:
            return g
    return allowed[-1]


def plan_drop(snapshots: Sequence[MemorySnapshot], params: MemoryParams) -> DropPlan:
    """Decide which instances form groups and their size from the queued demand.

    Voters (see :func:`should_drop`) are served most-short first; each group starts from one voter, takes
    other voters of its kind while g allows, then the freest idle-ish compatible instances (their free
    blocks pool too). g is chosen so the group's freed weights plus its members' free blocks cover its
    members' queued demand (see :func:`choose_group_size`). Draining and grouped instances never join.
    """
    eligible = [s for s in snapshots if not s.draining and not s.grouped]
    voters = sorted((s for s in eligible if should_drop(s, params)), key=lambda s: (-s.deficit_blocks, s.instance_id))
    taken: set[str] = set()
    groups: list[GroupPlan] = []
    for leader in voters:
        if leader.instance_id in taken:
            continue
        pool = [s for s in eligible if s.instance_id not in taken and compatible(s, leader) and s is not leader]
        other_voters = [s for s in pool if should_drop(s, params)]
        others = sorted(
            (s for s in pool if not should_drop(s, params)), key=lambda s: (-s.num_free_blocks, s.instance_id)
        )
        candidates = [leader, *other_voters, *others]
        g = choose_group_size(leader.deficit_blocks, len(candidates), leader, params)
        if g is None:
            continue
        # Re-check with the demand of everyone picked: more voters need more memory.
        for _ in range(params.max_group_size):
            picked = candidates[:g]
            demand = sum(s.deficit_blocks for s in picked)
            bigger = choose_group_size(demand, len(candidates), leader, params)
            if bigger is None or bigger <= g:
                break
            g = bigger
        picked = candidates[:g]
        taken.update(s.instance_id for s in picked)
        groups.append(
            GroupPlan(
                members=tuple(s.instance_id for s in picked),
                layer_ranges=split_layers(leader.num_layers, g),
                freed_blocks=freed_blocks(leader.weight_bytes, leader.kv_block_bytes, g),
                pipeline_overhead=pipeline_overhead(g, params),
            )
        )
    return DropPlan(groups=tuple(groups))


def group_kv_blocks(budget_bytes: int, weight_bytes: int, kv_block_bytes: int, group_size: int) -> int:
    """KV blocks (full-model layout) a group of ``group_size`` members of ``budget_bytes`` each holds.

    g·budget minus one copy of the weights: exactly one full copy of the model stays in the group.
    """
    if kv_block_bytes <= 0:
        return 0
    return max(0, group_size * budget_bytes - weight_bytes) // kv_block_bytes


def instance_kv_blocks(budget_bytes: int, weight_bytes: int, kv_block_bytes: int) -> int:
    """KV blocks an instance holding the whole model has beside its weights."""
    return group_kv_blocks(budget_bytes, weight_bytes, kv_block_bytes, 1)
