"""The control plane's own ceiling: accepted submits/s with many simulated engines connected over NATS.

    python -m scripts.bench_control_ceiling [--engines 1000] [--hosts 4] [--rates 50,100,200,400,800]
                                            [--step-s 8] [--max-tokens 2] [--heartbeat-s 0.25] [--json FILE]

One embedded nats-server, one control-plane process (``drover control serve``, as ``drover up`` starts it),
``--hosts`` engine-host processes each serving ``engines / hosts`` sim engines (one NATS connection per host
process; each engine keeps its own EngineActor and heartbeat thread, as in ``drover engine serve``), and
this process as the client. Engines run in real time with tiny requests (``--max-tokens``), so what limits
the rate is the control plane, NATS or the client, never the engines' capacity.

Per offered rate (open loop for ``--step-s`` seconds): submits accepted per second (an ``Accepted`` reply
within the step plus 5 s), their accept latency p50/p99, requests finished, and the CPU each process used
(as a share of one core) with the control plane's busiest threads by name, each with the share of the
wall time it was runnable but waiting for a CPU (schedstat), which says where it saturates:
the scheduler's actor thread, the bus's event-loop thread (NATS I/O, heartbeat decoding), nats-server, or
the client. Before the first step the idle cost is measured: the heartbeats alone
(``engines / heartbeat-s`` messages a second). Bounded: start-up of the engines plus one step per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from control.client import DroverClient
from control.settings import dump_toml, load_settings
from transport.nats_server import EmbeddedNatsServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting from /proc ---------------------------------------------------------------------------
def thread_names(path: Path) -> dict[int, str]:
    """Native thread id -> Python thread name, as the control-plane wrapper last wrote them."""
    try:
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return {}


def thread_cpu(pid: int, names: dict[int, str]) -> dict[str, tuple[float, float]]:
    """(CPU seconds, seconds spent runnable but waiting for a CPU) per thread name (threads of one name
    summed, digits dropped) of process ``pid``, from /proc/PID/task/TID/schedstat."""
    out: dict[str, tuple[float, float]] = {}
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else ():
        try:
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
            name = name.rstrip("0123456789-_ ") or name
            run_ns, wait_ns = (int(v) for v in (task / "schedstat").read_text().split()[:2])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        cpu, wait = out.get(name, (0.0, 0.0))
        out[name] = (cpu + run_ns / 1e9, wait + wait_ns / 1e9)
    return out


def process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU used between ``start`` and ``stop`` by each watched process, and per thread of the control plane."""

    def __init__(self, processes: dict[str, int], control_pid: int, names_file: Path) -> None:
        self.processes = processes
        self.control_pid = control_pid
        self.names_file = names_file
        self._t0 = 0.0
        self._before: dict[str, float] = {}
        self._threads: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._before = {name: process_cpu(pid) for name, pid in self.processes.items()}
        self._before["client"] = time.process_time()
        self._threads = thread_cpu(self.control_pid, thread_names(self.names_file))

    def stop(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self._t0)
        after = {name: process_cpu(pid) for name, pid in self.processes.items()}
        after["client"] = time.process_time()
        share = {name: round((after[name] - self._before[name]) / wall, 3) for name in after}
        threads = thread_cpu(self.control_pid, thread_names(self.names_file))
        per_thread = {}
        for name, (cpu, wait) in threads.items():
            cpu0, wait0 = self._threads.get(name, (0.0, 0.0))
            per_thread[name] = {
                "cpu": round((cpu - cpu0) / wall, 3),
                "waiting_for_cpu": round((wait - wait0) / wall, 3),
            }
        busiest = dict(sorted(per_thread.items(), key=lambda kv: -kv[1]["cpu"])[:4])
        hosts = sum(v for k, v in share.items() if k.startswith("host"))
        return {
            "cpu_cores": {k: v for k, v in share.items() if not k.startswith("host")}
            | {"engine_hosts": round(hosts, 3)},
            "control_threads": busiest,
        }


# -- processes ---------------------------------------------------------------------------------------------
def serve_control(config: Path, names_file: Path) -> None:
    """``drover control serve``, plus a thread that writes the native id -> name of every Python thread
    each half second (Python does not name OS threads, and /proc shows only "python")."""
    from control.apps.processes import serve_control as serve

    def dump_names() -> None:
        while True:
            names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            tmp = names_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(names))
            tmp.replace(names_file)
            time.sleep(0.5)

    threading.Thread(target=dump_names, name="ceiling-thread-names", daemon=True).start()
    serve(load_settings(config))


# -- engine hosts ------------------------------------------------------------------------------------------
def serve_host(config: Path, first: int, count: int) -> None:
    """Serve ``count`` sim engines (engine-FIRST ...) on one NATS connection until SIGINT/SIGTERM."""
    from actors.engine_host import EngineHost, build_engine
    from transport.bus import Bus, BusOptions

    settings = load_settings(config)
    assert settings.nats.url
    bus = Bus(BusOptions(url=settings.nats.url, name=f"ceiling-host-{first}")).start()
    hosts: list[EngineHost] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for index in range(first, first + count):
            engine, tokenizer = build_engine(settings, f"engine-{index}")
            hosts.append(EngineHost(settings, bus, engine, tokenizer).start())
        print(f"host {first}: {count} engines serving", flush=True)
        stop.wait()
    finally:
        for host in hosts:
            host.heartbeater.stop()
        for host in hosts:
            host.stop()
        bus.stop()


