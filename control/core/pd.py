"""Prefill/decode disaggregation in the control core: the phase registry, phase-aware dispatch and the
handoff bookkeeping, with no I/O and no clock. The live scheduler (``actors/scheduler.py``) and the simulator
(``control/simulator/pd.py``) drive the same objects; the decisions are ``control/policy/pd.py``'s.

* :class:`PhasedDispatch` is a :class:`~control.policy.dispatch.DispatchIndex` made of three indexes of the
  configured policy: prefill-side instances (``prefill``, ``both``), decode-side ones (``decode``, ``both``)
  and all of them. A new request asks the pool :func:`~control.policy.pd.intake_phases` names, then the
  whole fleet (never blocks). ``kv_aware`` pools share one prefix index, so prefix reports feed all three.
* :class:`PdCore` holds each instance's phase (reported, or set by an operator, which wins), the prompt
  length of each request it may hand off and which requests were handed off or tried, and turns an
  instance's report into :class:`~control.policy.pd.Handoff` commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from control.core.record import DecisionLog
from control.policy.dispatch import DispatchIndex, make_dispatch_policy
from control.policy.kv_aware import KvAwareIndex
from control.policy.params import DispatchParams
from control.policy.pd import (
    ANY_PHASE,
    DECODE_SIDE,
    PREFILL_SIDE,
    Handoff,
    HandoffCandidate,
    PdParams,
    Phase,
    PhaseChange,
    disaggregates,
    handoff_candidates,
    intake_phases,
    plan_handoffs,
    plan_split,
)
from control.policy.prefix_index import PrefixIndex
from control.policy.snapshots import InstanceSnapshot, RequestDemand

_POOLS: tuple[frozenset[Phase], ...] = (PREFILL_SIDE, DECODE_SIDE, ANY_PHASE)


class PhasedDispatch:
    """Dispatch over instances with phases; see the module docstring. ``phase_of`` answers an instance's
    current phase (the registry's)."""

    def __init__(self, make: Callable[[], DispatchIndex], params: PdParams, phase_of: Callable[[str], Phase]) -> None:
        self.params = params
        self.phase_of = phase_of
        self.pools: dict[frozenset[Phase], DispatchIndex] = {phases: make() for phases in _POOLS}
        self.name = self.pools[ANY_PHASE].name
        shared = getattr(self.pools[ANY_PHASE], "prefix_index", None)
        if isinstance(shared, PrefixIndex):
            for index in self.pools.values():
                if isinstance(index, KvAwareIndex):
                    index.prefix_index = shared
        self._member: dict[str, Phase] = {}  # instance -> the phase it was filed under

    @property
    def prefix_index(self) -> PrefixIndex | None:
        """The prefix index the pools share (``kv_aware``), which prefix reports feed; None otherwise."""
        index = getattr(self.pools[ANY_PHASE], "prefix_index", None)
        return index if isinstance(index, PrefixIndex) else None

    def upsert(self, snapshot: InstanceSnapshot) -> None:
        iid = snapshot.instance_id
        phase = self.phase_of(iid)
        before = self._member.get(iid)
        for phases, index in self.pools.items():
            if phase in phases:
                index.upsert(snapshot)
            elif before is not None and before in phases:
                # its phase changed: in this pool it now takes no dispatch. Filed as draining rather than
                # removed, because removing it from a kv_aware index would drop its cached prefixes from the
                # prefix index the pools share.
                index.upsert(replace(snapshot, draining=True))
        self._member[iid] = phase

    def remove(self, instance_id: str) -> None:
        self._member.pop(instance_id, None)
        for index in self.pools.values():
            index.remove(instance_id)

    def choose(self, demand: RequestDemand) -> str | None:
        wanted = intake_phases(self.params, demand.num_prompt_tokens)
        chosen = self.pools[wanted].choose(demand)
        if chosen is None and wanted != ANY_PHASE:
            chosen = self.pools[ANY_PHASE].choose(demand)  # no instance of those phases: anyone (never blocks)
        return chosen

    def on_dispatched(self, instance_id: str, demand: RequestDemand) -> None:
        for index in self.pools.values():
            index.on_dispatched(instance_id, demand)  # a pool that does not hold it ignores it


class PdCore:
    """The phase registry and the handoffs in flight; one per scheduler (or simulator run)."""

    MAX_ATTEMPTS = 2
    """Handoffs of one request before it stays where it is for good."""

    def __init__(self, params: PdParams) -> None:
        self.params = params
        self.reported: dict[str, Phase] = {}
        self.overrides: dict[str, Phase] = {}
        """Set by an operator (``drover phase set``); wins over what the instance reports."""
        self.prompt_tokens: dict[str, int] = {}
        """Requests that may be handed off: request id -> prompt length."""
        self.tried: set[str] = set()
        """Requests handed off, or whose handoff aborted: each is moved at most once."""
        self.handoffs_started = 0
        self.handoffs_stayed = 0
        """Reports where a candidate found no decode instance with room (it stayed, for now)."""
        self.handoffs_committed = 0
        self.attempts: dict[str, int] = {}
        self.last_rebalance = float("-inf")
        self.last_autoscale: float | None = None
        self.phase_changes = 0

    @property
    def enabled(self) -> bool:
        return self.params.mode != "off"

    def phase_of(self, instance_id: str) -> Phase:
        return self.overrides.get(instance_id) or self.reported.get(instance_id, "both")

    def on_report(self, instance_id: str, phase: Phase) -> bool:
        """An instance reported its phase; True if its effective phase changed."""
        before = self.phase_of(instance_id)
        self.reported[instance_id] = phase
        return self.phase_of(instance_id) != before

    def set_phase(self, instance_id: str, phase: Phase) -> None:
        self.overrides[instance_id] = phase

    def forget_instance(self, instance_id: str) -> None:
        self.reported.pop(instance_id, None)
        self.overrides.pop(instance_id, None)

    def on_request(self, request_id: str, num_prompt_tokens: int) -> None:
        """A request was dispatched: remember what the handoff decision needs."""
        if self.enabled:
            self.prompt_tokens[request_id] = num_prompt_tokens

    def on_request_ended(self, request_id: str) -> None:
        self.prompt_tokens.pop(request_id, None)
        self.tried.discard(request_id)
        self.attempts.pop(request_id, None)

    def handoffs(
        self,
        reports: Sequence[InstanceSnapshot],
        instances: Iterable[InstanceSnapshot],
        busy: Callable[[str], bool],
        overlap: Callable[[str, Sequence[int]], int] | None = None,
        prefix_of: Callable[[str], Sequence[int]] | None = None,
    ) -> list[Handoff]:
        """The handoffs fresh reports call for (empty unless a report is a prefill instance's with requests
        past their first token), planned as one round so they share the decode side's room. ``instances``:
        the latest snapshots to choose among (only decode-phase ones are used); ``busy``: the request is
        migrating already. The requests returned count as tried: each is moved at most once, or tried again
        after an abort while it has attempts left (:meth:`on_handoff_ended`)."""
        if not self.enabled:
            return []
        candidates = [
            c
            for report in reports
            for c in handoff_candidates(
                report,
                self.phase_of(report.instance_id),
                self.params,
                self.prompt_tokens,
                lambda rid: rid in self.tried or busy(rid),
            )
        ]
        return self._plan(candidates, instances, overlap, prefix_of)

    def wants_first_token(self, instance_id: str, num_prompt_tokens: int) -> bool:
        """Whether a request dispatched to ``instance_id`` is handed off after its first token (so its engine
        should report that token at once: :meth:`first_token_handoffs`)."""
        return (
            self.enabled and self.phase_of(instance_id) == "prefill" and disaggregates(self.params, num_prompt_tokens)
        )

    def first_token_handoffs(
        self,
        request_id: str,
        source: InstanceSnapshot,
        num_blocks: int,
        instances: Iterable[InstanceSnapshot],
        busy: Callable[[str], bool],
        overlap: Callable[[str, Sequence[int]], int] | None = None,
        prefix_of: Callable[[str], Sequence[int]] | None = None,
    ) -> list[Handoff]:
        """The handoff a request's first-token event calls for: the same decision as :meth:`handoffs` makes
        on a report that lists the request as decoding, taken when the engine says its first token is out
        rather than at the prefill instance's next heartbeat, so the KV copy starts right after the prefill.
        ``num_blocks``: the blocks its KV fills now (prompt and first token). Empty when the source is not a
        prefill instance (any more), the request is not disaggregated, already tried or ``busy``."""
        if not self.enabled or self.phase_of(source.instance_id) != "prefill":
            return []
        prompt = self.prompt_tokens.get(request_id)
        if prompt is None or request_id in self.tried or busy(request_id) or not disaggregates(self.params, prompt):
            return []
        candidate = HandoffCandidate(request_id, source.instance_id, num_blocks, model=source.model)
        return self._plan([candidate], instances, overlap, prefix_of)

    def _plan(
        self,
        candidates: list[HandoffCandidate],
        instances: Iterable[InstanceSnapshot],
        overlap: Callable[[str, Sequence[int]], int] | None,
        prefix_of: Callable[[str], Sequence[int]] | None,
    ) -> list[Handoff]:
        """Plan one round of handoffs and count them as tried (see :meth:`handoffs`)."""
        if not candidates:
            return []
        if overlap is not None and prefix_of is not None:
            candidates = [_with_prefix(c, tuple(prefix_of(c.request_id) or ())) for c in candidates]
        decode = [s for s in instances if self.phase_of(s.instance_id) == "decode"]
        planned = plan_handoffs(candidates, decode, self.params, overlap)
        self.handoffs_stayed += len(candidates) - len(planned)
        for h in planned:
            self.tried.add(h.request_id)
            self.attempts[h.request_id] = self.attempts.get(h.request_id, 0) + 1
        self.handoffs_started += len(planned)
        return planned

    def balancing_pool(self, snapshots: Sequence[InstanceSnapshot]) -> list[InstanceSnapshot]:
        """The instances load-balancing migration (Llumnix's pairing) may pair: without the prefill ones
        when disaggregation is on, so it never moves a decoding request onto a prefill instance (handoffs
        move requests off those)."""
        if not self.enabled:
            return list(snapshots)
        return [s for s in snapshots if self.phase_of(s.instance_id) != "prefill"]

    def rebalance(self, snapshots: Iterable[InstanceSnapshot], now: float) -> PhaseChange | None:
        """Every ``rebalance_period_s`` (the shell passes its clock): at most one instance changes sides by
        :func:`~control.policy.pd.plan_split`; the change is applied to the registry (as an override, the
        way an operator's is) and returned so the shell can re-file the instance and log it."""
        period = self.params.rebalance_period_s
        if not self.enabled or period <= 0 or now - self.last_rebalance < period:
            return None
        self.last_rebalance = now
        change = plan_split([(s, self.phase_of(s.instance_id)) for s in snapshots], self.params)
        if change is not None:
            self.set_phase(change.instance_id, change.phase)
            self.phase_changes += 1
        return change

    def autoscale(
        self,
        snapshots: Iterable[InstanceSnapshot],
        now: float,
        removable: Callable[[str], bool],
        starting: Sequence[Phase] = (),
    ) -> list[PoolScaling]:
        """Every ``autoscale_period_s`` (the shell passes its clock; the first is one period after the first
        call, so the pools have reported): :func:`plan_pool_scaling` over the registry's phases. The shell
        starts instances (and gives each its phase once it reports) or drains the ones named."""
        period = self.params.autoscale_period_s
        if not self.enabled or period <= 0:
            return []
        if self.last_autoscale is None:
            self.last_autoscale = now
        if now - self.last_autoscale < period:
            return []
        self.last_autoscale = now
        pairs = [(s, self.phase_of(s.instance_id)) for s in snapshots]
        return plan_pool_scaling(pairs, self.params, removable, starting)

    def on_handoff_ended(self, request_id: str, ok: bool) -> None:
        """A migration of ``request_id`` ended; an aborted handoff (a reservation refused on stale room, the
        request preempted meanwhile) may be tried again at a later report, up to ``MAX_ATTEMPTS``."""
        if request_id not in self.tried:
            return  # a migration of another kind (load balancing, drain)
        if ok:
            self.handoffs_committed += 1
        elif self.attempts.get(request_id, 0) < self.MAX_ATTEMPTS:
            self.tried.discard(request_id)


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One phase's pool as the per-phase autoscaler sees it."""

    phase: Phase
    instances: int
    """Serving, not draining."""
    queued_prompt_tokens: int
    kv_used: float
    """Mean fraction of KV blocks in use."""
    pressure: float
    """1: at its budget (TTFT for prefill, KV headroom for decode); above: short of instances."""


@dataclass(frozen=True, slots=True)
class PoolScaling:
    """Start one instance for ``phase`` (``delta`` 1), or drain ``instance_id`` out of it (``delta`` -1)."""

    phase: Phase
    delta: int
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PdPoolsQuery:
    """Autoscaler -> scheduler: the serving instances with their phases (for the per-phase autoscaler)."""

    reply_to: Any  # an actor ref: .tell(PdPools)


@dataclass(frozen=True, slots=True)
class PdPools:
    """Scheduler -> autoscaler: each serving instance's snapshot and its phase (an override applied)."""

    instances: tuple[tuple[InstanceSnapshot, Phase], ...]


def pool_loads(instances: Sequence[tuple[InstanceSnapshot, Phase]], params: PdParams) -> dict[Phase, PoolLoad]:
    """Each pool's backpressure (Dynamo's planner and Chiron's pools as anchors):

    * prefill: queued prompt tokens over what the pool prefills within the TTFT budget
      (``autoscale_prefill_tokens_per_s`` x instances x ``autoscale_ttft_target_s``): at 1 the queue alone
      takes the whole budget;
    * decode: the mean KV demand (blocks in use plus the blocks its queue waits for, over the total) over
      ``autoscale_decode_kv_target``: at 1 the batch has no room left, and each more request lengthens every
      step (TPOT) or waits. Handed-off requests queue on the decode side when its batch is full, so the
      queue counts here.

    Draining instances count in neither (they are leaving)."""
    out: dict[Phase, PoolLoad] = {}
    for phase in ("prefill", "decode"):
        pool = [s for s, p in instances if p == phase and not s.draining]
        n = len(pool)
        queued = sum(s.waiting_blocks * s.block_size for s in pool)
        used = sum(s.num_used_blocks / max(1, s.num_total_blocks) for s in pool) / n if n else 0.0
        if phase == "prefill":
            budget = params.autoscale_prefill_tokens_per_s * params.autoscale_ttft_target_s * max(1, n)
            pressure = queued / budget
        else:
            demand = sum((s.num_used_blocks + s.waiting_blocks) / max(1, s.num_total_blocks) for s in pool)
            pressure = (demand / n if n else 0.0) / params.autoscale_decode_kv_target
        out[phase] = PoolLoad(phase, n, queued, used, pressure)
    return out


def plan_pool_scaling(
    instances: Sequence[tuple[InstanceSnapshot, Phase]],
    params: PdParams,
    removable: Callable[[str], bool],
    starting: Sequence[Phase] = (),
) -> list[PoolScaling]:
    """At most one change per pool per period: a pool at or over its budget (pressure >= 1) gets one instance
    more while the fleet (with the ``starting`` ones, by the pool they are for) is under
    ``autoscale_max_instances``, the more pressed pool first, unless one is starting for it already (its
    pressure does not show it yet); a pool under ``autoscale_scale_in_below`` with more than one instance
    gives back its least used one that ``removable`` allows (the autoscaler can only stop what it started)."""
    loads = pool_loads(instances, params)
    total = sum(1 for s, p in instances if p in ("prefill", "decode") and not s.draining) + len(starting)
    out: list[PoolScaling] = []
    for load in sorted(loads.values(), key=lambda x: -x.pressure):
        if load.phase in starting:
            continue
        if load.pressure >= 1.0 and total < params.autoscale_max_instances:
            out.append(PoolScaling(load.phase, 1, "", f"{load.phase} pressure {load.pressure:.2f}"))
            total += 1
        elif load.pressure < params.autoscale_scale_in_below and load.instances > 1:
            pool = [s for s, p in instances if p == load.phase and not s.draining and removable(s.instance_id)]
            if pool:
                victim = min(pool, key=lambda s: (s.num_used_blocks, s.num_running + s.num_waiting, s.instance_id))
                out.append(
                    PoolScaling(load.phase, -1, victim.instance_id, f"{load.phase} pressure {load.pressure:.2f}")
                )
    return out


def _with_prefix(candidate: HandoffCandidate, hashes: tuple[int, ...]) -> HandoffCandidate:
    return replace(candidate, prefix_hashes=hashes)


def make_dispatch(name: str, params: DispatchParams, pd: PdCore) -> DispatchIndex:
    """The dispatch index a shell uses: policy ``name`` as it is when disaggregation is off, else a
    :class:`PhasedDispatch` of it over ``pd``'s phase registry."""
    if not pd.enabled:
        return make_dispatch_policy(name, params)
    return PhasedDispatch(lambda: make_dispatch_policy(name, params), pd.params, pd.phase_of)


class AnswerLog:
    """A shell's callable with every answer it gave, keyed by the arguments (a recorded run's ``busy``,
    ``overlap`` and ``prefix_of``: the replay answers from it)."""

    def __init__(self, function: Callable[..., object]) -> None:
        self.function = function
        self.answers: dict[tuple[object, ...], object] = {}

    def __call__(self, *args: object) -> object:
        key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        answer = self.function(*args)
        self.answers[key] = answer
        return answer


class HandoffAnswers:
    """The three callables a handoff round asks the shell (``busy``, ``overlap``, ``prefix_of``), each wrapped
    in an :class:`AnswerLog`, typed as the round takes them; :attr:`answers` is what the log stores."""

    def __init__(
        self,
        busy: Callable[[str], bool],
        overlap: Callable[[str, Sequence[int]], int] | None,
        prefix_of: Callable[[str], Sequence[int]] | None,
    ) -> None:
        self._busy = AnswerLog(busy)
        self._overlap = AnswerLog(overlap) if overlap is not None else None
        self._prefix_of = AnswerLog(prefix_of) if prefix_of is not None else None
        overlaps, prefixes = self._overlap, self._prefix_of
        self.busy: Callable[[str], bool] = lambda rid: bool(self._busy(rid))
        self.overlap: Callable[[str, Sequence[int]], int] | None = (
            (lambda iid, hashes: cast(int, overlaps(iid, hashes))) if overlaps is not None else None
        )
        self.prefix_of: Callable[[str], Sequence[int]] | None = (
            (lambda rid: cast(Sequence[int], prefixes(rid))) if prefixes is not None else None
        )

    @property
    def answers(self) -> tuple[object, object, object]:
        return (
            self._busy.answers,
            self._overlap.answers if self._overlap else None,
            self._prefix_of.answers if self._prefix_of else None,
        )


class RecordedPdCore(PdCore):
    """A :class:`PdCore` that records each call with its inputs and output in a
    :class:`~control.core.record.DecisionLog` (the replay parity test); it decides exactly as PdCore does."""

    def __init__(self, params: PdParams, log: DecisionLog) -> None:
        super().__init__(params)
        self.log = log

    def on_report(self, instance_id: str, phase: Phase) -> bool:
        changed = super().on_report(instance_id, phase)
        self.log.add("pd_report", instance_id, (phase,), changed)
        return changed

    def set_phase(self, instance_id: str, phase: Phase) -> None:
        super().set_phase(instance_id, phase)
        self.log.add("pd_set_phase", instance_id, (phase,), None)

    def forget_instance(self, instance_id: str) -> None:
        super().forget_instance(instance_id)
        self.log.add("pd_forget_instance", instance_id, (), None)

    def on_request(self, request_id: str, num_prompt_tokens: int) -> None:
        super().on_request(request_id, num_prompt_tokens)
        self.log.add("pd_request", request_id, (num_prompt_tokens,), None)

    def on_request_ended(self, request_id: str) -> None:
        super().on_request_ended(request_id)
        self.log.add("pd_request_ended", request_id, (), None)

    def handoffs(
        self,
        reports: Sequence[InstanceSnapshot],
        instances: Iterable[InstanceSnapshot],
        busy: Callable[[str], bool],
        overlap: Callable[[str, Sequence[int]], int] | None = None,
        prefix_of: Callable[[str], Sequence[int]] | None = None,
    ) -> list[Handoff]:
        seen = tuple(instances)
        asked = HandoffAnswers(busy, overlap, prefix_of)
        planned = super().handoffs(reports, seen, asked.busy, asked.overlap, asked.prefix_of)
        self.log.add("pd_handoffs", "", (tuple(reports), seen, asked.answers), tuple(planned))
        return planned

    def wants_first_token(self, instance_id: str, num_prompt_tokens: int) -> bool:
        wants = super().wants_first_token(instance_id, num_prompt_tokens)
        self.log.add("pd_wants_first_token", instance_id, (num_prompt_tokens,), wants)
        return wants

    def first_token_handoffs(
        self,
        request_id: str,
        source: InstanceSnapshot,
        num_blocks: int,
        instances: Iterable[InstanceSnapshot],
        busy: Callable[[str], bool],
        overlap: Callable[[str, Sequence[int]], int] | None = None,
        prefix_of: Callable[[str], Sequence[int]] | None = None,
    ) -> list[Handoff]:
        seen = tuple(instances)
        asked = HandoffAnswers(busy, overlap, prefix_of)
        planned = super().first_token_handoffs(
            request_id, source, num_blocks, seen, asked.busy, asked.overlap, asked.prefix_of
        )
        self.log.add("pd_first_token_handoffs", request_id, (source, num_blocks, seen, asked.answers), tuple(planned))
        return planned

    def balancing_pool(self, snapshots: Sequence[InstanceSnapshot]) -> list[InstanceSnapshot]:
        pool = super().balancing_pool(snapshots)
        self.log.add("pd_balancing_pool", "", (tuple(snapshots),), tuple(pool))
        return pool

    def rebalance(self, snapshots: Iterable[InstanceSnapshot], now: float) -> PhaseChange | None:
        seen = tuple(snapshots)
        change = super().rebalance(seen, now)
        self.log.add("pd_rebalance", "", (seen, now), change)
        return change

    def on_handoff_ended(self, request_id: str, ok: bool) -> None:
        super().on_handoff_ended(request_id, ok)
        self.log.add("pd_handoff_ended", request_id, (ok,), None)


def make_pd_core(params: PdParams, log: DecisionLog | None = None) -> PdCore:
    """The PdCore a shell runs: recording its calls into ``log`` when one is given (parity tests)."""
    return PdCore(params) if log is None else RecordedPdCore(params, log)
