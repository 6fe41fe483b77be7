"""Every NATS subject Drover uses, in one place. Prefix ``drover.v1``: the subject space is versioned too."""

from __future__ import annotations

PREFIX = "drover.v1"

# Clients
SUBMIT = f"{PREFIX}.submit"  # SubmitRequest (queue group: control planes)
CANCEL = f"{PREFIX}.cancel"  # Cancel
# Client inboxes live under drover.v1.inbox.<client_id>: a JetStream stream keeps what is sent there
# (tokens, acks, errors) for a bounded time, so failover and client resume can read what was produced, and
# subject permissions can restrict each client to its own prefix.
INBOX_ROOT = f"{PREFIX}.inbox"
OUTPUT_STREAM = "DROVER_OUTPUT"


def client_inbox_prefix(client_id: str) -> str:
    return f"{INBOX_ROOT}.{validate_token(client_id)}"


ALIVE_ROOT = f"{PREFIX}.alive"
# An engine's own request replies (the PubAck of its JetStream publish of a final reply): its connection's
# inbox prefix, drover.v1.engine_reply.<instance_id>, so its permissions name only that (not _INBOX.>).
ENGINE_REPLY_ROOT = f"{PREFIX}.engine_reply"


def engine_inbox_prefix(instance_id: str) -> str:
    return f"{ENGINE_REPLY_ROOT}.{validate_token(instance_id)}"


def alive(reply_to: str) -> str:
    """Where a client that asked for liveness answers probes: ``drover.v1.alive.<inbox without
    drover.v1.inbox.>``. Not under the inbox root on purpose: the output stream captures that root, and
    JetStream would ack a probe sent there, so a gone client would look alive."""
    root = INBOX_ROOT + "."
    return f"{ALIVE_ROOT}.{reply_to.removeprefix(root)}"


# Control plane
CONTROL_QUEUE = "drover-control"
ENGINE_EVENTS = f"{PREFIX}.engine_events"  # EngineRequestEnded from every engine
HEARTBEATS = f"{PREFIX}.heartbeat"  # heartbeat.<instance_id>
ADMIN = f"{PREFIX}.admin"  # admin.<verb> request/reply
SPANS = f"{PREFIX}.spans"  # SpanBatch from engines and gateways (observability.ship_to_control)


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
