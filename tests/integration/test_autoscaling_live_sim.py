"""The live autoscaling cycle with simulated engines started as `drover engine serve` processes by the
LocalProcessProvisioner (real NATS, real processes): an instance added under load serves requests, is
drained by migration and stopped after the load; no request lost, no token duplicated."""

from __future__ import annotations

from pathlib import Path

from scripts.bench_autoscaling_live import check_exactly_once, cycle_settings, run_cycle


async def test_scale_out_drain_scale_in_with_sim_processes(nats_url: str, tmp_path: Path) -> None:
    settings = cycle_settings(
        nats_url, "sim", extra={"autoscaler": {"instance_prefix": "simcycle"}, "engine": {"sim_time_scale": 1.0}}
    )
    cycle = await run_cycle(settings, tmp_path, in_flight=6, max_tokens=200, ready_timeout_s=60, load_timeout_s=60)
    assert cycle.results, "no request ran"
    for result in cycle.results:
        assert result.done is not None and result.done.finish_reason == "length", result.request_id
        assert result.done.num_tokens == 200
        check_exactly_once(cycle.chunks[result.request_id], 200)
    actions = [(action, iid) for _, action, iid, _ in cycle.events]
    assert ("start", cycle.added) in actions and ("ready", cycle.added) in actions
    drained = {iid for action, iid in actions if action == "drain"}
    stopped = {iid for action, iid in actions if action == "stop"}
    assert drained and drained <= stopped, actions
    assert len(cycle.startup_samples) >= 2, "start-up of both instances measured"
    assert max(p.instances for p in cycle.timeline) == 2  # max_instances held
    up = next(i for i, p in enumerate(cycle.timeline) if p.serving)
    assert min(p.serving for p in cycle.timeline[up:]) >= 1  # min_instances held once the first was up
