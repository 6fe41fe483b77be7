"""`drover`: the admin CLI (typer + rich).

Global options (--config, --nats-url, --log-level) come first: `drover --nats-url nats://... status`. Without
them, commands find the cluster of the last `drover up` through its context (`drover context show`). Shared
conventions (one-line errors, exit codes, --json, context lookup) live in control/apps/cli_common.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal, get_args

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from control.apps.cli_common import (
    CLI_CONNECT,
    EXIT_REFUSED,
    JSON_HELP,
    DroverTyper,
    cli_settings,
    emit_json,
    fail,
    need_url,
    read_timeout_option,
    set_root_options,
    setting_default,
)
from control.settings import Settings, dump_toml

app = DroverTyper(
    help="Drover: a control plane for LLM serving clusters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
control_app = typer.Typer(help="The control-plane process.", no_args_is_help=True)
engine_app = typer.Typer(help="Engine-host processes.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(control_app, name="control")
app.add_typer(engine_app, name="engine")
app.add_typer(config_app, name="config")
console = Console()


# Choices shown by --help and checked before anything starts (typer reads Literal types as choices).
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
EngineKind = Literal["vllm", "sim", "torch"]
EngineRole = Literal["interactive", "mixed", "batch"]
DispatchName = Literal[
    "round_robin", "least_loaded", "freeness", "prefix_affinity", "infaas++", "infaas", "llumnix", "rr"
]


def settings(extra: dict[str, dict[str, Any]] | None = None, *, use_context: bool = True) -> Settings:
    """Effective settings of the running command (global options, then ``extra`` flag values)."""
    return cli_settings(None, extra, use_context=use_context)


@app.callback()
def main(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML settings file.", envvar="DROVER_CONFIG"),
    nats_url: str | None = typer.Option(
        None,
        "--nats-url",
        help="The cluster's NATS URL. Default: $DROVER_NATS__URL, the --config file, else the current context "
        "(`drover context show`); `drover up`/`control serve` without one start an embedded server.",
    ),
    log_level: LogLevel | None = typer.Option(
        None,
        "--log-level",
        case_sensitive=False,
        help=f"Python log level (default: {setting_default('observability', 'log_level')}).",
    ),
) -> None:
    """Global options; they come before the command."""
    set_root_options(config=config, nats_url=nats_url, log_level=log_level.upper() if log_level else None)


def _need_url(s: Settings) -> str:
    return need_url(s)


_POLICY_ALIASES = {"infaas++": "least_loaded", "infaas": "least_loaded", "llumnix": "freeness", "rr": "round_robin"}
"""Names the papers and docs use for dispatch policies (INFaaS++ is least_loaded, Llumnix's is freeness)."""
_DISPATCH_CHOICES = get_args(DispatchName)


def _policy_name(name: str | None) -> str | None:
    return _POLICY_ALIASES.get(name.lower(), name) if name else name


# --------------------------------------------------------------------------------------------------- processes
@control_app.command("serve")
def control_serve(
    policy: DispatchName | None = typer.Option(
        None,
        help="Dispatch policy (default: settings' policy.dispatch_policy).",
    ),
) -> None:
    """Run the control plane (Supervisor, Scheduler) until SIGTERM."""
    from control.apps.processes import serve_control

    serve_control(settings({"policy": {"dispatch_policy": _policy_name(policy)}}, use_context=False))


@engine_app.command("serve")
def engine_serve(
    instance_id: str = typer.Option(..., "--instance-id", help="Unique id of this instance."),
    kind: EngineKind | None = typer.Option(None, "--kind", help=f"(default: {setting_default('engine', 'kind')})"),
    role: EngineRole | None = typer.Option(None, "--role", help=f"(default: {setting_default('engine', 'role')})"),
) -> None:
    """Run one engine instance (vLLM or simulated) until SIGTERM (drains first) or SIGINT (stops at once)."""
    from control.apps.processes import serve_engine
    from transport.subjects import validate_token

    try:
        validate_token(instance_id)
    except ValueError as exc:
        fail(f"--instance-id: {exc}")
    serve_engine(settings({"engine": {"kind": kind, "role": role}}, use_context=False), instance_id)


@app.command()
def up(
    instances: int | None = typer.Option(
        None,
        "--instances",
        "-n",
        min=1,
        help=f"Engine instances to start (default: {setting_default('demo', 'instances')}).",
    ),
    kind: EngineKind | None = typer.Option(
        None,
        "--kind",
        help=f"Engine kind (default: {setting_default('engine', 'kind')}).",
    ),
    requests: int | None = typer.Option(
        None, "--requests", min=0, help=f"Demo requests to submit (default: {setting_default('demo', 'requests')})."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help=f"Tokens per demo request (default: {setting_default('demo', 'max_tokens')})."
    ),
    keep: bool = typer.Option(False, "--keep", help="Keep the cluster running after the demo (Ctrl-C stops)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Where process logs go (default: a new temp dir)."),
    secure: bool | None = typer.Option(
        None, "--secure", help="Embedded NATS with generated per-role credentials and subject permissions."
    ),
    context_name: str | None = typer.Option(
        None, "--context", help="Name of the cluster context this writes (default: local-<NATS port>)."
    ),
) -> None:
    """Start a local cluster (embedded NATS, control plane, engines), run a demo workload, print a summary.

    It records a cluster context, so other commands find this cluster without --nats-url. On Ctrl-C or
    SIGTERM it stops every process it started (engines, control plane, nats-server) within about 20 s,
    saying what it stops; if it is killed outright, its children get a parent-death signal and stop too."""
    from control.apps.launcher import STOP_BOUND_S, local_cluster, run_workload, summarize, wait_ready

    s = settings(
        {
            "engine": {"kind": kind},
            "demo": {"instances": instances, "requests": requests, "max_tokens": max_tokens},
            "nats": {"secure": secure},
        },
        use_context=False,
    )
    demo = s.demo
    _stop_on_sigterm()
    if s.engine.kind == "vllm":
        with console.status("building the tiny model (once, cached)..."):
            from actors.engine_host import resolve_model_dir

            model_dir = resolve_model_dir(s)
        console.print(f"model: {model_dir}")

    def progress_line(line: str) -> None:
        console.print(f"[dim]up:[/] {line}", highlight=False)

    context_saved: str | None = None
    try:
        with local_cluster(s, demo.instances, work_dir, on_progress=progress_line) as cluster:
            console.print(f"NATS at [bold]{cluster.url}[/]; logs in {cluster.work_dir}", soft_wrap=True)
            if cluster.secure is not None:
                console.print(
                    f"NATS credentials per role in {cluster.secure.directory} (operator: operator.toml)", soft_wrap=True
                )
            context_saved = _save_up_context(cluster, context_name)
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
            ) as progress:
                progress.add_task(f"starting control plane and {demo.instances} {s.engine.kind} engines...")
                asyncio.run(wait_ready(cluster, demo.instances, timeout_s=600))
            metrics_url = cluster.metrics_url()
            console.print(
                f"[green]{demo.instances} instances serving[/]; control plane metrics and health at "
                f"{metrics_url}/metrics, /healthz, /readyz",
                soft_wrap=True,
            )
            if demo.requests:
                console.print(f"submitting {demo.requests} requests")
                _run_demo(cluster, demo, run_workload, summarize)
            if keep:
                console.print(
                    f"cluster stays up; context {context_saved!r}: `drover status`, `drover top` find it "
                    f"(Ctrl-C stops; stopping takes at most {STOP_BOUND_S:.0f}s)",
                    soft_wrap=True,
                )
                while True:
                    cluster.check_alive()
                    time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        if context_saved:
            from control.apps.cli_common import remove_context

            remove_context(context_saved, only_pid=os.getpid())


