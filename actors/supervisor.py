"""SupervisorActor: starts the control plane's actors, notices when one dies, restarts it with backoff.

pykka has no supervision, so we build it: every child is reached through an :class:`ActorSlot` (a stable
address: bus handlers tell the slot, the slot forwards to the child's current incarnation). A child reports
its own crash from ``on_failure``; a periodic liveness check also catches children that died in ``on_start``
(pykka calls neither ``on_failure`` nor ``on_stop`` then). Restarts back off exponentially, and a child that
fails more than ``max_restarts`` times inside ``restart_window_s`` is given up on (logged, shown in status).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pykka

log = logging.getLogger(__name__)


class ActorSlot:
    """A restartable actor's stable address."""

    def __init__(self, name: str) -> None:
        """Thread: the one that builds the control plane."""
        self.name = name
        self.ref: pykka.ActorRef[Any] | None = None
        self.dropped = 0

    def tell(self, message: Any) -> None:
        """Thread: any (a pykka tell is thread-safe; ``ref`` is swapped whole by the supervisor)."""
        ref = self.ref
        if ref is None:
            self.dropped += 1
            log.warning("actor %s is restarting: dropped %s", self.name, type(message).__name__)
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            self.dropped += 1
            log.warning("actor %s is dead: dropped %s", self.name, type(message).__name__)

    def ask(self, message: Any, timeout_s: float = 5.0) -> Any:
        """Thread: any but the slot's own actor's (it would wait for itself)."""
        ref = self.ref
        if ref is None:
            raise pykka.ActorDeadError(f"actor {self.name} is restarting")
        return ref.ask(message, timeout=timeout_s)

    @property
    def alive(self) -> bool:
        """Thread: any."""
        return self.ref is not None and self.ref.is_alive()


class SupervisedActor(pykka.ThreadingActor):
    """Base of actors a supervisor restarts: reports its own failure upward."""

    def __init__(self, supervisor: pykka.ActorRef[Any] | None = None, name: str = "") -> None:
        """Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__()
        self.supervisor = supervisor
        self.child_name = name or type(self).__name__

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Thread: the supervised actor's own thread."""
        log.error("actor %s failed: %r", self.child_name, exception_value)
        if self.supervisor is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                self.supervisor.tell(ChildFailed(self.child_name, repr(exception_value)))


@dataclass(frozen=True, slots=True)
class ChildFailed:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Restart:
    name: str


@dataclass(frozen=True, slots=True)
class _CheckChildren:
    pass


@dataclass(frozen=True, slots=True)
class GetStatus:
    pass


ChildFactory = Callable[[pykka.ActorRef[Any], str], pykka.ActorRef[Any]]


@dataclass(slots=True)
class ChildRecord:
    slot: ActorSlot
    factory: ChildFactory
    failures: deque[float] = field(default_factory=deque)
    state: str = "running"  # running | restarting | failed
    restarts: int = 0
    last_error: str = ""


class SupervisorActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_restarts: int = 10,
        restart_window_s: float = 60.0,
        check_interval_s: float = 0.5,
    ) -> None:
        """Thread: the one that builds the actor (before its own thread starts)."""
        super().__init__()
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.check_interval_s = check_interval_s
        self.children: dict[str, ChildRecord] = {}
        self._timers: list[threading.Timer] = []
        self._stopping = False

    # ------------------------------------------------------------------------------------------- public (ask)
    def start_child(self, name: str, factory: ChildFactory) -> ActorSlot:
        """Start ``factory(supervisor_ref, name)`` and supervise it; returns its stable slot.

        Thread: the supervisor actor's thread."""
        slot = ActorSlot(name)
        slot.ref = factory(self.actor_ref, name)
        self.children[name] = ChildRecord(slot=slot, factory=factory)
        return slot

    def on_start(self) -> None:
        """Thread: the supervisor actor's thread."""
        self._schedule(self.check_interval_s, _CheckChildren())

    def on_receive(self, message: Any) -> Any:
        """Thread: the supervisor actor's thread."""
        if isinstance(message, ChildFailed):
            self._on_child_failed(message.name, message.reason)
        elif isinstance(message, _Restart):
            self._restart(message.name)
        elif isinstance(message, _CheckChildren):
            for name, child in self.children.items():
                if child.state == "running" and not child.slot.alive:
                    self._on_child_failed(name, "actor stopped unexpectedly")
            self._schedule(self.check_interval_s, _CheckChildren())
        elif isinstance(message, GetStatus):
            return {name: child.state for name, child in self.children.items()}
        return None

    def on_stop(self) -> None:
        """Thread: the supervisor actor's thread."""
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        for child in self.children.values():
            ref = child.slot.ref
            if ref is not None and ref.is_alive():
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    ref.stop(timeout=5)

    # ------------------------------------------------------------------------------------------- restart logic
    def restart_delay(self, child: ChildRecord) -> float:
        """Thread: the supervisor actor's thread."""
        return min(self.backoff_max_s, self.backoff_initial_s * (2 ** max(0, len(child.failures) - 1)))

    def _on_child_failed(self, name: str, reason: str) -> None:
        """Thread: the supervisor actor's thread."""
        child = self.children.get(name)
        if child is None or child.state != "running":
            return
        now = time.monotonic()
        child.failures.append(now)
        while child.failures and now - child.failures[0] > self.restart_window_s:
            child.failures.popleft()
        child.last_error = reason
        if len(child.failures) > self.max_restarts:
            child.state = "failed"
            child.slot.ref = None
            log.error("actor %s failed %d times in %.0fs: giving up", name, len(child.failures), self.restart_window_s)
            return
        child.state = "restarting"
        child.slot.ref = None
        delay = self.restart_delay(child)
        log.warning("restarting actor %s in %.2fs (%s)", name, delay, reason)
        self._schedule(delay, _Restart(name))

    def _restart(self, name: str) -> None:
        """Thread: the supervisor actor's thread."""
        child = self.children[name]
        try:
            child.slot.ref = child.factory(self.actor_ref, name)
        except Exception as exc:
            child.state = "running"  # let the failure path count it and back off again
            self._on_child_failed(name, f"restart failed: {exc!r}")
            return
        child.state = "running"
        child.restarts += 1
        log.info("actor %s restarted (%d restarts)", name, child.restarts)

    def _schedule(self, delay_s: float, message: Any) -> None:
        """Thread: the supervisor actor's thread."""
        if self._stopping:
            return
        ref = self.actor_ref

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(message)

        timer = threading.Timer(delay_s, fire)
        timer.daemon = True
        timer.start()
        self._timers = [t for t in self._timers if t.is_alive()]
        self._timers.append(timer)
