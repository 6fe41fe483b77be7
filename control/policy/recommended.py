"""User-facing policy names (``drover sim run --policy``) and the one place that says what ``drover`` means.

A user-facing policy is a dispatch policy plus whether Llumnix migration runs; the names are a public
interface (external scripts pass them):

* ``round_robin``: cycle over instances, no migration;
* ``least_loaded`` (alias ``infaas++``): INFaaS++, the Llumnix paper's baseline: lowest KV load, no migration;
* ``llumnix``: Llumnix freeness dispatch plus live migration;
* ``prefix_affinity``: the instance holding the longest prefix of the prompt, else freeness; migration on;
* ``kv_aware``: KV-cache-aware routing, available once a ``kv_aware`` dispatch policy is registered;
* ``queue_size``: fewest waiting requests, no migration (the queue-size balancer of Llumnix's README table);
* ``drover``: the project's recommended default. Change :data:`RECOMMENDED` (and
  :data:`RECOMMENDED_MIGRATION`) to change what it means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from control.policy.dispatch import POLICY_NAMES
from control.policy.params import PolicyParams

# name -> (dispatch policy, migration enabled)
USER_POLICIES: Mapping[str, tuple[str, bool]] = {
    "round_robin": ("round_robin", False),
    "least_loaded": ("least_loaded", False),
    "llumnix": ("freeness", True),
    "prefix_affinity": ("prefix_affinity", True),
    "kv_aware": ("kv_aware", True),
    "queue_size": ("queue_size", False),
}

ALIASES: Mapping[str, str] = {"infaas++": "least_loaded"}

RECOMMENDED: tuple[str, bool] = ("predictive", True)
"""What ``drover`` means today: ``predictive`` dispatch with late binding (:data:`RECOMMENDED_DISPATCH`) and
migration that counts its cost, run for draining instances only (:data:`RECOMMENDED_MIGRATION`). The grid,
the ablation and why load migration is off are in docs/policies.md."""

RECOMMENDED_DISPATCH: Mapping[str, object] = {
    "predict_hold": True,
    "predict_prefix": True,
    "predict_prefix_idle_first": True,
    "queue_hold_all": True,
    "queue_backfill_scan": 4,
    "predict_prefill_blocks": True,
    "predict_hold_prefill_tokens": 2048,
    "predict_hold_growth_share": 0.5,
}
"""Late binding: a request no instance can start now waits in the scheduler's queue, with one EASY-backfilling
reservation (docs/policies.md, "Late binding"); and prefix-aware: an instance caching the prompt's prefix wins
when its predicted time to first token (the work ahead plus the uncached prompt) is the soonest
(docs/policies.md, "Dispatch: prefix-aware"), except that while an instance is idle a busy holder must cache
the whole prompt (``predict_prefix_idle_first``: the rest's prefill would stall the holder's decodes; docs/policies.md,
"Prefix hits that stall decodes"). Without prefix reports (no engine caches, or prompts
without hashes) the decisions are exactly those of late binding alone. One queue for the cluster (issue 17,
Azure): every request no instance can start now is held (``queue_hold_all``), not only the first, and each
tick tries the first 4 held ones in arrival order (``queue_backfill_scan``). Shortest-prefill-first aging
(``queue_aging_tokens_per_s``) stays off: it raised attainment past the knee but made p99 TTFT there worse
than INFaaS++'s (docs/policies.md, "One queue for the cluster"). Chunked-prefill-aware memory
(``predict_prefill_blocks``, round 26): the blocks a running prompt's later chunks will still take count in
an instance's demand, so a request is not queued behind a long prompt that has just started
(docs/policies.md, "Chunked-prefill-aware memory"). Decode stalls (``predict_decode_stall``) stay off: they
fix the sweep's prefill-heavy TPOT flags but cost Mooncake's attainment (docs/policies.md, "Decode stalls:
prompts beside decodes"). Prefill-backlog hold (``predict_hold_prefill_tokens``, round 29): an instance takes a
request only while at most 2,048 prompt tokens (vLLM's default step budget) are queued on it, so under a prefill
burst the backlog waits in the one cluster queue, not in each engine's (docs/policies.md, "Prefill-backlog
hold"). The hold test's growth reserve takes at most half an instance's free room (``predict_hold_growth_share``,
round 30): on a small pool the full reserve held requests for growth that the hosted requests' completions pay
back (docs/policies.md, "Growth reserve bounded by free room")."""

RECOMMENDED_MIGRATION: Mapping[str, object] = {
    "migration_cost_aware": True,
    "migration_budget_per_request": 2,
    "migration_cooldown_s": 2.0,
    "migration_pingpong_window_s": 30.0,
    "max_migrations_per_round": 64,
    "migration_sources": "drain",
}
"""The migration rules ``drover`` adds to Llumnix's pairing (docs/policies.md, "Migration that counts its
cost"); other policies keep Llumnix's defaults. Load migration (``migration_sources`` freeness or pressure)
measured a net loss under vLLM-v1 admission, so ``drover`` migrates only off draining instances."""

STEP_BUDGET_SHARE = 0.5
"""The share of the TPOT SLO a step of prompt tokens may take when the step budget is turned on (measured)."""

RECOMMENDED_LOCAL: Mapping[str, object] = {"step_budget_slo_share": STEP_BUDGET_SHARE, "step_budget_adaptive": True}
"""Local control ``drover`` adds (issue 17): the adaptive step budget. Each instance runs the engine's configured
budget while fewer than 1 % of its recent decode gaps would carry a full-budget chunk, the SLO-sized budget
(``step_budget_slo_share`` 0.5) otherwise (docs/policies.md, "Adaptive step budget"). The SLO-sized budget
alone (round 27) raised goodput on qwen Azure (1.15x to 1.28x INFaaS++) and Mooncake but made p99 inter-token
latency at light load 1.1-2x INFaaS++'s; the adaptive one keeps the qwen goodput and leaves light-load tails
as ``drover`` without it. Read by the simulator; live engines take ``[engine] step_budget_adaptive``."""

POLICY_CHOICES: tuple[str, ...] = (*USER_POLICIES, "drover", *ALIASES)


def canonical_policy(name: str) -> str:
    """The canonical user-facing name of ``name`` (aliases resolved); ValueError with the choices if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key != "drover" and key not in USER_POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_CHOICES)}")
    return key


def user_policy_params(name: str, base: PolicyParams | None = None) -> PolicyParams:
    """``base`` (default values when None) with the dispatch policy and migration switch of policy ``name``.

    ValueError (one line) for an unknown name, or a known one whose dispatch policy is not registered.
    """
    key = canonical_policy(name)
    dispatch, migration = RECOMMENDED if key == "drover" else USER_POLICIES[key]
    if dispatch not in POLICY_NAMES:
        raise ValueError(
            f"policy {key!r} needs the {dispatch!r} dispatch policy, which this build does not register "
            f"(registered: {', '.join(POLICY_NAMES)})"
        )
    params = dataclasses.replace(base or PolicyParams(), dispatch_policy=dispatch, migration_enabled=migration)
    if key == "drover":
        params = params.with_updates(**RECOMMENDED_DISPATCH, **RECOMMENDED_MIGRATION, **RECOMMENDED_LOCAL)
    return params
