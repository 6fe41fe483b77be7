"""A whole cluster inside one process (control plane + engine hosts, each with its own bus connection):
for tests and benchmarks that need real NATS and real actors without process start-up costs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from actors.control_plane import ControlPlane
from actors.engine_host import EngineHost
from control.core.record import DecisionLog
from control.settings import Settings
from engines.base import Engine
from engines.tokenizer import Tokenizer
from transport import subjects
from transport.bus import Bus, BusOptions
from transport.kv_store import delete_bucket
from transport.nats_auth import NatsAuth


@dataclass
class InProcessCluster:
    settings: Settings
    tokenizer: Tokenizer
    control_bus: Bus | None = None
    control: ControlPlane | None = None
    hosts: dict[str, EngineHost] = field(default_factory=dict)
    _buses: dict[str, Bus] = field(default_factory=dict)
    _crashed: list[tuple[EngineHost, Bus]] = field(default_factory=list)  # crash_engine: stopped at stop()
    control_auth: NatsAuth | None = None  # NATS credentials of the control plane (servers with auth)
    engine_auth: NatsAuth | None = None  # of every engine host
    reply_auth: NatsAuth | None = None  # of the control plane's client-bound connection (secure mode)
    reply_bus: Bus | None = None
    standbys: list[tuple[ControlPlane, Bus]] = field(default_factory=list)
    isolate_state: bool = True  # own state and lease buckets: clusters sharing a NATS server stay apart

    def __post_init__(self) -> None:
        if self.isolate_state:
            suffix = uuid.uuid4().hex[:8]
            ha = self.settings.ha
            ha.state_bucket, ha.lease_bucket = f"{ha.state_bucket}_{suffix}", f"{ha.lease_bucket}_{suffix}"

    @property
    def url(self) -> str:
        assert self.settings.nats.url, "settings.nats.url must be set"
        return self.settings.nats.url

    def _bus_options(self, name: str, auth: NatsAuth | None, inbox_prefix: str | None = None) -> BusOptions:
        """Connect as ``auth`` with the reconnect and ping settings of ``settings.nats``."""
        nats = self.settings.nats
        return BusOptions.with_auth(
            self.url,
            name,
            auth,
            reconnect_wait_s=nats.reconnect_wait_s,
            ping_interval_s=nats.ping_interval_s,
            max_outstanding_pings=nats.max_outstanding_pings,
            inbox_prefix=inbox_prefix,
        )

    def start_control(self, decision_log: DecisionLog | None = None) -> ControlPlane:
        """Start the control plane; ``decision_log`` records the control core's decisions (parity tests)."""
        self.control_bus = Bus(self._bus_options("drover-control", self.control_auth)).start()
        if self.reply_auth is not None and self.reply_bus is None:
            self.reply_bus = Bus(self._bus_options("drover-control-reply", self.reply_auth)).start()
        self.control = ControlPlane(
            self.settings, self.control_bus, self.tokenizer, decision_log=decision_log, reply_bus=self.reply_bus
        ).start()
        return self.control

    def restart_control(self) -> ControlPlane:
        """Stop the control plane (SIGTERM-like: state flushed, lease released) and start a fresh one."""
        if self.control is not None:
            self.control.stop()
        if self.control_bus is not None:
            self.control_bus.stop()
        return self.start_control()

    def start_standby(self) -> ControlPlane:
        """Another control plane on its own connection (it leads once the current leader's lease is gone)."""
        bus = Bus(self._bus_options(f"drover-control-{len(self.standbys) + 1}", self.control_auth)).start()
        plane = ControlPlane(self.settings, bus, self.tokenizer, reply_bus=self.reply_bus).start()
        self.standbys.append((plane, bus))
        return plane

    def add_engine(
        self, engine: Engine, tokenizer: Tokenizer | None = None, decision_log: DecisionLog | None = None
    ) -> EngineHost:
        """Start an engine host; ``decision_log`` records its local autoscaler's decisions (parity tests)."""
        instance_id = engine.info.instance_id
        prefix = subjects.engine_inbox_prefix(instance_id)
        bus = Bus(self._bus_options(f"drover-engine-{instance_id}", self.engine_auth, prefix)).start()
        host = EngineHost(self.settings, bus, engine, tokenizer or self.tokenizer, decision_log).start()
        self.hosts[instance_id] = host
        self._buses[instance_id] = bus
        return host

    def crash_engine(self, instance_id: str) -> None:
        """What a kill -9 of an engine looks like from outside: heartbeats stop and nothing more is published
        (its connection goes silent mid-stream). For failure tests."""
        host = self.hosts.pop(instance_id)
        host.heartbeater.stop()
        bus = self._buses.pop(instance_id)
        bus.loop.call_soon_threadsafe(bus.loop.stop)
        self._crashed.append((host, bus))  # cleaned up by stop(), after the test has seen the silence

    def remove_engine(self, instance_id: str) -> None:
        host = self.hosts.pop(instance_id)
        host.stop()
        self._buses.pop(instance_id).stop()

    def stop(self) -> None:
        for instance_id in list(self.hosts):
            self.remove_engine(instance_id)
        for host, bus in self._crashed:  # their loops stopped mid-work: end the tasks, then the actors
            bus.stop()
            if host.actor is not None and host.actor.is_alive():
                host.actor.stop(timeout=5)
        self._crashed.clear()
        for plane, bus in self.standbys:
            plane.stop()
            bus.stop()
        if self.control is not None:
            self.control.stop()
        if self.control_bus is not None:
            if self.isolate_state and self.settings.ha.enabled and self.control_bus.connected:
                for bucket in (self.settings.ha.state_bucket, self.settings.ha.lease_bucket):
                    self.control_bus.run(delete_bucket(self.control_bus.nc, bucket)).result(timeout=10)
            self.control_bus.stop()
        if self.reply_bus is not None:
            self.reply_bus.stop()
            self.reply_bus = None
