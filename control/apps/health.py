"""What "alive" and "ready" mean for Drover's processes (served by observability/health.py).

Control plane
  - live: its bus connection to NATS is up (a process cut off from the bus can do nothing).
  - ready: live, and the supervisor, scheduler and migrator actors are alive, and the scheduler answers a
    status ask within ``timeout_s`` (not stuck). Zero engines still counts as ready: submissions queue
    until instances join, and the autoscaler may be about to start them. A standby control plane (leader
    election) is ready when connected: it is there to take over.
Engine host
  - live: its bus connection is up.
  - ready: live, the engine is loaded and its actor alive, the heartbeat says "serving" (not draining or
    stopping), and the control plane lists this instance as serving (it is registered and receives work).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from observability.health import HealthChecks
from transport import subjects
from transport.bus import Bus
from transport.messages import StatusQuery, StatusReply

if TYPE_CHECKING:
    from actors.control_plane import ControlPlane
    from actors.engine_host import EngineHost


def bus_check(bus: Bus) -> tuple[bool, str]:
    return (True, "connected") if bus.connected else (False, "not connected to NATS")


def control_plane_checks(plane: ControlPlane, timeout_s: float = 1.0) -> HealthChecks:
    """Liveness and readiness of a control-plane process."""

    def standby() -> bool:
        # With leader election (a `leading` flag), a standby runs no actors yet is ready to take over.
        return getattr(plane, "leading", True) is False

    def actors() -> tuple[bool, str]:
        if standby():
            return True, "standby: another control plane leads"
        sup = plane.supervisor
        if sup is None or not sup.is_alive():
            return False, "supervisor not running"
        if plane.scheduler is None or plane.migrator is None:
            return False, "actors not started"
        down = [slot.name for slot in (plane.scheduler, plane.migrator) if not slot.alive]
        return (False, "not alive: " + ", ".join(down)) if down else (True, "supervisor, scheduler, migrator alive")

    def scheduler_answers() -> tuple[bool, str]:
        if standby():
            return True, "standby"
        slot = plane.scheduler
        ref = slot.ref if slot is not None else None
        if ref is None:
            return False, "scheduler not running"
        status: StatusReply = ref.proxy().status().get(timeout=timeout_s)
        return True, f"{len(status.instances)} instances, {status.queued} queued"

    return HealthChecks(
        liveness={"bus": lambda: bus_check(plane.bus)},
        readiness={"actors": actors, "scheduler": scheduler_answers},
    )


def engine_host_checks(host: EngineHost, timeout_s: float = 1.0) -> HealthChecks:
    """Liveness and readiness of an engine-host process."""

    def engine() -> tuple[bool, str]:
        if host.actor is None or not host.actor.is_alive():
            return False, "engine not loaded (starting) or stopped"
        state = host.heartbeater.state
        return (True, f"{host.engine.info.engine_kind} loaded") if state == "serving" else (False, state)

    def registered() -> tuple[bool, str]:
        reply = host.bus.request(subjects.admin("status"), StatusQuery(), timeout_s=timeout_s).result(timeout_s + 1)
        if not isinstance(reply, StatusReply):
            return False, f"control plane answered {type(reply).__name__}"
        mine = next((i for i in reply.instances if i.info.instance_id == host.instance_id), None)
        if mine is None:
            return False, "not (yet) registered with the control plane"
        return mine.state == "serving", f"control plane sees it {mine.state}"

    return HealthChecks(
        liveness={"bus": lambda: bus_check(host.bus)},
        readiness={"engine": engine, "registered": registered},
    )
