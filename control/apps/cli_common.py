"""Conventions every `drover` command shares, in one place so new command groups adopt them by import.

- **Errors are one line.** :class:`DroverTyper` (the root app) turns any exception a command raises into one
  line on stderr, ``drover: error: ...``, and an exit code: 2 when the command could not run (bad input or
  settings, cluster unreachable, no answer, a port in use), 1 when the cluster answered "no" (a
  :class:`~control.client.ReplyError` reply, an operation that failed). ``DROVER_DEBUG=1`` shows the
  traceback instead. Raise :class:`CliError` (or call :func:`fail`) for your own errors.
- **Scriptable output.** Listing commands take ``--json`` (:data:`JSON_OPTION`) and print through
  :func:`emit_json`, which accepts msgspec structs, dataclasses, pydantic models and plain data, unabridged
  (ids are never cut), one JSON document on stdout.
- **Cluster context** (like kubectl's): `drover up` records how to reach the cluster it started
  (:func:`save_context`) in ``$DROVER_CONTEXT`` or ``~/.config/drover/contexts.json``; commands that need
  the cluster find it through :func:`cli_settings` when no ``--nats-url``, ``DROVER_NATS__URL`` or
  ``--config`` names one. ``drover context show|use|clear`` manage it.
- **Short-lived connections.** :data:`CLI_CONNECT` makes a CLI connection fail within seconds instead of
  retrying forever.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from control.errors import DroverError

if TYPE_CHECKING:
    from control.settings import Settings

CLI_CONNECT: dict[str, Any] = {"connect_timeout": 2, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2}
"""nats-py connect options for a short-lived CLI process: fail in about 2 s when NATS is not there."""

EXIT_REFUSED = 1
"""The cluster answered, and the answer was no (an error reply, a migration that aborted, a drain that timed out)."""
EXIT_USAGE = 2
"""The command could not run: bad input or settings, nothing reachable, no answer, a resource in use."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

READ_TIMEOUT_HELP = (
    "Seconds to wait for an answer; meanwhile the question is asked again while no control plane answers "
    "(a lapsed leader lease, a takeover)."
)


def read_timeout_option(default: float = 5.0) -> Any:
    """``--timeout`` of a read-only command (status, instances, requests, policy get, autoscale status): the
    client's overall timeout, within which it asks again (``DroverClient.status``)."""
    return typer.Option(default, "--timeout", min=0.1, help=READ_TIMEOUT_HELP)


class CliError(DroverError):
    """An error the CLI reports as one line, with ``exit_code`` (default :data:`EXIT_USAGE`)."""

    default_code = "cli_error"

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_USAGE) -> NoReturn:
    raise CliError(message, exit_code)


# --------------------------------------------------------------------------------------------------- target
@dataclasses.dataclass
class _Target:
    """What the running command talks to, so an error can name it (set by :func:`need_url`)."""

    url: str = ""
    source: str = ""


_target = _Target()


def describe_target() -> str:
    return f"{_target.url}{f' ({_target.source})' if _target.source else ''}" if _target.url else "the cluster"


