"""Everything the control plane sends to a client goes through here: the target is checked to lie under the
sender's own inbox (the identity the NATS server authenticated, ``subjects.client_identity``) before anything
is published, and it is published over the client-bound connection (in secure mode a NATS user that may
publish only to client inboxes), never with the control role's JetStream and KV rights.

A refused target publishes nothing; it is logged and counted (``drover_replies_refused_total{what}``), and the
caller tells the sender where it can (the other of its two reply subjects, when that one passes).
"""

from __future__ import annotations

import logging

from observability.metrics import metrics
from transport import subjects
from transport.bus import Bus
from transport.messages import ErrorCode, ErrorReply, Message, error_version

log = logging.getLogger(__name__)


class ClientReplies:
    """Checked, least-privilege publishing to clients. ``bus``: the client-bound connection."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.refused = 0

    def allowed(self, identity: str, target: str, what: str) -> bool:
        """True when ``target`` lies under ``identity``'s own inbox; else log, count and return False."""
        if subjects.reply_target_allowed(identity, target):
            return True
        self.refused += 1
        metrics().reply_refused(what)
        log.warning("refused a %s reply of %r to %r: not under its own inbox", what, identity, target[:300])
        return False

    def publish(self, identity: str, target: str, message: Message, what: str) -> bool:
        if not target or not self.allowed(identity, target, what):
            return False
        self.bus.publish(target, message)
        return True

    async def apublish(self, identity: str, target: str, message: Message, what: str) -> bool:
        if not target or not self.allowed(identity, target, what):
            return False
        await self.bus.apublish(target, message)
        return True

    def error(
        self, identity: str, target: str | None, code: ErrorCode, text: str, request_id: str | None, what: str
    ) -> bool:
        """An ErrorReply at the oldest version that has ``code`` (every supported peer reads it)."""
        reply = ErrorReply(code=code, message=text, request_id=request_id, v=error_version(code))
        return self.publish(identity, target or "", reply, what)

    def first_allowed(self, identity: str, targets: list[str], what: str) -> list[str]:
        """The targets that pass (each refused one logged and counted), in order, without duplicates."""
        passed: list[str] = []
        for target in dict.fromkeys(t for t in targets if t):
            if self.allowed(identity, target, what):
                passed.append(target)
        return passed

    def to_owner(self, target: str, message: Message, what: str) -> bool:
        """Publish to a target stored with a request (checked when it was submitted): checked again against
        the inbox's owner, so a record restored from an older version cannot make us publish elsewhere."""
        return self.publish(owner_of(target), target, message, what)


def owner_of(target: str) -> str:
    """The identity an inbox belongs to, or ANONYMOUS (a target outside every client inbox)."""
    return subjects.inbox_owner(target) or subjects.ANONYMOUS
