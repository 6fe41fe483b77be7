"""`drover top`: a live terminal dashboard of a cluster, redrawn from the control plane's status.

Each frame shows the instances (kind, state, KV use, running, waiting, dispatch rate), the scheduler's queue
and requests in flight by state and class, the scheduler's migration tally, the requests that changed
instance between frames (a committed migration, or a failover after an engine died), and the autoscaler's
last decision with its reason ("autoscaler off" when it is disabled).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from control.apps.metrics_exporter import SloTally
from control.client import DroverClient
from observability.metrics import SloRow
from transport import subjects
from transport.messages import (
    AutoscaleStatusReply,
    EngineRequestEnded,
    InstanceStatus,
    ProtocolError,
    StatusReply,
    decode,
)

if TYPE_CHECKING:
    from control.policy.autoscaling import SloParams
    from control.settings import NatsSettings

KV_BAR_WIDTH = 20
OLDEST_SHOWN = 8
WIDE = 120
"""At fewer columns than this a frame drops the columns an operator can do without (kind, model, heartbeat) and
narrows the KV bar, so that ids stay whole at 80 columns."""


@dataclass
class TopState:
    """What one frame needs from earlier frames: dispatch counters and where each request ran."""

    previous: StatusReply | None = None
    previous_at: float = 0.0
    placements: dict[str, str] = field(default_factory=dict)  # request id -> instance id
    moves_seen: int = 0
    recent_moves: list[tuple[str, str, str]] = field(default_factory=list)  # request, from, to

    def observe(self, status: StatusReply, now: float) -> dict[str, float]:
        """Record ``status``; returns dispatches per second per instance since the previous frame."""
        rates: dict[str, float] = {}
        if self.previous is not None and now > self.previous_at:
            before = {i.info.instance_id: i.dispatched for i in self.previous.instances}
            for inst in status.instances:
                iid = inst.info.instance_id
                if iid in before:
                    rates[iid] = max(0, inst.dispatched - before[iid]) / (now - self.previous_at)
        moves: list[tuple[str, str, str]] = []
        placements: dict[str, str] = {}
        for req in status.requests:
            if req.instance_id is None:
                continue
            was = self.placements.get(req.request_id)
            if was is not None and was != req.instance_id:
                moves.append((req.request_id, was, req.instance_id))
            placements[req.request_id] = req.instance_id
        self.moves_seen += len(moves)
        self.recent_moves = (moves + self.recent_moves)[:OLDEST_SHOWN]
        self.placements = placements
        self.previous, self.previous_at = status, now
        return rates


def slo_table(rows: list[SloRow], window_s: float) -> Table:
    """SLO attainment and goodput per request class and client, over the last ``window_s``."""
    table = Table(title=f"SLOs (last {window_s:.0f}s)", title_justify="left", box=None, pad_edge=False)
    for column, justify in (("class", "left"), ("client", "left"), ("ended", "right"), ("met", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    table.add_column("goodput tok/s", justify="right")
    for r in rows:
        colour = "green" if r.attainment >= 0.99 else "yellow" if r.attainment >= 0.9 else "red"
        table.add_row(
            r.request_class,
            r.client,
            str(r.requests),
            Text(f"{r.attainment * 100:.1f}%", style=colour),
            f"{r.goodput_tokens_per_s:.1f}",
        )
    if not rows:
        table.add_row("-", "no request ended yet", "0", "-", "0.0")
    return table


def kv_bar(inst: InstanceStatus, width: int = KV_BAR_WIDTH) -> Text:
    """Used KV blocks as a bar, coloured by how full the instance is."""
    total = max(1, inst.load.num_total_blocks)
    used = total - inst.load.num_free_blocks
    fraction = min(1.0, max(0.0, used / total))
    filled = round(fraction * width)
    colour = "green" if fraction < 0.6 else "yellow" if fraction < 0.85 else "red"
    bar = Text("█" * filled, style=colour)
    bar.append("·" * (width - filled), style="dim")
    bar.append(f" {fraction * 100:5.1f}%")
    return bar


def _state(state: str) -> Text:
    colour = {"serving": "green", "draining": "yellow", "drained": "blue", "starting": "cyan"}.get(state, "red")
    return Text(state, style=colour)


def autoscaler_line(autoscale: AutoscaleStatusReply | str | None, now: float | None = None) -> Text:
    """The autoscaler's last decision and why, one line; a string: why its status is unavailable."""
    if autoscale is None:
        return Text("autoscaler: no answer", style="dim")
    if isinstance(autoscale, str):
        return Text(f"autoscaler: unavailable ({autoscale})", style="yellow")
    if not autoscale.enabled:
        return Text("autoscaler off", style="dim")
    targets = ", ".join(f"{r.role} {r.instances}+{r.starting}/{r.target}" for r in autoscale.roles if r.max_instances)
    line = Text.assemble(("autoscaler ", "bold"), f"({autoscale.provisioner}; active+starting/target: {targets})  ")
    if not autoscale.last_decision_at:
        line.append("no decision yet", style="dim")
        return line
    ago = max(0.0, (now if now is not None else time.time()) - autoscale.last_decision_at)
    line.append(f"last decision {ago:.0f}s ago: ")
    line.append(autoscale.last_reason or "-", style="cyan")
    return line


