"""Bounds on shipped spans (``drover.v1.spans``) at the control plane, before they reach the trace file.

Only engines, gateways and the control plane may publish there (NATS permissions, transport/nats_auth.py); this
receiver also bounds what those send, so one faulty or compromised sender cannot grow the trace file without
limit: a batch holds at most ``MAX_SPANS_PER_BATCH`` spans (the wire bound), each at most ``max_span_bytes``
as JSON and nested at most ``MAX_NESTING_DEPTH`` deep, and all senders together at most ``spans_per_s``
(token bucket, ``burst`` deep). What is dropped is logged and counted (``drover_spans_dropped_total{reason}``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec

from observability.metrics import metrics
from transport.messages import MAX_NESTING_DEPTH, nesting_depth

log = logging.getLogger(__name__)

MAX_SPAN_BYTES = 16 * 1024
"""One span as JSON: a span with every Drover attribute is under 2 KiB."""
SPANS_PER_S = 2000.0
"""Spans a second from all senders together (a busy 16-engine cluster ships a few hundred)."""


@dataclass
class SpanBudget:
    """Which shipped spans to keep (pure: ``now`` is passed in)."""

    max_span_bytes: int = MAX_SPAN_BYTES
    spans_per_s: float = SPANS_PER_S
    burst: float = 2 * SPANS_PER_S
    _tokens: float = field(default=-1.0, repr=False)
    _at: float = field(default=0.0, repr=False)
    dropped: dict[str, int] = field(default_factory=dict)

    def admit(self, spans: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """The spans of one batch that fit the size, depth and rate bounds."""
        if self._tokens < 0:
            self._tokens, self._at = self.burst, now
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.spans_per_s)
        self._at = now
        kept: list[dict[str, Any]] = []
        for span in spans:
            if nesting_depth(span) > MAX_NESTING_DEPTH:
                self._drop("depth")
            elif len(msgspec.json.encode(span)) > self.max_span_bytes:
                self._drop("size")
            elif self._tokens < 1:
                self._drop("rate")
            else:
                self._tokens -= 1
                kept.append(span)
        return kept

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        metrics().spans_dropped(1, reason)
