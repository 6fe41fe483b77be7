"""NATS security: per-role subject permissions, client connection options (user/password, nkeys, TLS),
generated credentials and the matching ``nats-server`` configuration.

Roles and what each may do (the permission map, :func:`role_permissions`, is a pure function so it is
unit-tested; tests/transport/test_nats_security.py shows every denial against a real server):

- **client** (a user of the cluster): submit, cancel (only with its cancel token), read the cluster status and
  replay its inbox, each on its *own* subject (``drover.v1.submit.<client_id>`` ...: the control plane takes
  the identity from the subject, protocol v3), and read only its own inbox ``drover.v1.inbox.<client_id>.>``
  (its token streams and its request/reply answers; nats-py's ``inbox_prefix`` puts reply inboxes there too).
  No JetStream API at all (no consumers of its own: the control plane replays for it) and no spans.
- **gateway** (the OpenAI gateway): a client that may also ship spans.
- **control-reply**: the control plane's client-bound connection: publishes only to client inboxes,
  subscribes to nothing (docs/security.md, "least privilege").
- **engine**: publish tokens to client inboxes (the output stream captures them; no JetStream API needed:
  the final reply is also a JetStream publish to the inbox subject, whose PubAck comes back on the engine's
  own reply prefix ``drover.v1.engine_reply.<instance>``), engine events and its heartbeat; receive commands
  on its own ``drover.v1.engine.<instance>`` subject; answer the requests it receives (``allow_responses``:
  EngineAdd acknowledgements, migration steps) instead of publishing to every ``_INBOX``.
- **control** (control plane): take submissions, cancels, heartbeats, engine events and admin commands;
  command engines; answer clients; JetStream (the output stream, KV state) and its own ``_INBOX`` replies.
- **operator**: what a client may do, plus every admin subject (``drover.v1.admin.>``, so admin verbs added
  later are covered) and the cluster's event/heartbeat feeds (``drover top``, ``drover metrics``).
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from transport import subjects


class Role(StrEnum):
    CLIENT = "client"
    ENGINE = "engine"
    CONTROL = "control"
    OPERATOR = "operator"
    GATEWAY = "gateway"  # a client that may also ship spans
    CONTROL_REPLY = "control-reply"  # the control plane's client-bound connection


CONTROL_REPLY_USER = "control-reply"
"""The control plane's client-bound user (publishes only to client inboxes)."""

ACCOUNT = "DROVER"
"""The one NATS account every Drover user lives in (JetStream enabled)."""

READ_ONLY_ADMIN_VERBS = ("status",)
"""Admin verbs that change nothing: clients may use them (the gateway's /v1/models, waiting for instances).
Every other verb under ``drover.v1.admin.>`` is operator-only."""

