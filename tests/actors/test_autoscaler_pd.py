"""The AutoscalerActor per phase ([pd] autoscale_period_s) on a real nats-server, with simulated engines in
process: handed-off requests queue on the only decode instance (one sequence at a time, few blocks), so the
decode pool is over its KV budget and the autoscaler starts an instance for it (which gets its phase once it
heartbeats); once the load is gone the pool gives that instance back (drained, stopped). Every request
completes with all its tokens. (The prefill pool's queue rule is tested in the simulator.)"""

from __future__ import annotations

from actors.engine_host import EngineHost
from control.apps.cli_autoscale import request_admin
from control.client import DroverClient
from control.policy.autoscaling import InstanceRole
from control.settings import Settings, load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from tests.actors.planes import own_state, started_plane
from tests.waiting import wait_for
from transport.bus import Bus, BusOptions
from transport.messages import AutoscaleStatusQuery, AutoscaleStatusReply, SamplingParams


def pd_settings(nats_url: str) -> Settings:
    return load_settings(
        overrides={
            "nats": {"url": nats_url},
            "ha": own_state("pdas"),
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05, "local_autoscaler": False},
            "autoscaler": {"enabled": True, "stop_timeout_s": 30.0},
            "policy": {"migration_enabled": False},
            "pd": {
                "mode": "disaggregated",
                "autoscale_period_s": 0.5,
                "autoscale_max_instances": 3,
                "autoscale_decode_kv_target": 0.5,  # one request decoding and one waiting are over it
            },
        }
    )


def make_engine(instance_id: str, role: InstanceRole) -> MigratableSimEngine:
    return MigratableSimEngine(instance_id, num_blocks=128, max_num_seqs=4, time_scale=1.0)


async def test_the_decode_pool_grows_under_its_queue_and_gives_the_instance_back(nats_url: str) -> None:
    settings = pd_settings(nats_url)
    fixed: list[tuple[EngineHost, Bus]] = []
    with started_plane(settings, make_engine, local_autoscaler=False) as plane:
        prefix = plane.prefix
        try:
            for name, phase in (("pdas-p", "prefill"), ("pdas-d", "decode")):  # not the provisioner's: never stopped
                engine_settings = settings.engine.model_copy(update={"phase": phase})
                host_bus = Bus(BusOptions(url=nats_url, name=f"drover-engine-{name}")).start()
                seqs, blocks = (8, 256) if phase == "prefill" else (1, 64)  # decode: a queue of handed-off requests
                engine = MigratableSimEngine(name, num_blocks=blocks, max_num_seqs=seqs, time_scale=1.0)
                host = EngineHost(
                    settings.model_copy(update={"engine": engine_settings}), host_bus, engine, ByteTokenizer()
                )
                fixed.append((host.start(), host_bus))
            async with DroverClient(nats_url, name="pd-autoscale") as client:
                await client.wait_for_instances(2, timeout_s=30)
                sampling = SamplingParams(max_tokens=60, ignore_eos=True)
                streams = [
                    await client.submit("q" * 600, sampling=sampling, request_id=f"pdas-{i}") for i in range(8)
                ]  # prefilled at once; the one decode instance decodes one at a time: they queue there

                async def started_decode() -> bool:
                    status = await client.status()
                    return any(i.info.instance_id.startswith(prefix) and i.phase == "decode" for i in status.instances)

                await wait_for(started_decode, 60, "an instance started for the decode pool, serving decode")
                results = [await s.result() for s in streams]
                for result in results:
                    assert result.done is not None and result.done.num_tokens == 60, result.request_id

                async def given_back() -> bool:
                    status = await client.status()
                    return not any(i.info.instance_id.startswith(prefix) for i in status.instances)

                await wait_for(given_back, 90, "the idle decode pool to give its started instance back")
            reply = await request_admin(nats_url, "autoscale", AutoscaleStatusQuery())
            assert isinstance(reply, AutoscaleStatusReply)
            actions = [(e.action, e.instance_id) for e in reply.events]
            started = [iid for action, iid in actions if action == "start"]
            assert len(started) == 1 and started[0].startswith(prefix)  # one start: the pool's max held
            assert ("drain", started[0]) in actions and ("stop", started[0]) in actions
            assert not any(action in ("drain", "stop") and not iid.startswith(prefix) for action, iid in actions)
        finally:
            for host, host_bus in fixed:
                host.stop()
                host_bus.stop()
