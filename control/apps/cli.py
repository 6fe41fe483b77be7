"""`drover`: the admin CLI (typer + rich).

Global options (--config, --nats-url, --log-level) come first: `drover --nats-url nats://... status`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from control.settings import Settings, dump_toml, load_settings

app = typer.Typer(help="Drover: a control plane for LLM serving clusters.", no_args_is_help=True)
control_app = typer.Typer(help="The control-plane process.", no_args_is_help=True)
engine_app = typer.Typer(help="Engine-host processes.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(control_app, name="control")
app.add_typer(engine_app, name="engine")
app.add_typer(config_app, name="config")
console = Console()


# The CLI is short-lived: fail fast when the cluster is not there instead of retrying for minutes.
CLI_CONNECT: dict[str, Any] = {"connect_timeout": 2, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2}


class _State:
    config: Path | None = None
    overrides: dict[str, dict[str, Any]] = {}


def settings(extra: dict[str, dict[str, Any]] | None = None) -> Settings:
    overrides = {k: dict(v) for k, v in _State.overrides.items()}
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_settings(_State.config, overrides)


@app.callback()
def main(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML settings file.", envvar="DROVER_CONFIG"),
    nats_url: str | None = typer.Option(None, "--nats-url", help="NATS URL; none: embedded server."),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING..."),
) -> None:
    _State.config = config
    _State.overrides = {"nats": {"url": nats_url}, "observability": {"log_level": log_level}}


def _need_url(s: Settings) -> str:
    if not s.nats.url:
        console.print("[red]no NATS URL:[/] pass --nats-url or set DROVER_NATS__URL (the cluster's server)")
        raise typer.Exit(2)
    return s.nats.url


# --------------------------------------------------------------------------------------------------- processes
@control_app.command("serve")
def control_serve(
    policy: str | None = typer.Option(None, help="Dispatch policy (round_robin, least_loaded, freeness, ...)."),
) -> None:
    """Run the control plane (Supervisor, Scheduler) until SIGTERM."""
    from control.apps.processes import serve_control

    serve_control(settings({"policy": {"dispatch_policy": policy}}))


@engine_app.command("serve")
def engine_serve(
    instance_id: str = typer.Option(..., "--instance-id", help="Unique id of this instance."),
    kind: str | None = typer.Option(None, "--kind", help="vllm or sim."),
    role: str | None = typer.Option(None, "--role", help="interactive, mixed (default) or batch."),
) -> None:
    """Run one engine instance (vLLM or simulated) until SIGTERM."""
    from control.apps.processes import serve_engine
    from transport.subjects import validate_token

    validate_token(instance_id)
    serve_engine(settings({"engine": {"kind": kind, "role": role}}), instance_id)


@app.command()
def up(
    instances: int | None = typer.Option(None, "--instances", "-n", help="Engine instances to start."),
    kind: str | None = typer.Option(None, "--kind", help="Engine kind: vllm (default) or sim."),
    requests: int | None = typer.Option(None, "--requests", help="Demo requests to submit."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Tokens per demo request."),
    keep: bool = typer.Option(False, "--keep", help="Keep the cluster running after the demo (Ctrl-C stops)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Where process logs go."),
    secure: bool | None = typer.Option(
        None, "--secure", help="Embedded NATS with generated per-role credentials and subject permissions."
    ),
) -> None:
    """Start a local cluster (embedded NATS, control plane, engines), run a demo workload, print a summary."""
    from control.apps.launcher import local_cluster, run_workload, summarize, wait_ready

    s = settings(
        {
            "engine": {"kind": kind},
            "demo": {"instances": instances, "requests": requests, "max_tokens": max_tokens},
            "nats": {"secure": secure},
        }
    )
    demo = s.demo
    if s.engine.kind == "vllm":
        with console.status("building the tiny model (once, cached)..."):
            from actors.engine_host import resolve_model_dir

            model_dir = resolve_model_dir(s)
        console.print(f"model: {model_dir}")
    with local_cluster(s, demo.instances, work_dir) as cluster:
        console.print(f"NATS at [bold]{cluster.url}[/]; logs in {cluster.work_dir}")
        if cluster.secure is not None:
            console.print(f"NATS credentials per role in {cluster.secure.directory} (operator: operator.toml)")
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            progress.add_task(f"starting control plane and {demo.instances} {s.engine.kind} engines...")
            asyncio.run(wait_ready(cluster, demo.instances, timeout_s=600))
        console.print(f"[green]{demo.instances} instances serving[/]; submitting {demo.requests} requests")
        started = time.perf_counter()
        results = asyncio.run(
            run_workload(
                cluster.url, demo.requests, demo.max_tokens, demo.concurrency, nats_settings=cluster.client_nats
            )
        )
        summary = summarize(results, time.perf_counter() - started)
        table = Table(title="Drover demo")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("requests", str(summary.requests))
        table.add_row("tokens streamed", str(summary.tokens))
        table.add_row("throughput (tokens/s)", f"{summary.tokens_per_s:.1f}")
        table.add_row("TTFT p50 / p99 (ms)", f"{summary.ttft_p50_ms:.1f} / {summary.ttft_p99_ms:.1f}")
        table.add_row("inter-token p50 / p99 (ms)", f"{summary.itl_p50_ms:.2f} / {summary.itl_p99_ms:.2f}")
        for instance, count in summary.served_by.items():
            table.add_row(f"served by {instance}", f"{count} requests")
        console.print(table)
        sample = results[0]
        console.print(f"sample output: [italic]{sample.text[:80]!r}[/]")
        if keep:
            login = (
                f"--config {cluster.secure.directory / 'operator.toml'}"
                if cluster.secure
                else f"--nats-url {cluster.url}"
            )
            console.print(f"cluster stays up: drover {login} status   (Ctrl-C to stop)")
            try:
                while True:
                    cluster.check_alive()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


# --------------------------------------------------------------------------------------------------- client
@app.command()
def submit(
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_tokens: int = typer.Option(16, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    priority: int = typer.Option(0, "--priority"),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive."),
    request_id: str | None = typer.Option(None, "--request-id"),
) -> None:
    """Submit one request and print its output."""
    from control.client import DroverClient, DroverError

    s = settings()
    url = _need_url(s)

    async def go() -> int:
        async with DroverClient(url, name="drover-cli", nats_settings=s.nats) as client:
            req = await client.submit(
                prompt, max_tokens=max_tokens, temperature=temperature, priority=priority, request_id=request_id
            )
            try:
                async for event in req.events():
                    if stream:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
            except DroverError as exc:
                console.print(f"[red]error[/] {exc.code}: {exc.message}")
                return 1
            result = req.result_data
            if stream:
                sys.stdout.write("\n")
            else:
                console.print(result.text)
            done = result.done
            if done is not None:
                console.print(
                    f"[dim]{done.request_id}: {done.usage.completion_tokens} tokens, finish={done.finish_reason}, "
                    f"ttft={done.timings.ttft_s * 1e3:.1f} ms, instances={','.join(done.instances)}[/]"
                )
            return 0

    raise typer.Exit(asyncio.run(go()))


def _status() -> Any:
    return admin_call(lambda c: c.status())


def _instances_table(status: Any) -> Table:
    table = Table(title=f"instances (dispatch: {status.dispatch_policy})")
    for column in (
        "instance",
        "kind",
        "model",
        "state",
        "free/total blocks",
        "running",
        "waiting",
        "dispatched",
        "cached blocks",
        "age s",
    ):
        table.add_column(column)
    for inst in status.instances:
        load = inst.load
        table.add_row(
            inst.info.instance_id,
            inst.info.engine_kind,
            inst.info.model,
            inst.state,
            f"{load.num_free_blocks}/{load.num_total_blocks}",
            str(load.num_running),
            str(load.num_waiting),
            str(inst.dispatched),
            str(inst.cached_blocks) if inst.cached_blocks >= 0 else "-",  # prefix cache (KV events)
            f"{inst.age_s:.1f}",
        )
    return table


def _requests_table(status: Any) -> Table:
    table = Table(title=f"requests ({status.queued} queued)")
    for column in ("request", "instance", "state", "prompt tokens", "priority", "class", "age s"):
        table.add_column(column)
    for req in status.requests:
        table.add_row(
            req.request_id,
            req.instance_id or "-",
            req.state,
            str(req.prompt_tokens),
            str(req.priority),
            str(req.request_class),
            f"{req.age_s:.1f}",
        )
    return table


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Cluster overview: instances with load, queue, running requests, actor health."""
    st = _status()
    if as_json:
        import msgspec

        console.print_json(msgspec.json.encode(st).decode())
        return
    console.print(_instances_table(st))
    console.print(_requests_table(st))
    if st.groups:
        from control.apps.cli_memory import groups_table

        console.print(groups_table(st))
    console.print("actors: " + ", ".join(f"{k}={v}" for k, v in st.actors.items()))


