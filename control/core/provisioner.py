"""What the autoscaler needs from a cluster manager, and how start-up time is measured.

:class:`Provisioner` is the interface the AutoscalerActor uses: start an instance of a role, stop one, list
them, and the measured start-up time (ask to first heartbeat) that feeds ``AutoscaleParams.startup_s``. Calls
return at once (the actor must not block); a start completes when the instance's first heartbeat reaches
the scheduler, which the autoscaler reports back with :meth:`Provisioner.mark_ready`.

The implementations live with the apps that own processes (``control/apps/provisioning.py``); this module
sits below the actors so that they depend on the interface only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from control.errors import ConfigError
from control.policy.autoscaling import InstanceRole


@dataclass(slots=True)
class ProvisionedInstance:
    instance_id: str
    role: InstanceRole
    requested_at: float  # time.monotonic() when start was asked
    ready_at: float | None = None  # first heartbeat seen
    stopping: bool = False
    exited: bool = False

    @property
    def startup_s(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.requested_at


class Provisioner(Protocol):
    """What the AutoscalerActor needs from a cluster manager. Every method returns without waiting."""

    name: str

    def start(self, role: InstanceRole) -> str:
        """Ask for a new instance of ``role``; returns its instance id (it joins by heartbeating)."""
        ...

    def stop(self, instance_id: str) -> None:
        """Stop an instance this provisioner started (call once it is drained: it gets SIGTERM-like
        treatment and drains whatever is left by migration)."""
        ...

    def instances(self) -> list[ProvisionedInstance]:
        """The instances it started and has not seen exit."""
        ...

    def mark_ready(self, instance_id: str, at: float | None = None) -> float | None:
        """The instance's first heartbeat arrived (at ``at``, time.monotonic(); None: now): record and return
        its start-up time (None: unknown id or already ready)."""
        ...

    def startup_estimate_s(self, prior_s: float) -> float:
        """Running estimate of the start-up time (``prior_s`` until one start was measured)."""
        ...

    def startup_samples(self) -> list[float]: ...

    def close(self) -> None:
        """Stop everything it started (control-plane shutdown)."""
        ...


@dataclass(slots=True)
class StartupModel:
    """Start-up time as an exponentially weighted mean of measurements (the last few kept for status)."""

    weight: float = 0.5
    estimate_s: float | None = None
    samples: list[float] = field(default_factory=list)

    def observe(self, seconds: float) -> None:
        self.samples = [*self.samples[-19:], seconds]
        self.estimate_s = (
            seconds if self.estimate_s is None else (1 - self.weight) * self.estimate_s + self.weight * seconds
        )

    def estimate(self, prior_s: float) -> float:
        return prior_s if self.estimate_s is None else self.estimate_s


class NoProvisioner:
    """A fixed fleet: nothing to start or stop (the autoscaler is off, or an embedding gave no provisioner)."""

    name = "none"

    def start(self, role: InstanceRole) -> str:
        raise ConfigError("no provisioner: this control plane cannot start instances", code="no_provisioner")

    def stop(self, instance_id: str) -> None:
        raise ConfigError(f"no provisioner: cannot stop {instance_id}", code="no_provisioner")

    def instances(self) -> list[ProvisionedInstance]:
        return []

    def mark_ready(self, instance_id: str, at: float | None = None) -> float | None:
        return None

    def startup_estimate_s(self, prior_s: float) -> float:
        return prior_s

    def startup_samples(self) -> list[float]:
        return []

    def close(self) -> None:
        return None
