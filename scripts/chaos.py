"""Chaos benchmark: a mixed workload against a live cluster while faults are injected at random.

Workload (Poisson arrivals, every request streamed and checked token by token at the client):
interactive requests (short outputs, high priority), batch requests (long outputs), and a share of both
cancelled mid-stream. Faults, one every ``--fault-every`` seconds on average, picked at random from:

  kill9     kill -9 of an engine process group (restarted under the same instance id after 1-4 s)
  sigstop   SIGSTOP of an engine process group for 1-10 s, then SIGCONT (a hung engine)
  nats      a NATS node restarted (kill -9 or SIGTERM, back after 1-3 s); with --nats-cluster 3, one of
            three nodes; with 1, the single server on the same URL
  flood     2,000 malformed messages on every subject Drover listens on
and, for the whole run, a slow-consumer client that submits long requests and never reads its inbox.

Engines run as processes (``drover engine serve --kind sim|vllm``), the control plane too; NATS is the
embedded server or a 3-node cluster (routes, clustered JetStream, output stream with 3 replicas).

It prints submitted / completed / cancelled / failed-with-error (by code) / lost (must be 0); tokens
duplicated, missing or out of order as the application sees them (must be 0; on sim engines every token is
also compared with the engine's deterministic output); recovery time p50/p99 per fault kind (fault to the
next token of every request it touched); and peak RSS per process.

    python -m scripts.chaos [--duration 300] [--kind sim|vllm] [--instances 8] [--nats-cluster 3]
                            [--rate 8] [--fault-every 8] [--faults kill9,sigstop,nats,flood] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil

from control.apps.launcher import percentile
from control.client import DroverClient, DroverError, RequestStream
from control.settings import Settings, dump_toml, load_settings
from engines.sim.engine import request_seed, token_at
from scripts.fuzz_bus import fuzz_payload
from transport import subjects
from transport.messages import RequestClass, SamplingParams, StatusReply, SubmitRequest, encode
from transport.nats_cluster import EmbeddedNatsCluster
from transport.nats_server import EmbeddedNatsServer

FAULT_KINDS = ("kill9", "sigstop", "nats", "flood")


# ----------------------------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    stopped: bool = False  # SIGSTOPped
    down: bool = False  # killed, restart pending


class ProcessCluster:
    """The control plane and engine hosts as child processes, each in a session of its own so that a fault
    reaches its whole process group (vLLM's EngineCore and workers included)."""

    def __init__(self, settings: Settings, work_dir: Path) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.config = work_dir / "drover.toml"
        self.config.write_text(dump_toml(settings))
        self.procs: dict[str, Proc] = {}

    def spawn(self, name: str, args: list[str]) -> None:
        log_file = open(self.work_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(
            [sys.executable, "-m", "control.apps.cli", "--config", str(self.config), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.procs[name] = Proc(name, args, popen)

    def start(self, instances: int) -> None:
        self.spawn("control", ["control", "serve"])
        for index in range(instances):
            self.spawn(f"engine-{index}", ["engine", "serve", "--instance-id", f"engine-{index}"])

    def signal(self, name: str, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].popen.pid, sig)

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        self.signal(name, signal.SIGKILL)
        proc.popen.wait()
        proc.down = True

    def restart(self, name: str) -> None:
        self.spawn(name, self.procs[name].args)

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.popen.poll() is None:
                self.signal(name, signal.SIGCONT)
                self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, proc in self.procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.popen.poll() is None:
                self.signal(name, signal.SIGKILL)
                proc.popen.wait()


class RssSampler:
    """Peak resident memory per named process (a process tree: an engine with vLLM's children)."""

    def __init__(self) -> None:
        self.peak_mib: dict[str, float] = defaultdict(float)

    def sample(self, pids: dict[str, int], alone: frozenset[str] = frozenset()) -> None:
        """``alone``: names measured without their children (the driver, whose children are the cluster)."""
        for name, pid in pids.items():
            try:
                root = psutil.Process(pid)
                children = [] if name in alone else root.children(recursive=True)
                rss = root.memory_info().rss + sum(c.memory_info().rss for c in children if c.is_running())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.peak_mib[name] = max(self.peak_mib[name], rss / 2**20)


def recovery_s(
    token_times: list[float], fault_at: float, settle_s: float = 2.0, horizon_s: float = 60.0
) -> float | None:
    """How long a stream took to recover from a fault: the end of its longest stall that began before the
    fault or within ``settle_s`` after it (tokens already in flight still arrive for a moment), measured
    from the fault. None when no token came after the fault (the request had ended, or was cancelled)."""
    before = [t for t in token_times if t <= fault_at]
    after = [t for t in token_times if fault_at < t <= fault_at + horizon_s]
    if not after:
        return None
    times = [before[-1] if before else fault_at, *after]
    gaps = [(b - a, b) for a, b in itertools.pairwise(times) if a <= fault_at + settle_s]
    if not gaps:
        return after[0] - fault_at
    _, end = max(gaps)
    return end - fault_at


# ----------------------------------------------------------------------------------------------- workload
@dataclass
class Tracked:
    request_id: str
    request_class: str
    max_tokens: int
    cancel_at_s: float | None
    submitted_at: float
    stream: RequestStream | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic time of each delivered token
    token_instances: list[str] = field(default_factory=list)
    outcome: str = ""  # completed | cancelled | error:<code> | (empty: still open = lost)
    duplicated: int = 0
    out_of_order: int = 0
    missing: int = 0
    wrong: int = 0  # sim only: a token that differs from the engine's deterministic output
    finish_reason: str = ""
    error: str = ""


@dataclass
class Fault:
    kind: str
    at: float
    target: str
    affected: list[str]


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.requests: dict[str, Tracked] = {}
        self.faults: list[Fault] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.rss = RssSampler()
        self.slow_submitted = 0
        self.flood_sent = 0
        self.nats_server: EmbeddedNatsServer | None = None
        self.nats_cluster: EmbeddedNatsCluster | None = None
        self.cluster: ProcessCluster | None = None
        self.client: DroverClient | None = None
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------------------------------- set-up
    def start(self, work_dir: Path) -> str:
        args = self.args
        if args.nats_cluster > 1:
            self.nats_cluster = EmbeddedNatsCluster(args.nats_cluster)
            url = self.nats_cluster.start()
        else:
            self.nats_server = EmbeddedNatsServer()
            url = self.nats_server.start()
        engine: dict[str, object] = {"kind": args.kind, "cpu_threads": 1}
        if args.kind == "vllm":
            engine.update({"max_num_seqs": 8, "kv_cache_gib": 0.25})
        settings = load_settings(
            overrides={
                "nats": {"url": url},
                "engine": engine,
                "reliability": {"output_replicas": min(3, args.nats_cluster)},
                "ha": {"replicas": min(3, args.nats_cluster)},  # the lease and state survive a node loss
                "observability": {"exporter": "none", "log_level": "INFO"},
            }
        )
        self.cluster = ProcessCluster(settings, work_dir)
        self.cluster.start(args.instances)
        return url

    def pids(self) -> dict[str, int]:
        pids: dict[str, int] = {"chaos-driver": os.getpid()}
        if self.cluster is not None:
            for name, proc in self.cluster.procs.items():
                if proc.popen.poll() is None:
                    pids[name] = proc.popen.pid
        if self.nats_cluster is not None:
            pids.update({f"nats-{k}": v for k, v in self.nats_cluster.pids().items()})
        if self.nats_server is not None and self.nats_server.pid is not None:
            pids["nats"] = self.nats_server.pid
        return pids

    async def sample_rss(self) -> None:
        while True:
            await asyncio.to_thread(self.rss.sample, self.pids(), frozenset({"chaos-driver"}))
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------------------------------- requests
    async def arrivals(self, client: DroverClient, until: float) -> None:
        n = 0
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.expovariate(self.args.rate))
            interactive = self.rng.random() < 0.6
            max_tokens = self.rng.randint(8, 48) if interactive else self.rng.randint(96, self.args.max_tokens)
            cancel_at = self.rng.uniform(0.2, 3.0) if self.rng.random() < self.args.cancel_share else None
            tracked = Tracked(
                request_id=f"chaos-{self.args.seed}-{n}",
                request_class="interactive" if interactive else "batch",
                max_tokens=max_tokens,
                cancel_at_s=cancel_at,
                submitted_at=time.monotonic(),
            )
            self.requests[tracked.request_id] = tracked
            self._spawn(self.one_request(client, tracked))
            n += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def one_request(self, client: DroverClient, tracked: Tracked) -> None:
        interactive = tracked.request_class == "interactive"
        words = self.rng.randint(4, 60)
        stream = await client.submit(
            " ".join(f"w{self.rng.randrange(1000)}" for _ in range(words)),
            sampling=SamplingParams(max_tokens=tracked.max_tokens, ignore_eos=True),
            request_id=tracked.request_id,
            priority=1 if interactive else 0,
            request_class=RequestClass.INTERACTIVE if interactive else RequestClass.BATCH,
        )
        tracked.stream = stream
        if tracked.cancel_at_s is not None:
            self._spawn(self.cancel_later(stream, tracked.cancel_at_s))
        expected_index = 0
        try:
            async for event in stream.events():
                now = time.monotonic()
                if event.index < expected_index:
                    tracked.duplicated += min(len(event.token_ids), expected_index - event.index)
                elif event.index > expected_index:
                    tracked.out_of_order += 1
                expected_index = max(expected_index, event.index + len(event.token_ids))
                tracked.token_times.extend([now] * len(event.token_ids))
                tracked.token_instances.extend([event.instance_id] * len(event.token_ids))
            done = stream.result_data.done
            assert done is not None
            tracked.finish_reason = done.finish_reason
            tracked.outcome = "cancelled" if done.finish_reason == "abort" else "completed"
            want = done.num_tokens if done.finish_reason == "abort" else tracked.max_tokens
            tracked.missing = max(0, want - len(stream.result_data.token_ids))
        except DroverError as exc:
            tracked.outcome = f"error:{exc.code}"
            tracked.error = exc.message
        if self.args.kind == "sim":
            seed = request_seed(0, tracked.request_id)
            tracked.wrong = sum(1 for p, t in enumerate(stream.result_data.token_ids) if t != token_at(seed, p))

    async def cancel_later(self, stream: RequestStream, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if stream.finished:
            return
        with contextlib.suppress(Exception):  # finished meanwhile: unknown_request is fine
            await stream.cancel(timeout_s=10)

    async def slow_consumer(self, url: str, until: float) -> None:
        """A client that submits long requests and never reads its inbox."""

        async def quiet(exc: Exception) -> None:  # slow-consumer drops are the point here
            return None

        nc = await nats.connect(
            url.split(","), name="chaos-slow", max_reconnect_attempts=-1, reconnect_time_wait=0.25, error_cb=quiet
        )
        try:
            inbox = subjects.client_inbox_prefix("chaos-slow") + ".never-read"
            await nc.subscribe(inbox, pending_msgs_limit=64, pending_bytes_limit=64 * 1024)  # no callback: unread
            n = 0
            while time.monotonic() < until:
                submit = SubmitRequest(
                    reply_to=inbox,
                    request_id=f"slow-{self.args.seed}-{n}",
                    prompt="never read " * 8,
                    sampling=SamplingParams(max_tokens=self.args.max_tokens, ignore_eos=True),
                    request_class=RequestClass.BATCH,
                )
                with contextlib.suppress(Exception):
                    await nc.publish(subjects.SUBMIT, encode(submit), reply=inbox)
                    self.slow_submitted += 1
                n += 1
                await asyncio.sleep(2.0)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    # ------------------------------------------------------------------------------------------- faults
    def streaming(self) -> list[Tracked]:
        return [t for t in self.requests.values() if t.token_times and not t.outcome]

    async def faults_loop(self, url: str, until: float) -> None:
        kinds = [k for k in self.args.faults.split(",") if k]
        engines_busy: set[str] = set()
        order: list[str] = []
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.args.fault_every))
            if time.monotonic() >= until:
                return
            if not order:  # every kind once per round, in a random order: short runs still see each kind
                order = self.rng.sample(kinds, len(kinds))
            kind = order.pop()
            if kind in ("kill9", "sigstop"):
                assert self.cluster is not None
                serving = await self.serving()
                live = [n for n in serving if n not in engines_busy]
                if len(live) <= max(1, self.args.instances // 4):  # keep most of the fleet serving
                    continue
                victim = self.rng.choice(live)
                engines_busy.add(victim)
                self._spawn(self.engine_fault(kind, victim, engines_busy))
            elif kind == "nats":
                await self.nats_fault()
            elif kind == "flood":
                await self.flood(url)

    def _record(self, kind: str, target: str, affected: list[Tracked]) -> None:
        self.faults.append(Fault(kind, time.monotonic(), target, [t.request_id for t in affected]))
        print(f"  fault {kind:8s} {target:10s} at {time.monotonic() - self.t0:6.1f}s: {len(affected)} streams")

    async def serving(self) -> set[str]:
        """Instances the scheduler sees serving (a restarted vLLM engine takes a while to come back)."""
        assert self.client is not None
        try:
            status = await self.client.status(timeout_s=5)
        except Exception:
            return set()
        return {i.info.instance_id for i in status.instances if i.state == "serving"}

    async def engine_fault(self, kind: str, victim: str, busy: set[str]) -> None:
        assert self.cluster is not None
        affected = [t for t in self.streaming() if t.token_instances and t.token_instances[-1] == victim]
        try:
            if kind == "kill9":
                self._record("kill9", victim, affected)
                await asyncio.to_thread(self.cluster.kill9, victim)
                await asyncio.sleep(self.rng.uniform(1.0, 4.0))
                self.cluster.restart(victim)
                await asyncio.sleep(6.0)  # the old incarnation's record lapses (5 s heartbeat timeout)
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:  # not faulted again before it serves again
                    await asyncio.sleep(2.0)
                    if victim in await self.serving():
                        break
            else:
                self._record("sigstop", victim, affected)
                self.cluster.signal(victim, signal.SIGSTOP)
                await asyncio.sleep(self.rng.uniform(1.0, 10.0))
                self.cluster.signal(victim, signal.SIGCONT)
        finally:
            busy.discard(victim)

    async def nats_fault(self) -> None:
        graceful = self.rng.random() < 0.5
        affected = self.streaming()
        if self.nats_cluster is not None:
            node = self.rng.randrange(self.nats_cluster.size)
            self._record("nats", f"node {node}", affected)
            if graceful:
                await asyncio.to_thread(self.nats_cluster.stop_node, node)
            else:
                await asyncio.to_thread(self.nats_cluster.kill_node, node)
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            await asyncio.to_thread(self.nats_cluster.start_node, node)
            await asyncio.to_thread(self.nats_cluster.wait_jetstream_ready)
        elif self.nats_server is not None:
            self._record("nats", "server", affected)
            await asyncio.to_thread(self.nats_server.kill, signal.SIGTERM if graceful else signal.SIGKILL)
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            await asyncio.to_thread(self.nats_server.start)

    async def flood(self, url: str, count: int = 2000) -> None:
        targets = [
            subjects.SUBMIT,
            subjects.CANCEL,
            subjects.ENGINE_EVENTS,
            subjects.heartbeat("engine-0"),
            subjects.engine("engine-0"),
            subjects.engine("engine-1"),
            subjects.admin("status"),
            subjects.admin("migrate"),
            subjects.admin("drain"),
            subjects.admin("policy"),
        ]
        valid = encode(SubmitRequest(reply_to="_INBOX.flood", prompt="hello", sampling=SamplingParams(max_tokens=4)))
        self._record("flood", f"{count} msgs", self.streaming())
        nc = await nats.connect(url.split(","), name="chaos-flood", max_reconnect_attempts=5)
        try:
            for n in range(count):
                payload = fuzz_payload(self.rng, valid)
                with contextlib.suppress(Exception):
                    await nc.publish(targets[n % len(targets)], payload)
                    self.flood_sent += 1
                if n % 200 == 0:
                    await asyncio.sleep(0)
            await nc.flush()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    # ------------------------------------------------------------------------------------------- run
    async def run(self, url: str) -> int:
        args = self.args
        client = DroverClient(url, name="chaos-client")
        await client.connect()
        self.client = client
        sampler = asyncio.get_running_loop().create_task(self.sample_rss())
        try:
            ready_timeout = 300 if args.kind == "vllm" else 60
            await client.wait_for_instances(args.instances, timeout_s=ready_timeout)
            self.t0 = time.monotonic()
            until = self.t0 + args.duration
            print(
                f"cluster ready ({args.instances} {args.kind} engines, NATS nodes: {args.nats_cluster}); "
                f"running {args.duration:.0f} s"
            )
            background = [
                asyncio.get_running_loop().create_task(self.faults_loop(url, until)),
                asyncio.get_running_loop().create_task(self.slow_consumer(url, until)),
            ]
            await self.arrivals(client, until)
            await asyncio.gather(*background, return_exceptions=True)
            # Drain: every accepted request must end (engines restarted, streams resumed) within the grace.
            grace_until = time.monotonic() + args.grace
            while self.tasks and time.monotonic() < grace_until:
                await asyncio.sleep(0.5)
            for task in list(self.tasks):
                task.cancel()
            status = await client.status(timeout_s=10)
            actors_ok = all(state == "running" for state in status.actors.values())
            self.write_problems(status)
            return self.report(actors_ok, client)
        finally:
            sampler.cancel()
            await client.close()

    # ------------------------------------------------------------------------------------------- report
    def write_problems(self, status: StatusReply) -> None:
        """One line per request that did not end cleanly, with the scheduler's view of it (for debugging)."""
        assert self.cluster is not None
        known = {r.request_id: r for r in status.requests}
        lines = []
        for t in self.requests.values():
            if t.outcome in ("completed", "cancelled") and not (t.duplicated or t.missing or t.out_of_order or t.wrong):
                continue
            s = t.stream
            view = known.get(t.request_id)
            lines.append(
                f"{t.request_id} outcome={t.outcome or 'LOST'} tokens={len(t.token_times)}/{t.max_tokens} "
                f"submitted_at={t.submitted_at - self.t0:.1f}s "
                f"last_token_at={(t.token_times[-1] - self.t0) if t.token_times else -1:.1f}s "
                f"instances={sorted(set(t.token_instances))} accepted={bool(s and s.accepted.done())} "
                f"repairs={s.repairs if s else 0} resubmits={s.resubmits if s else 0} "
                f"dup={t.duplicated} missing={t.missing} ooo={t.out_of_order} wrong={t.wrong} "
                f"scheduler={(view.state, view.instance_id) if view else None} error={t.error!r}"
            )
        (self.cluster.work_dir / "problems.txt").write_text("\n".join(lines) + "\n")
        faults = [f"{f.at - self.t0:.1f}s {f.kind} {f.target} affected={f.affected}" for f in self.faults]
        (self.cluster.work_dir / "faults.txt").write_text("\n".join(faults) + "\n")

    def report(self, actors_ok: bool, client: DroverClient) -> int:
        reqs = list(self.requests.values())
        outcomes = Counter(t.outcome or "lost" for t in reqs)
        errors = {k.removeprefix("error:"): v for k, v in outcomes.items() if k.startswith("error:")}
        lost = outcomes.get("lost", 0)
        dup = sum(t.duplicated for t in reqs)
        missing = sum(t.missing for t in reqs)
        ooo = sum(t.out_of_order for t in reqs)
        wrong = sum(t.wrong for t in reqs)
        tokens = sum(len(t.token_times) for t in reqs)
        repairs = sum(t.stream.repairs for t in reqs if t.stream)
        resubmits = sum(t.stream.resubmits for t in reqs if t.stream)
        resent = sum(
            max(0, sum(n for _, n in t.stream.raw_chunks) - len(t.stream.result_data.token_ids))
            for t in reqs
            if t.stream
        )
        print()
        print("| metric | value |")
        print("|---|---|")
        rows = [
            ("submitted", len(reqs)),
            ("completed", outcomes.get("completed", 0)),
            ("cancelled (by the workload)", outcomes.get("cancelled", 0)),
            ("failed with error", ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"),
            ("**lost** (no end)", lost),
            ("tokens delivered", tokens),
            ("**duplicated tokens**", dup),
            ("**missing tokens**", missing),
            ("**out-of-order deliveries**", ooo),
        ]
        if self.args.kind == "sim":
            rows.append(("tokens differing from the engine's deterministic output", wrong))
        rows += [
            ("re-sent tokens dropped by index at the client", resent),
            ("inbox replays / resubmits by the client", f"{repairs} / {resubmits}"),
            ("client reconnects", client.reconnects),
            ("slow-consumer requests (never read)", self.slow_submitted),
            ("malformed messages sent", self.flood_sent),
            ("control-plane actors running at the end", "yes" if actors_ok else "NO"),
        ]
        for name, value in rows:
            print(f"| {name} | {value} |")

        print()
        print("| fault | count | streams touched | recovery p50 | recovery p99 | max |")
        print("|---|---|---|---|---|---|")
        by_kind: dict[str, list[float]] = defaultdict(list)
        counts: Counter[str] = Counter()
        touched: Counter[str] = Counter()
        for fault in self.faults:
            counts[fault.kind] += 1
            for rid in fault.affected:
                tracked = self.requests[rid]
                touched[fault.kind] += 1
                recovery = recovery_s(tracked.token_times, fault.at)
                if recovery is not None:
                    by_kind[fault.kind].append(recovery)
        for kind in sorted(counts):
            values = by_kind.get(kind, [])
            cells = (
                [f"{percentile(values, 50):.2f} s", f"{percentile(values, 99):.2f} s", f"{max(values):.2f} s"]
                if values
                else ["-", "-", "-"]
            )
            print(f"| {kind} | {counts[kind]} | {touched[kind]} | " + " | ".join(cells) + " |")

        print()
        print("| process | peak RSS |")
        print("|---|---|")
        for name, mib in sorted(self.rss.peak_mib.items()):
            print(f"| {name} | {mib:.0f} MiB |")
        ok = lost == 0 and dup == 0 and missing == 0 and ooo == 0 and wrong == 0 and actors_ok
        print()
        print("summary:", "PASS" if ok else "FAIL", f"({len(reqs)} requests, {len(self.faults)} faults)")
        return 0 if ok else 1

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
        if self.nats_server is not None:
            self.nats_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="Seconds of workload and faults.")
    parser.add_argument("--kind", choices=["sim", "vllm"], default="sim")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--nats-cluster", type=int, default=3, choices=[1, 3], help="NATS nodes.")
    parser.add_argument("--rate", type=float, default=8.0, help="Requests per second (Poisson).")
    parser.add_argument("--max-tokens", type=int, default=256, help="Longest batch output.")
    parser.add_argument("--cancel-share", type=float, default=0.1, help="Share of requests cancelled mid-way.")
    parser.add_argument("--fault-every", type=float, default=8.0, help="Mean seconds between faults.")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="Comma-separated fault kinds.")
    parser.add_argument("--grace", type=float, default=120.0, help="Seconds for requests to end after the run.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="Logs of every process (default: a temp dir).")
    args = parser.parse_args()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="drover-chaos-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {work_dir}")
    chaos = Chaos(args)
    try:
        url = chaos.start(work_dir)
        code = asyncio.run(chaos.run(url))
    finally:
        chaos.stop()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
