"""The control core's prefill/decode pieces (control/core/pd.py): phase-aware dispatch and handoffs."""

from __future__ import annotations

from control.core.pd import PdCore, PhasedDispatch, make_dispatch
from control.policy.dispatch import make_dispatch_policy
from control.policy.kv_aware import KvAwareIndex
from control.policy.params import DispatchParams
from control.policy.pd import PdParams
from control.policy.snapshots import InstanceSnapshot, RequestDemand, RunningSnapshot


def snap(iid: str, free: int = 100, running: tuple[RunningSnapshot, ...] = ()) -> InstanceSnapshot:
    return InstanceSnapshot(iid, 100, free, len(running), 0, running=running)


def demand(rid: str, tokens: int) -> RequestDemand:
    return RequestDemand(rid, num_prompt_tokens=tokens, num_blocks=-(-tokens // 32))


def fleet(mode: str, phases: dict[str, str], policy: str = "least_loaded") -> tuple[PdCore, PhasedDispatch]:
    core = PdCore(PdParams(mode=mode, adaptive_min_prompt_tokens=256))  # type: ignore[arg-type]
    for iid, phase in phases.items():
        core.on_report(iid, phase)  # type: ignore[arg-type]
    index = make_dispatch(policy, DispatchParams(), core)
    assert isinstance(index, PhasedDispatch)
    for iid in phases:
        index.upsert(snap(iid))
    return core, index


def test_off_is_the_plain_policy() -> None:
    assert not isinstance(make_dispatch("freeness", DispatchParams(), PdCore(PdParams())), PhasedDispatch)


def test_disaggregated_dispatch_goes_to_prefill_instances() -> None:
    _, index = fleet("disaggregated", {"p0": "prefill", "d0": "decode", "d1": "decode"})
    for i in range(6):
        d = demand(f"r{i}", 1000)
        chosen = index.choose(d)
        assert chosen == "p0"
        index.on_dispatched("p0", d)


def test_adaptive_splits_by_prompt_length() -> None:
    _, index = fleet("adaptive", {"p0": "prefill", "d0": "decode"})
    assert index.choose(demand("long", 4096)) == "p0"
    assert index.choose(demand("short", 100)) == "d0"


def test_no_instance_of_the_wanted_phase_falls_back_to_any() -> None:
    core, index = fleet("disaggregated", {"d0": "decode"})
    assert index.choose(demand("r", 1000)) == "d0"  # never blocks
    core.set_phase("d0", "prefill")  # an operator's setting wins over the report and moves pools
    core.on_report("d0", "decode")
    assert core.phase_of("d0") == "prefill"
    index.upsert(snap("d0"))
    assert index.pools[frozenset(("prefill", "both"))].choose(demand("r", 1000)) == "d0"
    assert index.pools[frozenset(("decode", "both"))].choose(demand("r", 10)) is None
    index.remove("d0")
    assert index.choose(demand("r", 1000)) is None


def test_kv_aware_pools_share_one_prefix_index() -> None:
    _, index = fleet("disaggregated", {"p0": "prefill", "d0": "decode"}, policy="kv_aware")
    shared = index.prefix_index
    assert shared is not None
    assert all(isinstance(i, KvAwareIndex) and i.prefix_index is shared for i in index.pools.values())
    assert isinstance(make_dispatch_policy("kv_aware"), KvAwareIndex)


def test_handoff_once_after_the_first_token_and_stay_when_decode_is_full() -> None:
    core, _ = fleet("disaggregated", {"p0": "prefill", "d0": "decode"})
    core.on_request("r1", 1000)
    prefilling = snap("p0", running=(RunningSnapshot("r1", 1000, 32, decoding=False),))
    decoding = snap("p0", running=(RunningSnapshot("r1", 1001, 32, decoding=True),))
    never = lambda rid: False  # noqa: E731
    assert core.handoffs([prefilling], [snap("d0")], never) == []
    assert core.handoffs([decoding], [snap("d0", free=10)], never) == []  # full: it stays
    assert core.handoffs_stayed == 1
    [h] = core.handoffs([decoding], [snap("d0"), snap("p0")], never)  # p0 is not a decode instance
    assert (h.request_id, h.destination_id) == ("r1", "d0")
    assert core.handoffs([decoding], [snap("d0")], never) == []  # at most once while it runs
    core.on_handoff_ended("r1", False)  # aborted: offered again, up to MAX_ATTEMPTS handoffs
    [h] = core.handoffs([decoding], [snap("d0")], never)
    core.on_handoff_ended("r1", False)
    assert core.handoffs([decoding], [snap("d0")], never) == []  # out of attempts: it stays
    core.on_request_ended("r1")
    assert "r1" not in core.prompt_tokens and "r1" not in core.tried


def test_first_token_event_hands_off_as_a_decoding_report_would() -> None:
    core, _ = fleet("adaptive", {"p0": "prefill", "d0": "decode", "b0": "both"})
    never = lambda rid: False  # noqa: E731
    assert core.wants_first_token("p0", 1000) and not core.wants_first_token("p0", 100)  # short: not moved
    assert not core.wants_first_token("b0", 1000) and not core.wants_first_token("d0", 1000)
    core.on_request("r1", 1000)
    core.on_request("short", 100)
    assert core.first_token_handoffs("short", snap("p0"), 4, [snap("d0")], never) == []
    assert core.first_token_handoffs("r1", snap("b0"), 32, [snap("d0")], never) == []  # not a prefill instance
    assert core.first_token_handoffs("r1", snap("p0"), 32, [snap("d0")], lambda rid: True) == []  # busy
    [h] = core.first_token_handoffs("r1", snap("p0"), 32, [snap("d0"), snap("b0")], never)
    assert (h.request_id, h.source_id, h.destination_id, h.num_blocks) == ("r1", "p0", "d0", 32)
    decoding = snap("p0", running=(RunningSnapshot("r1", 1001, 32, decoding=True),))
    assert core.handoffs([decoding], [snap("d0")], never) == []  # the next report does not move it again
    assert core.first_token_handoffs("r1", snap("p0"), 32, [snap("d0")], never) == []
    assert not PdCore(PdParams()).wants_first_token("p0", 10_000)  # pd off: engines report nothing


def test_rebalance_runs_at_its_period_and_refiles_the_instance() -> None:
    core = PdCore(PdParams(mode="disaggregated", rebalance_period_s=5.0))
    for iid, phase in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        core.on_report(iid, phase)  # type: ignore[arg-type]
    index = make_dispatch("least_loaded", DispatchParams(), core)
    hot = InstanceSnapshot("p0", 100, 20, 1, 5, waiting_blocks=70)
    cold = [snap("d0", free=90), snap("d1", free=95)]
    for s in (hot, *cold):
        index.upsert(s)
    change = core.rebalance([hot, *cold], now=100.0)
    assert change is not None and (change.instance_id, change.phase) == ("d1", "prefill")
    assert core.phase_of("d1") == "prefill" and core.phase_changes == 1
    assert core.rebalance([hot, *cold], now=101.0) is None  # within the period
    index.upsert(snap("d1", free=95))
    assert isinstance(index, PhasedDispatch)
    assert index.pools[frozenset(("prefill", "both"))].choose(demand("r", 1000)) == "d1"
    assert PdCore(PdParams(mode="disaggregated")).rebalance([hot, *cold], now=100.0) is None  # period 0: off


def test_a_phase_change_keeps_the_instance_s_cached_prefixes() -> None:
    core, index = fleet("disaggregated", {"p0": "prefill", "d0": "decode"}, policy="kv_aware")
    shared = index.prefix_index
    assert shared is not None
    shared.resync("d0", epoch="e", seq=1, hashes=[11, 12, 13])
    core.set_phase("d0", "prefill")  # leaves the decode-side pool, joins the prefill side
    index.upsert(snap("d0"))
    assert shared.overlap("d0", [11, 12, 13]) == 3  # still known
    assert index.pools[frozenset(("decode", "both"))].choose(demand("r", 10)) is None
    index.remove("d0")  # gone for good: forgotten everywhere
    assert shared.overlap("d0", [11, 12, 13]) == 0


def test_pool_scaling_from_each_pool_s_backpressure() -> None:
    from control.core.pd import plan_pool_scaling, pool_loads

    params = PdParams(
        mode="disaggregated",
        autoscale_ttft_target_s=1.0,
        autoscale_prefill_tokens_per_s=1000.0,
        autoscale_decode_kv_target=0.8,
        autoscale_scale_in_below=0.25,
        autoscale_max_instances=4,
    )

    def inst(iid: str, free: int, waiting_blocks: int = 0, draining: bool = False) -> InstanceSnapshot:
        return InstanceSnapshot(iid, 100, free, 1, 1, waiting_blocks=waiting_blocks, block_size=32, draining=draining)

    always = lambda iid: True  # noqa: E731
    # prefill: 40 queued blocks x 32 tokens = 1,280 tokens over 1 x 1,000 tok/s x 1 s: pressure 1.28 -> one more
    # decode: KV 10% and 20% used, mean 0.15 / 0.8 = 0.19 < 0.25 -> the least used (d0) goes
    fleet = [(inst("p0", 90, 40), "prefill"), (inst("d0", 90), "decode"), (inst("d1", 80), "decode")]
    loads = pool_loads(fleet, params)  # type: ignore[arg-type]
    assert abs(loads["prefill"].pressure - 1.28) < 1e-9 and loads["prefill"].queued_prompt_tokens == 1280
    assert abs(loads["decode"].pressure - 0.15 / 0.8) < 1e-9
    plan = plan_pool_scaling(fleet, params, always)  # type: ignore[arg-type]
    assert [(p.phase, p.delta, p.instance_id) for p in plan] == [("prefill", 1, ""), ("decode", -1, "d0")]
    assert plan_pool_scaling(fleet, params, lambda iid: iid != "d0")[1].instance_id == "d1"  # type: ignore[arg-type]
    # full fleet: no start; a pool of one is never emptied; draining instances count in no pool
    full = [*fleet, (inst("p1", 90, 40), "prefill")]
    assert [p.delta for p in plan_pool_scaling(full, params, always)] == [-1]  # type: ignore[arg-type]
    alone = [(inst("p0", 100), "prefill"), (inst("d0", 100), "decode"), (inst("d1", 100, draining=True), "decode")]
    assert plan_pool_scaling(alone, params, always) == []  # type: ignore[arg-type]
    # decode KV over its target: decode grows first when it is the more pressed pool
    hot = [(inst("p0", 100, 20), "prefill"), (inst("d0", 5), "decode")]
    assert [(p.phase, p.delta) for p in plan_pool_scaling(hot, params, always)] == [("decode", 1)]  # type: ignore[arg-type]


def test_autoscale_runs_at_its_period_only_when_on() -> None:
    core = PdCore(PdParams(mode="disaggregated", autoscale_period_s=10.0, autoscale_prefill_tokens_per_s=1.0))
    core.on_report("p0", "prefill")
    core.on_report("d0", "decode")
    queued = [InstanceSnapshot("p0", 100, 50, 1, 5, waiting_blocks=50), InstanceSnapshot("d0", 100, 100, 0, 0)]
    always = lambda iid: True  # noqa: E731
    assert core.autoscale(queued, 0.0, always) == []  # the first plan is one period in
    assert core.autoscale(queued, 5.0, always) == []
    assert [p.phase for p in core.autoscale(queued, 10.0, always)] == ["prefill"]
    assert core.autoscale(queued, 12.0, always) == []
    assert PdCore(PdParams(mode="disaggregated")).autoscale(queued, 100.0, always) == []  # period 0: off


def test_an_instance_starting_for_a_pool_counts_and_holds_that_pool() -> None:
    from control.core.pd import plan_pool_scaling

    params = PdParams(mode="disaggregated", autoscale_max_instances=3)
    hot = [(InstanceSnapshot("p0", 100, 100, 0, 0), "prefill"), (InstanceSnapshot("d0", 100, 5, 4, 0), "decode")]
    always = lambda iid: True  # noqa: E731
    assert [p.phase for p in plan_pool_scaling(hot, params, always)] == ["decode"]  # type: ignore[arg-type]
    assert plan_pool_scaling(hot, params, always, ("decode",)) == []  # type: ignore[arg-type]
    full = PdParams(mode="disaggregated", autoscale_max_instances=3)
    assert plan_pool_scaling(hot, full, always, ("prefill",)) == []  # type: ignore[arg-type]  # 3 with it