def _stop_on_sigterm() -> None:
    """SIGTERM stops `drover up` the way Ctrl-C does (its cluster is stopped in order, not orphaned)."""

    def interrupt(signum: int, _frame: object) -> None:
        # Once stopping has begun, further signals must not cut the clean-up short (it has its own bound).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def _save_up_context(cluster: Any, name: str | None) -> str:
    from control.apps.cli_common import ClusterContext, context_name_for, save_context

    context = ClusterContext(
        name=name or context_name_for(cluster.url),
        nats_url=cluster.url,
        config=str(cluster.secure.directory / "operator.toml") if cluster.secure else None,
        work_dir=str(cluster.work_dir),
        traces=cluster.settings.observability.jsonl_path,
        metrics_url=cluster.metrics_url(),
        pid=os.getpid(),
        created_at=time.time(),
    )
    path = save_context(context)
    console.print(f"context {context.name!r} saved in {path}", soft_wrap=True)
    return context.name


def _run_demo(cluster: Any, demo: Any, run_workload: Any, summarize: Any) -> None:
    started = time.perf_counter()
    results = asyncio.run(
        run_workload(cluster.url, demo.requests, demo.max_tokens, demo.concurrency, nats_settings=cluster.client_nats)
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
    console.print(f"sample output: [italic]{results[0].text[:80]!r}[/]")


# --------------------------------------------------------------------------------------------------- client
@app.command()
def submit(
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    priority: int = typer.Option(0, "--priority"),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive."),
    request_id: str | None = typer.Option(None, "--request-id"),
    timeout_s: float = typer.Option(
        60.0,
        "--timeout",
        min=0.1,
        help="Give up after this many seconds: Drover ends the request (DEADLINE_EXCEEDED) and so does the CLI.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result (text, usage, timings) as JSON."),
) -> None:
    """Submit one request and print its output."""
    from control.client import DroverClient, ReplyError
    from observability.tracing import setup_tracing, shutdown_tracing

    s = settings()
    url = _need_url(s)
    obs = s.observability
    # The client's submit span goes to the same place as the cluster's, so `drover trace` shows it. With the
    # exporter off, no tracer provider is installed (one per process: an embedding program keeps its own).
    if obs.exporter != "none":
        setup_tracing(
            f"{obs.service_name}-cli", obs.exporter, jsonl_path=_trace_path(s), otlp_endpoint=obs.otlp_endpoint
        )

    async def go() -> int:
        client = await DroverClient(url, name="drover-cli", nats_settings=s.nats).connect(**CLI_CONNECT)
        try:
            req = await client.submit(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                priority=priority,
                request_id=request_id,
                deadline_s=timeout_s,
            )

            async def consume() -> None:
                async for event in req.events():
                    if stream and not as_json:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()

            try:
                # Drover enforces the deadline; the extra seconds cover a control plane that is not there.
                await asyncio.wait_for(consume(), timeout_s + 5.0)
            except TimeoutError:
                fail(f"no result within {timeout_s:g}s (--timeout): is any instance serving? `drover instances`")
            except ReplyError as exc:
                fail(f"{exc.code}: {exc.message}", EXIT_REFUSED)
        finally:
            await client.close()
        result = req.result_data
        done = result.done
        if as_json:
            emit_json({"request_id": req.request_id, "text": result.text, "done": done})
            return 0
        if stream:
            sys.stdout.write("\n")
        else:
            console.print(result.text, markup=False, highlight=False, soft_wrap=True)
        if done is not None:
            console.print(
                f"[dim]{done.request_id}: {done.usage.completion_tokens} tokens, finish={done.finish_reason}, "
                f"ttft={done.timings.ttft_s * 1e3:.1f} ms, instances={','.join(done.instances)}[/]",
                soft_wrap=True,
            )
        return 0

    try:
        code = asyncio.run(go())
    finally:
        shutdown_tracing()
    raise typer.Exit(code)


def _trace_path(s: Settings) -> str:
    from control.apps.cli_common import context_traces

    return str(context_traces(s))


def _status(timeout_s: float) -> Any:
    return admin_call(lambda c: c.status(timeout_s=timeout_s))


def listing(title: str) -> Table:
    """A listing table that fits 80 columns: light borders; cells fold rather than end in "…"."""
    from rich import box

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def add_column(table: Table, name: str, justify: str = "left") -> None:
    table.add_column(name, overflow="fold", justify=justify)  # type: ignore[arg-type]


def add_id_column(table: Table, name: str, values: list[str]) -> None:
    """A column for ids: never cut or wrapped (an id must survive copy and paste at any terminal width);
    the other columns wrap around it."""
    table.add_column(name, no_wrap=True, min_width=max((len(v) for v in values), default=len(name)))


def _instances_table(status: Any) -> Table:
    table = listing(f"instances (dispatch: {status.dispatch_policy})")
    add_id_column(table, "instance", [i.info.instance_id for i in status.instances])
    for column in ("kind", "model", "state", "phase", "free/total", "run", "wait", "disp", "cached", "age s"):
        add_column(table, column, "left" if column in ("kind", "model", "state", "phase") else "right")
    for inst in status.instances:
        load = inst.load
        table.add_row(
            inst.info.instance_id,
            inst.info.engine_kind,
            inst.info.model,
            inst.state,
            inst.phase,  # prefill/decode disaggregation
            f"{load.num_free_blocks}/{load.num_total_blocks}",
            str(load.num_running),
            str(load.num_waiting),
            str(inst.dispatched),
            str(inst.cached_blocks) if inst.cached_blocks >= 0 else "-",  # prefix cache (KV events)
            f"{inst.age_s:.1f}",
        )
    return table


def _requests_table(status: Any) -> Table:
    table = listing(f"requests ({status.queued} queued)")
    add_id_column(table, "request", [r.request_id for r in status.requests])
    for column in ("instance", "state", "prompt", "prio", "class", "age s"):
        add_column(table, column, "right" if column in ("prompt", "prio", "age s") else "left")
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
def status(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP), timeout_s: float = read_timeout_option()
) -> None:
    """Cluster overview: instances with load, queue, running requests, actor health."""
    st = _status(timeout_s)
    if as_json:
        emit_json(st)
        return
    console.print(_instances_table(st))
    console.print(_requests_table(st))
    if st.groups:
        from control.apps.cli_memory import groups_table

        console.print(groups_table(st))
    console.print("actors: " + ", ".join(f"{k}={v}" for k, v in st.actors.items()))