def error_line(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for ``exc``, blaming what actually failed."""
    import nats.errors

    from control.client import NoAnswerError, ReplyError
    from control.settings import SettingsError

    where = describe_target()
    if isinstance(exc, CliError):
        return exc.message, exc.exit_code
    if isinstance(exc, NoAnswerError):  # a read asked again until its timeout: name what was tried, and where
        return f"{exc.message}; is one running at {where}? (`--timeout` waits longer)", EXIT_USAGE
    if isinstance(exc, SettingsError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ReplyError):  # the cluster answered, and the answer was no
        return f"{exc.code}: {exc.message}", EXIT_REFUSED
    if isinstance(exc, DroverError):  # a failure of ours with a message for the user (bad config, ...)
        return f"{exc.code}: {exc.message}" if exc.message else str(exc.code), EXIT_USAGE
    if isinstance(exc, nats.errors.NoRespondersError):
        return f"nothing answers on NATS at {where}: is a control plane running there?", EXIT_USAGE
    if isinstance(exc, nats.errors.NoServersError | ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
    ):
        return f"cannot reach NATS at {where}: is the cluster up? (`drover context show`)", EXIT_USAGE
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        detail = f": {exc}" if str(exc) else ""
        return f"no answer from the control plane at {where} in time{detail}", EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"address already in use: {exc.strerror or exc}", EXIT_USAGE
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}", EXIT_USAGE
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text} (DROVER_DEBUG=1 shows the traceback)", EXIT_USAGE


def print_error(message: str) -> None:
    typer.echo(f"drover: error: {message.splitlines()[0] if message else 'failed'}", err=True)


class DroverGroup(typer.core.TyperGroup):
    """Runs every command under one error boundary: an exception a command lets escape becomes one line on
    stderr and an exit code (in-process runs, typer's test runner, see the same as the shell)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("DROVER_DEBUG"):
                raise
            message, code = error_line(exc)
            print_error(message)
            raise typer.Exit(code) from None


class DroverTyper(typer.Typer):
    """The root app: every error, a usage error included, becomes one line on stderr and an exit code."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", DroverGroup)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        try:
            result = command.main(*args, **{**kwargs, "standalone_mode": False})
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except typer.TyperException as exc:  # click's usage errors (typer vendors click): one line, no box
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
                sys.exit(exc.exit_code)
            where = getattr(ctx, "command_path", "drover")
            print_error(f"{exc.format_message()} (see `{where} --help`)")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("DROVER_DEBUG"):
                raise
            message, code = error_line(exc)
            print_error(message)
            sys.exit(code)
        sys.exit(result if isinstance(result, int) else 0)


# --------------------------------------------------------------------------------------------------- output
JSON_HELP = "Print JSON (complete, never abridged) instead of a table."


def to_jsonable(value: Any) -> Any:
    """Plain data from msgspec structs, dataclasses, pydantic models, enums and containers."""
    import msgspec

    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return msgspec.to_builtins(value)


def emit_json(value: Any) -> None:
    """One JSON document on stdout (no colour, no wrapping: safe to pipe into jq)."""
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def setting_default(section: str, name: str) -> str:
    """A setting's default as text, for ``--help`` of flags whose None means "from settings"."""
    from control.settings import Settings

    model = Settings.model_fields[section].annotation
    field = model.model_fields[name]  # type: ignore[union-attr]
    return str(field.default)


# --------------------------------------------------------------------------------------------------- context
@dataclasses.dataclass
class ClusterContext:
    """How to reach one cluster (what `drover up` started)."""

    name: str
    nats_url: str
    config: str | None = None  # settings file with credentials (`drover up --secure`)
    work_dir: str | None = None
    traces: str | None = None  # the cluster's span file (absolute)
    metrics_url: str | None = None
    pid: int | None = None  # the `drover up` that wrote it
    created_at: float = 0.0


def context_path() -> Path:
    """``$DROVER_CONTEXT``, else ``$XDG_CONFIG_HOME/drover/contexts.json`` (``~/.config`` by default)."""
    explicit = os.environ.get("DROVER_CONTEXT")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "drover" / "contexts.json"


def _read() -> dict[str, Any]:
    path = context_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "contexts": {}}
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"context file {path} is unreadable ({exc}): `drover context clear --all` starts afresh")
    if not isinstance(data, dict) or not isinstance(data.get("contexts"), dict):
        fail(f"context file {path} is not a drover context file: `drover context clear --all` starts afresh")
    return data


def _write(data: dict[str, Any]) -> None:
    path = context_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)  # atomic: two `drover up`s never leave half a file


def list_contexts() -> tuple[str | None, list[ClusterContext]]:
    data = _read()
    names = {f.name for f in dataclasses.fields(ClusterContext)}
    found = [ClusterContext(**{k: v for k, v in c.items() if k in names}) for c in data["contexts"].values()]
    return data.get("current"), found


def current_context() -> ClusterContext | None:
    current, found = list_contexts()
    return next((c for c in found if c.name == current), None)


def save_context(context: ClusterContext, make_current: bool = True) -> Path:
    data = _read()
    data["contexts"][context.name] = dataclasses.asdict(context)
    if make_current:
        data["current"] = context.name
    _write(data)
    return context_path()


