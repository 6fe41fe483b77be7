"""`drover memory drop|restore` (KunServe groups) and the groups table of `drover status`."""

from __future__ import annotations

import typer
from rich.table import Table

from transport.messages import StatusReply

memory_app = typer.Typer(help="KunServe parameter-centric memory: force a layer drop (group) or a restore.")


def groups_table(st: StatusReply) -> Table:
    """Groups with their members, layer ranges and the KV blocks the drop added (leader first: it takes
    the group's dispatches)."""
    table = Table(title="memory groups (KunServe)")
    for column in ("group", "state", "members (leader first)", "layers", "extra KV blocks", "age s"):
        table.add_column(column)
    for g in st.groups:
        table.add_row(
            g.group_id,
            g.state,
            ", ".join(g.members),
            " ".join(f"{m}:[{r[0]},{r[1]})" for m, r in zip(g.members, g.layer_ranges, strict=False)),
            str(g.extra_kv_blocks),
            f"{g.age_s:.1f}",
        )
    return table


def _run(op: str, target: str, timeout_s: float) -> None:
    from control.apps.cli import admin_call, console

    reply = admin_call(lambda c: c.memory(op, target, timeout_s=timeout_s))
    colour = "green" if reply.ok else "red"
    console.print(f"[{colour}]{reply.message}[/] " + " ".join(f"{k}={v}" for k, v in reply.details.items()))
    raise typer.Exit(0 if reply.ok else 1)


@memory_app.command("drop")
def drop(
    group: str = typer.Argument(
        ...,
        help="Instances to group, comma-separated, the first leads (e.g. t0,t1); one id: it leads and the "
        "freest compatible standalone instance joins.",
    ),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the group to form."),
) -> None:
    """Form a group now: members drop to 1/g of the layers, KV moves, the group serves as a pipeline."""
    _run("drop", group, timeout)


@memory_app.command("restore")
def restore(
    group: str = typer.Argument(..., help="Group id (see `drover status`) or any of its instances."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the restore."),
) -> None:
    """End a group now: layers are reloaded, KV moves back to the leader, members serve alone."""
    _run("restore", group, timeout)


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")