@app.command()
def instances(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP), timeout_s: float = read_timeout_option()
) -> None:
    """Instances with their load."""
    st = _status(timeout_s)
    if as_json:
        emit_json(st.instances)
        return
    console.print(_instances_table(st))


@app.command("requests")
def requests_cmd(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP), timeout_s: float = read_timeout_option()
) -> None:
    """Requests the control plane knows (queued and running)."""
    st = _status(timeout_s)
    if as_json:
        emit_json(st.requests)
        return
    console.print(_requests_table(st))


def admin_call(call: Any) -> Any:
    """Run an admin coroutine factory ``call(client)`` against the cluster. Errors propagate: the root app
    reports each as one line (an error reply: exit 1; unreachable, no answer: exit 2)."""
    from control.client import DroverClient

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

    return asyncio.run(go())


@app.command()
def migrate(
    request_id: str = typer.Argument(..., help="Running request to move."),
    to: str = typer.Option("", "--to", help="Destination instance (default: the freest compatible one)."),
) -> None:
    """Live-migrate a running request with its KV cache; waits for commit or abort."""

    async def go(client: Any) -> Any:
        if to:  # blame the right thing: a destination that is where the request already runs, or unknown
            st = await client.status()
            known = {i.info.instance_id for i in st.instances}
            if to not in known:
                fail(f"--to {to}: no such instance (instances: {', '.join(sorted(known)) or 'none'})")
            where = next((r.instance_id for r in st.requests if r.request_id == request_id), None)
            if where == to:
                fail(f"{request_id} already runs on {to}: pick another --to, or leave it out")
        return await client.migrate(request_id, to)

    reply = admin_call(go)
    colour = "green" if reply.ok else "red"
    console.print(
        f"[{colour}]{reply.message}[/] " + " ".join(f"{k}={v}" for k, v in reply.details.items()), soft_wrap=True
    )
    raise typer.Exit(0 if reply.ok else EXIT_REFUSED)