JETSTREAM_SUBJECTS = ("$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>")
"""JetStream API, acks, flow control and KV puts: the control plane's output stream and state."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a NATS user may publish to and subscribe to (allow lists; anything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests it received, whatever their reply subject

    def as_config(self) -> dict[str, Any]:
        """The ``permissions`` block of a nats-server user (no subscribe subject: deny every one, since an
        empty allow list would allow all)."""
        block: dict[str, Any] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]},
        }
        if self.allow_responses:
            block["allow_responses"] = True
        return block


def own_client_subjects(client_id: str) -> tuple[str, ...]:
    """What a client publishes on (protocol v3): submit, cancel, status and replay, each on its own subject
    that ends in its id; only this user may publish there, which is how the control plane knows who sent it."""
    return (
        subjects.submit(client_id),
        subjects.cancel(client_id),
        subjects.status(client_id),
        subjects.replay(client_id),
    )


def role_permissions(role: Role, *, client_id: str | None = None, instance_id: str | None = None) -> Permissions:
    """The minimal permissions of ``role``.

    ``client_id`` (client and operator roles): whose inbox (``drover.v1.inbox.<client_id>``) the user reads;
    required for those roles. ``instance_id`` (engine role): the one instance these credentials serve; None
    gives a credential shared by every engine (``drover.v1.engine.*``).
    """
    if role in (Role.CLIENT, Role.GATEWAY, Role.OPERATOR):
        if not client_id:
            raise ValueError(f"the {role} role needs a client_id (its inbox)")
        inbox = subjects.client_inbox_prefix(client_id) + ".>"
        # its requests' liveness probes (drover.v1.alive.<client_id>.>), answered on the prober's reply subject
        alive = subjects.alive(subjects.client_inbox_prefix(client_id)) + ".>"
        own = own_client_subjects(client_id)
        if role in (Role.CLIENT, Role.GATEWAY):
            spans = (subjects.SPANS,) if role is Role.GATEWAY else ()
            return Permissions(publish=(*own, *spans), subscribe=(inbox, alive), allow_responses=True)
        return Permissions(
            publish=(*own, subjects.ADMIN + ".>"),
            subscribe=(inbox, alive, subjects.ENGINE_EVENTS, subjects.heartbeat("*")),
            allow_responses=True,
        )
    if role is Role.CONTROL_REPLY:
        return Permissions(publish=(subjects.INBOX_ROOT + ".>",), subscribe=())
    if role is Role.ENGINE:
        target = subjects.validate_token(instance_id) if instance_id else "*"
        return Permissions(
            publish=(subjects.INBOX_ROOT + ".>", subjects.ENGINE_EVENTS, subjects.heartbeat(target), subjects.SPANS),
            # its own replies: the PubAck of the JetStream publish that stores a final reply
            subscribe=(subjects.engine(target), f"{subjects.ENGINE_REPLY_ROOT}.{target}.>"),
            allow_responses=True,
        )
    if role is Role.CONTROL:
        return Permissions(
            publish=(
                subjects.INBOX_ROOT + ".>",
                subjects.engine("*"),
                *JETSTREAM_SUBJECTS,
                "_INBOX.>",  # replies to its own inbox: the admin audit relays the scheduler's answers
                # a deposed leader passes control messages on once to whoever leads now (control/leadership)
                subjects.SUBMIT,
                subjects.CANCEL,
                subjects.SUBMIT + ".>",
                subjects.CANCEL + ".>",
                subjects.ADMIN + ".>",
                subjects.ALIVE_ROOT + ".>",  # liveness probes of clients' requests (actors/request_lifecycle)
            ),
            subscribe=(
                subjects.SUBMIT,
                subjects.CANCEL,
                subjects.SUBMIT + ".*",
                subjects.CANCEL + ".*",
                subjects.REPLAY + ".*",
                subjects.heartbeat("*"),
                subjects.ENGINE_EVENTS,
                subjects.ADMIN + ".>",
                subjects.SPANS,  # spans shipped by engines and gateways, for its trace file
                "_INBOX.>",  # its request replies, JetStream API answers and pull deliveries
            ),
            allow_responses=True,
        )
    raise ValueError(f"unknown role {role!r}")


@dataclass(frozen=True, slots=True)
class UserSpec:
    """One NATS user: a login ``name`` with a role (and the client or instance id it is bound to)."""

    name: str
    role: Role
    client_id: str | None = None
    instance_id: str | None = None

    @property
    def permissions(self) -> Permissions:
        return role_permissions(self.role, client_id=self.client_id, instance_id=self.instance_id)


def permission_map(users: Iterable[UserSpec]) -> dict[str, Permissions]:
    """User name -> permissions (names must be unique)."""
    result: dict[str, Permissions] = {}
    for user in users:
        if user.name in result:
            raise ValueError(f"duplicate NATS user {user.name!r}")
        result[user.name] = user.permissions
    return result


def default_users(
    *,
    clients: Sequence[str] = ("client",),
    engines: Sequence[str] = (),
    operator: str = "operator",
    gateways: Sequence[str] = (),
) -> list[UserSpec]:
    """A control-plane user (and its client-bound ``control-reply`` user), one operator, one user per client
    id, and engine users: one per instance id in ``engines``, or one shared ``engine`` user (every instance)
    when ``engines`` is empty."""
    users = [
        UserSpec("control", Role.CONTROL),
        UserSpec(CONTROL_REPLY_USER, Role.CONTROL_REPLY),
        UserSpec(operator, Role.OPERATOR, client_id=operator),
    ]
    users += [UserSpec(client, Role.CLIENT, client_id=client) for client in clients]
    users += [UserSpec(gateway, Role.GATEWAY, client_id=gateway) for gateway in gateways]
    if engines:
        users += [UserSpec(f"engine-{iid}", Role.ENGINE, instance_id=iid) for iid in engines]
    else:
        users.append(UserSpec("engine", Role.ENGINE))
    permission_map(users)  # validates names and ids
    return users


# ------------------------------------------------------------------------------------------ client side
@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How a process authenticates to NATS and verifies the server (all optional)."""

    user: str | None = None
    password: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None


