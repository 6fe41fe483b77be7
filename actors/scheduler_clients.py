"""What clients send the scheduler: a submission (checked, admitted, stored, acknowledged) and a cancel.

Identity is what the NATS server authenticated (the subject it let the message through on), never a message
field, and replies go only to targets under the sender's own inbox (``actors/client_replies.py``). Whether a
submission is well formed and within the limits is the control core's decision (``control/core/
admission.py``); :class:`ClientRequests` gathers its inputs and carries it out. Everything here runs on the
scheduler actor's thread; an acknowledged submission comes back to the actor as :class:`Acknowledged`, and
the actor hands it to the dispatch loop (``actors/dispatching.py``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from actors.client_replies import ClientReplies
from actors.control_state import ControlState
from actors.dispatching import Placements
from actors.scheduler_ends import RequestEnds
from actors.scheduler_instances import InstanceRegistry
from control.core.admission import decide, max_prompt_tokens, validate
from control.core.dispatch import Dispatcher
from control.core.requests import RequestRecord, RequestTable
from control.settings import Settings
from engines.tokenizer import Tokenizer
from observability.metrics import metrics
from transport import subjects
from transport.bus import Bus, Envelope
from transport.messages import (
    Accepted,
    Cancel,
    CancelAck,
    EngineAbort,
    ErrorCode,
    RequestDone,
    SubmitRequest,
    Usage,
    peer_version,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """A submission's record is stored and its Accepted sent: it may be dispatched."""

    request_id: str


