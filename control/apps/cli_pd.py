"""`drover phase set INSTANCE prefill|decode|both`: prefill/decode disaggregation, set live and audited."""

from __future__ import annotations

import typer

from control.policy.pd import PHASES

phase_app = typer.Typer(help="Prefill/decode disaggregation: which phase an instance serves ([pd] mode).")


@phase_app.command("set")
def set_phase(
    instance: str = typer.Argument(..., help="Instance id (see `drover status`)."),
    phase: str = typer.Argument(..., help=f"One of: {', '.join(PHASES)}."),
) -> None:
    """Make INSTANCE serve PHASE from now on: prefill instances take new requests and hand them to decode
    instances after the first token; both serves a request start to end. Wins over the engine's
    engine.phase until the control plane restarts."""
    from control.apps.cli import admin_call, console
    from control.apps.cli_common import fail

    if phase not in PHASES:
        fail(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    reply = admin_call(lambda c: c.set_phase(instance, phase))
    colour = "green" if reply.ok else "red"
    console.print(f"[{colour}]{reply.message}[/]")
    raise typer.Exit(0 if reply.ok else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(phase_app, name="phase")
