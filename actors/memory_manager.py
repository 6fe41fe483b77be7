"""MemoryManager: the live half of KunServe's parameter-centric memory, run inside the SchedulerActor.

Every scheduler tick it turns the torch instances' heartbeats (KV occupancy, free blocks, pending demand,
weights; :class:`~transport.messages.EngineMemory`) into :class:`~control.policy.memory.MemorySnapshot`
and :class:`~control.policy.memory.GroupSnapshot`, asks the pure policy (``should_drop`` / ``plan_drop`` /
``should_restore``, the same functions the memory simulator runs) what to do, and orders the engines:

* **drop**: each member ``join``\\ s (hands its requests to the group: each running one's KV of every layer
  is parked at the member; drops to its layer range, serves it as a stage over TCP), then the leader
  ``lead``\\ s (moves its running requests' KV for the members' layers to them, drops to the first range,
  computes as the pipeline, takes in the members' parked KV); then the members' requests are added to the
  leader, where they continue on that KV (the KunServe paper's join, and the memory simulator's: one
  behaviour in both shells). A handed request whose add fails is resumed by the scheduler from its outputs
  (recomputed);
* **restore**: the leader ``dissolve``\\ s (takes the KV back, reloads its layers, serves alone), then each
  member ``leave``\\ s (reloads its layers).

The group is one dispatch target: the leader, whose heartbeat reports the pooled KV capacity; members (and
the leader while the group changes shape) take no dispatches. A member that dies ends the group: the
leader evicts its requests (the scheduler resumes them from their delivered tokens) and restores; a
leader that dies fails over like any instance, and its members restore.

Group steps run as coroutines on the bus loop; the tables here are touched from both the scheduler's
thread and those coroutines, under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import StatusCode

from actors.threads import Guarded
from control.core.memory import GroupHysteresis, restore_snapshot
from control.core.record import DecisionLog
from control.errors import DroverError
from control.policy.memory import (
    GroupSnapshot,
    MemoryParams,
    MemorySnapshot,
    split_layers,
)
from control.settings import MemorySettings
from observability import spans
from observability.metrics import metrics
from observability.tracing import tracer
from transport import subjects
from transport.bus import Bus
from transport.messages import (
    AdminReply,
    EngineAdd,
    EngineMemory,
    ErrorCode,
    GroupCommand,
    GroupReply,
    GroupStatus,
    InstanceHeartbeat,
    InstanceLoad,
    MemoryCommand,
)

log = logging.getLogger(__name__)


class GroupStepFailed(DroverError):
    """An engine refused or failed a group step, or did not answer."""

    default_code = "group_step_failed"


@dataclass(slots=True)
class _Seen:
    """The last heartbeat of a torch instance, as far as memory is concerned."""

    memory: EngineMemory
    load: InstanceLoad
    model: str
    kv_layout: str
    sent_at: float
    draining: bool


@dataclass(slots=True)
class LiveGroup:
    group_id: str
    members: tuple[str, ...]  # leader first
    layer_ranges: tuple[tuple[int, int], ...]
    state: str = "forming"  # forming | pipelined | restoring
    created: float = field(default_factory=time.monotonic)
    formed_wall: float = 0.0  # time.time() when the leader answered "lead"
    formed_mono: float = 0.0
    joined: list[str] = field(default_factory=list)
    joined_wall: float = 0.0  # time.time() when the last member answered "join" (or the group was adopted)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def leader(self) -> str:
        """Thread: whichever holds the group (members never change after the group forms)."""
        return self.members[0]


def memory_params(settings: MemorySettings) -> MemoryParams:
    params = MemoryParams(
        drop_memory_use=settings.drop_memory_use,
        restore_memory_use=settings.restore_memory_use,
        max_group_size=settings.max_group_size,
        pipeline_overhead_per_stage=settings.pipeline_overhead_per_stage,
        max_pipeline_overhead=settings.max_pipeline_overhead,
        min_group_s=settings.min_group_s,
        cooldown_s=settings.cooldown_s,
    )
    params.validate()
    return params


class MemoryManager:
    """Plans and runs KunServe drops and restores for the scheduler (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        settings: MemorySettings,
        on_change: Callable[[str], None],
        decision_log: DecisionLog | None = None,
        on_handed: Callable[[str, str, str | None, list[int]], None] | None = None,
    ) -> None:
        """``on_change(instance_id)``: the scheduler re-reads whether an instance takes dispatches;
        ``decision_log``: the core's calls with their inputs, recorded (parity tests); None: off;
        ``on_handed(request_id, source, destination, outputs)``: a joining member's request moves from
        ``source`` to the group's leader (its record moves before the leader is told, so the leader's events
        about it find it there), or, with ``destination`` None, the scheduler resumes it after ``outputs``.
        Called on the bus loop: it must hand over to the scheduler's thread (in order).

        Thread: the one that builds the scheduler."""
        self.bus = bus
        self.settings = settings
        self.params = memory_params(settings)
        self.on_change = on_change
        self.groups: dict[str, LiveGroup] = {}
        self.seen: dict[str, _Seen] = {}
        # Members of an ended group -> time.time() when they were last known to be members: until a heartbeat
        # sent after it says otherwise, such an instance may still hold only its stage's layers (or be dead:
        # a member that dies ends its group before its heartbeats run out), whatever an older beat said. (The
        # engine's sent_at against our clock, as the leader's "serves alone again" check does.)
        self.left: dict[str, float] = {}
        # When automatic steps may happen (min group time, idle restore, cooldown): the control core's, the
        # one the memory simulator runs; fed time.monotonic().
        self.hysteresis = GroupHysteresis(self.params)
        self.decision_log = decision_log
        # Instances whose dispatchability changed on the bus loop; the scheduler's thread re-reads them on its
        # next tick. Shared by the two threads.
        self._dirty: Guarded[set[str]] = Guarded(set())
        self.on_handed = on_handed
        self._lock = threading.RLock()

    def _record(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        """Thread: the scheduler actor's thread, or the bus loop when a group step ends (under the lock, so
        the record keeps the order in which the hysteresis saw its calls)."""
        if self.decision_log is not None:
            self.decision_log.add(what, key, inputs, output)

    def _changed(self, instance_id: str) -> None:
        """Tell the scheduler an instance's dispatchability changed: at once on its own thread, else (a group
        step finishing on the bus loop) on its next tick, so its dispatch index is only touched by it.
        Thread: the scheduler actor's thread, or the bus loop (see above)."""
        if self.bus.in_loop():
            with self._dirty as dirty:
                dirty.add(instance_id)
        else:
            self.on_change(instance_id)

    # ------------------------------------------------------------------------------------------ queries
    def group_of(self, instance_id: str) -> LiveGroup | None:
        """Thread: the scheduler actor's thread."""
        with self._lock:
            return next((g for g in self.groups.values() if instance_id in g.members), None)

    def blocks_dispatch(self, instance_id: str) -> bool:
        """True for a group's members, for its leader while the group forms or restores, and for an instance
        that still serves as a stage (a member whose group ended takes requests once it restored: once a
        heartbeat it sent after its join says it is no member; an older one, from before the join, says
        "standalone" but proves nothing, and a member that died never sends a newer one).

        Thread: the scheduler actor's thread."""
        group = self.group_of(instance_id)
        if group is None:
            seen = self.seen.get(instance_id)
            return seen is not None and (seen.memory.group_role == "member" or self._unheard(instance_id, seen))
        return instance_id != group.leader or group.state != "pipelined"

    def _unheard(self, instance_id: str, seen: _Seen) -> bool:
        """A member of an ended group whose last word predates its join (a beat from before it: "standalone"):
        no sign that it restored, or that it is alive at all.

        Thread: the scheduler actor's thread."""
        left = self.left.get(instance_id)
        return left is not None and seen.sent_at <= left

    def status(self) -> list[GroupStatus]:
        """Thread: the scheduler actor's thread."""
        now = time.monotonic()
        with self._lock:
            return [
                GroupStatus(
                    group_id=g.group_id,
                    members=list(g.members),
                    layer_ranges=[list(r) for r in g.layer_ranges],
                    state=g.state,
                    extra_kv_blocks=self._extra_blocks(g),
                    age_s=now - g.created,
                )
                for g in sorted(self.groups.values(), key=lambda g: g.group_id)
            ]

    def _extra_blocks(self, group: LiveGroup) -> int:
        """Thread: the scheduler actor's thread."""
        seen = self.seen.get(group.leader)
        if group.state != "pipelined" or seen is None or seen.memory.group_id != group.group_id:
            return 0
        return max(0, seen.load.num_total_blocks - seen.memory.home_num_blocks)

    # ------------------------------------------------------------------------------------------ inputs
    def on_heartbeat(self, beat: InstanceHeartbeat) -> None:
        """Thread: the scheduler actor's thread."""
        if beat.memory is None:
            return
        instance_id = beat.info.instance_id
        with self._lock:
            self.seen[instance_id] = _Seen(
                beat.memory, beat.load, beat.info.model, beat.info.kv_layout, beat.sent_at, beat.draining
            )
            left = self.left.get(instance_id)
            if left is not None and beat.sent_at > left and beat.memory.group_role != "member":
                self.left.pop(instance_id)  # it reported since its group: its own word counts again
            group = self.group_of(instance_id)
            if group is None and beat.memory.group_role == "leader" and beat.memory.group_id:
                group = self._adopt(beat.memory)
            if (
                group is not None
                and group.state == "pipelined"
                and instance_id == group.leader
                and beat.sent_at > group.formed_wall
                and beat.memory.group_id != group.group_id
            ):
                log.warning("group %s: leader %s serves alone again (the group broke)", group.group_id, instance_id)
                self._end(group, leave=[m for m in group.members[1:]])

    def _adopt(self, memory: EngineMemory) -> LiveGroup | None:
        """A group this manager did not form (the scheduler restarted): track it from its leader's report.

        Thread: the scheduler actor's thread."""
        members = tuple(memory.group_members)
        if len(members) < 2 or any(self.group_of(m) is not None for m in members):
            return None
        now_wall = time.time()
        group = LiveGroup(
            group_id=memory.group_id,
            members=members,
            layer_ranges=split_layers(memory.num_layers, len(members)),
            state="pipelined",
            formed_wall=now_wall,
            formed_mono=time.monotonic(),
            joined_wall=now_wall,
        )
        self.groups[group.group_id] = group
        self.hysteresis.formed(group.group_id, group.formed_mono)
        self._record("group_formed", group.group_id, (group.formed_mono,), None)
        log.info("group %s adopted from its leader's heartbeat: %s", group.group_id, members)
        return group

    def on_instance_dead(self, instance_id: str) -> None:
        """An instance was declared dead: end its group (the leader evicts and restores; members restore).

        Thread: the scheduler actor's thread."""
        with self._lock:
            self.seen.pop(instance_id, None)
            self.left.pop(instance_id, None)
            group = self.group_of(instance_id)
            if group is None:
                return
            log.warning("group %s: %s died; ending the group", group.group_id, instance_id)
            survivors = [m for m in group.members if m != instance_id]
            if instance_id != group.leader and group.leader in survivors:
                self.bus.run(self._ask_quietly(group.leader, GroupCommand(op="break", group_id=group.group_id)))
            self._end(group, leave=[m for m in survivors if m != group.leader])

    def _end(self, group: LiveGroup, leave: list[str]) -> None:
        """Thread: the scheduler actor's thread."""
        self._forget(group)
        for member in leave:
            self.bus.run(self._ask_quietly(member, GroupCommand(op="leave", group_id=group.group_id)))
        self._cool(group.group_id, group.members)
        self._publish_gauges()

    def _forget(self, group: LiveGroup) -> None:
        """The group is over: its members stay out of dispatch until they report from after their join.

        Thread: whichever thread ends the group (the scheduler actor's, or the bus loop when a group step
        ends), under the lock."""
        self.groups.pop(group.group_id, None)
        if group.joined_wall:
            for member in group.joined or group.members[1:]:  # (an adopted group lists no joins)
                if member in self.seen:  # (one declared dead meanwhile is gone for good)
                    self.left[member] = group.joined_wall

    def _cool(self, group_id: str, members: tuple[str, ...] | list[str]) -> None:
        """Thread: the scheduler actor's thread, or the bus loop when a group step ends (under the lock)."""
        now = time.monotonic()
        self.hysteresis.ended(group_id, members, now)
        self._record("group_ended", group_id, (tuple(members), now), None)
        for member in members:
            self._changed(member)

    # ------------------------------------------------------------------------------------------ tick
    def tick(self, live: set[str]) -> None:
        """Poll the policy (``live``: instances the scheduler considers alive and serving).
        Thread: the scheduler actor's thread."""
        with self._dirty as changed:
            dirty = sorted(changed)
            changed.clear()
        for instance_id in dirty:
            self.on_change(instance_id)
        if not self.settings.auto:
            return
        now = time.monotonic()
        with self._lock:
            groups = [
                snapshot
                for group in self.groups.values()
                if group.state == "pipelined" and (snapshot := self._group_snapshot(group)) is not None
            ]
            snapshots = [s for s in (self._snapshot(i) for i in sorted(live)) if s is not None]
            commands = self.hysteresis.poll(snapshots, groups, now)
            self._record("memory_poll", "", (tuple(snapshots), tuple(groups), now), commands)
            for group_id in commands.restores:
                self._start_restore(self.groups[group_id], None)
            for plan in commands.drops:
                self._start_drop(plan.members, "policy", None)

    def _snapshot(self, instance_id: str) -> MemorySnapshot | None:
        """Thread: the scheduler actor's thread."""
        seen = self.seen.get(instance_id)
        if seen is None:
            return None
        memory, load = seen.memory, seen.load
        standalone = memory.group_role == "standalone" and not memory.group_id
        return MemorySnapshot(
            instance_id=instance_id,
            num_layers=memory.num_layers,
            weight_bytes=memory.model_weight_bytes,
            kv_block_bytes=memory.kv_block_bytes,
            num_total_blocks=load.num_total_blocks,
            num_free_blocks=load.num_free_blocks,
            pending_blocks=load.waiting_blocks,
            num_waiting=load.num_waiting,
            draining=seen.draining,
            grouped=not standalone or self.group_of(instance_id) is not None or self._unheard(instance_id, seen),
            compat_key=f"{seen.model}|{seen.kv_layout}",
        )

    def _group_snapshot(self, group: LiveGroup) -> GroupSnapshot | None:
        """Thread: the scheduler actor's thread."""
        seen = self.seen.get(group.leader)
        if seen is None or seen.memory.group_id != group.group_id:
            return None
        load = seen.load
        return restore_snapshot(
            group.group_id, load.num_total_blocks, load.num_free_blocks, load.num_waiting, seen.memory.home_num_blocks
        )

    # ------------------------------------------------------------------------------------------ commands
    def on_command(self, command: MemoryCommand, reply: str) -> None:
        """``drover memory drop|restore``: validate, then run the step and answer when it is over.

        Thread: the scheduler actor's thread."""
        with self._lock:
            if command.op == "drop":
                members = self._members_for(command.target)
                if isinstance(members, str):
                    self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, members)
                    return
                self._start_drop(members, "operator", reply)
            elif command.op == "restore":
                group = self.groups.get(command.target) or self.group_of(command.target)
                if group is None:
                    self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, f"no group {command.target}")
                    return
                if group.state != "pipelined":
                    self.bus.reply_error(
                        reply, ErrorCode.INVALID_REQUEST, f"group {group.group_id} is {group.state}; retry"
                    )
                    return
                self._start_restore(group, reply)
            else:
                self.bus.reply_error(reply, ErrorCode.INVALID_REQUEST, f"unknown memory op {command.op!r}")

    def _members_for(self, target: str) -> tuple[str, ...] | str:
        """The members a forced drop groups (leader first), or why it cannot. Thread: the scheduler actor's thread."""
        names = [t.strip() for t in target.split(",") if t.strip()]
        if not names:
            return "give one or more instance ids (the first leads)"
        snapshots: list[MemorySnapshot] = []
        for name in names:
            snapshot = self._snapshot(name)
            if snapshot is None:
                return f"{name} is not a live torch instance (only torch engines drop layers)"
            if snapshot.grouped or snapshot.draining:
                return f"{name} is already in a group or draining"
            snapshots.append(snapshot)
        if len(names) == 1:
            leader = snapshots[0]
            partners = [
                s
                for s in (self._snapshot(i) for i in sorted(self.seen))
                if s is not None
                and s.instance_id != leader.instance_id
                and not s.grouped
                and not s.draining
                and s.compat_key == leader.compat_key
            ]
            if not partners:
                return f"no compatible standalone torch instance to group {leader.instance_id} with"
            names.append(max(partners, key=lambda s: (s.num_free_blocks, s.instance_id)).instance_id)
        elif len(set(names)) != len(names):
            return "an instance appears twice"
        elif any(s.compat_key != snapshots[0].compat_key or s.num_layers != snapshots[0].num_layers for s in snapshots):
            return "instances of a group must serve the same model with the same KV layout"
        if len(names) > snapshots[0].num_layers:
            return f"{len(names)} members cannot split {snapshots[0].num_layers} layers"
        return tuple(names)

    # ------------------------------------------------------------------------------------------ drop
    def _start_drop(self, members: tuple[str, ...], reason: str, reply: str | None) -> None:
        """Thread: the scheduler actor's thread."""
        num_layers = self.seen[members[0]].memory.num_layers
        group = LiveGroup(
            group_id=f"g-{uuid.uuid4().hex[:6]}",
            members=members,
            layer_ranges=split_layers(num_layers, len(members)),
        )
        self.groups[group.group_id] = group
        for member in members:
            self._changed(member)
        log.info("group %s forms (%s): %s keep %s", group.group_id, reason, members, group.layer_ranges)
        self.bus.run(self._form(group, reason, reply))

    async def _form(self, group: LiveGroup, reason: str, reply: str | None) -> None:
        """Thread: the bus loop."""
        started = time.perf_counter()
        with tracer().start_as_current_span(
            spans.MEMORY_DROP,
            attributes={
                spans.GROUP_ID: group.group_id,
                "drover.memory.members": list(group.members),
                "drover.memory.reason": reason,
            },
        ) as span:
            try:
                addresses: list[str] = []
                evicted: list[str] = []
                handed: list[tuple[str, EngineAdd]] = []  # (member, the add that resumes it on the leader)
                for rank, member in enumerate(group.members[1:], start=1):
                    answer = await self._ask(
                        member,
                        GroupCommand(
                            op="join",
                            group_id=group.group_id,
                            layer_range=list(group.layer_ranges[rank]),
                            members=list(group.members),
                        ),
                    )
                    group.joined.append(member)
                    group.joined_wall = time.time()
                    addresses.append(answer.address)
                    evicted += answer.evicted
                    handed += [(member, add) for add in answer.handed]
                answer = await self._ask(
                    group.leader,
                    GroupCommand(
                        op="lead",
                        group_id=group.group_id,
                        layer_range=list(group.layer_ranges[0]),
                        members=list(group.members),
                        stage_addresses=addresses,
                        micro_batches=self.settings.micro_batches,
                    ),
                )
            except GroupStepFailed as exc:
                log.warning("group %s did not form: %s", group.group_id, exc)
                span.set_status(StatusCode.ERROR, str(exc))
                metrics().memory_event("drop_ordered", outcome="failed")
                self._hand_back(handed)
                with self._lock:
                    self._end(group, leave=list(group.joined))
                if reply:
                    await self.bus.apublish(reply, AdminReply(ok=False, message=f"drop failed: {exc}"))
                return
            kept = await self._add_handed(group.leader, handed)
            details = {
                **answer.details,
                "evicted": evicted,
                "handed": [add.request_id for _, add in handed],
                "kept": kept,
                "seconds": time.perf_counter() - started,
            }
            for key in ("freed_weight_bytes", "kv_blocks_before", "kv_blocks_after", "moved_kv_bytes"):
                if key in answer.details:
                    span.set_attribute(f"drover.memory.{key}", answer.details[key])
        with self._lock:
            group.state, group.details = "pipelined", details
            group.formed_wall, group.formed_mono = time.time(), time.monotonic()
            self.hysteresis.formed(group.group_id, group.formed_mono)
            self._record("group_formed", group.group_id, (group.formed_mono,), None)
            self._changed(group.leader)
            self._publish_gauges()
        metrics().memory_event("drop_ordered", seconds=details["seconds"])
        log.info("group %s pipelined: %s", group.group_id, details)
        if reply:
            await self.bus.apublish(
                reply,
                AdminReply(
                    ok=True,
                    message=f"group {group.group_id}: {', '.join(group.members)} serve as a "
                    f"{len(group.members)}-stage pipeline",
                    details={
                        "group_id": group.group_id,
                        "layer_ranges": [list(r) for r in group.layer_ranges],
                        **details,
                    },
                ),
            )

    async def _add_handed(self, leader: str, handed: list[tuple[str, EngineAdd]]) -> list[str]:
        """Add the joining members' requests to the leader (each on the KV it took in at ``lead``); one the
        leader does not take is resumed by the scheduler from its outputs. Returns the ids the leader took.

        Thread: the bus loop."""
        kept: list[str] = []
        for member, add in handed:
            outputs = list(add.output_token_ids)
            self._tell_handed(add.request_id, member, leader, outputs)
            try:
                reply = await self.bus.arequest(subjects.engine(leader), add, timeout_s=self.settings.op_timeout_s)
                ok = isinstance(reply, AdminReply) and reply.ok
            except Exception as exc:  # timeout, no responders (the leader died): the scheduler resumes it
                log.warning("handed %s not added to %s: %r", add.request_id, leader, exc)
                ok = False
            if ok:
                kept.append(add.request_id)
            else:
                self._tell_handed(add.request_id, leader, None, outputs)
        return kept

    def _hand_back(self, handed: list[tuple[str, EngineAdd]]) -> None:
        """The group did not form: the scheduler resumes the members' handed requests from their outputs.

        Thread: the bus loop."""
        for member, add in handed:
            self._tell_handed(add.request_id, member, None, list(add.output_token_ids))

    def _tell_handed(self, request_id: str, source: str, destination: str | None, outputs: list[int]) -> None:
        """Thread: the bus loop."""
        if self.on_handed is not None:
            self.on_handed(request_id, source, destination, outputs)

    # ------------------------------------------------------------------------------------------ restore
    def _start_restore(self, group: LiveGroup, reply: str | None) -> None:
        """Thread: the scheduler actor's thread."""
        group.state = "restoring"
        self._changed(group.leader)
        log.info("group %s restores", group.group_id)
        self.bus.run(self._restore(group, reply))

    async def _restore(self, group: LiveGroup, reply: str | None) -> None:
        """Thread: the bus loop."""
        started = time.perf_counter()
        ok, message, details = True, "", {}
        with tracer().start_as_current_span(
            spans.MEMORY_RESTORE,
            attributes={spans.GROUP_ID: group.group_id, "drover.memory.members": list(group.members)},
        ) as span:
            try:
                answer = await self._ask(group.leader, GroupCommand(op="dissolve", group_id=group.group_id))
                details = dict(answer.details)
                for member in group.members[1:]:
                    await self._ask(member, GroupCommand(op="leave", group_id=group.group_id))
                message = f"group {group.group_id} restored: {', '.join(group.members)} serve alone"
            except GroupStepFailed as exc:
                ok, message = False, f"restore of {group.group_id} failed: {exc}"
                log.warning("%s", message)
                span.set_status(StatusCode.ERROR, message)
            details["seconds"] = time.perf_counter() - started
        with self._lock:
            self._forget(group)
            self._cool(group.group_id, group.members)
            self._publish_gauges()
        metrics().memory_event("restore_ordered", seconds=details["seconds"], outcome="ok" if ok else "failed")
        if reply:
            await self.bus.apublish(reply, AdminReply(ok=ok, message=message, details=details))

    # ------------------------------------------------------------------------------------------ plumbing
    async def _ask(self, instance_id: str, command: GroupCommand) -> GroupReply:
        """Thread: the bus loop."""
        try:
            answer = await self.bus.arequest(
                subjects.engine(instance_id), command, timeout_s=self.settings.op_timeout_s
            )
        except Exception as exc:  # timeout, no responders (a dead instance), transport errors
            raise GroupStepFailed(f"{command.op} on {instance_id}: {exc!r}") from exc
        if not isinstance(answer, GroupReply):
            raise GroupStepFailed(f"{instance_id} answered {type(answer).__name__}: {getattr(answer, 'message', '')}")
        if not answer.ok:
            raise GroupStepFailed(f"{command.op} on {instance_id}: {answer.error}")
        return answer

    async def _ask_quietly(self, instance_id: str, command: GroupCommand) -> None:
        """Thread: the bus loop."""
        try:
            await self._ask(instance_id, command)
        except GroupStepFailed as exc:
            log.warning("group %s: %s", command.group_id, exc)

    def _publish_gauges(self) -> None:
        """Thread: the scheduler actor's thread, or the bus loop when a group step ends (under the lock)."""
        pipelined = [g for g in self.groups.values() if g.state == "pipelined"]
        metrics().set_memory_groups(len(pipelined), sum(self._extra_blocks(g) for g in pipelined))
