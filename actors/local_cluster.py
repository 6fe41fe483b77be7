"""A whole cluster inside one process (control plane + engine hosts, each with its own bus connection):
for tests and benchmarks that need real NATS and real actors without process start-up costs."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.control_plane import ControlPlane
from actors.engine_host import EngineHost
from control.processes import bus_options
from control.settings import Settings
from engines.base import Engine
from engines.tokenizer import Tokenizer
from transport.bus import Bus


@dataclass
class InProcessCluster:
    settings: Settings
    tokenizer: Tokenizer
    control_bus: Bus | None = None
    control: ControlPlane | None = None
    hosts: dict[str, EngineHost] = field(default_factory=dict)
    _buses: dict[str, Bus] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.settings.nats.url, "settings.nats.url must be set"
        return self.settings.nats.url

    def start_control(self) -> ControlPlane:
        self.control_bus = Bus(bus_options(self.settings, "drover-control")).start()
        self.control = ControlPlane(self.settings, self.control_bus, self.tokenizer).start()
        return self.control

    def add_engine(self, engine: Engine, tokenizer: Tokenizer | None = None) -> EngineHost:
        instance_id = engine.info.instance_id
        bus = Bus(bus_options(self.settings, f"drover-engine-{instance_id}")).start()
        host = EngineHost(self.settings, bus, engine, tokenizer or self.tokenizer).start()
        self.hosts[instance_id] = host
        self._buses[instance_id] = bus
        return host

    def remove_engine(self, instance_id: str) -> None:
        host = self.hosts.pop(instance_id)
        host.stop()
        self._buses.pop(instance_id).stop()

    def stop(self) -> None:
        for instance_id in list(self.hosts):
            self.remove_engine(instance_id)
        if self.control is not None:
            self.control.stop()
        if self.control_bus is not None:
            self.control_bus.stop()
