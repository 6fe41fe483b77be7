"""Which thread owns a piece of state, said by its type rather than by a comment.

The live shell has three kinds of threads: each actor's own thread (pykka), the bus loop thread (asyncio,
owns the NATS connection; bus callbacks and per-request coroutines run there) and a few timer/heartbeat
threads. One thread owns each piece of state; where two must share one, it is :class:`Guarded`.

* :class:`LoopOwned`: state only the bus loop thread touches; reaching it from another thread raises.
* :class:`Guarded`: state two threads share; reachable only inside ``with guarded as value:`` (its lock).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from control.errors import DroverError

T = TypeVar("T")


class WrongThread(DroverError):
    """State was reached from a thread that does not own it (a bug: hand the work to the owner instead)."""

    default_code = "wrong_thread"


class LoopOwned(Generic[T]):
    """A value owned by the thread running ``loop``."""

    def __init__(self, value: T, loop: asyncio.AbstractEventLoop) -> None:
        self._value = value
        self._loop = loop

    @property
    def value(self) -> T:
        """The value; only on the loop's thread (a loop not running yet: any thread, as during set-up)."""
        if self._loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not self._loop:
                raise WrongThread(f"loop-owned state reached from thread {threading.current_thread().name}")
        return self._value


class Guarded(Generic[T]):
    """A value shared by threads; ``with guarded as value:`` holds its (re-entrant) lock."""

    def __init__(self, value: T) -> None:
        self._value = value
        self.lock = threading.RLock()

    @contextmanager
    def hold(self) -> Iterator[T]:
        with self.lock:
            yield self._value

    def __enter__(self) -> T:
        self.lock.acquire()
        return self._value

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
