"""Every NATS subject Drover uses, in one place. Prefix ``drover.v1``: the subject space is versioned too.

Since protocol version 3, clients publish on subjects that end in their identity (``drover.v1.submit.<id>``,
``cancel.<id>``, ``admin.status.<id>``, ``replay.<id>``): in secure mode each NATS user may publish only on
its own, so the control plane reads *who* sent a message from the subject the server let it through on, never
from a message field (docs/security.md). The version-2 subjects without an identity still work: their sender
is :data:`ANONYMOUS` (in secure mode no client may publish there)."""

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


# ---------------------------------------------------------------------------------- identity (protocol v3)
ANONYMOUS = "anonymous"
"""The identity of a message on a version-2 subject (no identity token): unauthenticated local mode."""
REPLAY = f"{PREFIX}.replay"  # ReplayRequest: the control plane reads a client's inbox back for it (v3)
STATUS = f"{PREFIX}.admin.status"  # StatusQuery (read-only admin verb clients may use)
CLIENT_ROOTS = (SUBMIT, CANCEL, STATUS, REPLAY)
"""Subjects clients publish on; each also exists as ``<root>.<identity>`` (v3)."""
ANONYMOUS_REPLY_ROOTS = (INBOX_ROOT + ".", "_INBOX.", f"{PREFIX}.engine_reply.")
"""Where replies to an :data:`ANONYMOUS` sender may go: any client inbox, nats-py's default inbox, or an
engine's own reply inbox (its readiness check asks for the status)."""


def submit(identity: str) -> str:
    return f"{SUBMIT}.{validate_token(identity)}"


def cancel(identity: str) -> str:
    return f"{CANCEL}.{validate_token(identity)}"


def status(identity: str) -> str:
    return f"{STATUS}.{validate_token(identity)}"


def replay(identity: str) -> str:
    return f"{REPLAY}.{validate_token(identity)}"


def client_identity(subject: str) -> str | None:
    """Who sent a message received on ``subject``: the identity token of a v3 client subject, ANONYMOUS on a
    v2 client subject, None when ``subject`` is no client subject (engine, admin and internal subjects)."""
    for root in CLIENT_ROOTS:
        if subject == root:
            return ANONYMOUS
        if subject.startswith(root + "."):
            rest = subject[len(root) + 1 :]
            return rest if rest and "." not in rest else None
    return None


def reply_target_allowed(identity: str, target: str) -> bool:
    """May Drover publish a reply for ``identity`` to ``target``? Only under that identity's own inbox
    (``drover.v1.inbox.<identity>.``); an ANONYMOUS sender's replies only under a client inbox root. Never a
    wildcard, never a JetStream, KV, engine or control subject."""
    if not target or len(target) > MAX_SUBJECT_LENGTH or any(ch in target for ch in "*> \t\r\n"):
        return False
    if ".." in target or target.endswith("."):
        return False
    if identity == ANONYMOUS:
        return target.startswith(ANONYMOUS_REPLY_ROOTS)
    return target.startswith(f"{INBOX_ROOT}.{identity}.")


def is_client_reply_target(target: str) -> bool:
    """Does ``target`` lie in a client's inbox (its owner's, or an anonymous sender's reply roots)? What an
    engine checks before it streams to the ``reply_to`` of an EngineAdd."""
    return reply_target_allowed(inbox_owner(target) or ANONYMOUS, target)


def inbox_owner(inbox: str) -> str | None:
    """The identity whose inbox ``inbox`` is (``drover.v1.inbox.<identity>.…``), or None."""
    root = INBOX_ROOT + "."
    if not inbox.startswith(root):
        return None
    owner = inbox[len(root) :].split(".", 1)[0]
    return owner or None


MAX_SUBJECT_LENGTH = 256
"""Longest reply subject Drover accepts from a client (also the wire bound on ``reply_to``)."""


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
