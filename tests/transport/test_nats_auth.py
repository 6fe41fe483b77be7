"""The pure parts of NATS security: the per-role permission map, connect options, generated configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from control.settings import NatsSettings, load_settings
from transport import subjects
from transport.nats_auth import (
    ClusterRoutes,
    NatsAuth,
    Role,
    ServerTls,
    UserSpec,
    connect_options,
    default_users,
    make_bundle,
    own_client_subjects,
    permission_map,
    role_permissions,
)
from transport.nats_server import find_nats_server_binary


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching (``*`` one token, ``>`` the rest)."""
    p, s = pattern.split("."), subject.split(".")
    for index, token in enumerate(p):
        if token == ">":
            return len(s) > index
        if index >= len(s) or (token != "*" and token != s[index]):
            return False
    return len(p) == len(s)


def _allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(_matches(p, subject) for p in patterns)


ADMIN_VERBS = ["migrate", "drain", "scale", "autoscale", "policy", "memory", "config", "a-verb-added-later"]


def test_client_role_is_minimal() -> None:
    perms = role_permissions(Role.CLIENT, client_id="alice")
    # v3: only its own submit/cancel/status/replay subjects; no JetStream API, no spans
    assert set(perms.publish) == set(own_client_subjects("alice"))
    assert set(own_client_subjects("alice")) == {
        subjects.submit("alice"),
        subjects.cancel("alice"),
        subjects.status("alice"),
        subjects.replay("alice"),
    }
    stream = subjects.OUTPUT_STREAM
    assert not _allowed(perms.publish, f"$JS.API.CONSUMER.CREATE.{stream}.n1.{subjects.client_inbox_prefix('alice')}.x")
    assert not _allowed(perms.publish, subjects.SPANS)
    assert not _allowed(perms.publish, subjects.SUBMIT) and not _allowed(perms.publish, subjects.submit("bob"))
    alice_inbox = subjects.client_inbox_prefix("alice")
    assert perms.subscribe == (alice_inbox + ".>", subjects.alive(alice_inbox) + ".>")
    assert perms.allow_responses  # it answers the liveness probes of its own requests
    assert _allowed(perms.subscribe, subjects.alive(alice_inbox + ".abc"))
    assert not _allowed(perms.subscribe, subjects.alive(subjects.client_inbox_prefix("bob") + ".abc"))
    for verb in ADMIN_VERBS:
        assert not _allowed(perms.publish, subjects.admin(verb))
    assert not _allowed(perms.subscribe, subjects.client_inbox_prefix("bob") + ".x")
    assert not _allowed(perms.subscribe, subjects.client_inbox_prefix("alice2") + ".x")
    assert not _allowed(perms.publish, subjects.engine("e1"))


def test_only_operators_reach_every_admin_subject() -> None:
    users = default_users(clients=["alice"], engines=["e1"])
    perms = permission_map(users)
    for verb in ADMIN_VERBS:
        subject = subjects.admin(verb)
        publishers = {name for name, p in perms.items() if _allowed(p.publish, subject)}
        # operators send them; a deposed control-plane leader may pass one on once to the new leader
        assert publishers == {"operator", "control"}, (verb, publishers)
        # the control plane serves them
        assert _allowed(perms["control"].subscribe, subject)


def test_engine_role() -> None:
    one = role_permissions(Role.ENGINE, instance_id="e1")
    assert _allowed(one.publish, subjects.client_inbox_prefix("anyone") + ".abc")
    assert _allowed(one.publish, subjects.ENGINE_EVENTS)
    assert _allowed(one.publish, subjects.heartbeat("e1"))
    assert not _allowed(one.publish, subjects.heartbeat("e2"))
    assert _allowed(one.publish, subjects.SPANS)  # ships its spans to the control plane's trace file
    assert one.subscribe == (subjects.engine("e1"), subjects.engine_inbox_prefix("e1") + ".>")
    assert not _allowed(one.subscribe, subjects.engine_inbox_prefix("e2") + ".x.y")
    assert one.allow_responses  # answers the migrator and the scheduler without _INBOX.> rights
    assert not any(p.startswith("$JS") or p.startswith("_INBOX") for p in one.publish + one.subscribe)
    shared = role_permissions(Role.ENGINE)
    assert _allowed(shared.subscribe, subjects.engine("e2"))
    assert _allowed(shared.subscribe, subjects.engine_inbox_prefix("e2") + ".x.y")
    assert not _allowed(shared.publish, subjects.SUBMIT)