def render_frame(
    status: StatusReply,
    rates: dict[str, float],
    state: TopState,
    *,
    url: str = "",
    interval_s: float = 0.0,
    autoscale: AutoscaleStatusReply | str | None = None,
    slo: list[SloRow] | None = None,
    slo_window_s: float = 60.0,
    width: int = WIDE,
    height: int = 0,
) -> RenderableType:
    """One dashboard frame (a pure function of the status and the history in ``state``), fitted to ``width``
    columns and, when ``height`` is given, that many lines (the long lists are cut, saying how many are left)."""
    compact = width < WIDE
    serving = sum(1 for i in status.instances if i.state == "serving")
    running = sum(1 for r in status.requests if r.state == "running")
    header = Text.assemble(
        ("drover top", "bold"),
        f"  {url}" if url else "",
        (f"  every {interval_s:g}s" if interval_s else "", "dim"),
        "\n",
        f"policy {status.dispatch_policy}  instances {serving}/{len(status.instances)} serving  ",
        f"queued {status.queued}  in flight {len(status.requests)} ({running} running)\n",
        f"migrations {len(status.migrations_in_flight)} running, {status.migrations_completed} done, "
        f"{status.migrations_aborted} aborted  moves seen {state.moves_seen}",
    )
    columns = [("instance", "left"), ("state", "left"), ("KV used", "left")]
    if not compact:
        columns[1:1] = [("kind", "left"), ("model", "left")]
        columns += [("free/total", "right")]
    columns += [("run", "right"), ("wait", "right"), ("disp", "right"), ("disp/s", "right")]
    if not compact:
        columns.append(("heartbeat", "right"))
    instances = Table(title="instances", title_justify="left", box=None, pad_edge=False)
    longest = max((len(i.info.instance_id) for i in status.instances), default=8)
    for column, justify in columns:
        instances.add_column(
            column,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            min_width=longest if column == "instance" else None,
        )
    for inst in status.instances:
        load = inst.load
        rate = rates.get(inst.info.instance_id)
        cells: dict[str, RenderableType] = {
            "instance": inst.info.instance_id,
            "kind": inst.info.engine_kind,
            "model": inst.info.model,
            "state": _state(inst.state),
            "KV used": kv_bar(inst, 8 if compact else KV_BAR_WIDTH),
            "free/total": f"{load.num_free_blocks}/{load.num_total_blocks}",
            "run": str(load.num_running),
            "wait": str(load.num_waiting),
            "disp": str(inst.dispatched),
            "disp/s": "-" if rate is None else f"{rate:.1f}",
            "heartbeat": f"{inst.age_s:.1f}s ago",
        }
        instances.add_row(*(cells[c] for c, _ in columns))
    by_class = Counter((str(r.request_class), r.state) for r in status.requests)
    requests = Table(title="requests in flight", title_justify="left", box=None, pad_edge=False)
    requests.add_column("class")
    requests.add_column("queued", justify="right")
    requests.add_column("running", justify="right")
    requests.add_column("high priority", justify="right")
    for request_class in sorted({c for c, _ in by_class} | {"interactive"}):
        high = sum(1 for r in status.requests if str(r.request_class) == request_class and r.priority > 0)
        requests.add_row(
            request_class,
            str(by_class[(request_class, "queued")]),
            str(by_class[(request_class, "running")]),
            str(high),
        )
    # Lines left for the oldest requests when the terminal is short: header 3, autoscaler 1, titles and
    # column heads 2 each, the other tables' rows; the rest (at least 1) for requests.
    shown = OLDEST_SHOWN
    if height:
        used = 3 + 1 + 2 + len(status.instances) + 2 + max(1, len(by_class)) + 2 + 2 + max(1, len(slo or []))
        shown = max(1, min(OLDEST_SHOWN, height - used - 2))
    oldest = Table(
        title=f"oldest requests ({min(shown, len(status.requests))} of {len(status.requests)})",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for column in ("request", "instance", "state", "prompt", "prio", "age s"):
        oldest.add_column(
            column,
            justify="right" if column in ("prompt", "prio", "age s") else "left",
            overflow="fold",
            no_wrap=column == "request",
        )
    migrating = set(status.migrations_in_flight)
    for req in sorted(status.requests, key=lambda r: -r.age_s)[:shown]:
        oldest.add_row(
            req.request_id,
            req.instance_id or "-",
            req.state + (" (migrating)" if req.request_id in migrating else ""),
            str(req.prompt_tokens),
            str(req.priority),
            f"{req.age_s:.1f}",
        )
    parts: list[RenderableType] = [header, autoscaler_line(autoscale), instances, requests]
    if slo is not None:
        parts.append(slo_table(slo, slo_window_s))
    parts.append(oldest)
    if state.recent_moves and not height:
        moves = Table(title="recent moves (migration or failover)", title_justify="left")
        for column in ("request", "from", "to"):
            moves.add_column(column)
        for rid, source, destination in state.recent_moves:
            moves.add_row(rid, source, destination)
        parts.append(moves)
    if status.actors and not height:
        parts.append(Text("actors: " + ", ".join(f"{k}={v}" for k, v in sorted(status.actors.items())), style="dim"))
    return Group(*parts)


async def run_top(
    url: str,
    *,
    interval_s: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    connect_options: dict[str, object] | None = None,
    nats_settings: NatsSettings | None = None,
    slo: SloParams | None = None,
) -> None:
    """Poll the cluster at ``url`` and redraw every ``interval_s``; ``once`` prints one frame and returns.

    A frame needs two polls for dispatch rates, so ``once`` polls twice, ``interval_s`` apart (at most 1 s).
    SLO attainment comes from the engines' request-ended events seen since top started (last minute)."""
    console = console or Console()
    state = TopState()
    tally = SloTally(slo)
    client = await DroverClient(url, name="drover-top", nats_settings=nats_settings).connect(**(connect_options or {}))

    async def on_event(msg: Any) -> None:
        try:
            event = decode(msg.data)
        except ProtocolError:
            return
        if isinstance(event, EngineRequestEnded):
            tally.observe(event)

    with contextlib.suppress(Exception):  # a user without permission to read engine events: no SLO table
        await client.nc.subscribe(subjects.ENGINE_EVENTS, cb=on_event)

    def frame(status: StatusReply, rates: dict[str, float], scaling: Any, interval: float = 0.0) -> RenderableType:
        width, height = console.size
        return render_frame(
            status,
            rates,
            state,
            url=url,
            interval_s=interval,
            autoscale=scaling,
            slo=tally.rows(),
            slo_window_s=tally.window_s,
            width=width,
            height=0 if once else height,
        )

    async def autoscale() -> AutoscaleStatusReply | str:
        try:
            return await client.autoscale_status(timeout_s=min(5.0, max(1.0, interval_s)))
        except Exception as exc:  # e.g. a client-role user may not ask it; the rest of the frame still shows
            return str(exc) or type(exc).__name__

    try:
        if once:
            state.observe(await client.status(), time.monotonic())
            await asyncio.sleep(min(interval_s, 1.0))
            status = await client.status()
            rates = state.observe(status, time.monotonic())
            console.print(frame(status, rates, await autoscale()))
            return
        with Live(console=console, auto_refresh=False, screen=False, vertical_overflow="crop") as live:
            while True:
                try:
                    status = await client.status()
                except Exception as exc:  # keep the last frame and say why it is stale; retry next tick
                    live.update(
                        Group(live.renderable, Text(f"no answer from the control plane: {exc!r}", style="red")),
                        refresh=True,
                    )
                else:
                    rates = state.observe(status, time.monotonic())
                    scaling = await autoscale()
                    live.update(frame(status, rates, scaling, interval_s), refresh=True)
                await asyncio.sleep(interval_s)
    finally:
        await client.close()
