"""Every NATS subject Drover uses, in one place. Prefix ``drover.v1``: the subject space is versioned too."""

from __future__ import annotations

PREFIX = "drover.v1"

# Clients
SUBMIT = f"{PREFIX}.submit"  # SubmitRequest (queue group: control planes)
CANCEL = f"{PREFIX}.cancel"  # Cancel
CLIENT_INBOX_PREFIX = "_INBOX"  # nats-py default; per-client prefixes are set with inbox_prefix

# Control plane
CONTROL_QUEUE = "drover-control"
ENGINE_EVENTS = f"{PREFIX}.engine_events"  # EngineRequestEnded from every engine
HEARTBEATS = f"{PREFIX}.heartbeat"  # heartbeat.<instance_id>
ADMIN = f"{PREFIX}.admin"  # admin.<verb> request/reply


def heartbeat(instance_id: str) -> str:
    return f"{HEARTBEATS}.{instance_id}"


def engine(instance_id: str) -> str:
    """Commands for one instance: EngineAdd, EngineAbort, migration control."""
    return f"{PREFIX}.engine.{instance_id}"


def admin(verb: str) -> str:
    return f"{ADMIN}.{verb}"


def kv_data(instance_id: str) -> str:
    """KV-block data plane endpoint of one instance (chunked transfer)."""
    return f"{PREFIX}.kv.{instance_id}"


def migrator() -> str:
    return f"{PREFIX}.migrator"


def validate_token(token: str) -> str:
    """Reject ids that would break subject structure (wildcards, separators, whitespace)."""
    if not token or any(ch in token for ch in ".*> \t\r\n") or len(token) > 128:
        raise ValueError(f"invalid subject token {token!r}")
    return token
