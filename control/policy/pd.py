"""Prefill/decode disaggregation: which instances take a new request, and where it decodes after its first
token. Pure functions of snapshots, no I/O and no clock; the live scheduler and the simulator call them.

An instance's **phase** (``prefill`` / ``decode`` / ``both``) sits beside its Chiron role (interactive /
mixed / batch): the two are independent. Llumnix's rule (its ``Prefill-decode_Disaggregation`` doc) is the
anchor: new requests go to prefill instances only; after the first step a request migrates to a decode
instance. Dynamo's conditional disaggregation is the anchor of the adaptive mode: a short prompt is not worth
a KV transfer, so it runs start to end on a decode-side instance.

* ``off``: phases are ignored; every instance takes new requests and nothing is handed off.
* ``disaggregated``: new requests go to ``prefill`` or ``both`` instances; once a request on a ``prefill``
  instance has its first token it moves to a ``decode`` instance (:func:`plan_handoffs`).
* ``adaptive``: as disaggregated for prompts of at least ``adaptive_min_prompt_tokens`` tokens; shorter
  prompts go to ``decode`` or ``both`` instances and stay there.

Never blocks, never fails: when no instance of the wanted phases can take a new request, any instance that
can is used; when no decode instance can take a request, it stays where it is (and is offered again at the
next report, since decode instances free up).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from control.policy.freeness import dispatch_freeness
from control.policy.snapshots import InstanceSnapshot

Phase = Literal["prefill", "decode", "both"]
PHASES: tuple[Phase, ...] = ("prefill", "decode", "both")
PdMode = Literal["off", "disaggregated", "adaptive"]
PD_MODES: tuple[PdMode, ...] = ("off", "disaggregated", "adaptive")

PREFILL_SIDE: frozenset[Phase] = frozenset(("prefill", "both"))
"""Instances that take a request which will be handed off after its first token."""
DECODE_SIDE: frozenset[Phase] = frozenset(("decode", "both"))
"""Instances that take a request which runs start to end in one place (adaptive mode, short prompts)."""
ANY_PHASE: frozenset[Phase] = frozenset(PHASES)


@dataclass(frozen=True, slots=True)
class PdParams:
    """The ``[pd]`` settings section."""

    mode: PdMode = "off"
    """off | disaggregated | adaptive (see the module docstring). Off by default: an engine started by hand
    serves both phases and nothing moves."""
    adaptive_min_prompt_tokens: int = 1024
    """Adaptive mode: prompts at least this long are disaggregated. The transfer of a prompt's KV costs
    about as much as its prefill steals from co-located decodes at around a thousand tokens on the GPU
    presets (docs/pd.md measures it); shorter prompts stay on a decode-side instance."""
    decode_headroom_blocks: int = 2
    """Blocks a decode instance must have free beyond the request's own (its next tokens, the copy's last
    stage) to be chosen."""
    prefix_weight: float = 1.0
    """Blocks of free room one block of the prompt's prefix already cached at a decode instance is worth
    (fewer blocks to copy, and its next turns hit there); 0 ignores prefixes."""

    rebalance_period_s: float = 0.0
    """How often the split between prefill and decode instances is re-judged from each pool's pressure
    (:func:`plan_split`); 0: never (the split is what engines report and operators set)."""
    rebalance_ratio: float = 1.5
    """A pool must be this many times as pressed as the other before an instance changes sides (hysteresis:
    one move must not invert the imbalance)."""
    rebalance_min_pressure: float = 0.05
    """...and at least this pressed (queued blocks over total, :func:`pool_pressure`): a fleet without a
    queue keeps its split."""

    autoscale_period_s: float = 0.0
    """How often the autoscaler starts or stops an instance per phase from each pool's backpressure
    (``control/core/pd.py``, :func:`~control.core.pd.plan_pool_scaling`); 0: never."""
    autoscale_ttft_target_s: float = 2.0
    """Prefill pool: the TTFT budget its queue may take. Its pressure is the queued prompt tokens over what
    the pool prefills in this time (Dynamo's planner scales prefill workers from queued prefill work)."""
    autoscale_prefill_tokens_per_s: float = 8192.0
    """Prompt tokens one prefill instance prefills per second (an estimate; a preset's cost model gives it)."""
    autoscale_decode_kv_target: float = 0.8
    """Decode pool: the KV use an instance may reach before its batch, and so its TPOT, has no headroom left
    (Dynamo's planner scales decode workers on KV use). Its pressure is the mean KV use over this."""
    autoscale_scale_in_below: float = 0.25
    """A pool whose pressure is under this gives back one instance (it keeps at least one)."""
    autoscale_max_instances: int = 16
    """Prefill plus decode instances the autoscaler may run."""

    def validate(self) -> None:
        """Raise ValueError with an actionable message when a value is out of range."""
        if self.rebalance_period_s < 0:
            raise ValueError("pd.rebalance_period_s must be >= 0")
        if self.rebalance_ratio < 1:
            raise ValueError("pd.rebalance_ratio must be >= 1")
        if self.mode not in PD_MODES:
            raise ValueError(f"pd.mode must be one of {', '.join(PD_MODES)}, got {self.mode!r}")
        if self.adaptive_min_prompt_tokens < 0:
            raise ValueError("pd.adaptive_min_prompt_tokens must be >= 0")
        if self.decode_headroom_blocks < 0:
            raise ValueError("pd.decode_headroom_blocks must be >= 0")
        if self.prefix_weight < 0:
            raise ValueError("pd.prefix_weight must be >= 0")
        if self.autoscale_period_s < 0:
            raise ValueError("pd.autoscale_period_s must be >= 0")
        if self.autoscale_ttft_target_s <= 0 or self.autoscale_prefill_tokens_per_s <= 0:
            raise ValueError("pd.autoscale_ttft_target_s and pd.autoscale_prefill_tokens_per_s must be > 0")
        if not 0 < self.autoscale_decode_kv_target <= 1:
            raise ValueError("pd.autoscale_decode_kv_target must be in (0, 1]")
        if not 0 <= self.autoscale_scale_in_below < 1:
            raise ValueError("pd.autoscale_scale_in_below must be in [0, 1)")
        if self.autoscale_max_instances < 2:
            raise ValueError("pd.autoscale_max_instances must be >= 2 (one per pool)")


def parse_phase(text: str) -> Phase:
    """A phase from the wire or a setting; ValueError names the choices."""
    if text not in PHASES:
        raise ValueError(f"unknown phase {text!r}; phases: {', '.join(PHASES)}")
    return cast(Phase, text)


def phase_or_both(text: str) -> Phase:
    """A reported phase; anything unknown (an engine newer than this control plane) serves both."""
    return cast(Phase, text) if text in PHASES else "both"


def disaggregates(params: PdParams, num_prompt_tokens: int) -> bool:
    """Whether a request with this prompt is prefilled on one instance and decoded on another."""
    if params.mode == "disaggregated":
        return True
    return params.mode == "adaptive" and num_prompt_tokens >= params.adaptive_min_prompt_tokens


def intake_phases(params: PdParams, num_prompt_tokens: int) -> frozenset[Phase]:
    """The phases of the instances a new request should be dispatched to (in preference; any instance when
    none of these can take it)."""
    if params.mode == "off":
        return ANY_PHASE
    return PREFILL_SIDE if disaggregates(params, num_prompt_tokens) else DECODE_SIDE


@dataclass(frozen=True, slots=True)
class HandoffCandidate:
    """A request on a prefill instance that has its first token and may move to a decode instance."""

    request_id: str
    source_id: str
    num_blocks: int
    """KV blocks it holds now (what the first copy stage moves)."""
    prefix_hashes: tuple[int, ...] = ()
    """Its prompt's prefix-block hashes, for a prefix-aware choice; empty: not known."""
    model: str = ""


@dataclass(frozen=True, slots=True)
class Handoff:
    """Move ``request_id`` from ``source_id`` to ``destination_id`` (a live migration)."""

    request_id: str
    source_id: str
    destination_id: str
    num_blocks: int
    reason: str = "pd_handoff"


Overlap = Callable[[str, Sequence[int]], int]
"""(instance id, prefix hashes) -> blocks of that prefix the instance holds (a prefix index's ``overlap``)."""


def plan_handoffs(
    candidates: Sequence[HandoffCandidate],
    decode_instances: Sequence[InstanceSnapshot],
    params: PdParams,
    overlap: Overlap | None = None,
) -> list[Handoff]:
    """Where each candidate decodes: the decode instance with the most room after taking it (Llumnix's
    dispatch freeness), preferring one that already holds its prompt's prefix (``prefix_weight`` blocks of
    room per cached block) when ``overlap`` is given. Candidates no decode instance can take are left out:
    they stay where they are. Room taken by earlier candidates of the same round counts, so a burst does
    not herd onto one instance between reports.

    ``decode_instances`` are the instances of phase ``decode`` (the caller filters by phase); draining ones
    and ones of another model are skipped here."""
    taken: dict[str, int] = {}
    added: dict[str, int] = {}
    out: list[Handoff] = []
    for cand in candidates:
        best: tuple[float, float] | None = None
        dest = ""
        for snap in decode_instances:
            iid = snap.instance_id
            if snap.draining or iid == cand.source_id or (cand.model and snap.model and snap.model != cand.model):
                continue
            room = snap.num_free_blocks - snap.waiting_blocks - taken.get(iid, 0)
            if room < cand.num_blocks + params.decode_headroom_blocks:
                continue
            free = dispatch_freeness(
                snap,
                headroom_blocks=cand.num_blocks,
                extra_waiting=added.get(iid, 0) + 1,
                extra_waiting_blocks=taken.get(iid, 0),
            )
            cached = overlap(iid, cand.prefix_hashes) if overlap is not None and cand.prefix_hashes else 0
            key = (params.prefix_weight * cached + free, free)
            # highest score, then most free, then the smallest id (deterministic)
            if best is None or key > best or (key == best and iid < dest):
                best, dest = key, iid
        if best is None:
            continue
        taken[dest] = taken.get(dest, 0) + cand.num_blocks
        added[dest] = added.get(dest, 0) + 1
        out.append(Handoff(cand.request_id, cand.source_id, dest, cand.num_blocks))
    return out


def handoff_candidates(
    snapshot: InstanceSnapshot,
    phase: Phase,
    params: PdParams,
    prompt_tokens: Mapping[str, int],
    busy: Callable[[str], bool],
) -> list[HandoffCandidate]:
    """The requests of one instance's report that should move to a decode instance now: it is a
    ``prefill`` instance, the request is decoding (its first token is out), it is disaggregated by the mode
    (``prompt_tokens``: request id -> prompt length, for the ones the caller owns) and not ``busy`` (already
    migrating, or already tried). Oldest first (the report's running order)."""
    if params.mode == "off" or phase != "prefill":
        return []
    out = []
    for r in snapshot.running:
        prompt = prompt_tokens.get(r.request_id)
        if prompt is None or not r.decoding or busy(r.request_id) or not disaggregates(params, prompt):
            continue
        out.append(HandoffCandidate(r.request_id, snapshot.instance_id, r.num_blocks, model=snapshot.model))
    return out


def pool_pressure(snapshot: InstanceSnapshot) -> float:
    """How short of capacity one instance is, comparable across phases: the blocks its queue needs over its
    total. A pool is short when work queues in it (prompts waiting for a prefill instance's compute,
    requests waiting for a decode instance's memory); blocks in use without a queue are work being served.
    Measured in bench_pd: counting blocks in use too (Llumnix's virtual usage) made decode pools, which hold
    every request's KV, look pressed on short-prompt traces and starved the prefill pool (Azure, 2x load:
    goodput 8.99-9.86 req/s against 12.83 colocated); the queue alone does not (docs/pd.md)."""
    if snapshot.num_total_blocks <= 0:
        return 0.0
    return snapshot.waiting_blocks / snapshot.num_total_blocks


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """Move ``instance_id`` to the other pool: it serves ``phase`` from now on."""

    instance_id: str
    phase: Phase
    reason: str


def plan_split(instances: Sequence[tuple[InstanceSnapshot, Phase]], params: PdParams) -> PhaseChange | None:
    """At most one instance changes sides: from the less pressed pool (prefill vs decode instances, by mean
        :func:`pool_pressure`) to the more pressed one, when that one is ``rebalance_ratio`` times as pressed and
        at least ``rebalance_min_pressure``; each pool keeps at least one instance. The instance that moves is
        the least pressed of its pool, then the one with the fewest blocks in use (its work is most easily left
    to finish where it is). The
        anchors: Dynamo's planner (prefill and decode pools scaled from their own load) and Chiron's pools."""
    pools: dict[Phase, list[tuple[float, float, str]]] = {"prefill": [], "decode": []}
    for snapshot, phase in instances:
        if phase in pools and not snapshot.draining:
            used = snapshot.num_used_blocks / max(1, snapshot.num_total_blocks)
            pools[phase].append((pool_pressure(snapshot), used, snapshot.instance_id))
    if not pools["prefill"] or not pools["decode"]:
        return None
    mean = {phase: sum(load[0] for load in loads) / len(loads) for phase, loads in pools.items()}
    for hot, cold in (("prefill", "decode"), ("decode", "prefill")):
        hot_phase, cold_phase = cast(Phase, hot), cast(Phase, cold)
        if len(pools[cold_phase]) < 2 or mean[hot_phase] < params.rebalance_min_pressure:
            continue
        if mean[hot_phase] >= params.rebalance_ratio * max(mean[cold_phase], 1e-9):
            _, _, mover = min(pools[cold_phase])  # least queued, then least in use, then the smallest id
            return PhaseChange(
                mover, hot_phase, f"{hot} pressure {mean[hot_phase]:.2f} vs {cold} {mean[cold_phase]:.2f}"
            )
    return None
