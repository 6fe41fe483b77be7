"""Provisioning: how the autoscaler gets and gives back instances.

:class:`Provisioner` is the interface the AutoscalerActor uses: start an instance of a role, stop one, list
them, and the measured start-up time (ask to first heartbeat) that feeds ``AutoscaleParams.startup_s``. Calls
return at once (the actor must not block); a start completes when the instance's first heartbeat reaches
the scheduler, which the autoscaler reports back with :meth:`Provisioner.mark_ready`.

Implementations here:

* :class:`LocalProcessProvisioner`: ``drover engine serve`` processes on this machine (the same spawning
  code as ``drover up``, :class:`control.apps.launcher.LocalCluster`).
* :class:`InProcessProvisioner`: engine hosts inside this process, each with its own bus connection (tests
  and benchmarks where process start-up does not matter; the cluster simulator models start-up instead).

A cluster manager (Kubernetes: a Deployment per role scaled by replicas, or a pod per instance; Ray: an actor
per instance) implements the same five methods: ``start`` creates the pod/actor with ``DROVER_ENGINE__ROLE``
and ``DROVER_ENGINE__INSTANCE_ID``-style arguments and returns its id, ``stop`` deletes it (the engine drains
on SIGTERM), ``instances`` lists what it created, and :class:`StartupModel` does the measuring.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control.core.provisioner import ProvisionedInstance, Provisioner, StartupModel
from control.policy.autoscaling import InstanceRole
from control.settings import Settings

if TYPE_CHECKING:
    from control.apps.launcher import LocalCluster
    from engines.base import Engine

log = logging.getLogger(__name__)


class TrackedInstances:
    """Bookkeeping shared by the provisioners: names, the instance table, start-up measurement."""

    def __init__(self, prefix: str, startup_weight: float) -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self._table: dict[str, ProvisionedInstance] = {}
        self._counter = 0
        self._startup = StartupModel(weight=startup_weight)

    def _new_id(self, role: InstanceRole) -> str:
        with self._lock:
            self._counter += 1
            instance_id = f"{self._prefix}-{role}-{self._counter}"
            self._table[instance_id] = ProvisionedInstance(instance_id, role, time.monotonic())
            return instance_id

    def instances(self) -> list[ProvisionedInstance]:
        with self._lock:
            return [i for i in self._table.values() if not i.exited]

    def mark_ready(self, instance_id: str, at: float | None = None) -> float | None:
        with self._lock:
            inst = self._table.get(instance_id)
            if inst is None or inst.ready_at is not None:
                return None
            inst.ready_at = max(inst.requested_at, at if at is not None else time.monotonic())
            seconds = inst.ready_at - inst.requested_at
            self._startup.observe(seconds)
        log.info("instance %s (%s) ready after %.1fs", instance_id, inst.role, seconds)
        return seconds

    def startup_estimate_s(self, prior_s: float) -> float:
        with self._lock:
            return self._startup.estimate(prior_s)

    def startup_samples(self) -> list[float]:
        with self._lock:
            return list(self._startup.samples)

    def _exited(self, instance_id: str) -> None:
        with self._lock:
            inst = self._table.get(instance_id)
            if inst is not None:
                inst.exited = True


class LocalProcessProvisioner(TrackedInstances):
    """Instances are ``drover engine serve`` processes on this machine, spawned like ``drover up``'s."""

    name = "local"

    def __init__(self, settings: Settings, work_dir: Path | None = None) -> None:
        auto = settings.autoscaler
        super().__init__(auto.instance_prefix, auto.startup_ewma)
        self.settings = settings
        self.work_dir = work_dir or Path(auto.work_dir)
        self.kind = auto.engine_kind or settings.engine.kind
        self.stop_timeout_s = auto.stop_timeout_s
        self._cluster: LocalCluster | None = None

    @property
    def cluster(self) -> LocalCluster:
        """The spawner, made at the first start (its directory holds the engines' config and logs)."""
        if self._cluster is None:
            from control.apps.launcher import LocalCluster

            self.work_dir.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix="drover-auto-", dir=self.work_dir))
            self._cluster = LocalCluster(settings=self.settings, work_dir=directory)
        return self._cluster

    def start(self, role: InstanceRole) -> str:
        instance_id = self._new_id(role)
        env = {
            "DROVER_ENGINE__ROLE": role,
            "DROVER_ENGINE__KIND": self.kind,
            "DROVER_ENGINE__LOCAL_AUTOSCALER": "true",
        }
        process = self.cluster.spawn_engine(instance_id, env)
        log.info("started %s (%s, pid %d); log %s", instance_id, role, process.pid, self.log_path(instance_id))
        threading.Thread(
            target=self._reap, args=(instance_id, process), name=f"reap-{instance_id}", daemon=True
        ).start()
        return instance_id

    def log_path(self, instance_id: str) -> Path:
        return self.cluster.work_dir / f"{instance_id}.log"

    def _reap(self, instance_id: str, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        self._exited(instance_id)
        log.info("instance %s exited with %s", instance_id, code)

    def stop(self, instance_id: str) -> None:
        process = self._cluster.processes.get(instance_id) if self._cluster is not None else None
        if process is None or process.poll() is not None:
            self._exited(instance_id)
            return
        with self._lock:
            if instance_id in self._table:
                self._table[instance_id].stopping = True
        process.send_signal(signal.SIGTERM)  # the engine drains what is left, then exits

        def kill_late() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_timeout_s)
            if process.poll() is None:
                log.warning("instance %s ignored SIGTERM for %.0fs: killing it", instance_id, self.stop_timeout_s)
                process.kill()

        threading.Thread(target=kill_late, name=f"stop-{instance_id}", daemon=True).start()

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()


