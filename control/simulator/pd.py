"""Prefill/decode disaggregation in the cluster simulator: the same control core as the live scheduler
(``control/core/pd.py``: phase registry, phase-aware dispatch, handoff decisions), driven in virtual time.

Each instance has a phase. New requests are dispatched by :class:`~control.core.pd.PhasedDispatch`; at every
scheduler tick (the heartbeats) each prefill instance's fresh snapshot goes through
:meth:`~control.core.pd.PdCore.handoffs`, and each handoff runs as a live migration of the base simulator
(``ClusterSimulator._start_migration``): the first stage copies the prompt's KV at the preset's
``migration_bandwidth`` while the prefill instance keeps stepping (its next prefills, and this request's
next tokens), so the transfer overlaps with its next work; the last stage stops the request, copies what
it wrote meanwhile and resumes it on the decode instance. A handoff the decode side cannot take (no room,
a reservation that fails) leaves the request where it is: it finishes on the prefill instance.
"""

from __future__ import annotations

from collections.abc import Sequence

from control.core.pd import PdCore, make_dispatch
from control.policy.migration import MigrationDecision
from control.policy.pd import PdParams, Phase
from control.simulator.cluster import ClusterConfig, ClusterSimulator, SimInstance
from control.simulator.workload import RequestSpec
from engines.sim.core import SimOutput, SimRequest


def split_phases(num_instances: int, prefill: int) -> tuple[Phase, ...]:
    """``prefill`` prefill instances then decode ones; ``prefill == 0`` (or ``num_instances``): all both."""
    both: Phase = "both"
    if not 0 < prefill < num_instances:
        return (both,) * num_instances
    prefill_phase: Phase = "prefill"
    decode_phase: Phase = "decode"
    return (prefill_phase,) * prefill + (decode_phase,) * (num_instances - prefill)


class PdClusterSimulator(ClusterSimulator):
    """A :class:`ClusterSimulator` whose instances serve phases (``phases[i]`` for instance ``i``)."""

    def __init__(
        self,
        config: ClusterConfig,
        requests: Sequence[RequestSpec],
        phases: Sequence[Phase],
        pd: PdParams,
        *,
        startup_s: float = 30.0,
    ) -> None:
        super().__init__(config, requests)
        self.startup_s = startup_s  # of an instance the per-phase autoscaler starts ([pd] autoscale_period_s)
        self.scaled_out = self.scaled_in = 0
        if len(phases) != config.num_instances:
            raise ValueError(f"{len(phases)} phases for {config.num_instances} instances")
        self.pd = PdCore(pd)
        for inst, phase in zip(self.instances, phases, strict=True):
            self.pd.on_report(inst.instance_id, phase)
        self.index = make_dispatch(self.params.dispatch_policy, self.params.dispatch_params(), self.pd)

    def _plan_migrations(self) -> list[MigrationDecision]:
        """Load-balancing migration pairs decode-side instances only (as live: ``PdCore.balancing_pool``)."""
        live = self.pd.balancing_pool([self._snapshots[i] for i in self._live])
        self.planner.sync(live)
        return self.planner.plan(list(self._in_flight.values()), now=self.now)

    def _on_placed(self, inst: SimInstance, request: SimRequest) -> None:
        self.pd.on_request(request.request_id, request.prompt_len)

    def _on_outputs(self, inst: SimInstance, outputs: list[SimOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.pd.on_request_ended(out.request.request_id)

    def _after_tick(self) -> None:
        if not self.pd.enabled:
            return
        change = self.pd.rebalance((self._snapshots[i] for i in self._live), self.now)
        if change is not None:
            self.index.upsert(self._snapshots[int(change.instance_id.rsplit("-", 1)[1])])  # re-filed in its pool
        self._autoscale()
        moving = {m.request.request_id for m in self._migrations.values()}
        phase_of = self.pd.phase_of
        reports = [self._snapshots[i] for i in self._live if phase_of(self.instances[i].instance_id) == "prefill"]
        decode = [self._snapshots[i] for i in self._live if phase_of(self.instances[i].instance_id) == "decode"]
        prefix_index = getattr(self.index, "prefix_index", None)
        handoffs = self.pd.handoffs(
            reports,
            decode,
            moving.__contains__,
            prefix_index.overlap if prefix_index is not None else None,
            self._prefix_of if prefix_index is not None else None,
        )
        for h in handoffs:
            started = self.counters.migrations_started + self.counters.migrations_aborted
            self._start_migration(
                MigrationDecision(h.source_id, h.destination_id, h.request_id, h.num_blocks, 0, h.reason, 0.0, 0.0)
            )
            if self.counters.migrations_started + self.counters.migrations_aborted == started:
                self.pd.on_handoff_ended(h.request_id, False)  # it was no longer running: nothing started

    def _autoscale(self) -> None:
        """The per-phase autoscaler (the same core decision as the live AutoscalerActor's): start an instance
        for a pressed pool (it serves once ``startup_s`` passed), drain the least used one of an idle pool
        and stop it once empty."""
        for inst in self.instances:
            if inst.state == "draining" and self.is_empty(inst):
                self.stop_instance(inst)
        actions = self.pd.autoscale((self._snapshots[i] for i in self._live), self.now, lambda iid: True)
        for action in actions:
            if action.delta > 0:
                inst = self.add_instance(startup_s=self.startup_s)
                self.pd.set_phase(inst.instance_id, action.phase)
                self.scaled_out += 1
            else:
                self.start_drain(self.instances[int(action.instance_id.rsplit("-", 1)[1])])
                self.scaled_in += 1

    def _prefix_of(self, request_id: str) -> tuple[int, ...]:
        record = self._records.get(request_id)
        return record.spec.prefix_hashes if record is not None else ()

    def _on_moved(self, request: SimRequest, src: SimInstance, dst: SimInstance) -> None:
        self.pd.on_handoff_ended(request.request_id, True)

    def _on_aborted(self, request: SimRequest, reason: str) -> None:
        self.pd.on_handoff_ended(request.request_id, False)