def use_context(name: str) -> ClusterContext:
    data = _read()
    if name not in data["contexts"]:
        known = ", ".join(sorted(data["contexts"])) or "none"
        fail(f"no context {name!r} (known: {known})")
    data["current"] = name
    _write(data)
    return current_context()  # type: ignore[return-value]


def remove_context(name: str | None = None, *, only_pid: int | None = None) -> bool:
    """Forget context ``name`` (default: the current one); with ``only_pid``, only if that process wrote it
    (a `drover up` cleaning up after itself leaves a newer one's context alone). True if one was removed."""
    data = _read()
    name = name or data.get("current")
    entry = data["contexts"].get(name) if name else None
    if entry is None or (only_pid is not None and entry.get("pid") != only_pid):
        return False
    del data["contexts"][name]
    if data.get("current") == name:
        data["current"] = None
    _write(data)
    return True


def clear_contexts() -> None:
    _write({"current": None, "contexts": {}})


def context_name_for(url: str) -> str:
    """A stable name for a context from its URL (``local-4222``)."""
    return "local-" + url.rsplit(":", 1)[-1].strip("/")


# --------------------------------------------------------------------------------------------------- settings
_root_options: dict[str, Any] = {}


def set_root_options(**options: Any) -> None:
    """Called by the root command's callback with its global options (--config, --nats-url, --log-level).
    Kept here rather than in control.cli: under ``python -m control.cli`` that module runs as ``__main__``
    and an import of ``control.cli`` would see a second, empty copy."""
    _root_options.clear()
    _root_options.update(options)


def root_options(ctx: typer.Context | None = None) -> dict[str, Any]:
    """The global options, from ``ctx`` when given, else as the root callback recorded them."""
    return dict(ctx.find_root().params) if ctx is not None else dict(_root_options)


def cli_settings(
    ctx: typer.Context | None = None, extra: dict[str, dict[str, Any]] | None = None, *, use_context: bool = True
) -> Settings:
    """Effective settings for a command: defaults < (cluster context) < file < environment < flags.

    The cluster context only fills in what nothing else named: with no NATS URL from ``--nats-url``,
    ``DROVER_NATS__URL`` or the ``--config`` file, the current context's URL (and its settings file, which
    holds credentials for a secure cluster) are used. ``use_context=False`` for commands that start a
    cluster rather than join one."""
    from control.settings import load_settings

    root = root_options(ctx)
    overrides: dict[str, dict[str, Any]] = {
        "nats": {"url": root.get("nats_url")},
        "observability": {"log_level": root.get("log_level")},
    }
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    config = root.get("config")
    settings = load_settings(config, overrides)
    if settings.nats.url:
        _target.url, _target.source = settings.nats.url, ""
        return settings
    if not use_context:
        return settings
    context = current_context()
    if context is None:
        return settings
    _target.source = f"context {context.name!r} from {context_path()}"
    if context.config and not config and not os.environ.get("DROVER_CONFIG"):
        if not Path(context.config).exists():
            fail(f"context {context.name!r} names {context.config}, which is gone: `drover context clear`")
        settings = load_settings(context.config, overrides)
    if not settings.nats.url:
        settings = load_settings(config or context.config, {**overrides, "nats": {"url": context.nats_url}})
    _target.url = settings.nats.url or ""
    return settings


def need_url(settings: Settings) -> str:
    """The cluster's NATS URL, or a one-line error saying how to give one."""
    if not settings.nats.url:
        fail("no cluster: pass --nats-url, set DROVER_NATS__URL, or start one with `drover up` (it records a context)")
    _target.url = settings.nats.url
    return settings.nats.url


def context_traces(settings: Settings) -> Path:
    """The span file `drover trace` reads: the context's (its cluster's absolute path) when the settings keep
    the default, else the settings' path."""
    from control.settings import ObservabilitySettings

    configured = settings.observability.jsonl_path
    default = ObservabilitySettings.model_fields["jsonl_path"].default
    context = current_context() if configured == default else None
    return Path(context.traces) if context is not None and context.traces else Path(configured)


def iter_contexts_table() -> Iterator[tuple[str, str, str, str]]:
    current, found = list_contexts()
    for c in found:
        age = time.time() - c.created_at if c.created_at else 0.0
        yield ("*" if c.name == current else "", c.name, c.nats_url, f"pid {c.pid}, {age:.0f}s ago")
