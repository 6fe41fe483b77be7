"""Supervision: a crashed child is restarted with backoff and its slot keeps working."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.supervisor import ActorSlot, GetStatus, SupervisedActor, SupervisorActor


class Echo(SupervisedActor):
    started = 0

    def on_start(self) -> None:
        Echo.started += 1

    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("injected crash")
        return ("echo", message)


class FailsInStart(SupervisedActor):
    def on_start(self) -> None:
        raise RuntimeError("cannot start")


@pytest.fixture
def supervisor() -> Iterator[pykka.ActorRef[Any]]:
    ref = SupervisorActor.start(backoff_initial_s=0.05, max_restarts=3, restart_window_s=60, check_interval_s=0.05)
    yield ref
    ref.stop()


def _wait(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_crashed_child_is_restarted_and_serves_again(supervisor: pykka.ActorRef[Any]) -> None:
    Echo.started = 0
    slot: ActorSlot = supervisor.proxy().start_child("echo", lambda p, n: Echo.start(p, n)).get()
    first = slot.ref
    assert slot.ask("hi") == ("echo", "hi")
    slot.tell("crash")  # tell: the exception stops the actor and calls on_failure
    _wait(lambda: slot.ref is not None and slot.ref is not first and slot.alive)
    assert slot.ask("again") == ("echo", "again")
    assert Echo.started == 2
    assert supervisor.ask(GetStatus()) == {"echo": "running"}


def test_child_failing_in_on_start_is_caught_by_the_liveness_check(supervisor: pykka.ActorRef[Any]) -> None:
    supervisor.proxy().start_child("bad", lambda p, n: FailsInStart.start(p, n)).get()
    _wait(lambda: supervisor.ask(GetStatus())["bad"] == "failed", timeout_s=10)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    sup = SupervisorActor(backoff_initial_s=0.1, backoff_max_s=0.5)
    from actors.supervisor import ChildRecord

    child = ChildRecord(slot=ActorSlot("x"), factory=lambda p, n: None)  # type: ignore[arg-type,return-value]
    delays = []
    for _ in range(5):
        child.failures.append(time.monotonic())
        delays.append(sup.restart_delay(child))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
