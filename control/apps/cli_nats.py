"""`drover nats config`: a ready nats-server configuration with Drover's accounts, users and per-role subject
permissions (transport/nats_auth.py), optional TLS and cluster routes, and one credentials file per user."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.table import Table

if TYPE_CHECKING:
    from transport.nats_auth import Registry

nats_app = typer.Typer(help="NATS server configuration and credentials.", no_args_is_help=True)

SERVER_CONF = "nats-server.conf"
ACCOUNTS_CONF = "accounts.conf"


def register(app: typer.Typer) -> None:
    app.add_typer(nats_app, name="nats")


def _server_conf(
    *,
    server_name: str | None,
    host: str,
    port: int,
    max_payload: int,
    jetstream_dir: str,
    tls_block: str,
    cluster_block: str,
) -> str:
    lines = [
        f"# nats-server config for Drover, written by `drover nats config` on {datetime.date.today()}",
        "# Users, roles and subject permissions are in accounts.conf (the same file on every node).",
    ]
    if server_name:
        lines.append(f'server_name: "{server_name}"')
    lines += [
        f'host: "{host}"',
        f"port: {port}",
        f"max_payload: {max_payload}",
        f'jetstream {{ store_dir: "{jetstream_dir}" }}',
        f'include "{ACCOUNTS_CONF}"',
    ]
    return "\n".join(lines) + "\n" + tls_block + cluster_block


def _check(path: Path) -> str | None:
    """``nats-server -t``: None when valid, else its complaint (None too when no binary is found)."""
    from transport.nats_server import NatsServerError, find_nats_server_binary

    try:
        binary = find_nats_server_binary()
    except NatsServerError:
        return None
    result = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


@nats_app.command("config")
def config(
    out: Path = typer.Option(Path("drover-nats"), "--out", "-o", help="Directory to write into."),
    client: list[str] = typer.Option(
        [], "--client", help="Client id (repeat): a client user reading only drover.v1.inbox.<id>. Default: client."
    ),
    gateway: list[str] = typer.Option(
        [], "--gateway", help="Gateway client id (repeat): a client that may also ship spans (the OpenAI gateway)."
    ),
    engine: list[str] = typer.Option(
        [], "--engine", help="Engine instance id (repeat): one user each. None: one user shared by every engine."
    ),
    operator: str = typer.Option("operator", "--operator", help="Name (and client id) of the operator user."),
    auth: str = typer.Option("nkey", "--auth", help="nkey (server keeps public keys only) or password."),
    host: str = typer.Option("0.0.0.0", "--host", help="Client listen address of the server."),
    port: int = typer.Option(4222, "--port", help="Client port of the server."),
    url: str | None = typer.Option(
        None, "--url", help="NATS URL(s) written into the users' files (default nats://<host>:<port>)."
    ),
    server_name: str | None = typer.Option(
        None, "--server-name", help="server_name (needed in a cluster); the file is then nats-server-<name>.conf."
    ),
    jetstream_dir: str = typer.Option("./jetstream", "--jetstream-dir", help="JetStream store directory."),
    max_payload: int = typer.Option(8 * 1024 * 1024, "--max-payload", help="max_payload in bytes."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Server certificate (PEM): clients must use TLS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Private key of --tls-cert."),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="CA that signed the server cert; written into users' files to verify the server."
    ),
    tls_verify_clients: bool = typer.Option(
        False, "--tls-verify-clients", help="Also require client certificates signed by --tls-ca."
    ),
    cluster_name: str = typer.Option("drover", "--cluster-name", help="Cluster name (with --route)."),
    cluster_listen: str = typer.Option("0.0.0.0:6222", "--cluster-listen", help="Route listen address."),
    route: list[str] = typer.Option([], "--route", help="Peer route URL nats-route://host:6222 (repeat)."),
    route_user: str | None = typer.Option(None, "--route-user", help="User other nodes' routes log in with."),
    route_password: str | None = typer.Option(None, "--route-password", help="Password of --route-user."),
    node_only: bool = typer.Option(
        False, "--node-only", help="Write only nats-server.conf for another node; keep accounts and credentials."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing credentials."),
) -> None:
    """Write nats-server.conf + accounts.conf (users and per-role permissions) and per-user credentials
    (`<user>.nk` seeds, `<user>.toml` Drover settings: `drover --config <user>.toml ...`)."""
    from control.apps import cli
    from transport.nats_auth import (
        ClusterRoutes,
        NatsAuth,
        Registry,
        ServerTls,
        accounts_config,
        cluster_config,
        default_users,
        make_bundle,
        tls_config,
    )

    console = cli.console
    if auth not in ("nkey", "password"):
        console.print(f"[red]--auth must be nkey or password, not {auth!r}[/]")
        raise typer.Exit(2)
    if (tls_cert is None) != (tls_key is None):
        console.print("[red]--tls-cert and --tls-key go together[/]")
        raise typer.Exit(2)
    if tls_verify_clients and tls_ca is None:
        console.print("[red]--tls-verify-clients needs --tls-ca[/]")
        raise typer.Exit(2)
    out = out.resolve()
    accounts_path = out / ACCOUNTS_CONF
    if node_only and not accounts_path.exists():
        console.print(f"[red]--node-only needs {accounts_path} from an earlier `drover nats config`[/]")
        raise typer.Exit(2)
    if not node_only and accounts_path.exists() and not force:
        console.print(f"[red]{accounts_path} exists:[/] --force replaces every credential, --node-only keeps them")
        raise typer.Exit(2)

    def absolute(path: Path | None) -> str | None:
        return str(path.resolve()) if path is not None else None

    server_tls = (
        ServerTls(absolute(tls_cert) or "", absolute(tls_key) or "", absolute(tls_ca), tls_verify_clients)
        if tls_cert
        else None
    )
    cluster = (
        ClusterRoutes(cluster_name, cluster_listen, tuple(route), route_user, route_password)
        if route or route_user
        else None
    )
    # TLS and cluster blocks are per node; accounts are shared by every node
    tls_block = tls_config(server_tls) if server_tls is not None else ""
    cluster_block = cluster_config(cluster) if cluster is not None else ""
    out.mkdir(parents=True, exist_ok=True)
    # several nodes' files can sit side by side: nats-server-<name>.conf when a server name is given
    server_path = out / (f"nats-server-{server_name}.conf" if server_name else SERVER_CONF)
    server_path.write_text(
        _server_conf(
            server_name=server_name,
            host=host,
            port=port,
            max_payload=max_payload,
            jetstream_dir=jetstream_dir,
            tls_block=tls_block,
            cluster_block=cluster_block,
        )
    )
    server_path.chmod(0o600)  # route passwords
    if not node_only:
        users = default_users(clients=client or ["client"], engines=engine, operator=operator, gateways=gateway)
        client_tls = NatsAuth(tls_ca_file=absolute(tls_ca)) if tls_cert else None
        bundle = make_bundle(out, users, mode=auth, client_tls=client_tls)  # type: ignore[arg-type]
        accounts_path.write_text(
            "# Drover's NATS users and their subject permissions (`drover nats config`); one account, DROVER.\n"
            + accounts_config(bundle.credentials)
        )
        accounts_path.chmod(0o600)
        scheme = "tls" if tls_cert else "nats"
        client_url = url or f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        # users.json: what `drover nats add-user | revoke | rotate` change later, without a restart
        Registry(bundle.credentials, client_url, absolute(tls_ca) if tls_cert else None).save(out)
        table = Table(title=f"NATS users ({auth})")
        for column in ("user", "role", "may publish", "may subscribe", "credentials"):
            table.add_column(column)
        paths = bundle.write_settings(client_url)
        for cred in bundle.credentials:
            spec = cred.user
            settings_path = paths[spec.name]
            perms = spec.permissions
            table.add_row(
                spec.name,
                str(spec.role),
                "\n".join(perms.publish) + ("\n(replies to requests)" if perms.allow_responses else ""),
                "\n".join(perms.subscribe),
                settings_path.name + (f", {spec.name}.nk" if cred.nkey_seed else ""),
            )
        console.print(table)
    problem = _check(server_path) if (server_tls is None or (tls_cert and tls_cert.exists())) else None
    if problem:
        console.print(f"[red]nats-server rejects the config:[/] {problem}")
        raise typer.Exit(1)
    console.print(f"wrote {server_path} and {accounts_path.name}; start: nats-server -c {server_path}")
    if not node_only:
        console.print(
            "give each process its user's file: `drover --config "
            f"{out}/control.toml control serve`, engines `engine*.toml`, clients `<client>.toml`"
        )


# ------------------------------------------------------------------------------------------ live changes
_DIR = typer.Option(Path("drover-nats"), "--dir", "-d", help="Directory `drover nats config` wrote.")
_PID = typer.Option(None, "--pid", help="PID of the running nats-server to reload (SIGHUP, as --signal reload).")
_PID_FILE = typer.Option(None, "--pid-file", help="File holding that PID (nats-server's pid_file).")


def _fail(message: str) -> NoReturn:
    from control.apps import cli

    cli.console.print(f"[red]{message}[/]")
    raise typer.Exit(2)


def _load(directory: Path) -> Registry:
    from transport.nats_auth import REGISTRY_FILE, Registry

    try:
        return Registry.load(directory.resolve())
    except FileNotFoundError:
        _fail(f"no {directory / REGISTRY_FILE}: run `drover nats config --out {directory}` first")
    except (ValueError, KeyError) as exc:
        _fail(f"{directory / REGISTRY_FILE} is unreadable: {exc}")


def _apply(directory: Path, registry: Registry, pid: int | None, pid_file: Path | None, what: str) -> None:
    """Write accounts.conf and users.json, then have the server reload them (when told which one)."""
    from control.apps import cli
    from transport.nats_auth import accounts_config, reload_server

    directory = directory.resolve()
    accounts = directory / ACCOUNTS_CONF
    accounts.write_text(
        "# Drover's NATS users and their subject permissions (`drover nats config`); one account, DROVER.\n"
        + accounts_config(registry.credentials)
    )
    accounts.chmod(0o600)
    registry.save(directory)
    if pid_file is not None:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read a PID from {pid_file}: {exc}")
    if pid is None:
        cli.console.print(f"{what}; reload the server: nats-server --signal reload=<pid> (or SIGHUP)")
        return
    try:
        reload_server(pid)
    except OSError as exc:
        _fail(f"{what}, but reloading nats-server {pid} failed: {exc}")
    cli.console.print(f"{what}; nats-server {pid} reloaded")


@nats_app.command("add-user")
def add_user(
    name: str = typer.Argument(..., help="Login name of the new user."),
    role: str = typer.Option("client", "--role", help="client, gateway, engine, operator or control-reply."),
    client_id: str | None = typer.Option(None, "--client-id", help="Its client id (default: the name)."),
    instance_id: str | None = typer.Option(None, "--instance-id", help="Engine role: the one instance it serves."),
    auth: str = typer.Option("nkey", "--auth", help="nkey or password."),
    directory: Path = _DIR,
    pid: int | None = _PID,
    pid_file: Path | None = _PID_FILE,
) -> None:
    """Add a user (its `<name>.toml` and seed are written) and reload the running server: no restart."""
    from transport.nats_auth import Role, UserSpec, write_user_files

    registry = _load(directory)
    try:
        spec_role = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r} (client, gateway, engine, operator, control-reply)")
    if auth not in ("nkey", "password"):
        _fail(f"--auth must be nkey or password, not {auth!r}")
    needs_id = spec_role in (Role.CLIENT, Role.GATEWAY, Role.OPERATOR)
    spec = UserSpec(name, spec_role, client_id=(client_id or name) if needs_id else None, instance_id=instance_id)
    try:
        updated, cred = registry.added(spec, auth)  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
    path = write_user_files(directory.resolve(), cred, updated)
    _apply(directory, updated, pid, pid_file, f"added {name} ({spec_role}): {path}")


@nats_app.command("revoke")
def revoke(
    name: str = typer.Argument(..., help="The user to remove."),
    directory: Path = _DIR,
    pid: int | None = _PID,
    pid_file: Path | None = _PID_FILE,
) -> None:
    """Remove a user: after the reload the server refuses it (its connections are closed)."""
    registry = _load(directory)
    try:
        updated = registry.revoked(name)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    _apply(directory, updated, pid, pid_file, f"revoked {name}")


@nats_app.command("rotate")
def rotate(
    name: str = typer.Argument(..., help="The user whose secret is replaced."),
    directory: Path = _DIR,
    pid: int | None = _PID,
    pid_file: Path | None = _PID_FILE,
) -> None:
    """Give a user a new secret (new seed and `<name>.toml`); the old one is refused after the reload."""
    from transport.nats_auth import write_user_files

    registry = _load(directory)
    try:
        updated, cred = registry.rotated(name)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    path = write_user_files(directory.resolve(), cred, updated)
    _apply(directory, updated, pid, pid_file, f"rotated {name}: {path}")