# -- load ----------------------------------------------------------------------------------------------
async def offered_step(client: DroverClient, rate: float, step_s: float, max_tokens: int) -> dict[str, Any]:
    """Submit at ``rate``/s for ``step_s`` s (open loop); wait up to 5 s more for accepts and results."""
    accepted_at: list[float] = []
    finished = 0
    errors: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []

    async def one(k: int) -> None:
        nonlocal finished
        started = time.perf_counter()
        try:
            stream = await client.submit(prompt_token_ids=[1 + (k % 200), 2, 3, 4], max_tokens=max_tokens)
            await asyncio.wait_for(asyncio.shield(stream.accepted), timeout=step_s + 5)
            accepted_at.append(time.perf_counter() - started)
            await asyncio.wait_for(stream.result(), timeout=step_s + 5)
            finished += 1
        except Exception as exc:  # counted by kind: a refusal (its error code), a timeout
            key = str(getattr(exc, "code", "") or type(exc).__name__)
            errors[key] = errors.get(key, 0) + 1

    start = time.perf_counter()
    total = int(rate * step_s)
    for k in range(total):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k)))
    submit_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    lat = sorted(accepted_at)
    return {
        "offered_per_s": rate,
        "submitted": total,
        "submit_s": round(submit_s, 2),
        "accepted": len(lat),
        "accepted_per_s": round(len(lat) / max(step_s, submit_s), 1),
        "finished": finished,
        "errors": errors,
        "accept_p50_ms": round(lat[len(lat) // 2] * 1e3, 1) if lat else None,
        "accept_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 1) if lat else None,
    }


async def drive(url: str, args: argparse.Namespace, meter: CpuMeter) -> dict[str, Any]:
    async with DroverClient(url, name="ceiling") as client:
        started = time.monotonic()
        await client.wait_for_instances(args.engines, timeout_s=args.startup_s)
        ready_s = time.monotonic() - started
        print(f"{args.engines} engines serving ({ready_s:.0f} s after the hosts started)", flush=True)
        meter.start()
        await asyncio.sleep(args.step_s)
        idle = meter.stop()
        print(f"idle (heartbeats only): {json.dumps(idle)}", flush=True)
        steps = []
        for rate in args.rates:
            meter.start()
            row = await offered_step(client, rate, args.step_s, args.max_tokens)
            row.update(meter.stop())
            steps.append(row)
            print(json.dumps(row), flush=True)
            if row["accepted"] < 0.5 * row["submitted"]:
                break  # well past saturation: more rate only piles up timeouts
        return {"ready_s": round(ready_s, 1), "idle": idle, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=4, help="engine-host processes (engines split evenly)")
    parser.add_argument("--rates", default="50,100,200,400,800", help="offered submits/s, comma-separated")
    parser.add_argument("--step-s", type=float, default=8.0, help="seconds per offered rate")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--heartbeat-s", type=float, default=0.25, help="engine heartbeat interval")
    parser.add_argument("--startup-s", type=float, default=300.0, help="give up if the engines take longer")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve-control", nargs=2, metavar=("CONFIG", "NAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-host", nargs=3, metavar=("CONFIG", "FIRST", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_control:
        serve_control(Path(args.serve_control[0]), Path(args.serve_control[1]))
        return
    if args.serve_host:
        serve_host(Path(args.serve_host[0]), int(args.serve_host[1]), int(args.serve_host[2]))
        return
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        parser.error(f"--rates expects numbers, got {args.rates!r}")
    if args.engines < 1 or args.hosts < 1:
        parser.error("--engines and --hosts must be at least 1")
    settings = load_settings(
        None,
        {
            "engine": {"kind": "sim", "heartbeat_interval_s": args.heartbeat_s, "max_num_seqs": 64},
            # one client offers all the load: the per-client and total bounds must not be what refuses it
            "limits": {
                "max_in_flight_per_client": 1_000_000,
                "max_in_flight_requests": 1_000_000,
                "max_queued_per_client": 1_000_000,
            },
            "observability": {"exporter": "none", "log_level": "WARNING"},
        },
    )
    work_dir = Path(tempfile.mkdtemp(prefix="drover-ceiling-"))
    nats = EmbeddedNatsServer(host="127.0.0.1", die_with_parent=True)
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(work_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        child = subprocess.Popen(
            [sys.executable, "-m", "scripts.bench_control_ceiling", *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        children.append(child)
        return child

    try:
        url = nats.start()
        settings = settings.model_copy(update={"nats": settings.nats.model_copy(update={"url": url})})
        config = work_dir / "ceiling.toml"
        config.write_text(dump_toml(settings))
        names_file = work_dir / "control-threads.json"
        control = spawn("control", "--serve-control", str(config), str(names_file))
        per_host = -(-args.engines // args.hosts)
        hosts = [
            spawn(f"host-{first}", "--serve-host", str(config), str(first), str(min(per_host, args.engines - first)))
            for first in range(0, args.engines, per_host)
        ]
        pids = {"control": control.pid, "nats_server": nats.pid or 0}
        pids.update({f"host{i}": p.pid for i, p in enumerate(hosts)})
        meter = CpuMeter(pids, control.pid, names_file)
        result = asyncio.run(drive(url, args, meter))
        result["config"] = {
            "engines": args.engines,
            "hosts": len(hosts),
            "heartbeat_s": args.heartbeat_s,
            "max_tokens": args.max_tokens,
            "step_s": args.step_s,
            "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        }
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        for child in reversed(children):  # the hosts first, the control plane last
            child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        nats.stop()
        print(f"logs: {work_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