@app.command()
def instances() -> None:
    """Instances with their load."""
    console.print(_instances_table(_status()))


@app.command("requests")
def requests_cmd() -> None:
    """Requests the control plane knows (queued and running)."""
    console.print(_requests_table(_status()))


def admin_call(call: Any) -> Any:
    """Run an admin coroutine factory ``call(client)`` against the cluster; print errors, exit 1."""
    from control.client import DroverClient, DroverError

    s = settings()
    url = _need_url(s)

    async def go() -> Any:
        client = await DroverClient(
            url, name="drover-cli", nats_settings=s.nats, operator=s.audit.operator or None
        ).connect(**CLI_CONNECT)
        try:
            return await call(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except DroverError as exc:
        console.print(f"[red]{exc.code}[/]: {exc.message}")
        raise typer.Exit(1) from exc
    except Exception as exc:
        console.print(f"[red]no answer from the control plane at {url}:[/] {exc!r}")
        raise typer.Exit(1) from exc


@app.command()
def migrate(
    request_id: str = typer.Argument(..., help="Running request to move."),
    to: str = typer.Option("", "--to", help="Destination instance (default: the freest compatible one)."),
) -> None:
    """Live-migrate a running request with its KV cache; waits for commit or abort."""
    reply = admin_call(lambda c: c.migrate(request_id, to))
    colour = "green" if reply.ok else "red"
    console.print(f"[{colour}]{reply.message}[/] " + " ".join(f"{k}={v}" for k, v in reply.details.items()))
    raise typer.Exit(0 if reply.ok else 1)


@app.command()
def drain(
    instance_id: str = typer.Argument(..., help="Instance to drain."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every request has moved off."),
    timeout_s: float = typer.Option(300.0, "--timeout", help="Seconds to wait."),
    undo: bool = typer.Option(False, "--undo", help="Put a drained instance back into service."),
) -> None:
    """Stop dispatching to an instance and migrate its running requests away."""
    reply = admin_call(lambda c: c.drain(instance_id, undo=undo))
    console.print(reply.message)
    if undo or not wait:
        return

    async def watch(client: Any) -> str:
        deadline = time.monotonic() + timeout_s
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task(f"draining {instance_id}")
            while time.monotonic() < deadline:
                status = await client.status()
                inst = next((i for i in status.instances if i.info.instance_id == instance_id), None)
                if inst is None:
                    return "gone"
                progress.update(
                    task,
                    description=f"draining {instance_id}: {inst.load.num_running} running, "
                    f"{inst.load.num_waiting} waiting",
                )
                if inst.state == "drained":
                    return "drained"
                await asyncio.sleep(0.2)
        return "timeout"

    outcome = admin_call(watch)
    console.print(f"{instance_id}: {outcome}")
    raise typer.Exit(0 if outcome in ("drained", "gone") else 1)


policy_app = typer.Typer(
    help="Scheduling policy parameters (dispatch, migration), changeable at run time.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


def _print_policy(values: dict[str, Any]) -> None:
    table = Table(title="policy")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, str(value))
    console.print(table)


@policy_app.command("get")
def policy_get() -> None:
    """Show the scheduler's current policy parameters."""
    _print_policy(admin_call(lambda c: c.policy()))


@policy_app.command("set")
def policy_set(assignments: list[str] = typer.Argument(..., help="NAME=VALUE pairs.")) -> None:
    """Change policy parameters, e.g. `drover policy set dispatch_policy=least_loaded migrate_threshold=5`."""
    changes: dict[str, str] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            console.print(f"[red]expected NAME=VALUE, got {item!r}[/]")
            raise typer.Exit(2)
        changes[name.strip()] = value.strip()
    _print_policy(admin_call(lambda c: c.policy(changes)))


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective settings (defaults < file < environment < flags)."""
    s = settings()
    if as_json:
        console.print_json(json.dumps(s.model_dump(mode="json")))
    else:
        console.print(dump_toml(s), markup=False, highlight=False)


from control.apps.cli_operator import register as _register_operator_commands  # noqa: E402

_register_operator_commands(app)
from control.apps.cli_nats import register as _register_nats_commands  # noqa: E402

_register_nats_commands(app)
from control.apps.cli_memory import register as _register_memory_commands  # noqa: E402

_register_memory_commands(app)

from control.apps.cli_autoscale import register as _register_autoscale_commands  # noqa: E402

_register_autoscale_commands(app)
from control.apps.cli_sim import register as _register_sim_commands  # noqa: E402

_register_sim_commands(app)

if __name__ == "__main__":
    app()
