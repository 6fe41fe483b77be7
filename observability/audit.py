"""The audit log: one JSON line per admin action (who, what, when, result), to a file and the log.

A record::

    {"ts": "2026-11-25T15:50:01.123Z", "operator": "alice", "command": "drain",
     "params": {"instance_id": "sim-0", "undo": false}, "ok": true, "result": "draining sim-0: 2 requests to move",
     "subject": "drover.v1.admin.drain", "duration_s": 0.002, "details": {...}}

The file is opened in append mode for each record (so log rotation by rename just works) under a lock
(several bus handlers may finish at once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("drover.audit")


def _timestamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


class AuditLog:
    """Writes audit records to ``path`` (JSON lines; None or "": the log only) and to the ``drover.audit`` logger."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        *,
        operator: str,
        command: str,
        params: dict[str, Any],
        ok: bool,
        result: str,
        at: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Append one record (``at``: when the command arrived, epoch seconds) and return it."""
        entry: dict[str, Any] = {
            "ts": _timestamp(at if at is not None else time.time()),
            "operator": operator or "unknown",
            "command": command,
            "params": params,
            "ok": ok,
            "result": result,
            **{k: v for k, v in extra.items() if k not in ("ts", "operator", "command", "params", "ok", "result")},
        }
        line = json.dumps(entry, default=str)
        log.info("audit %s", line)
        if self.path is not None:
            with self._lock:
                try:
                    with self.path.open("a", encoding="utf-8") as handle:
                        handle.write(line + "\n")
                except OSError as exc:  # a full disk must not take admin commands down with it
                    log.error("audit file %s not written: %s", self.path, exc)
        return entry


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """Every record of an audit file, oldest first."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
