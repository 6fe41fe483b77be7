"""NATS security against real nats-servers started with generated configs: every role can do its job (a full
request through a sim-engine cluster with auth on), and every denial shows (permissions violations, bad
credentials refused, TLS verified)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from actors.local_cluster import InProcessCluster
from control.client import PERMISSION_DENIED, DroverClient, DroverError
from control.settings import NatsSettings, load_settings
from engines.tokenizer import ByteTokenizer
from transport import subjects
from transport.messages import Cancel, ErrorCode, MigrateCommand, StatusQuery, encode
from transport.nats_auth import (
    NatsAuth,
    Role,
    SecureBundle,
    ServerTls,
    UserSpec,
    connect_options,
    default_users,
    make_bundle,
    new_nkey,
)
from transport.nats_server import EmbeddedNatsServer


# ------------------------------------------------------------------------------------------------ helpers
class Conn:
    """A raw nats-py connection that records the errors the server sends (permissions violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, url: str, auth: NatsAuth | None, **extra: Any) -> Conn:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            url,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
            **connect_options(auth),
            **extra,
        )
        return self

    async def violation(self, fragment: str, timeout_s: float = 3.0) -> str:
        """Wait for the server's permissions violation naming ``fragment``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for error in self.errors:
                if "permissions violation" in error.lower() and fragment.lower() in error.lower():
                    return error
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {fragment!r}; errors: {self.errors}")

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


def nats_settings(bundle: SecureBundle, user: str, url: str) -> NatsSettings:
    spec = bundle.user(user)
    return NatsSettings(url=url, client_id=spec.client_id, **dataclasses.asdict(bundle.auth[user]))


async def refused(url: str, auth: NatsAuth | None, **extra: Any) -> list[str]:
    """Connect and expect the server to refuse; the errors seen."""
    conn = Conn()
    with pytest.raises(Exception) as info:  # nats-py raises NoServersError or the auth/TLS error itself
        await conn.open(url, auth, max_reconnect_attempts=0, **extra)
    await conn.close()
    return [*conn.errors, repr(info.value)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedNatsServer, SecureBundle]]:
    """A JetStream server with nkey users: control, operator, clients alice and bob, a shared engine user."""
    bundle = make_bundle(tmp_path_factory.mktemp("nats-auth"), default_users(clients=["alice", "bob"]))
    server = EmbeddedNatsServer(config_text=bundle.config_text)
    server.start()
    yield server, bundle
    server.stop()


@pytest.fixture(scope="module")
def secure_cluster(secure: tuple[EmbeddedNatsServer, SecureBundle]) -> Iterator[InProcessCluster]:
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    server, bundle = secure
    settings = load_settings(
        overrides={"nats": {"url": server.url}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
    )
    cluster = InProcessCluster(
        settings=settings,
        tokenizer=ByteTokenizer(),
        control_auth=bundle.auth["control"],
        engine_auth=bundle.auth["engine"],
        reply_auth=bundle.auth["control-reply"],
    )
    cluster.start_control()
    for index in range(2):
        cluster.add_engine(SimEngine(f"sim-{index}", time_scale=1.0, max_model_len=1024))  # type: ignore[arg-type]
    yield cluster
    cluster.stop()


@pytest.fixture
async def alice(
    secure: tuple[EmbeddedNatsServer, SecureBundle], secure_cluster: InProcessCluster
) -> AsyncIterator[DroverClient]:
    server, bundle = secure
    client = await DroverClient(
        server.url, name="alice-app", nats_settings=nats_settings(bundle, "alice", server.url)
    ).connect()
    await client.wait_for_instances(2, timeout_s=15)
    yield client
    await client.close()


# ------------------------------------------------------------------------------------------------ allowed
async def test_full_request_with_auth_on(alice: DroverClient) -> None:
    assert alice.inbox_prefix == subjects.client_inbox_prefix("alice")
    result = await alice.generate("hello secure drover", max_tokens=10)
    assert len(result.token_ids) == 10
    assert result.done is not None and result.done.finish_reason == "length"


async def test_client_cancels_its_own_request(alice: DroverClient) -> None:
    stream = await alice.submit("a long one", max_tokens=1000)
    async for _ in stream.events():
        await stream.cancel()
        break
    await stream.result()
    assert stream.result_data.done is not None and stream.result_data.done.finish_reason == "abort"


async def test_engine_tokens_reach_the_output_stream(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    """Engines publish tokens with core NATS only; the control plane reads them back from JetStream."""
    from transport.output_stream import delivered_tokens

    server, bundle = secure
    stream = await alice.submit("durable", max_tokens=6, request_id="durable-1")
    result = await stream.result()
    control = await Conn().open(server.url, bundle.auth["control"])
    try:
        tokens, finished = await delivered_tokens(control.nc, f"{alice.inbox_prefix}.>", "durable-1")
    finally:
        await control.close()
    assert tokens == result.token_ids
    assert finished


async def test_engine_stores_a_final_reply_with_a_jetstream_publish(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    """Engines store the final RequestDone in the output stream with a JetStream publish: the PubAck comes
    back on their own reply prefix, which engine credentials may read (and nothing else's)."""
    server, bundle = secure
    prefix = subjects.engine_inbox_prefix("sim-0")
    engine = await Conn().open(server.url, bundle.auth["engine"], inbox_prefix=prefix)
    try:
        ack = await engine.nc.jetstream(timeout=5).publish(f"{alice.inbox_prefix}.stored-final", b"done")
        assert ack.stream == subjects.OUTPUT_STREAM
        await engine.nc.subscribe("_INBOX.>")  # other connections' replies stay out of reach
        await engine.violation("_INBOX.>")
    finally:
        await engine.close()


async def test_operator_may_use_admin_commands(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    server, bundle = secure
    async with DroverClient(server.url, name="ops", nats_settings=nats_settings(bundle, "operator", server.url)) as op:
        policy = await op.policy()
        assert "dispatch_policy" in policy
        reply = await op.drain("sim-1", undo=True)  # an admin command that changes the cluster
        assert reply.ok


# ------------------------------------------------------------------------------------------------ denied
@pytest.mark.parametrize("verb", ["migrate", "drain", "policy", "scale", "autoscale", "memory", "config", "later"])
async def test_client_may_not_publish_admin_subjects(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient, verb: str
) -> None:
    server, bundle = secure
    conn = await Conn().open(server.url, bundle.auth["alice"], inbox_prefix=subjects.client_inbox_prefix("alice"))
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await conn.nc.request(subjects.admin(verb), encode(MigrateCommand(request_id="x")), timeout=0.5)
        await conn.violation(subjects.admin(verb))
        # status is read-only: allowed, on the client's own status subject (protocol v3)
        reply = await conn.nc.request(subjects.status("alice"), encode(StatusQuery()), timeout=5)
        assert reply.data
    finally:
        await conn.close()


async def test_client_cannot_read_another_clients_inbox(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    server, bundle = secure
    bob = await Conn().open(server.url, bundle.auth["bob"])
    try:
        got: list[bytes] = []

        async def grab(msg: Any) -> None:
            got.append(msg.data)

        for subject in (f"{alice.inbox_prefix}.>", f"{subjects.INBOX_ROOT}.>", ">"):
            await bob.nc.subscribe(subject, cb=grab)
            await bob.violation(subject)
        # bob cannot forge tokens into alice's inbox either, nor command an engine or read submissions
        await bob.nc.publish(f"{alice.inbox_prefix}.forged", b"x")
        await bob.violation(f"{alice.inbox_prefix}.forged")
        await bob.nc.publish(subjects.engine("sim-0"), b"x")
        await bob.violation(subjects.engine("sim-0"))
        await bob.nc.subscribe(subjects.SUBMIT, cb=grab)
        await bob.violation(subjects.SUBMIT)
        await bob.nc.publish(subjects.heartbeat("fake"), b"x")
        await bob.violation(subjects.heartbeat("fake"))
        await alice.generate("private", max_tokens=4)
        assert got == []
    finally:
        await bob.close()


async def test_cancel_needs_the_cancel_token(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    server, bundle = secure
    stream = await alice.submit("guarded", max_tokens=500)
    accepted = await stream.accepted
    async with DroverClient(server.url, name="bob", nats_settings=nats_settings(bundle, "bob", server.url)) as bob:
        with pytest.raises(DroverError) as wrong:
            await bob.cancel(accepted.request_id, "guessed-token")
        with pytest.raises(DroverError) as unknown:
            await bob.cancel("no-such-request", "guessed-token")
    assert wrong.value.code == unknown.value.code == ErrorCode.UNKNOWN_REQUEST
    assert wrong.value.message.replace(accepted.request_id, "ID") == unknown.value.message.replace(
        "no-such-request", "ID"
    )
    await stream.cancel()  # the owner, with the token
    await stream.result()
    assert stream.result_data.done is not None and stream.result_data.done.finish_reason == "abort"


async def test_engine_credentials_are_not_operator_credentials(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    server, bundle = secure
    engine = await Conn().open(server.url, bundle.auth["engine"])
    try:
        await engine.nc.publish(subjects.admin("drain"), b"x")
        await engine.violation(subjects.admin("drain"))
        await engine.nc.subscribe(subjects.SUBMIT)
        await engine.violation(subjects.SUBMIT)
        await engine.nc.publish(subjects.CANCEL, encode(Cancel(request_id="r", cancel_token="t")))
        await engine.violation(subjects.CANCEL)
        await engine.nc.publish("$JS.API.STREAM.LIST", b"")
        await engine.violation("$JS.API.STREAM.LIST")
    finally:
        await engine.close()


async def test_unknown_nkey_and_anonymous_are_refused(
    secure: tuple[EmbeddedNatsServer, SecureBundle], tmp_path: Path
) -> None:
    server, _ = secure
    seed, _public = new_nkey()
    seed_file = tmp_path / "stranger.nk"
    seed_file.write_text(seed)
    errors = await refused(server.url, NatsAuth(nkey_seed_file=str(seed_file)))
    assert any("authorization violation" in e.lower() for e in errors), errors
    errors = await refused(server.url, None)
    assert any("authorization violation" in e.lower() for e in errors), errors


async def test_password_users(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_users(clients=["carol"]), mode="password")
    with EmbeddedNatsServer(config_text=bundle.config_text) as server:
        good = await Conn().open(server.url, bundle.auth["carol"])
        await good.close()
        errors = await refused(server.url, NatsAuth(user="carol", password="wrong"))
        assert any("authorization violation" in e.lower() for e in errors), errors
        # a user's password does not open another user
        errors = await refused(server.url, NatsAuth(user="operator", password=bundle.auth["carol"].password))
        assert any("authorization violation" in e.lower() for e in errors), errors


# ------------------------------------------------------------------------------------------------ TLS
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert (all from the CA), and a stranger CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("drover-test-ca", ca_key, None, ca=True)
    server_key, client_key, other_key = _key(), _key(), _key()
    other = _cert("stranger-ca", other_key, None, ca=True)
    return {
        "ca": _write_cert(ca, d / "ca.pem"),
        "server_cert": _write_cert(_cert("nats", server_key, (ca, ca_key)), d / "server.pem"),
        "server_key": _write_key(server_key, d / "server-key.pem"),
        "client_cert": _write_cert(_cert("drover-client", client_key, (ca, ca_key)), d / "client.pem"),
        "client_key": _write_key(client_key, d / "client-key.pem"),
        "other_ca": _write_cert(other, d / "other-ca.pem"),
    }


def _tls_bundle(tmp_path: Path, pki: dict[str, str], *, verify: bool) -> SecureBundle:
    return make_bundle(
        tmp_path / "auth",
        [UserSpec("alice", Role.CLIENT, client_id="alice")],
        mode="password",
        server_tls=ServerTls(pki["server_cert"], pki["server_key"], ca_file=pki["ca"], verify=verify),
        client_tls=NatsAuth(tls_ca_file=pki["ca"]),
    )


async def test_tls_server_is_verified(tmp_path: Path, pki: dict[str, str]) -> None:
    bundle = _tls_bundle(tmp_path, pki, verify=False)
    with EmbeddedNatsServer(config_text=bundle.config_text) as server:
        good = await Conn().open(server.url, bundle.auth["alice"])
        assert good.nc.connected_url is not None
        await good.nc.publish(subjects.submit("alice"), b"")  # allowed subject over TLS
        await good.nc.flush()
        await good.close()
        alice = bundle.auth["alice"]
        # a client that does not trust the server's CA refuses the server
        stranger_ca = dataclasses.replace(alice, tls_ca_file=pki["other_ca"])
        errors = await refused(server.url, stranger_ca)
        assert any("certificate verify failed" in e for e in errors), errors
        # a client without the CA (system CAs only) refuses the server too
        errors = await refused(server.url, dataclasses.replace(alice, tls_ca_file=None))
        assert any("certificate verify failed" in e for e in errors), errors


async def test_tls_client_certificates_when_required(tmp_path: Path, pki: dict[str, str]) -> None:
    bundle = _tls_bundle(tmp_path, pki, verify=True)
    alice = bundle.auth["alice"]
    with EmbeddedNatsServer(config_text=bundle.config_text) as server:
        with_cert = dataclasses.replace(alice, tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"])
        good = await Conn().open(server.url, with_cert)
        await good.close()
        errors = await refused(server.url, alice)  # no client certificate: the server ends the handshake
        # how the end shows depends on when the client next writes: lost, reset, broken pipe or a TLS alert
        ended = ("connection lost", "certificate", "broken pipe", "connection reset")
        assert any(word in e.lower() for e in errors for word in ended), errors


async def test_client_library_reports_denials_clearly(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    server, bundle = secure
    with pytest.raises(DroverError) as denied:
        await alice.drain("sim-0", timeout_s=1.0)
    assert denied.value.code == PERMISSION_DENIED
    assert "operator credentials" in denied.value.message
    # credentials of alice with another client id: the inbox check refuses at connect
    wrong = nats_settings(bundle, "alice", server.url).model_copy(update={"client_id": "bob"})
    with pytest.raises(DroverError) as inbox:
        await DroverClient(server.url, nats_settings=wrong).connect()
    assert inbox.value.code == PERMISSION_DENIED and "client_id" in inbox.value.message


async def test_gateway_with_client_credentials(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    import httpx

    from control.apps.gateway.server import GatewayThread
    from control.gateway_settings import GatewaySettings

    server, bundle = secure
    gateway = GatewayThread(
        GatewaySettings(port=0, client_name="gw"), server.url, nats_settings=nats_settings(bundle, "alice", server.url)
    )
    gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            models = await http.get("/v1/models")  # needs the read-only status
            assert models.status_code == 200, models.text
            body = {"model": models.json()["data"][0]["id"], "prompt": "via the gateway", "max_tokens": 5}
            completion = await http.post("/v1/completions", json=body)
            assert completion.status_code == 200, completion.text
            assert completion.json()["usage"]["completion_tokens"] == 5
    finally:
        gateway.stop()


async def test_client_resumes_its_own_stream_but_not_anothers(
    secure: tuple[EmbeddedNatsServer, SecureBundle], alice: DroverClient
) -> None:
    """resume_from replays the client's own inbox from JetStream; consumers over another inbox are refused."""
    from transport.output_stream import read_subject

    server, bundle = secure
    first = await alice.submit("resume me", max_tokens=8, request_id="resume-secure-1")
    full = await first.result()
    again = await DroverClient(
        server.url, name="alice-app", nats_settings=nats_settings(bundle, "alice", server.url)
    ).connect()
    try:
        resumed = await again.resume("resume-secure-1", first.inbox, resume_from=3)
        rest = await resumed.result()
        assert rest.token_ids[-5:] == full.token_ids[3:] and len(full.token_ids) == 8
    finally:
        await again.close()
    bob = await Conn().open(server.url, bundle.auth["bob"])
    try:
        with pytest.raises(Exception):  # noqa: B017 - nats-py reports the refused JetStream API call as a timeout
            await asyncio.wait_for(read_subject(bob.nc, f"{alice.inbox_prefix}.>"), timeout=10)
        await bob.violation(f"$JS.API.CONSUMER.CREATE.{subjects.OUTPUT_STREAM}")
    finally:
        await bob.close()
