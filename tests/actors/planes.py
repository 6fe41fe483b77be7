"""What the autoscaler tests (``test_autoscaler.py``, ``test_autoscaler_pd.py``) share: a control plane whose
provisioner starts simulated engines in this process, on a real nats-server."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from actors.control_plane import ControlPlane
from control.apps.provisioning import InProcessProvisioner
from control.core.record import DecisionLog
from control.policy.autoscaling import InstanceRole
from control.settings import Settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport.bus import Bus, BusOptions


@dataclasses.dataclass
class Plane:
    control: ControlPlane
    provisioner: InProcessProvisioner
    bus: Bus
    url: str
    decisions: DecisionLog  # the control core's calls (the parity checks replay them)
    prefix: str  # of the ids of the instances the provisioner starts


def own_state(tag: str) -> dict[str, str]:
    """``[ha]`` buckets of the test's own: nothing is restored from another test's control plane."""
    suffix = uuid.uuid4().hex[:8]
    return {"state_bucket": f"{tag}_state_{suffix}", "lease_bucket": f"{tag}_lease_{suffix}"}


@contextmanager
def started_plane(
    settings: Settings,
    make_engine: Callable[[str, InstanceRole], MigratableSimEngine],
    *,
    local_autoscaler: bool = True,
) -> Iterator[Plane]:
    """A control plane on ``settings`` (its nats url set) whose provisioner builds engines with
    ``make_engine``; stopped, with every instance it started, on exit."""
    url = settings.nats.url
    assert url, "the settings name no nats-server"
    prefix = f"t{int(time.time() * 1000) % 100000}"
    provisioner = InProcessProvisioner(settings, make_engine, prefix=prefix, local_autoscaler=local_autoscaler)
    bus = Bus(BusOptions(url=url, name="drover-control")).start()
    decisions = DecisionLog()
    control = ControlPlane(settings, bus, ByteTokenizer(), provisioner=provisioner, decision_log=decisions).start()
    try:
        yield Plane(control, provisioner, bus, url, decisions, prefix)
    finally:
        control.stop()
        bus.stop()
        provisioner.close()
