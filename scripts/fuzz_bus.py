"""Fuzz every subject Drover listens on with malformed, truncated, oversized and wrong-typed messages while
well-formed requests run, then check: every fuzz message with a reply subject got an ErrorReply (or a
well-formed answer), no actor died, and every well-formed request completed with all its tokens.

    python -m scripts.fuzz_bus [--messages 10000] [--seed 0]

Runs a real nats-server, an in-process control plane and two simulated engines (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time

import msgspec

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import ProtocolError, SamplingParams, SubmitRequest, decode, encode
from transport.nats_server import EmbeddedNatsServer

KINDS = [
    "submit",
    "cancel",
    "engine_add",
    "engine_abort",
    "heartbeat",
    "status_query",
    "migrate",
    "drain",
    "policy_update",
    "migrate_out",
    "migrate_in",
    "chunk",
    "done",
    "nope",
    "",
]
FIELDS = [
    "v",
    "request_id",
    "reply_to",
    "prompt",
    "prompt_token_ids",
    "sampling",
    "cancel_token",
    "info",
    "load",
    "instance_id",
    "op",
    "migration_id",
    "changes",
    "index",
    "token_ids",
    "num_blocks",
    "priority",
]


def random_value(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.randint(-(2**63), 2**63 - 1)
    if choice == 3:
        return rng.random() * 10 ** rng.randint(-5, 12)
    if choice == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    if choice == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(FIELDS): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def fuzz_payload(rng: random.Random, valid: bytes) -> bytes:
    """One malformed message: random bytes, a truncated valid one, wrong-typed fields, or an oversized one."""
    mode = rng.randrange(5)
    if mode == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if mode == 1:
        return valid[: rng.randrange(0, max(1, len(valid)))]
    if mode == 2:
        fields = {rng.choice(FIELDS): random_value(rng) for _ in range(rng.randrange(0, 8))}
        return msgspec.msgpack.encode({"kind": rng.choice(KINDS), **fields})
    if mode == 3:
        return msgspec.msgpack.encode({"kind": "submit", "v": 1, "reply_to": "x", "prompt": "A" * 600_000})
    flipped = bytearray(valid)
    for _ in range(rng.randrange(1, 6)):
        if flipped:
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return bytes(flipped)


def decodes(payload: bytes) -> bool:
    """A flipped byte can leave a message valid; its answers then go where its own reply_to says."""
    try:
        decode(payload)
    except ProtocolError:
        return False
    return True


async def run(messages: int, seed: int, verbose: bool = False) -> int:
    rng = random.Random(seed)
    server = EmbeddedNatsServer()
    url = server.start()
    settings = load_settings(
        overrides={"nats": {"url": url}, "engine": {"heartbeat_interval_s": 0.1}, "observability": {"exporter": "none"}}
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    await asyncio.to_thread(cluster.start_control)
    for name in ("fz-a", "fz-b"):
        await asyncio.to_thread(cluster.add_engine, MigratableSimEngine(name, time_scale=0.1))
    valid = encode(SubmitRequest(reply_to="_INBOX.fuzz", prompt="hello", sampling=SamplingParams(max_tokens=4)))
    targets = [
        subjects.SUBMIT,
        subjects.CANCEL,
        subjects.ENGINE_EVENTS,
        subjects.heartbeat("fz-a"),
        subjects.engine("fz-a"),
        subjects.engine("fz-b"),
        subjects.admin("status"),
        subjects.admin("migrate"),
        subjects.admin("drain"),
        subjects.admin("policy"),
        subjects.admin("scale"),
        subjects.admin("autoscale"),
    ]
    failures = 0
    try:
        async with DroverClient(url, name="fuzz-good") as good, DroverClient(url, name="fuzz-bad") as bad:
            await good.wait_for_instances(2, timeout_s=10)
            streams = [
                await good.submit(f"well-formed {i}", sampling=SamplingParams(max_tokens=64, ignore_eos=True))
                for i in range(8)
            ]
            replies = answered = 0
            started = time.perf_counter()
            for n in range(messages):
                target = targets[n % len(targets)]
                payload = fuzz_payload(rng, valid)
                if n % 4 == 0 and not decodes(payload):  # invalid, by request/reply: an error reply must come
                    replies += 1
                    try:
                        reply = await bad.nc.request(target, payload, timeout=2)
                        decode(reply.data)  # an ErrorReply, or a real answer to a message that was valid
                        answered += 1
                    except Exception as exc:  # timeout, no responders, payload too large
                        if "MaxPayload" not in type(exc).__name__ and "maximum payload" not in str(exc):
                            failures += 1
                            if verbose:
                                print(f"unanswered on {target}: {type(exc).__name__} {payload[:80]!r}")
                else:
                    with contextlib.suppress(Exception):  # the client refuses oversized payloads itself
                        await bad.nc.publish(target, payload)
            elapsed = time.perf_counter() - started
            results = [await s.result() for s in streams]
            complete = sum(1 for r in results if len(r.token_ids) == 64)
            status = await good.status()
            actors_ok = all(state == "running" for state in status.actors.values())
            print(
                f"fuzz messages: {messages} in {elapsed:.1f} s ({messages / elapsed:.0f}/s); "
                f"request/reply fuzz: {answered}/{replies} answered, {failures} unanswered"
            )
            print(
                f"well-formed requests complete: {complete}/{len(streams)}; actors: {status.actors}; "
                f"instances serving: {sum(1 for i in status.instances if i.state == 'serving')}/2"
            )
            ok = failures == 0 and complete == len(streams) and actors_ok
            print("summary:", "PASS" if ok else "FAIL")
            return 0 if ok else 1
    finally:
        await asyncio.to_thread(cluster.stop)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="Print each unanswered message.")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.messages, args.seed, args.verbose)))


if __name__ == "__main__":
    main()
