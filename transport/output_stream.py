"""The output stream: a JetStream stream over every client inbox (``drover.v1.inbox.>``).

Engines publish tokens straight to the client's inbox with core NATS (no extra hop, no ack on the token
path); the server also stores them in this stream, bounded by age and bytes. When an engine dies, the
control plane reads back what a request's client was sent (its chunks, by index) and resumes it elsewhere
from exactly there; a client that reconnects can replay its inbox the same way.
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from transport import subjects
from transport.js_read import read_stored
from transport.messages import ProtocolError, RequestDone, TokenChunk, decode

log = logging.getLogger(__name__)


async def ensure_output_stream(nc: NatsClient, *, max_age_s: float, max_bytes: int, replicas: int = 1) -> bool:
    """Create (or update) the output stream; False when JetStream is not available."""
    config = StreamConfig(
        name=subjects.OUTPUT_STREAM,
        subjects=[f"{subjects.INBOX_ROOT}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.MEMORY,
        max_age=max_age_s,
        max_bytes=max_bytes,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )
    js = nc.jetstream(timeout=5)
    try:
        try:
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
        return True
    except Exception as exc:  # no JetStream, or no permission: failover degrades to clear errors
        log.warning("output stream unavailable (%s): failover cannot resume streams", exc)
        return False


async def read_subject(nc: NatsClient, subject: str) -> list[bytes]:
    """Every stored message on ``subject`` (oldest first), with a consumer deleted after the read
    (``transport/js_read.py``)."""
    return [msg.data for msg in await read_stored(nc, subjects.OUTPUT_STREAM, subject)]


async def delivered_tokens(nc: NatsClient, reply_to: str, request_id: str) -> tuple[list[int], bool]:
    """The tokens a request's client was sent, in order without gaps, and whether it already ended."""
    chunks: dict[int, list[int]] = {}
    finished = False
    for data in await read_subject(nc, reply_to):
        try:
            message = decode(data)
        except ProtocolError:
            continue
        if isinstance(message, TokenChunk) and message.request_id == request_id:
            chunks[message.index] = message.token_ids
        elif isinstance(message, RequestDone) and message.request_id == request_id:
            finished = True
    tokens: list[int] = []
    for index in sorted(chunks):
        if index > len(tokens):
            break  # a gap: what follows cannot be trusted to continue from here
        tokens.extend(chunks[index][len(tokens) - index :])
    return tokens, finished
