"""The scheduler's side of live migration: which requests move where, and the moves in flight.

The MigratorActor (``actors/migrator.py``) runs each move's stages with the engines; the scheduler decides
them and keeps the request table right. :class:`SchedulerMigrations` holds the moves in flight (a request
moves once at a time) and starts one for:

- the periodic plan (``MigrationTick``: Llumnix pairing by ``control/policy/migration.py``'s planner, its
  destinations swapped toward prefix holders by ``actors/prefix_feed.py``);
- an operator's ``drover migrate`` (:class:`~transport.messages.MigrateCommand`);
- a prefill/decode handoff the control core picks (``control/core/pd.py``): a prefill instance's request past
  its first token moves to a decode instance.

A move that ends well moves the request's record to its destination. Everything here runs on the scheduler
actor's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from actors.control_state import ControlState
from actors.migrator import MigrationEnded, StartMigration
from actors.prefix_feed import prefix_aware_destinations
from actors.scheduler_instances import InstanceRegistry
from control.core.dispatch import Dispatcher
from control.core.migration import request_max_blocks
from control.core.pd import PdCore
from control.core.record import DecisionLog
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.block_hash import vllm_block_hashes
from control.policy.migration import InFlightMigration, MigrationPlanner
from control.policy.params import PolicyParams
from control.policy.snapshots import InstanceSnapshot
from transport.bus import Bus
from transport.messages import EngineFirstToken, ErrorCode, MigrateCommand

log = logging.getLogger(__name__)


class SchedulerMigrations:
    """Moves in flight and the decisions that start them (see the module docstring).

    Collaborators: the bus (error replies to operators), ``peers`` (the control plane's actor slots by name:
    ``migrator`` runs the moves; filled in once it starts), the instance ``registry``, the request table
    (``requests``), the core's ``dispatch`` loop (its index's prefix index), prefill/decode core (``pd``),
    the state store (``state``), ``params()`` the policy parameters in force, and the decision log."""

    def __init__(
        self,
        bus: Bus,
        peers: Mapping[str, Any],
        registry: InstanceRegistry,
        requests: Mapping[str, RequestRecord],
        dispatch: Dispatcher,
        pd: PdCore,
        state: ControlState,
        params: Callable[[], PolicyParams],
        decision_log: DecisionLog | None = None,
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.bus = bus
        self.peers = peers
        self.registry = registry
        self.requests = requests
        self.dispatch = dispatch
        self.pd = pd
        self.state = state
        self.params = params
        self.decision_log = decision_log
        self.in_flight: dict[str, InFlightMigration] = {}  # request id -> migration in flight
        self.planner = MigrationPlanner(params())  # remembers its moves: per-request budget, cooldown
        self.done = 0
        self.aborted = 0

    def __contains__(self, request_id: object) -> bool:
        """Whether the request is moving now.

        Thread: the scheduler actor's thread."""
        return request_id in self.in_flight

    def forget(self, request_id: str) -> None:
        """The request ended: the planner's move record of it is moot now.

        Thread: the scheduler actor's thread."""
        self.planner.forget(request_id)

    def start(
        self, request_id: str, source: str, destination: str, num_blocks: int, reason: str, reply_to: str = ""
    ) -> bool:
        """Hand one move to the migrator (an operator waiting on ``reply_to`` hears from it).

        Thread: the scheduler actor's thread."""
        migrator = self.peers.get("migrator")
        if migrator is None:
            self.bus.reply_error(reply_to, ErrorCode.MIGRATION_FAILED, "no migrator runs in this control plane")
            return False
        self.in_flight[request_id] = InFlightMigration(source, destination, request_id)
        record = self.requests.get(request_id)
        headers = record.headers if record is not None else None  # the migration joins the request's trace
        max_blocks = 0  # the reservation's cap: the heartbeat's size may lag the engine's (control/core/migration.py)
        info = self.registry.records[source].info if source in self.registry.records else None
        if record is not None and info is not None:
            prompt, max_tokens = len(record.prompt_token_ids), record.submit.sampling.max_tokens
            max_blocks = request_max_blocks(prompt, max_tokens, info.max_model_len, info.block_size)
        migrator.tell(
            StartMigration(
                request_id, source, destination, num_blocks, self.params(), reason, reply_to, headers, max_blocks
            )
        )
        return True

    def prompt_of(self, request_id: str) -> list[int] | None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        return record.prompt_token_ids if record is not None else None

    def migratable_snapshots(self) -> list[InstanceSnapshot]:
        """Thread: the scheduler actor's thread."""
        registry = self.registry
        return self.pd.balancing_pool([registry.snapshot(r) for r in registry.records.values() if r.can_migrate])

    def plan(self, now: float) -> None:
        """The periodic plan (a ``MigrationTick``): pair sources and destinations and start the moves.

        Thread: the scheduler actor's thread."""
        if not self.params().migration_enabled:
            return
        snapshots = self.migratable_snapshots()
        self.planner.sync(snapshots)
        in_flight = list(self.in_flight.values())
        decisions = self.planner.plan(in_flight, now=now)
        if self.decision_log is not None:  # for the replay parity test
            self.decision_log.add("migration_plan", "", (tuple(snapshots), tuple(in_flight), now), tuple(decisions))
        decisions = prefix_aware_destinations(self.dispatch.index, decisions, snapshots, self.prompt_of)
        for d in decisions:
            record = self.requests.get(d.request_id)
            if record is None or record.instance_id != d.source_id:
                # A heartbeat older than a committed move (or the request's end) still lists it at the source:
                # the request table knows better; moving it would only abort with "no request ... on <source>".
                continue
            self.start(d.request_id, d.source_id, d.destination_id, d.num_blocks, d.reason)

    def on_ended(self, ended: MigrationEnded) -> None:
        """A move ended (the migrator says): one that went well moves the record to its destination.

        Thread: the scheduler actor's thread."""
        self.in_flight.pop(ended.request_id, None)
        self.pd.on_handoff_ended(ended.request_id, ended.ok)
        if ended.ok:
            self.done += 1
        else:
            self.aborted += 1
        record = self.requests.get(ended.request_id)
        if record is not None and ended.ok:
            self.moved(record, ended.destination)
        if ended.reply_to and ended.reply is not None:
            self.bus.publish(ended.reply_to, ended.reply)  # after the table: a status read next sees the move

    def moved(self, record: RequestRecord, destination: str) -> None:
        """The request runs on ``destination`` now with the KV it had (a move that went well, or a KunServe
        member's request handed to its group's leader): its record follows it, stored.

        Thread: the scheduler actor's thread."""
        record.instance_id = destination
        record.served_by.append(destination)
        self.state.save_request(record)

    # ------------------------------------------------------------------------------------------- operators
    def on_command(self, command: MigrateCommand, reply: str) -> None:
        """An operator's ``drover migrate``: checked here, then run like any other move.

        Thread: the scheduler actor's thread."""
        instances = self.registry.records
        record = self.requests.get(command.request_id)
        if record is None or record.instance_id is None:
            self.bus.reply_error(
                reply, ErrorCode.UNKNOWN_REQUEST, f"no running request {command.request_id}", command.request_id
            )
            return
        source = instances.get(record.instance_id)
        if source is None or not source.can_migrate:
            self.bus.reply_error(
                reply,
                ErrorCode.MIGRATION_FAILED,
                f"instance {record.instance_id} cannot migrate requests",
                command.request_id,
            )
            return
        destination = command.destination or self.pick_destination(source) or ""
        target = instances.get(destination)
        if target is None:
            self.bus.reply_error(
                reply,
                ErrorCode.UNKNOWN_INSTANCE,
                f"no instance {command.destination or '(any compatible)'} to migrate to",
            )
            return
        if (
            destination == source.info.instance_id
            or not target.can_migrate
            or not target.info.compatible_with(source.info)
        ):
            self.bus.reply_error(
                reply,
                ErrorCode.MIGRATION_FAILED,
                f"{destination} is not a compatible migration destination for {source.info.instance_id}",
            )
            return
        if command.request_id in self.in_flight:
            self.bus.reply_error(reply, ErrorCode.MIGRATION_FAILED, f"{command.request_id} is already migrating")
            return
        blocks = next(
            (r.num_blocks for r in source.load.running if r.request_id == command.request_id),
            -(-len(record.prompt_token_ids) // source.info.block_size),
        )
        self.start(command.request_id, source.info.instance_id, destination, blocks, command.reason, reply)

    def pick_destination(self, source: InstanceRecord) -> str | None:
        """The compatible instance with the most free blocks that takes new requests (an operator named none).

        Thread: the scheduler actor's thread."""
        registry = self.registry
        candidates = [
            r
            for r in registry.records.values()
            if r is not source
            and r.can_migrate
            and not registry.takes_no_dispatch(r)
            and r.info.compatible_with(source.info)
        ]
        best = max(candidates, key=lambda r: r.load.num_free_blocks, default=None)
        return best.info.instance_id if best else None

    # ------------------------------------------------------------------------------------------- prefill/decode
    def on_first_token(self, event: EngineFirstToken) -> None:
        """A request's first token is out: hand it off now, not at its prefill instance's next heartbeat.

        Thread: the scheduler actor's thread."""
        record = self.registry.records.get(event.instance_id)
        if record is not None:
            self.hand_off(self.registry.snapshot(record), event)

    def hand_off(self, report: InstanceSnapshot, first_token: EngineFirstToken | None = None) -> None:
        """A prefill instance reported requests past their first token (or ``first_token`` says one is): move
        each to a decode instance the core picks (a live migration); one no decode instance can take stays
        where it is.

        Thread: the scheduler actor's thread."""
        if not self.pd.enabled or "migrator" not in self.peers:
            return
        registry = self.registry
        source = registry.records.get(report.instance_id)
        if source is None or not source.can_migrate:
            return
        decode = (  # built only when the report has candidates
            registry.snapshot(r)
            for r in registry.records.values()
            if r.can_migrate
            and r.info.compatible_with(source.info)
            and self.pd.phase_of(r.info.instance_id) == "decode"
        )

        def busy(request_id: str) -> bool:
            record = self.requests.get(request_id)
            return request_id in self.in_flight or record is None or record.instance_id != report.instance_id

        index = getattr(self.dispatch.index, "prefix_index", None)
        overlap = index.overlap if index is not None else None
        block_size = source.info.block_size

        def prefix_of(request_id: str) -> tuple[int, ...]:
            prompt = self.prompt_of(request_id)
            return tuple(vllm_block_hashes(prompt, block_size)) if prompt else ()

        prefixes = prefix_of if overlap is not None else None
        if first_token is None:
            planned = self.pd.handoffs([report], decode, busy, overlap, prefixes)
        else:
            blocks = -(-first_token.num_tokens // block_size)
            planned = self.pd.first_token_handoffs(
                first_token.request_id, report, blocks, decode, busy, overlap, prefixes
            )
        for h in planned:
            log.info("pd handoff: %s %s -> %s", h.request_id, h.source_id, h.destination_id)
            self.start(h.request_id, h.source_id, h.destination_id, h.num_blocks, h.reason)
