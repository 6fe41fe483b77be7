"""A Drover cluster over real vLLM-CPU engines for integration tests: the control plane on its own bus, each
engine host on the test loop with its own connection (engines come from ``tests.conftest_vllm``'s factory)."""

from __future__ import annotations

import asyncio
from typing import Any

from actors.control_plane import ControlPlane
from actors.engine_host import EngineHost
from control.client import DroverClient
from control.settings import Settings
from engines.tokenizer import ByteTokenizer
from transport.bus import Bus, BusOptions


class VllmCluster:
    """A control plane on its own bus and vLLM engine hosts on the test loop, each with its own connection."""

    def __init__(self, url: str, settings: Settings, name: str = "drover-control") -> None:
        self.url = url
        # The only control plane here: a lapsed lease can only make it pass its own status replies on. vLLM's
        # EngineCore processes can starve this process's loop past the 3 s default (CI: "the lease key
        # vanished", then a status query timed out); the HA tests keep their own short leases.
        settings.ha.lease_ttl_s = max(settings.ha.lease_ttl_s, 30.0)
        self.settings = settings
        self.control_bus = Bus(BusOptions(url=url, name=name)).start()
        self.control = ControlPlane(settings, self.control_bus, ByteTokenizer()).start()
        self.hosts: list[tuple[Bus, EngineHost]] = []

    async def add(self, engine: Any) -> None:
        bus = await Bus(
            BusOptions(url=self.url, name=f"engine-{engine.info.instance_id}"), loop=asyncio.get_running_loop()
        ).astart()
        host = await EngineHost(self.settings, bus, engine, ByteTokenizer()).astart(engine_started=True)
        self.hosts.append((bus, host))

    async def close(self) -> None:
        for bus, host in self.hosts:
            await host.astop()
            await bus.astop()
        await asyncio.to_thread(self.control.stop)
        await asyncio.to_thread(self.control_bus.stop)


async def idle_free_blocks(client: DroverClient, instances: tuple[str, ...] = ("a", "b")) -> dict[str, int]:
    """Free blocks per named instance once each reports no running or waiting request.

    Only the named ones: the session's shared nats-server keeps other modules' registrations (the KV routing
    module's "kv-a" and "kv-b"), which the scheduler lists until it declares them dead; once that happened
    between a test's two reads, and the two dicts differed in keys, not in blocks."""
    for _ in range(100):
        status = await client.status()
        ours = [i for i in status.instances if i.info.instance_id in instances]
        if len(ours) == len(instances) and all(i.load.num_running == 0 and i.load.num_waiting == 0 for i in ours):
            await asyncio.sleep(0.3)  # one more heartbeat after the last request left
            status = await client.status()
            return {
                i.info.instance_id: i.load.num_free_blocks for i in status.instances if i.info.instance_id in instances
            }
        await asyncio.sleep(0.1)
    raise AssertionError(f"instances {instances} did not become idle")