def test_control_role_serves_clients_and_engines() -> None:
    perms = role_permissions(Role.CONTROL)
    for subject in (subjects.SUBMIT, subjects.CANCEL, subjects.heartbeat("e1"), subjects.ENGINE_EVENTS, subjects.SPANS):
        assert _allowed(perms.subscribe, subject)
    assert _allowed(perms.publish, subjects.engine("e1"))
    assert _allowed(perms.publish, "$JS.API.STREAM.CREATE.DROVER_OUTPUT")
    # it passes control messages on when it loses the lease, and relays audited admin answers via its inbox
    assert _allowed(perms.publish, subjects.admin("drain"))
    assert _allowed(perms.publish, "_INBOX.abc")
    assert not _allowed(perms.publish, subjects.heartbeat("e1"))  # never impersonates an engine


def test_spans_flow_from_engines_and_gateways_to_the_control_plane() -> None:
    perms = permission_map(default_users(clients=["alice"], engines=["e1"], gateways=["gw"]))
    publishers = {name for name, p in perms.items() if _allowed(p.publish, subjects.SPANS)}
    subscribers = {name for name, p in perms.items() if _allowed(p.subscribe, subjects.SPANS)}
    assert publishers == {"gw", "engine-e1"}  # engines and gateways ship their spans; plain clients may not
    assert subscribers == {"control"}  # nobody else reads every host's spans


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        role_permissions(Role.CLIENT)
    with pytest.raises(ValueError):
        role_permissions(Role.CLIENT, client_id="a.b")
    with pytest.raises(ValueError):
        permission_map([UserSpec("x", Role.CONTROL), UserSpec("x", Role.CONTROL)])


def test_connect_options() -> None:
    assert connect_options(None) == {}
    assert connect_options(NatsAuth(user="u", password="p")) == {"user": "u", "password": "p"}
    assert connect_options(NatsAuth(nkey_seed_file="/s.nk")) == {"nkeys_seed": "/s.nk"}
    assert "tls" not in connect_options(NatsAuth(tls_hostname="h"))


def test_settings_carry_auth_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROVER_NATS__NKEY_SEED_FILE", "/etc/drover/engine.nk")
    monkeypatch.setenv("DROVER_NATS__CLIENT_ID", "alice")
    s = load_settings()
    assert s.nats.auth().nkey_seed_file == "/etc/drover/engine.nk"
    assert s.nats.client_id == "alice"
    assert NatsSettings().auth() == NatsAuth()


@pytest.mark.parametrize("mode", ["nkey", "password"])
def test_generated_config_is_valid_for_nats_server(tmp_path: Path, mode: str) -> None:
    bundle = make_bundle(
        tmp_path,
        default_users(clients=["alice", "bob"], engines=["e1", "e2"]),
        mode=mode,  # type: ignore[arg-type]
        server_tls=ServerTls("/nonexistent/cert.pem", "/nonexistent/key.pem"),
        cluster=ClusterRoutes(routes=("nats-route://10.0.0.2:6222",), user="route", password="secret"),
    )
    # TLS files must exist for -t: drop that block, check the rest
    text = bundle.config_text.split("tls: {")[0] + "cluster: {" + bundle.config_text.split("cluster: {")[1]
    conf = tmp_path / "nats.conf"
    conf.write_text(f'port: -1\nserver_name: n1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n{text}')
    check = subprocess.run([find_nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    if mode == "nkey":
        seeds = sorted(p.name for p in tmp_path.glob("*.nk"))
        assert "alice.nk" in seeds and "engine-e1.nk" in seeds
        assert (tmp_path / "alice.nk").stat().st_mode & 0o077 == 0
        for cred in bundle.credentials:  # only public keys reach the server config
            assert cred.nkey_seed and cred.nkey_seed not in bundle.config_text
            assert cred.nkey_public and cred.nkey_public in bundle.config_text


def test_control_reply_user_publishes_only_to_client_inboxes() -> None:
    perms = permission_map(default_users(clients=["alice"]))["control-reply"]
    assert perms.publish == (subjects.INBOX_ROOT + ".>",) and perms.subscribe == ()
    assert perms.as_config()["subscribe"] == {"deny": [">"]}  # an empty allow list would allow everything
    for subject in ("$JS.API.STREAM.PURGE.DROVER_OUTPUT", "$KV.lease.leader", subjects.engine("e1"), "_INBOX.x"):
        assert not _allowed(perms.publish, subject)