@app.command()
def drain(
    instance_id: str = typer.Argument(..., help="Instance to drain."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every request has moved off."),
    timeout_s: float = typer.Option(300.0, "--timeout", min=0.1, help="Seconds to wait."),
    undo: bool = typer.Option(False, "--undo", help="Put a drained instance back into service."),
) -> None:
    """Stop dispatching to an instance and migrate its running requests away."""
    reply = admin_call(lambda c: c.drain(instance_id, undo=undo))
    console.print(reply.message, soft_wrap=True)
    if undo or not wait:
        return

    async def watch(client: Any) -> str:
        deadline = time.monotonic() + timeout_s
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task(f"draining {instance_id}")
            while time.monotonic() < deadline:
                # the wait's own deadline bounds each status read (asked again while no control plane answers)
                status = await client.status(timeout_s=max(0.1, min(5.0, deadline - time.monotonic())))
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
    raise typer.Exit(0 if outcome in ("drained", "gone") else EXIT_REFUSED)


policy_app = typer.Typer(
    help="Scheduling policy parameters (dispatch, migration), changeable at run time.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


def _print_policy(values: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        emit_json(values)
        return
    table = Table(title="policy")
    table.add_column("parameter", no_wrap=True)
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, str(value))
    console.print(table)


@policy_app.command("get")
def policy_get(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP), timeout_s: float = read_timeout_option()
) -> None:
    """Show the scheduler's current policy parameters."""
    _print_policy(admin_call(lambda c: c.policy(timeout_s=timeout_s)), as_json)


@policy_app.command("set")
def policy_set(
    assignments: list[str] = typer.Argument(
        ...,
        help="NAME=VALUE pairs (names: `drover policy get`). dispatch_policy: "
        + ", ".join(_DISPATCH_CHOICES)
        + " (infaas++ = least_loaded, llumnix = freeness).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Change policy parameters, e.g. `drover policy set dispatch_policy=least_loaded migrate_threshold=5`."""
    changes: dict[str, str] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"expected NAME=VALUE, got {item!r}")
        name, value = name.strip(), value.strip()
        changes[name] = (_policy_name(value) or value) if name == "dispatch_policy" else value
    _print_policy(admin_call(lambda c: c.policy(changes)), as_json)


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Print the effective settings (defaults < cluster context < file < environment < flags)."""
    s = settings()
    if as_json:
        emit_json(s)
    else:
        console.print(dump_toml(s), markup=False, highlight=False, soft_wrap=True)


context_app = typer.Typer(
    help="Cluster contexts: how commands find a cluster without --nats-url (`drover up` records one).",
    no_args_is_help=True,
)
app.add_typer(context_app, name="context")


@context_app.command("show")
def context_show(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The contexts known, the current one marked with *; where the file is."""
    from control.apps.cli_common import context_path, list_contexts

    current, found = list_contexts()
    if as_json:
        emit_json({"file": context_path(), "current": current, "contexts": found})
        return
    if not found:
        console.print(f"no contexts in {context_path()} (`drover up` records one)", soft_wrap=True)
        return
    table = Table(title=f"contexts ({context_path()})")
    table.add_column("", no_wrap=True)
    add_id_column(table, "name", [c.name for c in found])
    add_id_column(table, "NATS URL", [c.nats_url for c in found])
    for column in ("metrics", "written by"):
        table.add_column(column)
    for c in found:
        age = time.time() - c.created_at if c.created_at else 0.0
        table.add_row(
            "*" if c.name == current else "", c.name, c.nats_url, c.metrics_url or "-", f"pid {c.pid}, {age:.0f}s ago"
        )
    console.print(table)


@context_app.command("use")
def context_use(name: str = typer.Argument(..., help="Context to make current.")) -> None:
    """Make NAME the current context."""
    from control.apps.cli_common import use_context

    context = use_context(name)
    console.print(f"current context: {context.name} ({context.nats_url})", soft_wrap=True)


@context_app.command("clear")
def context_clear(
    name: str | None = typer.Argument(None, help="Context to forget (default: the current one)."),
    clear_all: bool = typer.Option(False, "--all", help="Forget every context."),
) -> None:
    """Forget a context (commands then need --nats-url again)."""
    from control.apps.cli_common import clear_contexts, remove_context

    if clear_all:
        clear_contexts()
        console.print("no contexts")
        return
    if not remove_context(name):
        fail(f"no context {name!r}" if name else "no current context")
    console.print(f"forgot context {name or '(current)'}")


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
from control.apps.cli_pd import register as _register_pd_commands  # noqa: E402

_register_pd_commands(app)

if __name__ == "__main__":
    app()
