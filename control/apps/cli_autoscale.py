"""Autoscaling commands added to `drover` (registered by control/apps/cli.py):

* ``drover scale ROLE N`` pins a role at N instances (starts or drains the difference at once);
  ``drover scale ROLE --auto`` gives it back to the autoscaler's limits.
* ``drover autoscale status`` shows each level's inputs and last decision with its reason.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import typer
from rich.table import Table

from transport import subjects
from transport.messages import (
    AdminReply,
    AutoscaleStatusQuery,
    AutoscaleStatusReply,
    ErrorReply,
    Message,
    ScaleCommand,
    decode,
    encode,
)

autoscale_app = typer.Typer(help="The autoscaler (Chiron's hierarchical, SLO-aware).", no_args_is_help=True)


async def request_admin(
    url: str,
    verb: str,
    message: Message,
    timeout_s: float = 10.0,
    *,
    nats_settings: Any = None,
    operator: str | None = None,
) -> Message:
    """One request/reply on ``drover.v1.admin.<verb>`` (with the operator filled in, for the audit log). A
    command (``scale``) is sent once: it must not be repeated behind the operator's back. The autoscaler's
    status is read-only: it is asked again while no control plane answers (``DroverClient.autoscale_status``).
    An ErrorReply becomes a DroverError."""
    import msgspec

    from control.apps.cli_common import CLI_CONNECT
    from control.client import DroverClient, ReplyError

    client = await DroverClient(url, name="drover-cli", nats_settings=nats_settings, operator=operator).connect(
        **CLI_CONNECT
    )
    if "operator" in type(message).__struct_fields__:
        message = msgspec.structs.replace(message, operator=client.operator)
    try:
        if isinstance(message, AutoscaleStatusQuery):
            return await client.autoscale_status(timeout_s=timeout_s)
        reply = await client.nc.request(subjects.admin(verb), encode(message), timeout=timeout_s)
    finally:
        await client.close()
    answer = decode(reply.data)
    if isinstance(answer, ErrorReply):
        raise ReplyError(answer.code, answer.message, answer.request_id)
    return answer


def _call(ctx: typer.Context, verb: str, message: Message) -> Any:
    from control.apps.cli_common import cli_settings, need_url

    s = cli_settings(ctx)
    url = need_url(s)
    # Errors propagate: the root app reports them as one line (error reply: exit 1; no answer: exit 2).
    return asyncio.run(request_admin(url, verb, message, nats_settings=s.nats, operator=s.audit.operator or None))


def status_tables(status: AutoscaleStatusReply) -> list[Table]:
    """Roles, instances (local level), inputs (global level) and recent events, as rich tables."""
    state = "enabled" if status.enabled else "disabled (manual `drover scale` only)"
    samples = ", ".join(f"{s:.1f}" for s in status.startup_samples[-5:]) or "none yet"
    roles = Table(
        title=f"autoscaler {state}; provisioner {status.provisioner}; period {status.period_s:g} s; "
        f"start-up estimate {status.startup_estimate_s:.1f} s (measured: {samples}); "
        f"batch queue {status.batch_queue}"
    )
    for column in ("role", "active", "starting", "draining", "target", "min", "max", "pinned"):
        roles.add_column(column)
    for r in status.roles:
        roles.add_row(
            r.role,
            str(r.instances),
            str(r.starting),
            str(r.draining),
            str(r.target),
            str(r.min_instances),
            str(r.max_instances),
            "yes" if r.pinned else "",
        )
    local = Table(title="instances (local level: batch limit, SLO-safe capacity, backpressure)")
    for column in (
        "instance",
        "role",
        "state",
        "owned",
        "limit",
        "capacity",
        "backpressure",
        "interactive",
        "batch",
        "tok/s",
        "last local decision",
    ):
        local.add_column(column)
    for i in status.instances:
        local.add_row(
            i.instance_id,
            i.role,
            i.state,
            "yes" if i.owned else "",
            str(i.batch_limit or "-"),
            str(i.capacity or "-"),
            f"{i.backpressure:.2f}",
            str(i.num_interactive),
            str(i.num_batch),
            f"{i.tokens_per_s:.0f}",
            i.local_reason,
        )
    inputs = Table(title="global level: inputs of the last decision")
    inputs.add_column("input")
    inputs.add_column("value", justify="right")
    for key, value in status.inputs.items():
        inputs.add_row(key, f"{value:.3g}")
    when = (
        datetime.datetime.fromtimestamp(status.last_decision_at).strftime("%H:%M:%S")
        if status.last_decision_at
        else "never"
    )
    inputs.add_row("last decision at", when)
    inputs.add_row("reason", status.last_reason or "-")
    events = Table(title="recent scale events")
    for column in ("time", "action", "instance", "role", "reason"):
        events.add_column(column)
    for e in status.events[-15:]:
        events.add_row(
            datetime.datetime.fromtimestamp(e.at).strftime("%H:%M:%S"), e.action, e.instance_id, e.role, e.reason
        )
    return [roles, local, inputs, events]


def register(app: typer.Typer) -> None:
    """Add `drover scale` and `drover autoscale ...` to the main CLI app."""
    app.add_typer(autoscale_app, name="autoscale")

    @app.command()
    def scale(
        ctx: typer.Context,
        role: str = typer.Argument(..., help="interactive, mixed or batch."),
        count: int = typer.Argument(0, help="Instances of that role to run (pins the role's min and max)."),
        auto: bool = typer.Option(False, "--auto", help="Unpin: back to the autoscaler's configured limits."),
    ) -> None:
        """Manual override: run COUNT instances of ROLE (starts or drains the difference now)."""
        from control.apps.cli import console

        reply = _call(ctx, "scale", ScaleCommand(role=role, count=count, auto=auto))
        if not isinstance(reply, AdminReply):
            console.print(f"[red]unexpected reply {type(reply).__name__}[/]")
            raise typer.Exit(1)
        details = " ".join(f"{k}={v}" for k, v in reply.details.items() if v)
        console.print(f"[{'green' if reply.ok else 'red'}]{reply.message}[/] {details}")
        raise typer.Exit(0 if reply.ok else 1)

    from control.apps.cli_common import read_timeout_option

    @autoscale_app.command("status")
    def autoscale_status(
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        timeout_s: float = read_timeout_option(10.0),
    ) -> None:
        """Each level's inputs and last decision with its reason; recent scale events."""

        from control.apps.cli import admin_call, console

        # read-only: the client asks again while no control plane answers (a lapsed lease), until --timeout
        reply: AutoscaleStatusReply = admin_call(lambda c: c.autoscale_status(timeout_s=timeout_s))
        if as_json:
            from control.apps.cli_common import emit_json

            emit_json(reply)
            return
        for table in status_tables(reply):
            console.print(table)