class ClientRequests:
    """Submissions and cancels (see the module docstring).

    Collaborators: the bus (engine aborts), ``replies`` (checked client-bound publishing), the settings, the
    ``tokenizer``, the request table (``requests``), the instance ``registry``, the core's ``dispatch`` loop
    (its queues, for admission), ``placements`` (would a request start now), the state store (``state``), the
    ``ends`` (a request cancelled while it waits is forgotten) and ``tell(message)``, which hands a message to the
    scheduler actor from another thread (:class:`Acknowledged`, once the record is stored)."""

    def __init__(
        self,
        bus: Bus,
        replies: ClientReplies,
        settings: Settings,
        tokenizer: Tokenizer,
        requests: RequestTable[RequestRecord],
        registry: InstanceRegistry,
        dispatch: Dispatcher,
        placements: Placements,
        state: ControlState,
        ends: RequestEnds,
        tell: Callable[[object], None],
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.bus = bus
        self.replies = replies
        self.settings = settings
        self.tokenizer = tokenizer
        self.requests = requests
        self.registry = registry
        self.dispatch = dispatch
        self.placements = placements
        self.state = state
        self.ends = ends
        self.tell = tell

    def max_prompt_tokens(self, model: str) -> int:
        """The core's rule (``control/core/admission.py``) over the instances serving ``model``.

        Thread: the scheduler actor's thread."""
        instances = self.registry.records.values()
        lengths = [r.info.max_model_len for r in instances if not model or r.info.model == model]
        return max_prompt_tokens(self.settings.limits.max_prompt_tokens, lengths, self.settings.model.max_model_len)

    def on_submit(self, submit: SubmitRequest, envelope: Envelope) -> None:
        """Check, admit, store and acknowledge a submission (or refuse it with a reason).

        Thread: the scheduler actor's thread."""
        # Who sent it is what the NATS server authenticated (the subject it let through), not client_id.
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        reply_to = submit.reply_to or envelope.reply
        if not reply_to:
            log.warning("submit without reply subject dropped")
            return
        # Only targets under the sender's own inbox are ever published to (refusals logged and counted).
        targets = self.replies.first_allowed(identity, [reply_to, envelope.reply], "submit")

        def refuse(code: ErrorCode, text: str, request_id: str | None) -> None:
            # Errors go to the reply_to inbox and, when the sender used NATS request/reply, to that too.
            for target in targets:
                self.replies.error(identity, target, code, text, request_id, "submit")

        if reply_to not in targets:
            where = f"{subjects.INBOX_ROOT}.{identity}." if identity != subjects.ANONYMOUS else subjects.INBOX_ROOT
            refuse(ErrorCode.INVALID_REQUEST, f"reply_to must lie under your own inbox {where}", submit.request_id)
            return
        if identity != subjects.ANONYMOUS and submit.client_id != identity:
            submit = msgspec.structs.replace(submit, client_id=identity)  # limits count the server's identity

        reason = validate(submit)  # the core: control/core/admission.py
        if reason is not None:
            metrics().request_finished(ErrorCode.INVALID_REQUEST, str(submit.request_class))
            refuse(ErrorCode.INVALID_REQUEST, reason, submit.request_id)
            return
        request_id = submit.request_id or uuid.uuid4().hex
        finished = self.requests.finished.get(request_id)
        if finished is not None and finished.reply_to == reply_to:  # a retry (same inbox) of a finished request
            refuse(
                ErrorCode.DUPLICATE_REQUEST,
                f"request {request_id} already ran; its output stays in the "
                "output stream for reliability.output_retention_s (resume_from)",
                request_id,
            )
            return
        existing = self.requests.get(request_id)
        if existing is not None:
            if existing.submit.reply_to == reply_to:  # a client retry: acknowledge again, run once
                self.replies.publish(
                    identity,
                    reply_to,
                    Accepted(
                        request_id=request_id,
                        cancel_token=existing.cancel_token,
                        prompt_tokens=len(existing.prompt_token_ids),
                        v=peer_version(submit.v),
                    ),
                    "submit",
                )
            else:
                refuse(ErrorCode.DUPLICATE_REQUEST, f"request id {request_id} is in use", request_id)
            return
        token_ids = (
            list(submit.prompt_token_ids)
            if submit.prompt_token_ids is not None
            else self.tokenizer.encode(submit.prompt or "")
        )
        decision = decide(  # the limits: control/core/admission.py
            self.settings,
            self.requests,
            self.dispatch.queued,
            submit,
            reply_to,
            len(token_ids),
            max_prompt_tokens=self.max_prompt_tokens(submit.model or ""),
            no_room=lambda: not self.placements.fits_now(request_id, token_ids, submit),
        )
        if not decision.admitted:
            code = ErrorCode(decision.verdict.value)
            metrics().request_finished(code, str(submit.request_class))
            refuse(code, decision.reason, request_id)
            return
        record = RequestRecord(
            submit=submit,
            request_id=request_id,
            cancel_token=secrets.token_urlsafe(16),
            prompt_token_ids=token_ids,
            arrival=time.time(),
            headers=envelope.headers,
        )
        self.requests[request_id] = record
        accepted = Accepted(
            request_id=request_id,
            cancel_token=record.cancel_token,
            prompt_tokens=len(token_ids),
            v=peer_version(submit.v),
        )
        self.state.save_request(record)  # acknowledged once stored: a retry after a restart is still deduplicated

        def acknowledge() -> None:
            # Accepted goes out before the request is dispatched, so no token can reach the client before it.
            self.replies.publish(identity, reply_to, accepted, "submit")
            self.tell(Acknowledged(request_id))

        self.state.after_writes(acknowledge)

    def on_cancel(self, cancel: Cancel, envelope: Envelope) -> None:
        """Cancel a request of the sender's own: a queued one ends here, a running one at its engine.

        Thread: the scheduler actor's thread."""
        identity = subjects.client_identity(envelope.subject) or subjects.ANONYMOUS
        target = cancel.reply_to or envelope.reply
        if target and not self.replies.allowed(identity, target, "cancel"):
            # nothing is published there; the sender hears why on its NATS reply subject when that one is its own
            if envelope.reply != target:
                self.replies.error(
                    identity,
                    envelope.reply,
                    ErrorCode.INVALID_REQUEST,
                    "reply_to must lie under your own inbox",
                    cancel.request_id,
                    "cancel",
                )
            return
        record = self.requests.get(cancel.request_id)
        # A wrong token, or another identity's request, gets the same answer as an unknown id: ids of other
        # clients reveal nothing.
        foreign = (
            record is not None
            and identity != subjects.ANONYMOUS
            and subjects.inbox_owner(record.submit.reply_to) != identity
        )
        if record is None or foreign or not hmac.compare_digest(record.cancel_token, cancel.cancel_token):
            self.replies.error(
                identity,
                target,
                ErrorCode.UNKNOWN_REQUEST,
                f"no request {cancel.request_id} to cancel",
                cancel.request_id,
                "cancel",
            )
            return
        assert record is not None
        if record.state == "queued":
            self.ends.forget(cancel.request_id)
            self.replies.to_owner(
                record.submit.reply_to,
                RequestDone(
                    request_id=cancel.request_id,
                    finish_reason="abort",
                    usage=Usage(prompt_tokens=len(record.prompt_token_ids), completion_tokens=0),
                    v=peer_version(record.submit.v),
                ),
                "cancel",
            )
        elif record.instance_id is not None:
            version = self.registry.version(record.instance_id)
            self.bus.publish(subjects.engine(record.instance_id), EngineAbort(request_id=cancel.request_id, v=version))
        if target:
            self.replies.publish(
                identity, target, CancelAck(request_id=cancel.request_id, v=peer_version(cancel.v)), "cancel"
            )
