"""A record of the control core's decisions, in the order a shell asked for them.

A shell that is given a :class:`DecisionLog` appends each decision with the inputs it was made from. Parity
tests record a live run (the actors over a real NATS server) and replay the inputs through the core as the
simulator's shell drives it: identical inputs must give identical decisions. Without a log nothing is kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    what: str  # which decision: "first_reservation", "grow_reservation", "after_stage", ...
    key: str  # what it was about (a migration's request id, ...)
    inputs: tuple[object, ...]
    output: object


class DecisionLog:
    """Append-only and thread-safe: live decisions come from several migrations' coroutines at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Decision] = []

    def add(self, what: str, key: str, inputs: tuple[object, ...], output: object) -> None:
        with self._lock:
            self._entries.append(Decision(what, key, inputs, output))

    def entries(self) -> list[Decision]:
        with self._lock:
            return list(self._entries)
