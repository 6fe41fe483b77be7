"""RayProvisioner: the autoscaler's instances as actors on a Ray cluster (and so, through KubeRay, on Kubernetes).

Each instance is one Ray actor, :class:`RayEngineHost`, whose process runs what ``drover engine serve`` runs: its
own NATS connection and :class:`actors.engine_host.EngineHost`. Ray only places the process (by the role's
:class:`control.settings.RayShape`: CPUs, GPUs, memory, custom resources such as a node label) and kills it;
requests and tokens still go over NATS, so the control plane, the client and the engines never depend on Ray
for the request path. The control plane is a Ray *driver* only (``ray://HEAD:10001`` from outside the
cluster), never a Ray node.

Lifecycle, as the :class:`control.core.provisioner.Provisioner` protocol asks:

* ``start`` records the request time and returns at once; the actor is created by the provisioner's own
  thread (every Ray call is made there, so the AutoscalerActor never blocks on Ray). The instance is ready at
  its first heartbeat, which the autoscaler reports with ``mark_ready``: start-up is measured from the
  decision to that heartbeat, placement and process start included, as for local processes.
* ``stop`` (called once the scheduler drained the instance by migration) asks the actor to drain what is
  left, then to stop its engine and bus, then kills the actor; each step is bounded, so a stuck engine is
  killed after ``[autoscaler] stop_timeout_s``.
* A lost Ray node takes its actors with it: Ray reports them dead (``ActorDiedError``) and the instance
  leaves :meth:`RayProvisioner.instances`; Drover notices the engines themselves by their missed heartbeats
  (failover resumes their requests exactly once) and the autoscaler's next plan starts replacements, which
  Ray places on the nodes left. Actors are never restarted by Ray (``max_restarts=0``): a restarted engine
  would come back under an instance id whose requests were already failed over.

Actors are named after their instance ids in ``[provisioner] ray_namespace`` and detached, so a broken Ray
Client connection does not kill the engines; :meth:`RayProvisioner.close` stops them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from control.apps.provisioning import TrackedInstances
from control.core.provisioner import ProvisionedInstance
from control.errors import DroverError
from control.policy.autoscaling import InstanceRole
from control.settings import RayShape, Settings

log = logging.getLogger(__name__)

# Auth fields of [nats] that stay with the control plane: an engine on a Ray node connects with the
# credentials its own node provides (DROVER_NATS__... in the worker pods), never with the control plane's.
_NATS_AUTH_FIELDS = (
    "user",
    "password",
    "creds_file",
    "nkey_seed_file",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_hostname",
    "client_id",
)


class RayUnavailableError(DroverError, RuntimeError):
    """Ray is not installed or the cluster cannot be reached."""

    default_code = "ray_unavailable"


def import_ray() -> Any:
    """Ray, with its auto-connect off: a Ray call made while not connected must fail, never quietly start a
    local Ray instance inside the control plane (Ray reads this variable when first imported)."""
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("the ray provisioner needs Ray: pip install 'drover[ray]'") from exc
    return ray


class RayEngineHost:
    """One engine instance inside a Ray actor process: a bus connection of its own and an EngineHost.

    Constructed by Ray on the node it chose (``settings`` arrives as a JSON-able dict); the constructor
    returns once the engine is started and heartbeating. Methods run on Ray's actor threads
    (``max_concurrency`` > 1), so :meth:`wait_stopped` can block while :meth:`drain` and :meth:`shutdown` run.
    """

    def __init__(self, settings: dict[str, Any], instance_id: str) -> None:
        from actors.engine_host import EngineHost, build_engine
        from control.apps.processes import bus_options, ship_spans
        from observability.logs import setup_logging
        from observability.tracing import setup_tracing
        from transport import subjects
        from transport.bus import Bus

        self.settings = Settings(**settings)
        self.instance_id = instance_id
        obs = self.settings.observability
        setup_logging(obs.log_level)
        setup_tracing(
            f"{obs.service_name}-engine-{instance_id}",
            obs.exporter,
            jsonl_path=obs.jsonl_path,
            otlp_endpoint=obs.otlp_endpoint,
        )
        self._stopped = threading.Event()
        self.bus = Bus(
            bus_options(
                self.settings, f"drover-engine-{instance_id}", inbox_prefix=subjects.engine_inbox_prefix(instance_id)
            )
        ).start()
        try:
            ship_spans(self.settings, self.bus)
            engine, tokenizer = build_engine(self.settings, instance_id)
            self.host = EngineHost(self.settings, self.bus, engine, tokenizer)
            self.host.start()
        except BaseException:
            self.bus.stop()
            raise
        log.info("engine %s started in Ray actor on node %s", instance_id, self.where()["node_ip"])

    def where(self) -> dict[str, Any]:
        """The node this instance runs on (Ray node id and IP) and its process id."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def wait_stopped(self) -> str:
        """Returns when the instance was shut down; raises (as seen by the caller) when the actor dies: the
        provisioner's exit watch."""
        self._stopped.wait()
        return self.instance_id

    def drain(self, timeout_s: float) -> bool:
        """Stop taking work and wait until nothing runs here (True) or ``timeout_s`` passes (False)."""
        return self.host.drain(timeout_s)

    def shutdown(self) -> None:
        """Stop the engine and the bus connection (the last heartbeat says "stopping")."""
        try:
            self.host.stop()
        finally:
            self.bus.stop()
            self._stopped.set()