def tls_context(auth: NatsAuth) -> ssl.SSLContext | None:
    """A client TLS context verifying the server (with ``tls_ca_file``, else the system CAs) and presenting
    a client certificate when one is configured; None when no TLS setting is given."""
    if not (auth.tls_ca_file or auth.tls_cert_file):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=auth.tls_ca_file)
    if auth.tls_cert_file:
        context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
    return context


def connect_options(auth: NatsAuth | None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` carrying ``auth``."""
    if auth is None:
        return {}
    options: dict[str, Any] = {}
    if auth.user:
        options["user"] = auth.user
        options["password"] = auth.password or ""
    if auth.nkey_seed_file:
        options["nkeys_seed"] = auth.nkey_seed_file
    if auth.creds_file:
        options["user_credentials"] = auth.creds_file
    context = tls_context(auth)
    if context is not None:
        options["tls"] = context
    if auth.tls_hostname:
        options["tls_hostname"] = auth.tls_hostname
    return options


# ------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True, slots=True)
class Credential:
    """Generated secret of one user: a password, or an nkey (seed kept by the user, public key by the server)."""

    user: UserSpec
    password: str | None = None
    nkey_seed: str | None = None
    nkey_public: str | None = None


def new_nkey() -> tuple[str, str]:
    """A fresh user nkey: (seed, public key)."""
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def generate_credentials(users: Iterable[UserSpec], mode: Literal["nkey", "password"] = "nkey") -> list[Credential]:
    """A new secret per user: nkeys (the server stores only public keys) or random passwords."""
    result = []
    for user in users:
        if mode == "nkey":
            seed, public = new_nkey()
            result.append(Credential(user, nkey_seed=seed, nkey_public=public))
        elif mode == "password":
            result.append(Credential(user, password=secrets.token_urlsafe(24)))
        else:
            raise ValueError(f"unknown credential mode {mode!r}")
    return result


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's TLS block: its certificate and key; ``ca_file`` + ``verify`` require client certificates."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    verify: bool = False


@dataclass(frozen=True, slots=True)
class ClusterRoutes:
    """A nats-server cluster block: this node's route listener and its peers (``nats-route://host:port``)."""

    name: str = "drover"
    listen: str = "0.0.0.0:6222"
    routes: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = None


def _value(value: Any, indent: int) -> str:
    """Render a value in nats-server config syntax (a JSON superset: quoted strings keep ``$JS`` literal)."""
    pad = "  " * indent
    if isinstance(value, dict):
        inner = "\n".join(f"{pad}  {key}: {_value(item, indent + 1)}" for key, item in value.items())
        return "{\n" + inner + f"\n{pad}}}"
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            inner = "\n".join(f"{pad}  {_value(item, indent + 1)}" for item in value)
            return "[\n" + inner + f"\n{pad}]"
        return "[" + ", ".join(_value(item, indent) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def accounts_config(credentials: Iterable[Credential], *, account: str = ACCOUNT) -> str:
    """The ``accounts`` block: one JetStream-enabled account with every user and its permissions (the same
    on every node of a cluster)."""
    users: list[dict[str, Any]] = []
    for cred in credentials:
        entry: dict[str, Any] = {}
        if cred.nkey_public:
            entry["nkey"] = cred.nkey_public
        else:
            entry["user"] = cred.user.name
            entry["password"] = cred.password or ""
        entry["permissions"] = cred.user.permissions.as_config()
        users.append(entry)
    return f"accounts: {_value({account: {'jetstream': 'enabled', 'users': users}}, 0)}\n"


def tls_config(tls: ServerTls) -> str:
    """The server's ``tls`` block (clients must use TLS; with ``verify``, also present a certificate)."""
    block: dict[str, Any] = {"cert_file": tls.cert_file, "key_file": tls.key_file, "timeout": 2}
    if tls.ca_file:
        block["ca_file"] = tls.ca_file
    if tls.verify:
        block["verify"] = True
    return f"tls: {_value(block, 0)}\n"


def cluster_config(cluster: ClusterRoutes) -> str:
    """The ``cluster`` block: route listener, route credentials and peers."""
    block: dict[str, Any] = {"name": cluster.name, "listen": cluster.listen}
    if cluster.user:
        block["authorization"] = {"user": cluster.user, "password": cluster.password or ""}
    if cluster.routes:
        block["routes"] = list(cluster.routes)
    return f"cluster: {_value(block, 0)}\n"


def server_config(
    credentials: Iterable[Credential],
    *,
    tls: ServerTls | None = None,
    cluster: ClusterRoutes | None = None,
    account: str = ACCOUNT,
) -> str:
    """nats-server config blocks (accounts with users and permissions, optional tls and cluster): append to
    a config that sets host, port and jetstream (as :class:`EmbeddedNatsServer` and `drover nats config` do)."""
    text = accounts_config(credentials, account=account)
    if tls is not None:
        text += tls_config(tls)
    if cluster is not None:
        text += cluster_config(cluster)
    return text


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def client_auth(credential: Credential, directory: Path, *, tls: NatsAuth | None = None) -> NatsAuth:
    """Write what a user needs to connect (its nkey seed file, mode 0600) and return its :class:`NatsAuth`;
    ``tls`` carries the CA (and client cert) settings every user shares."""
    base = tls or NatsAuth()
    if credential.nkey_seed:
        seed_path = directory / f"{credential.user.name}.nk"
        _write_secret(seed_path, credential.nkey_seed + "\n")
        return NatsAuth(
            nkey_seed_file=str(seed_path),
            tls_ca_file=base.tls_ca_file,
            tls_cert_file=base.tls_cert_file,
            tls_key_file=base.tls_key_file,
            tls_hostname=base.tls_hostname,
        )
    return NatsAuth(
        user=credential.user.name,
        password=credential.password,
        tls_ca_file=base.tls_ca_file,
        tls_cert_file=base.tls_cert_file,
        tls_key_file=base.tls_key_file,
        tls_hostname=base.tls_hostname,
    )


def settings_toml(user: UserSpec, auth: NatsAuth, url: str | None) -> str:
    """A ``[nats]`` settings section (Drover TOML) for a user: `drover --config FILE ...` connects as it."""
    values: dict[str, Any] = {"url": url}
    values.update(
        user=auth.user,
        password=auth.password,
        nkey_seed_file=auth.nkey_seed_file,
        creds_file=auth.creds_file,
        tls_ca_file=auth.tls_ca_file,
        tls_cert_file=auth.tls_cert_file,
        tls_key_file=auth.tls_key_file,
        tls_hostname=auth.tls_hostname,
        client_id=user.client_id,
    )
    lines = [f"# NATS credentials of {user.name!r} (role {user.role}); keep this file private", "[nats]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


@dataclass
class SecureBundle:
    """Generated credentials for a set of users, the server config blocks, and each user's :class:`NatsAuth`
    (seed files written under ``directory``)."""

    directory: Path
    credentials: list[Credential]
    config_text: str
    auth: dict[str, NatsAuth] = field(default_factory=dict)

    def user(self, name: str) -> UserSpec:
        return next(c.user for c in self.credentials if c.user.name == name)

    def reply_fields(self) -> dict[str, str]:
        """The ``[nats] reply_*`` settings of the control plane's client-bound user (empty when none)."""
        auth = self.auth.get(CONTROL_REPLY_USER)
        if auth is None:
            return {}
        fields = {"reply_user": auth.user, "reply_password": auth.password, "reply_nkey_seed_file": auth.nkey_seed_file}
        return {key: value for key, value in fields.items() if value}

    def write_settings(self, url: str | None) -> dict[str, Path]:
        """Write ``<user>.toml`` (a Drover ``[nats]`` section, mode 0600) for every user; name -> path."""
        paths = {}
        for cred in self.credentials:
            path = self.directory / f"{cred.user.name}.toml"
            text = settings_toml(cred.user, self.auth[cred.user.name], url)
            if cred.user.role is Role.CONTROL:  # it also opens the client-bound connection
                text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in self.reply_fields().items())
            _write_secret(path, text)
            paths[cred.user.name] = path
        return paths


def make_bundle(
    directory: Path,
    users: Sequence[UserSpec],
    *,
    mode: Literal["nkey", "password"] = "nkey",
    server_tls: ServerTls | None = None,
    client_tls: NatsAuth | None = None,
    cluster: ClusterRoutes | None = None,
) -> SecureBundle:
    """Generate credentials for ``users``, write their secrets under ``directory``, build the server config."""
    credentials = generate_credentials(users, mode)
    bundle = SecureBundle(
        directory=directory,
        credentials=credentials,
        config_text=server_config(credentials, tls=server_tls, cluster=cluster),
    )
    directory.mkdir(parents=True, exist_ok=True)
    for cred in credentials:
        bundle.auth[cred.user.name] = client_auth(cred, directory, tls=client_tls)
    return bundle


# ------------------------------------------------------------------------------------------ live changes
REGISTRY_FILE = "users.json"
"""Beside accounts.conf: every user with its role and public key (or password), so users can be added,
revoked and rotated later without touching the others (`drover nats add-user | revoke | rotate`)."""


@dataclass
class Registry:
    """The users of one deployment and what their settings files need (URL, CA)."""

    credentials: list[Credential]
    url: str | None = None
    tls_ca_file: str | None = None

    def names(self) -> list[str]:
        return [c.user.name for c in self.credentials]

    def find(self, name: str) -> Credential:
        for cred in self.credentials:
            if cred.user.name == name:
                return cred
        raise KeyError(f"no NATS user {name!r} (users: {', '.join(self.names())})")

    def added(self, user: UserSpec, mode: Literal["nkey", "password"]) -> tuple[Registry, Credential]:
        """A registry with ``user`` and its fresh secret."""
        if user.name in self.names():
            raise ValueError(f"NATS user {user.name!r} exists (rotate its secret with `drover nats rotate`)")
        (cred,) = generate_credentials([user], mode)
        permission_map([*(c.user for c in self.credentials), user])  # validates ids
        return Registry([*self.credentials, cred], self.url, self.tls_ca_file), cred

    def revoked(self, name: str) -> Registry:
        self.find(name)
        return Registry([c for c in self.credentials if c.user.name != name], self.url, self.tls_ca_file)

    def rotated(self, name: str) -> tuple[Registry, Credential]:
        """A new secret for ``name`` (same kind as before); the old one stops working at the next reload."""
        old = self.find(name)
        (cred,) = generate_credentials([old.user], "nkey" if old.nkey_public else "password")
        credentials = [cred if c.user.name == name else c for c in self.credentials]
        return Registry(credentials, self.url, self.tls_ca_file), cred

    def to_json(self) -> str:
        users = [
            {
                "name": c.user.name,
                "role": str(c.user.role),
                "client_id": c.user.client_id,
                "instance_id": c.user.instance_id,
                "nkey_public": c.nkey_public,
                "password": c.password,
            }
            for c in self.credentials
        ]
        return json.dumps({"url": self.url, "tls_ca_file": self.tls_ca_file, "users": users}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Registry:
        raw = json.loads(text)
        creds = [
            Credential(
                UserSpec(u["name"], Role(u["role"]), u.get("client_id"), u.get("instance_id")),
                password=u.get("password"),
                nkey_public=u.get("nkey_public"),
            )
            for u in raw["users"]
        ]
        return cls(creds, raw.get("url"), raw.get("tls_ca_file"))

    def save(self, directory: Path) -> None:
        _write_secret(directory / REGISTRY_FILE, self.to_json())

    @classmethod
    def load(cls, directory: Path) -> Registry:
        return cls.from_json((directory / REGISTRY_FILE).read_text())


def write_user_files(directory: Path, credential: Credential, registry: Registry) -> Path:
    """The new secret's files (nkey seed, ``<user>.toml``, mode 0600); returns the settings file."""
    tls = NatsAuth(tls_ca_file=registry.tls_ca_file) if registry.tls_ca_file else None
    auth = client_auth(credential, directory, tls=tls)
    path = directory / f"{credential.user.name}.toml"
    _write_secret(path, settings_toml(credential.user, auth, registry.url))
    return path


def reload_server(pid: int) -> None:
    """Have a running nats-server re-read its config (what ``nats-server --signal reload=<pid>`` sends):
    new users may connect at once, revoked or rotated ones are refused, without a restart."""
    import signal

    os.kill(pid, signal.SIGHUP)
