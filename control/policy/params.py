"""Tunable policy parameters, with the Llumnix paper's values as defaults (see the design notes) except
the migration stage knobs, where Drover's measured defaults hold for the live control plane and the
simulator alike.

Both dataclasses are frozen: the live scheduler swaps in a new instance on ``drover policy set`` (use
:func:`dataclasses.replace` or :meth:`PolicyParams.with_updates`), so a decision always reads one
consistent set of values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

MigrationPick = Literal["shortest", "longest", "last_come", "first_come"]
AfterMaxStages = Literal["stop_and_copy", "abort"]
MigrationSources = Literal["freeness", "pressure", "drain"]


ENGINE_STARTUP_KEYS = frozenset({"step_budget_slo_share", "step_budget_adaptive"})
"""Policy keys an engine reads once, when it starts (vLLM takes its step budget at start-up only): the
simulator applies them per run; a running control plane refuses them in ``drover policy set`` and points to
the ``[engine]`` setting of the same name, which the engine hosts read."""


@dataclass(frozen=True, slots=True)
class DispatchParams:
    """What dispatch policies read."""

    watermark_blocks: int = 0
    """Blocks kept free on every instance in freeness (Llumnix watermark; Drover's scheduler default 0)."""
    high_priority_load_cap_tokens: int = 1600
    """Llumnix priority headroom: an instance hosting high-priority requests behaves as if it held only
    this many tokens of KV (the paper caps such instances' load around 1.6k tokens)."""
    affinity_min_freeness: float = 3.0
    """Prefix affinity and high-priority packing only choose an instance whose dispatch freeness is at
    least this (blocks per request); below it they fall back to plain freeness. Default: Llumnix's
    migration threshold, i.e. "not a migration source"."""
    prefix_min_match_blocks: int = 1
    """Fewest leading prefix blocks an instance must hold for prefix affinity to prefer it."""
    prefix_history_blocks: int = 0
    """Prefix hashes remembered per instance from dispatch history (LRU); 0 = the instance's KV blocks."""
    prefix_holders_per_block: int = 4
    """Instances remembered per prefix block (the most recent ones): bounds a decision's cost when a popular
    prefix is cached everywhere; a few candidates are enough to find one with room."""
    predict_growth_blocks: int = 4
    """``predictive`` dispatch: KV blocks each hosted request is expected to add (its growth reserve). The
    load key counts it in full; late binding's hold test counts ``predict_hold_growth_blocks`` per hosted
    request, in total at most ``predict_hold_growth_share`` of the instance's free room."""
    predict_high_watermark: float = 0.9
    """``predictive`` dispatch: predicted KV demand (fraction of blocks) above which an instance leaves the
    safe tier."""
    predict_decode_weight: float = 16.0
    """``predictive`` dispatch: prompt-token equivalents of one running request sharing the step."""
    predict_hold: bool = False
    """``predictive`` dispatch: late binding. Send a request only to an instance whose free KV, less what is
    queued there and the growth reserve, holds its prompt now; when none does, ``choose`` returns None and
    the scheduler holds the request in its own FIFO queue until a heartbeat shows room (docs/policies.md)."""
    predict_prefix: bool = False
    """``predictive`` dispatch: weigh expected prefix-cache hits (a prefix index fed by engines' cache
    reports, as ``kv_aware``'s): an instance holding the prompt's prefix wins when the prefill work ahead of
    the request there plus the prompt tokens it would still compute is below the best load-only choice's."""
    predict_prefix_idle_first: bool = False
    """``predictive`` dispatch with ``predict_prefix``: while the load-only choice is idle (it hosts no
    request), a prefix holder that hosts requests wins only if it caches the whole prompt. The prompt's
    uncached rest would be prefilled in chunks that share every step with the holder's decodes, stretching
    them (a short answer's per-token time doubles), where on the idle instance it stalls nobody. Only the
    light-load case: when every instance is busy the hit's saved prefill is worth its stall (Mooncake: p99
    TPOT +6-9% against INFaaS++ at light load without it; goodput 1.79 to 2.00x compression with it against
    2.00 without, INFaaS++ 1.14; docs/policies.md, "Prefix hits that stall decodes")."""
    queue_hold_all: bool = False
    """``predictive`` dispatch with ``predict_hold``: hold *every* request no instance can start now in the
    scheduler's queue (the first one still reserves the roomiest instance, EASY backfilling), instead of
    holding only that first one and sending the rest to the roomiest other instance's engine queue. A held
    request binds to whichever instance frees room first (one queue for the cluster instead of one per
    engine: no request waits behind a long prompt on one engine while another has room)."""
    queue_aging_tokens_per_s: float = 0.0
    """The scheduler's queue order (``control/core/wait_queue.py``): 0 = first come, first served; > 0 =
    shortest prefill first with aging: key = arrival + prompt tokens / this rate (tokens per second)."""
    queue_backfill_scan: int = 32
    """With ``queue_hold_all``: held requests tried per scheduler tick, head first (later ones may start on
    an instance the head does not fit; bounds a tick's cost however long the queue)."""
    queue_starvation_s: float = 0.0
    """With ``queue_hold_all``: a held request that has waited longer than this (seconds) and still fits
    nowhere stops the tick's scan, so nothing queued behind it overtakes it any more (0 = off)."""
    queue_ttft_slo_s: float = 0.0
    """With ``queue_hold_all``: goodput-first order of the scheduler's queue. A held request that has waited at
    least this long (seconds; the TTFT SLO) can no longer meet it, so each tick tries the held requests that
    still can first (in queue order), then the lost ones (they still run: behind the meetable ones, never
    dropped); ``queue_starvation_s`` keeps its bound on top. 0 = off; -1 = the run's TTFT SLO (the simulator's
    ``--slo-ttft-s``; a live control plane has none, so off). docs/policies.md, "Goodput-first queue order"."""
    predict_prefill_blocks: bool = False
    """``predictive`` dispatch: count the KV blocks a running prompt's remaining chunks will still allocate
    in the instance's demand (its room and memory load). Under chunked prefill a prompt holds only the
    blocks of the chunks computed so far, so a long prompt that has just started looks like free room, and
    requests sent there wait in the engine's queue behind it once its chunks take that room."""
    predict_interference: float = 0.0
    """``predictive`` dispatch with late binding: among the few best safe-tier instances with room now, pick
    the one with the lowest work ahead + this weight x running requests there x the new prompt's tokens (a
    long prompt's chunks share every step with the decodes there, so each of them is slowed for its whole
    prefill). 0 = off (the best by work ahead alone). docs/policies.md, "Prefill-interference placement"."""
    predict_hold_physical: bool = False
    """``predictive`` dispatch with ``predict_hold``: the hold decision (does the prompt fit now?) counts only
    physical room (free blocks less what is queued there) against the new prompt's own blocks; the growth
    reserve stays in the memory-load key, so placement still avoids instances about to grow. The reserve in
    the hold test predicts a shortage vLLM's admission (and preemption) settles anyway, and held a
    decode-heavy workload's requests while every instance had room (docs/policies.md, "Physical-room hold")."""
    predict_decode_stall: float = 0.0
    """``predictive`` dispatch with late binding: when the soonest-start instance has decoding requests, the
    few best safe-tier instances with room are scored by work ahead + this weight x the new prompt's tokens x
    the requests *decoding* there (each one shares every step of the new prefill with a chunk: its next
    inter-token gaps stretch by the whole prefill). At 1 a token of the new request's wait weighs as much as
    a token of stall on each decode, so a long prompt joins an instance that is only prefilling (or queues a
    little) rather than stalling decodes; prompts that only prefill beside each other stall nobody's tokens.
    0 = off (the default, and ``drover``'s: on Mooncake's long prompts it cost attainment). docs/policies.md,
    "Decode stalls: prompts beside decodes"."""
    predict_hold_growth_blocks: int = -1
    """``predictive`` dispatch with ``predict_hold``: the growth reserve per hosted request that the hold test
    counts: the instance's room, the new request's own need and a prefix holder's room check (-1:
    ``predict_growth_blocks``; 0 is ``predict_hold_physical``). The load key keeps the full reserve. A dial
    between decode-heavy work's TTFT (fewer holds) and long prompts' clean decodes (fewer preemptions): 1 fixed
    a short-prompt, long-output point's p99 TTFT but raised Azure's preemptions 37 to 237, so ``drover``
    keeps -1 (docs/policies.md, "Why the hold persists") and bounds the total instead
    (``predict_hold_growth_share``)."""
    predict_hold_growth_share: float = 0.0
    """``predictive`` dispatch with ``predict_hold``: the hold test's growth reserve on an instance (the hold
    reserve per hosted request x its hosted requests) is at most this share of its free room (free blocks less
    what is queued there); 0 = off (the whole reserve). The reserve forecasts every hosted request growing for
    the whole window with none completing; on a pool that is small against the reserve (ten short requests on a
    96-block instance reserve 40 of its 50 free blocks) that forecast holds requests for growth the hosted
    requests' own completions pay back. With the bound a request starts where it leaves the hosted requests at
    least this share of the free room. Long prompts on a large pool are never near the bound, so their
    decisions stay as without it (the trace grid's runs were identical). ``drover``: 0.5 (the 96-block live bench
    point's p99 TTFT 1.9 s to 0.1 s on seed 0; a request a third of the pool still waits, seed 2).
    docs/policies.md, "Growth reserve bounded by free room"."""
    predict_hold_prefill_tokens: int = 0
    """``predictive`` dispatch with ``predict_hold``: an instance takes a new request only while the prefill
    work queued on it (waiting prompts, dispatched-but-unreported ones and the unprefilled rest of running
    prompts, in tokens) is at most this; when none of the instances late binding looks at (the soonest few by
    work ahead, and the roomiest) is, the request waits in the scheduler's queue
    (with ``queue_hold_all``) and goes to the first instance whose queue falls under it. Under a prefill burst
    the engines' own first-come queues otherwise hold the backlog, each instance's apart (a request waits
    behind its instance's queue while another's empties first) and out of reach of the cluster queue's order
    (``queue_ttft_slo_s``). 0 = off. docs/policies.md, "Prefill-backlog hold"."""


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Every scheduling knob ``drover policy get/set`` exposes. Defaults are the Llumnix paper's values."""

    dispatch_policy: str = "freeness"
    """One of ``control.policy.dispatch.POLICY_NAMES``."""
    watermark_blocks: int = 0
    high_priority_load_cap_tokens: int = 1600
    affinity_min_freeness: float = 3.0
    prefix_min_match_blocks: int = 1
    prefix_history_blocks: int = 0
    prefix_holders_per_block: int = 4
    predict_growth_blocks: int = 4
    predict_high_watermark: float = 0.9
    predict_decode_weight: float = 16.0
    predict_hold: bool = False
    predict_prefix: bool = False
    predict_prefix_idle_first: bool = False
    queue_hold_all: bool = False
    queue_aging_tokens_per_s: float = 0.0
    queue_backfill_scan: int = 32
    queue_starvation_s: float = 0.0
    queue_ttft_slo_s: float = 0.0
    predict_prefill_blocks: bool = False
    predict_interference: float = 0.0
    predict_hold_physical: bool = False
    predict_decode_stall: float = 0.0
    predict_hold_growth_blocks: int = -1
    predict_hold_growth_share: float = 0.0
    predict_hold_prefill_tokens: int = 0
    step_budget_slo_share: float = 0.0
    """SLO-sized step budget (local control, read when an instance starts): each instance's per-step token
    budget (vLLM's ``max_num_batched_tokens``) is the largest whose step of prompt tokens alone takes at most
    this share of the TPOT SLO, by the instance's step-latency profile, never above the engine's configured
    budget (:func:`control.policy.step_budget.slo_step_token_budget`). 0 = off (the engine's own budget).
    docs/policies.md, "SLO-sized step budget"."""
    step_budget_adaptive: bool = False
    """With ``step_budget_slo_share`` > 0: the SLO-sized budget is a floor, not the budget; each step takes
    the largest budget (up to the engine's configured one) that every running decoder's TPOT slack allows
    (:mod:`control.adaptive_budget`): the full budget at light load, the SLO-sized one under pressure.
    docs/policies.md, "Adaptive step budget"."""

    migration_enabled: bool = True
    migrate_threshold: float = 3.0
    """Freeness (blocks per request) below which an instance is a migration source and above which it is a
    destination (Llumnix default 3)."""
    migration_period_s: float = 0.05
    """How often pairing runs (Llumnix: every 0.05 s)."""
    migration_pick: MigrationPick = "shortest"
    """Which running request moves: the shortest decode by default (Llumnix); low priority always first."""
    max_migrations_per_instance: int = 1
    """Concurrent migrations an instance takes part in, as source or destination (Llumnix default 1)."""
    max_migrations_total: int = 0
    """Concurrent migrations cluster-wide; 0 = no global cap (Llumnix has none)."""
    priority_isolation: bool = True
    """Move normal requests off instances that host high-priority ones (headroom makes them sources)."""
    last_stage_max_blocks: int = 1
    """Stop-and-copy when at most this many blocks are left to copy (Llumnix: 16; 4 in its first release).
    Drover's default, live and simulated alike: 1 (downtime about one decode step; docs/core.md has the
    measurement: lower downtime than 16 at every bandwidth where they differ, request p99 within a few %)."""
    max_stages: int = 8
    """Copy stages before ``after_max_stages`` decides (Llumnix: 3; Drover: 8, affordable with fast copies)."""
    after_max_stages: AfterMaxStages = "stop_and_copy"
    """What a migration does after ``max_stages`` stages without reaching ``last_stage_max_blocks``: stop and
    copy the rest anyway (a longer downtime), or abort (the request stays at its source and the copied work
    is lost). Llumnix aborts. Measured in the simulator (docs/core.md) the two never differed (stages converge
before the limit at every bandwidth tried); stop-and-copy is the default because a draining instance then
always empties."""

    # Drover's cost-aware migration (docs/policies.md, "Migration that counts its cost"); off = Llumnix.
    migration_cost_aware: bool = False
    """Pick the request whose move pays: the smallest one whose move lifts the source back to the threshold
    (all the relief for the least copy and downtime), else the largest that fits (the most relief per copy,
    instead of Llumnix's shortest-first, which frees a few blocks and leaves the source pressed for the next
    round); a destination that would end up more pressed than the source was is refused (the pressure would
    only change hands); a refused pair tries the next freest destinations."""
    migration_budget_per_request: int = 0
    """Most times one request may be moved for load (0 = no limit). Moves off a draining or preempting
    source are exempt: not moving costs more there (the instance must empty; preemption recomputes)."""
    migration_cooldown_s: float = 0.0
    """A request moved less than this long ago is not moved again for load (0 = off; same exemptions as the
    budget)."""
    migration_pingpong_window_s: float = 0.0
    """A request is never moved back to an instance it left less than this long ago (0 = off)."""
    migration_sources: MigrationSources = "freeness"
    """Which instances migration moves requests off (draining ones always): ``freeness`` (Llumnix):
    migration freeness, which counts the queue head, under ``migrate_threshold``, or preempting since the
    last report; ``pressure``: preempting, or free blocks (less the watermark) fewer than running requests
    (some decode needs a block it cannot get within the next ``block_size`` steps: preemption imminent);
    ``drain``: draining instances only (scale-in still empties them). Under vLLM-v1 admission a queue head
    waits for free blocks anyway, and moving decodes spends the destination's room (with late binding, the
    very room a held request waits for): every load trigger measured a net loss on the grid
    (docs/policies.md), so ``drover`` uses ``drain``."""
    max_migrations_per_round: int = 0
    """Most migrations one planning round starts (0 = no cap, as Llumnix): the most pressed sources go
    first, the rest wait for the next round (50 ms later). Bounds a round's cost at any cluster size."""

    def dispatch_params(self) -> DispatchParams:
        return DispatchParams(
            watermark_blocks=self.watermark_blocks,
            high_priority_load_cap_tokens=self.high_priority_load_cap_tokens,
            affinity_min_freeness=self.affinity_min_freeness,
            prefix_min_match_blocks=self.prefix_min_match_blocks,
            prefix_history_blocks=self.prefix_history_blocks,
            prefix_holders_per_block=self.prefix_holders_per_block,
            predict_growth_blocks=self.predict_growth_blocks,
            predict_high_watermark=self.predict_high_watermark,
            predict_decode_weight=self.predict_decode_weight,
            predict_hold=self.predict_hold,
            predict_prefix=self.predict_prefix,
            predict_prefix_idle_first=self.predict_prefix_idle_first,
            queue_hold_all=self.queue_hold_all,
            queue_aging_tokens_per_s=self.queue_aging_tokens_per_s,
            queue_backfill_scan=self.queue_backfill_scan,
            queue_starvation_s=self.queue_starvation_s,
            queue_ttft_slo_s=self.queue_ttft_slo_s,
            predict_prefill_blocks=self.predict_prefill_blocks,
            predict_interference=self.predict_interference,
            predict_hold_physical=self.predict_hold_physical,
            predict_decode_stall=self.predict_decode_stall,
            predict_hold_growth_blocks=self.predict_hold_growth_blocks,
            predict_hold_growth_share=self.predict_hold_growth_share,
            predict_hold_prefill_tokens=self.predict_hold_prefill_tokens,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_updates(self, **changes: Any) -> PolicyParams:
        """A copy with ``changes`` applied, type-coerced from strings (the CLI sends text) and validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in fields:
                raise ValueError(f"unknown policy parameter {name!r}; known: {', '.join(sorted(fields))}")
            coerced[name] = _coerce(value, type(getattr(self, name)), name)
        updated = dataclasses.replace(self, **coerced)
        updated.validate()
        return updated

    def validate(self) -> None:
        """Raise ValueError with an actionable message when a value is out of range."""
        from control.policy.dispatch import POLICY_NAMES  # late: dispatch imports this module

        if self.dispatch_policy not in POLICY_NAMES:
            raise ValueError(f"dispatch_policy must be one of {POLICY_NAMES}, got {self.dispatch_policy!r}")
        if self.migration_pick not in ("shortest", "longest", "last_come", "first_come"):
            raise ValueError(f"migration_pick {self.migration_pick!r} is not shortest/longest/last_come/first_come")
        if self.migration_sources not in ("freeness", "pressure", "drain"):
            raise ValueError(f"migration_sources {self.migration_sources!r} is not freeness/pressure/drain")
        if self.after_max_stages not in ("stop_and_copy", "abort"):
            raise ValueError(f"after_max_stages {self.after_max_stages!r} is not stop_and_copy/abort")
        for name in ("migration_cooldown_s", "migration_pingpong_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in (
            "watermark_blocks",
            "max_migrations_total",
            "prefix_history_blocks",
            "migration_budget_per_request",
            "max_migrations_per_round",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in (
            "max_migrations_per_instance",
            "max_stages",
            "high_priority_load_cap_tokens",
            "prefix_holders_per_block",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.queue_aging_tokens_per_s < 0:
            raise ValueError("queue_aging_tokens_per_s must be >= 0 (0 = first come, first served)")
        if self.queue_starvation_s < 0:
            raise ValueError("queue_starvation_s must be >= 0 (0 = off)")
        if self.queue_ttft_slo_s < 0 and self.queue_ttft_slo_s != -1:
            raise ValueError("queue_ttft_slo_s must be >= 0 (0 = off) or -1 (the run's TTFT SLO)")
        if self.queue_backfill_scan < 1:
            raise ValueError("queue_backfill_scan must be >= 1")
        if self.predict_hold_growth_blocks < -1:
            raise ValueError("predict_hold_growth_blocks must be >= 0, or -1 (predict_growth_blocks)")
        if not 0 <= self.predict_hold_growth_share <= 1:
            raise ValueError("predict_hold_growth_share must be in [0, 1] (0 = off)")
        if self.predict_interference < 0:
            raise ValueError("predict_interference must be >= 0 (0 = off)")
        if self.predict_hold_prefill_tokens < 0:
            raise ValueError("predict_hold_prefill_tokens must be >= 0 (0 = off)")
        if self.predict_decode_stall < 0:
            raise ValueError("predict_decode_stall must be >= 0 (0 = off)")
        if not 0 <= self.step_budget_slo_share <= 1:
            raise ValueError("step_budget_slo_share must be in [0, 1] (0 = off)")
        if self.migration_period_s <= 0:
            raise ValueError("migration_period_s must be > 0")


def _coerce(value: Any, kind: type, name: str) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        if kind is bool:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} expects true/false, got {value!r}")
        try:
            return kind(value)
        except ValueError as exc:
            raise ValueError(f"{name} expects {kind.__name__}, got {value!r}") from exc
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} expects {kind.__name__}, got {type(value).__name__}")