@dataclass(slots=True)
class _Actor:
    """The provisioner thread's view of one instance's actor."""

    instance_id: str
    handle: Any
    exit_ref: Any  # wait_stopped(): resolves on shutdown, raises when the actor dies
    where_ref: Any | None  # where(): resolves once the engine started
    stop_phase: str = ""  # "", "drain", "shutdown"
    stop_ref: Any | None = None
    stop_deadline: float = 0.0
    node_ip: str = ""
    shape: RayShape = field(default_factory=RayShape)
    created_at: float = field(default_factory=time.monotonic)
    warned_unplaced: bool = False


class RayProvisioner(TrackedInstances):
    """Instances are :class:`RayEngineHost` actors on the Ray cluster at ``[provisioner] ray_address``."""

    name = "ray"

    def __init__(self, settings: Settings, *, connect: bool = True) -> None:
        """``connect``: reach the cluster now (and adopt what runs there); False defers it to the first start."""
        self.settings = settings
        self.prov = settings.provisioner
        auto = settings.autoscaler
        self.prefix = auto.instance_prefix
        self.kind = auto.engine_kind or settings.engine.kind
        self.stop_timeout_s = auto.stop_timeout_s
        super().__init__(self.prefix, auto.startup_ewma)
        self._nodes: dict[str, str] = {}  # instance id -> IP of the node Ray placed it on
        self._commands: queue.Queue[tuple[str, str, InstanceRole | None]] = queue.Queue()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._ray: Any = None
        self._owns_connection = False
        self._actor_class: Any = None
        self._done: set[Any] = set()  # object refs the last poll found finished
        self._poll_failed_logged = -float("inf")
        self._actors: dict[str, _Actor] = {}  # owned by the provisioner thread
        # Connect (and adopt running instances) now, not at the first start: the first scale-out then does not
        # pay for the Ray Client handshake, and a new leader owns its predecessor's instances at once.
        if connect:
            self._ensure_thread()

    # ------------------------------------------------------------------------------------------- protocol
    def start(self, role: InstanceRole) -> str:
        if self._closed.is_set():
            raise RuntimeError("the ray provisioner is closed")
        instance_id = self._new_id(role)
        self._ensure_thread()
        self._commands.put(("start", instance_id, role))
        return instance_id

    def stop(self, instance_id: str) -> None:
        with self._lock:
            inst = self._table.get(instance_id)
            if inst is None or inst.exited:
                return
            inst.stopping = True
        self._ensure_thread()
        self._commands.put(("stop", instance_id, None))

    def close(self) -> None:
        """Stop every instance (drain, shut down, kill: bounded) and leave the Ray cluster."""
        if self._closed.is_set():
            return
        thread = self._thread
        self._commands.put(("close", "", None))
        self._closed.set()
        if thread is not None:
            thread.join(timeout=self.stop_timeout_s + 30)

    # ------------------------------------------------------------------------------------------- queries
    def node_of(self, instance_id: str) -> str | None:
        """IP of the Ray node the instance runs on (None: not placed or not started yet)."""
        with self._lock:
            return self._nodes.get(instance_id)

    def shape(self, role: InstanceRole) -> RayShape:
        return self.prov.ray_shapes.get(role, RayShape())

    def actor_options(self, instance_id: str, role: InstanceRole) -> dict[str, Any]:
        """Ray actor options of an instance: its role's resource shape, named and detached, never restarted."""
        shape = self.shape(role)
        options: dict[str, Any] = {
            "name": instance_id,
            "namespace": self.prov.ray_namespace,
            "lifetime": "detached",
            "num_cpus": shape.num_cpus,
            "num_gpus": shape.num_gpus,
            "max_restarts": 0,
            "max_concurrency": 4,  # wait_stopped blocks one thread; drain and shutdown need others
        }
        if shape.resources:
            options["resources"] = dict(shape.resources)
        if shape.memory_gib:
            options["memory"] = int(shape.memory_gib * 2**30)
        if self.prov.ray_scheduling == "spread":
            options["scheduling_strategy"] = "SPREAD"
        return options

    def engine_settings(self, role: InstanceRole) -> dict[str, Any]:
        """The settings an instance runs with, as a JSON-able dict (Ray pickles the actor's arguments)."""
        engine = self.settings.engine.model_copy(update={"role": role, "kind": self.kind, "local_autoscaler": True})
        nats = self.settings.nats.model_copy(update={"url": self.prov.engine_nats_url or self.settings.nats.url})
        data = self.settings.model_copy(update={"engine": engine, "nats": nats}).model_dump(mode="json")
        for name in _NATS_AUTH_FIELDS:
            data["nats"].pop(name, None)
        return data

    # ------------------------------------------------------------------------------------------- the thread
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ray-provisioner", daemon=True)
                self._thread.start()

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        from ray.util.client import ray as ray_client

        # A Ray Client connection made on another thread does not show in ray.is_initialized() here.
        if not (ray.is_initialized() or ray_client.is_connected()):
            try:
                ray.init(address=self.prov.ray_address, namespace=self.prov.ray_namespace, log_to_driver=False)
            except BaseException:
                # A failed Ray Client handshake can leave the client half set up (it then looks connected and
                # every call hangs): reset it, so that the next attempt starts clean.
                with contextlib.suppress(Exception):
                    ray.shutdown()
                raise
            self._owns_connection = True
            log.info("connected to the Ray cluster at %s", self.prov.ray_address)
        self._adopt(ray)  # raises when the connection is not usable after all: the next attempt adopts again
        self._ray = ray
        return ray

    def _adopt(self, ray: Any) -> None:
        """Take over the instances a previous control plane started (named ``<prefix>-<role>-<n>`` in our Ray
        namespace and still alive): they count as ready, and are drained and stopped like our own."""
        adopted = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name, namespace = entry.get("name", ""), entry.get("namespace", "")
            role, _, number = name.removeprefix(f"{self.prefix}-").rpartition("-")
            if namespace != self.prov.ray_namespace or not name.startswith(f"{self.prefix}-") or not number.isdigit():
                continue
            if role not in ("interactive", "mixed", "batch") or name in self._actors:
                continue
            try:
                handle = ray.get_actor(name, namespace=namespace)
            except ValueError:  # gone since it was listed
                continue
            now = time.monotonic()
            with self._lock:
                self._counter = max(self._counter, int(number))
                # Ready already: no start-up sample (its start was not measured here).
                self._table[name] = ProvisionedInstance(name, role, requested_at=now, ready_at=now)
            self._actors[name] = _Actor(
                name, handle, exit_ref=handle.wait_stopped.remote(), where_ref=handle.where.remote()
            )
            adopted.append(name)
        if adopted:
            log.info("adopted %d running instance(s) from a previous control plane: %s", len(adopted), adopted)

    def _run(self) -> None:
        next_connect = 0.0
        while True:
            if self._ray is None and time.monotonic() >= next_connect and not self._closed.is_set():
                try:  # connect (and adopt) while idle, so that a start does not wait for it
                    self._connect()
                except Exception as exc:
                    next_connect = time.monotonic() + 5.0
                    log.warning(
                        "ray provisioner: cannot reach the Ray cluster at %s (retrying): %r", self.prov.ray_address, exc
                    )
            try:
                command, instance_id, role = self._commands.get(timeout=self.prov.ray_poll_s)
            except queue.Empty:
                command, instance_id, role = "", "", None
            try:
                if command == "close":
                    self._close_all()
                    return
                if command == "start" and role is not None:
                    self._create(instance_id, role)
                elif command == "stop":
                    self._begin_stop(instance_id)
            except Exception:
                log.exception("ray provisioner: %s %s failed", command, instance_id)
                if command == "start":
                    self._exited(instance_id)
            try:
                if self._actors:
                    self._poll()
            except Exception as exc:  # e.g. the Ray Client connection is down: try again next time
                if time.monotonic() - self._poll_failed_logged > 30:
                    self._poll_failed_logged = time.monotonic()
                    log.warning("ray provisioner: cannot check its actors (retrying; logged every 30 s): %r", exc)

    def _create(self, instance_id: str, role: InstanceRole) -> None:
        with self._lock:
            inst = self._table.get(instance_id)
            cancelled = inst is None or inst.stopping
        if cancelled:  # stopped before it was created
            self._exited(instance_id)
            return
        ray = self._connect()
        if self._actor_class is None:
            self._actor_class = ray.remote(RayEngineHost)
        handle = self._actor_class.options(**self.actor_options(instance_id, role)).remote(
            self.engine_settings(role), instance_id
        )
        self._actors[instance_id] = _Actor(
            instance_id,
            handle,
            exit_ref=handle.wait_stopped.remote(),
            where_ref=handle.where.remote(),
            shape=self.shape(role),
        )
        log.info("asked Ray for %s (%s): %s", instance_id, role, self.shape(role))

    def _begin_stop(self, instance_id: str) -> None:
        actor = self._actors.get(instance_id)
        if actor is None or actor.stop_phase:
            if actor is None:
                self._exited(instance_id)
            return
        if actor.where_ref is not None:  # not started yet: nothing to drain
            self._kill(actor, "stopped before it started")
            return
        actor.stop_phase = "drain"
        actor.stop_ref = actor.handle.drain.remote(self.stop_timeout_s)
        actor.stop_deadline = time.monotonic() + self.stop_timeout_s + 5

    def _poll(self) -> None:
        ray = self._ray
        now = time.monotonic()
        refs = [r for a in self._actors.values() for r in (a.where_ref, a.exit_ref, a.stop_ref) if r is not None]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # one round trip for all of them
        self._done = set(done)
        for actor in list(self._actors.values()):
            if actor.where_ref is not None and self._ready(actor.where_ref):
                try:
                    where = ray.get(actor.where_ref)
                except Exception as exc:
                    self._lost(actor, f"did not start: {exc}")
                    continue
                actor.where_ref = None
                actor.node_ip = str(where.get("node_ip", ""))
                with self._lock:
                    self._nodes[actor.instance_id] = actor.node_ip
                log.info(
                    "instance %s placed on Ray node %s (pid %s)", actor.instance_id, actor.node_ip, where.get("pid")
                )
            elif actor.where_ref is not None and not actor.warned_unplaced and now - actor.created_at > 60:
                # Pending placement (no node has the role's shape free; with KubeRay's autoscaler a pod may be
                # on its way) or a slow engine load: worth a line for the operator, once.
                actor.warned_unplaced = True
                log.warning(
                    "instance %s not started after 60 s: Ray has not placed it yet (is a node with %s free?) "
                    "or its engine is still loading",
                    actor.instance_id,
                    actor.shape,
                )
            if self._ready(actor.exit_ref):
                try:
                    ray.get(actor.exit_ref)
                except ray.exceptions.ActorUnavailableError:
                    # Unreachable for now (a network blip, or a node Ray has not declared dead yet): watch
                    # again. Drover does not wait for Ray's verdict: missed heartbeats already fail the
                    # instance's requests over, and the autoscaler plans without it.
                    actor.exit_ref = actor.handle.wait_stopped.remote()
                    continue
                except Exception as exc:  # ActorDiedError: its node or process is gone
                    if actor.stop_phase:
                        self._kill(actor, "died while stopping")
                    else:
                        self._lost(actor, str(exc).splitlines()[0] if str(exc) else repr(exc))
                    continue
                self._kill(actor, "shut down")
                continue
            if actor.stop_phase == "drain" and (self._ready(actor.stop_ref) or now > actor.stop_deadline):
                actor.stop_phase = "shutdown"
                actor.stop_ref = actor.handle.shutdown.remote()
                actor.stop_deadline = now + 30
            elif actor.stop_phase == "shutdown" and now > actor.stop_deadline:
                self._kill(actor, "shutdown timed out")

    def _ready(self, ref: Any) -> bool:
        """Finished at the last poll's ray.wait."""
        return ref in self._done

    def _kill(self, actor: _Actor, why: str) -> None:
        with contextlib.suppress(Exception):  # already dead: nothing to kill
            self._ray.kill(actor.handle, no_restart=True)
        self._actors.pop(actor.instance_id, None)
        self._exited(actor.instance_id)
        log.info("instance %s stopped (%s)", actor.instance_id, why)

    def _lost(self, actor: _Actor, why: str) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(actor.handle, no_restart=True)
        self._actors.pop(actor.instance_id, None)
        self._exited(actor.instance_id)
        log.warning("instance %s lost: its Ray actor died (%s)", actor.instance_id, why)

    def _close_all(self) -> None:
        """Control-plane shutdown: ask every engine to stop, wait a bounded time, kill what is left; with
        ``[provisioner] ray_stop_on_close = false`` leave them serving (the next leader adopts them)."""
        if self._ray is not None and not self.prov.ray_stop_on_close:
            log.info("leaving %d instance(s) running on Ray for the next control plane", len(self._actors))
            self._actors.clear()
        elif self._ray is not None:
            deadline = time.monotonic() + min(self.stop_timeout_s, 15.0)
            refs = []
            for actor in self._actors.values():
                with contextlib.suppress(Exception):
                    refs.append(actor.handle.shutdown.remote())
            with contextlib.suppress(Exception):
                if refs:
                    self._ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            for actor in list(self._actors.values()):
                self._kill(actor, "control plane shutdown")
        if self._ray is not None and self._owns_connection:
            with contextlib.suppress(Exception):
                self._ray.shutdown()
        with self._lock:
            for inst in self._table.values():
                inst.exited = True
