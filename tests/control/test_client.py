"""The client's read-only questions (status, autoscale status, reading the policy) against a real nats-server:
asked again while no control plane answers, until the caller's timeout; commands are sent once.

Each test runs on a nats-server of its own module, so no control plane of another test answers here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from actors.leadership import LEASE_KEY, LeaseRecord
from actors.local_cluster import InProcessCluster
from control.client import DroverClient, DroverError, NoAnswerError
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer
from tests.waiting import wait_for
from transport import subjects
from transport.kv_store import open_bucket
from transport.messages import StatusQuery, StatusReply, encode
from transport.nats_server import EmbeddedNatsServer


@pytest.fixture(scope="module")
def quiet_url() -> Iterator[str]:
    """A nats-server (with JetStream) on which no control plane runs unless a test starts one."""
    with EmbeddedNatsServer() as server:
        yield server.url


@pytest.fixture
async def client(quiet_url: str) -> AsyncIterator[DroverClient]:
    async with DroverClient(quiet_url, name="reads") as c:
        yield c


def lone_control_plane(url: str, *, lease_ttl_s: float = 1.0, renew_period_s: float = 0.25) -> InProcessCluster:
    """One control plane (HA on, so it holds a lease of its own bucket) and no engines."""
    settings = load_settings(
        overrides={
            "nats": {"url": url},
            "ha": {"lease_ttl_s": lease_ttl_s, "renew_period_s": renew_period_s},
            "policy": {"migration_enabled": False},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    return cluster


class Silent:
    """A subscriber that takes requests on a subject and never answers (what a control plane that dropped
    them looks like to the client); counts what it got."""

    def __init__(self) -> None:
        self.received: list[Msg] = []
        self.nc: nats.NATS | None = None

    async def start(self, url: str, subject: str) -> Silent:
        async def on_message(msg: Msg) -> None:
            self.received.append(msg)

        self.nc = await nats.connect(url)
        await self.nc.subscribe(subject, cb=on_message)
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def test_status_started_before_the_control_plane_succeeds_once_it_runs(
    quiet_url: str, client: DroverClient
) -> None:
    asking = asyncio.get_running_loop().create_task(client.status(timeout_s=120))

    async def asked_again() -> bool:
        return client.read_retries >= 1

    await wait_for(asked_again, 60, "the status read to be asked again (no control plane yet)")
    assert not asking.done()  # still asking: nobody has answered
    cluster = await asyncio.to_thread(lone_control_plane, quiet_url)
    try:
        status = await asking
        assert isinstance(status, StatusReply)
        assert "scheduler" in status.actors
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.mark.parametrize(
    ("read", "subject"),
    [
        (lambda c: c.status(timeout_s=1.5), subjects.status("reads")),
        (lambda c: c.autoscale_status(timeout_s=1.5), subjects.admin("autoscale")),
        (lambda c: c.policy(timeout_s=1.5), subjects.admin("policy")),
    ],
    ids=["status", "autoscale_status", "policy"],
)
async def test_a_read_nobody_answers_fails_with_an_error_naming_the_tries(
    client: DroverClient, read: Callable[[DroverClient], Awaitable[object]], subject: str
) -> None:
    with pytest.raises(NoAnswerError) as failed:
        await read(client)
    error = failed.value
    assert isinstance(error, DroverError) and isinstance(error, TimeoutError)  # callers catching either go on
    assert error.code == "no_answer"
    assert error.tries >= 1
    assert error.message.startswith(f"no control plane answered {subject} in 1.5 s ({error.tries} tr")
    assert "with no responders" in error.message and "\n" not in error.message


async def test_a_read_left_unanswered_is_asked_again_until_the_timeout(quiet_url: str, client: DroverClient) -> None:
    silent = await Silent().start(quiet_url, subjects.status("reads"))
    try:
        with pytest.raises(NoAnswerError) as failed:
            await client.status(timeout_s=3.0)
        error = failed.value
        assert "unanswered" in error.message and "no responders" not in error.message

        async def every_try_arrived() -> bool:
            return len(silent.received) == error.tries

        await wait_for(every_try_arrived, 10, f"the {error.tries} tries the error names")
        assert len({msg.reply for msg in silent.received}) == 1  # one inbox: a late answer to any try counts
    finally:
        await silent.stop()


COMMANDS: list[tuple[str, Callable[[DroverClient], Awaitable[object]]]] = [
    ("migrate", lambda c: c.migrate("r-1", timeout_s=30)),
    ("drain", lambda c: c.drain("sim-0", timeout_s=30)),
    ("phase", lambda c: c.set_phase("sim-0", "decode", timeout_s=30)),
    ("memory", lambda c: c.memory("restore", "g-1", timeout_s=30)),
    ("policy", lambda c: c.policy({"migrate_threshold": "5"}, timeout_s=30)),
]


@pytest.mark.parametrize(("verb", "command"), COMMANDS, ids=[verb for verb, _ in COMMANDS])
async def test_a_command_fails_at_once_on_no_responders(
    client: DroverClient, verb: str, command: Callable[[DroverClient], Awaitable[object]]
) -> None:
    # NATS's own error, not NoAnswerError: the client did not go on asking for the 30 s it was given
    with pytest.raises(nats.errors.NoRespondersError):
        await command(client)
    assert client.read_retries == 0


async def test_a_command_left_unanswered_is_sent_once(quiet_url: str, client: DroverClient) -> None:
    silent = await Silent().start(quiet_url, subjects.admin("drain"))
    try:
        with pytest.raises(TimeoutError) as failed:
            await client.drain("sim-0", timeout_s=1.0)
        assert not isinstance(failed.value, NoAnswerError)

        async def arrived() -> bool:
            return len(silent.received) >= 1

        await wait_for(arrived, 10, "the drain command")
        assert silent.nc is not None
        await silent.nc.flush()
        assert len(silent.received) == 1
    finally:
        await silent.stop()


async def lease_gone(kv: KeyValue) -> bool:
    try:
        await kv.get(LEASE_KEY)
    except KeyNotFoundError:
        return True
    return False


async def test_status_survives_a_lone_control_plane_whose_loop_starved_past_its_lease(
    quiet_url: str, client: DroverClient, caplog: pytest.LogCaptureFixture
) -> None:
    """What CI saw with vLLM's processes hogging the CPU: the lone control plane's loop stalls past the lease
    TTL and its lease lapses (the bucket's TTL removes the key); what it is asked meanwhile it passes on for
    another leader (there is none) or, had it stepped down, nobody would be subscribed. It leads again a
    moment later; a status read asked during the stall gets its answer."""
    ttl_s = 1.0
    cluster = await asyncio.to_thread(lone_control_plane, quiet_url, lease_ttl_s=ttl_s)
    observer = await Silent().start(quiet_url, subjects.status("reads"))  # sees the query; never answers
    release = threading.Event()
    try:
        assert isinstance(await client.status(), StatusReply)  # leading
        assert cluster.control_bus is not None
        kv = await open_bucket(client.nc, cluster.settings.ha.lease_bucket, ttl_s=ttl_s, memory=True)
        stalled = threading.Event()

        def starve() -> None:  # the control plane's bus loop (lease renewal, its subscriptions) stops
            stalled.set()
            release.wait(60)

        caplog.set_level(logging.INFO, logger="actors")
        cluster.control_bus.loop.call_soon_threadsafe(starve)
        assert await asyncio.to_thread(stalled.wait, 30)
        await wait_for(lambda: lease_gone(kv), 30, "the stalled leader's lease to lapse")
        asking = asyncio.get_running_loop().create_task(client.status(timeout_s=30))

        async def asked() -> bool:
            return len(observer.received) >= 1

        await wait_for(asked, 30, "the status query to be sent while the loop is stalled")
        release.set()
        status = await asking
        assert isinstance(status, StatusReply)
        assert "scheduler" in status.actors
        lapsed = ("lease taken again", "stepping down")  # the leader found its lease gone (or stepped down)
        assert any(word in r.getMessage() for r in caplog.records for word in lapsed), [
            r.getMessage() for r in caplog.records
        ]
    finally:
        release.set()
        await observer.stop()
        await asyncio.to_thread(cluster.stop)


async def test_status_survives_the_lease_going_to_another_holder_and_back(quiet_url: str, client: DroverClient) -> None:
    """A lone leader that loses its lease steps down (leaves every subject: status gets "no responders"), and
    leads again once the other holder's lease lapses; a status read asked meanwhile gets its answer."""
    ttl_s = 1.0
    cluster = await asyncio.to_thread(lone_control_plane, quiet_url, lease_ttl_s=ttl_s)
    try:
        assert cluster.control is not None
        plane = cluster.control
        assert isinstance(await client.status(), StatusReply)
        kv = await open_bucket(client.nc, cluster.settings.ha.lease_bucket, ttl_s=ttl_s, memory=True)
        renewing = True

        async def other_holder() -> None:  # takes the lease and renews it while `renewing`, then vanishes
            while renewing:
                now = time.time()
                record = LeaseRecord(holder="elsewhere", host="nowhere", pid=1, acquired_at=now, renewed_at=now)
                await kv.put(LEASE_KEY, msgspec.msgpack.encode(record))
                await asyncio.sleep(ttl_s / 4)

        holder = asyncio.get_running_loop().create_task(other_holder())

        async def stepped_down() -> bool:  # it left the subjects: a plain request gets "no responders"
            try:
                await client.nc.request(subjects.status("reads"), encode(StatusQuery()), timeout=5)
            except nats.errors.NoRespondersError:
                return not plane.leading
            except TimeoutError:  # passed on while it steps down, and dropped
                return False
            return False

        await wait_for(stepped_down, 30, "the control plane to step down")
        asking = asyncio.get_running_loop().create_task(client.status(timeout_s=60))

        async def asked_again() -> bool:
            return client.read_retries >= 1

        await wait_for(asked_again, 30, "the status read to be asked again (no leader)")
        renewing = False
        await holder
        status = await asking
        assert isinstance(status, StatusReply)
        assert "scheduler" in status.actors
    finally:
        await asyncio.to_thread(cluster.stop)
