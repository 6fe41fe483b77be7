"""Read what a JetStream stream holds on a subject, once, with a consumer that is gone afterwards.

Both one-off reads of the control plane go through here: a failover's or a replay's read of a client's output
(every message on one inbox) and a new leader's read of the state bucket (the last value of every key).

Why not nats-py's ``pull_subscribe`` or a KV ``watchall``:
- **Their consumers outlive the read.** Neither deletes its ephemeral consumer on unsubscribe; the server does
  after the consumer's inactivity threshold (minutes), and a stream takes at most about 1,000 consumers, so a
  burst of failovers or client replays made every later read of the output stream fail with "maximum
  consumers limit reached" (measured: the 1,000th read in a row). Here each read deletes its consumer, and a
  short inactivity threshold is the backstop if the delete is lost with the connection.
- **A watch's end-of-initial-values marker can come first.** nats-py sends it when the consumer reports
  nothing pending and its subscription has received nothing yet, which is also true while the messages are
  still on the wire. A new leader then read an empty bucket and started with empty tables. Here the end is a
  count: the consumer's pending messages when it was created.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

CONSUMER_IDLE_S = 30.0
"""The server deletes a read's consumer after this long without a pull, where the read's own delete was lost
(a dropped connection): long enough for a slow read on a loaded host, short enough that lost ones cannot pile
up to the stream's consumer limit."""


async def read_stored(
    nc: NatsClient,
    stream: str,
    subject: str,
    *,
    last_per_subject: bool = False,
    batch: int = 512,
    idle_s: float = 0.5,
    timeout_s: float = 5.0,
) -> list[Msg]:
    """The messages ``stream`` held on ``subject`` (wildcards allowed) when the read began, oldest first:
    all of them, or the last one of each subject. Newer ones are left out. A message that ages out during
    the read is missed after ``idle_s`` without one."""
    js = nc.jetstream(timeout=timeout_s)
    config = ConsumerConfig(
        filter_subject=subject,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,  # a one-off read: nothing to redeliver
        inactive_threshold=CONSUMER_IDLE_S,
        mem_storage=True,
    )
    info = await js.add_consumer(stream, config=config)
    name = info.name or ""  # the server names every consumer it creates
    messages: list[Msg] = []
    try:
        expected = info.num_pending or 0
        if expected:
            sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
            loop = asyncio.get_running_loop()
            unavailable_until = loop.time() + timeout_s
            try:
                while len(messages) < expected:
                    try:
                        fetched = await sub.fetch(batch=min(batch, expected - len(messages)), timeout=idle_s)
                    except (TimeoutError, NatsTimeoutError):
                        break
                    except ServiceUnavailableError:
                        # No responder for the pull yet: on a clustered stream the new consumer is replicated
                        # and answers once its group has elected a leader (seen in CI on a 3-node cluster).
                        if loop.time() >= unavailable_until:
                            raise
                        await asyncio.sleep(0.1)
                        continue
                    messages.extend(fetched)
            finally:
                await sub.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except Exception as exc:  # the server deletes it after CONSUMER_IDLE_S
            log.debug("consumer %s of %s not deleted: %r", name, stream, exc)
    return messages