class InProcessProvisioner(TrackedInstances):
    """Instances are engine hosts in this process (own bus connection each); ``make_engine(id, role)`` builds
    the engine. Starts run on a thread of their own so that ``start`` returns at once."""

    name = "in-process"

    def __init__(
        self,
        settings: Settings,
        make_engine: Callable[[str, InstanceRole], Engine],
        *,
        prefix: str = "auto",
        local_autoscaler: bool = True,
    ) -> None:
        super().__init__(prefix, settings.autoscaler.startup_ewma)
        self.settings = settings
        self.make_engine = make_engine
        self.local_autoscaler = local_autoscaler
        self.hosts: dict[str, Any] = {}  # instance id -> (EngineHost, Bus)

    def start(self, role: InstanceRole) -> str:
        instance_id = self._new_id(role)
        threading.Thread(target=self._start, args=(instance_id, role), name=f"start-{instance_id}", daemon=True).start()
        return instance_id

    def _start(self, instance_id: str, role: InstanceRole) -> None:
        from actors.engine_host import EngineHost
        from engines.tokenizer import ByteTokenizer
        from transport.bus import Bus, BusOptions

        assert self.settings.nats.url
        engine_settings = self.settings.engine.model_copy(
            update={"role": role, "local_autoscaler": self.local_autoscaler}
        )
        settings = self.settings.model_copy(update={"engine": engine_settings})
        try:
            bus = Bus(BusOptions(url=self.settings.nats.url, name=f"drover-engine-{instance_id}")).start()
            host = EngineHost(settings, bus, self.make_engine(instance_id, role), ByteTokenizer()).start()
        except Exception:
            log.exception("instance %s failed to start", instance_id)
            self._exited(instance_id)
            return
        with self._lock:
            self.hosts[instance_id] = (host, bus)

    def stop(self, instance_id: str) -> None:
        with self._lock:
            entry = self.hosts.pop(instance_id, None)
        if entry is None:
            self._exited(instance_id)
            return

        def stop() -> None:
            host, bus = entry
            host.drain(self.settings.autoscaler.stop_timeout_s)
            host.stop()
            bus.stop()
            self._exited(instance_id)

        threading.Thread(target=stop, name=f"stop-{instance_id}", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            entries = list(self.hosts.items())
            self.hosts.clear()
        for instance_id, (host, bus) in entries:
            host.stop()
            bus.stop()
            self._exited(instance_id)


def make_provisioner(settings: Settings) -> Provisioner:
    """The provisioner ``[provisioner] kind`` names (``ray``: control/apps/ray_provisioner.py)."""
    if settings.provisioner.kind == "ray":
        from control.apps.ray_provisioner import RayProvisioner

        return RayProvisioner(settings)
    if settings.autoscaler.provisioner == "local":
        return LocalProcessProvisioner(settings)
    raise ValueError(f"unknown provisioner {settings.autoscaler.provisioner!r}")
