"""Prefill/decode disaggregation live: sim engines over a real nats-server, the in-process control plane.
A request dispatched to the prefill instance moves with its KV to the decode instance after its first token
(the live-migration machinery); the client gets the same tokens as in a colocated run, each exactly once and
in order; with no decode instance that can take it, the request completes where it is. The phases are set
with `drover phase set` (audited) and, for one instance, reported by its own heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from typer.testing import CliRunner

from actors.local_cluster import InProcessCluster
from control.apps.cli import app
from control.client import DroverClient, RequestResult
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from observability.audit import read_audit
from transport.messages import Message, RequestDone, TokenChunk, decode

runner = CliRunner()
MAX_TOKENS = 100  # long enough (seconds of modelled decode) that a handoff always finds it running


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pd-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def pd_cluster(nats_url: str, audit_file: Path) -> Iterator[InProcessCluster]:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "audit": {"path": str(audit_file)},
            "pd": {"mode": "disaggregated"},
        }
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for name, blocks in (("pd-p", 512), ("pd-d", 512), ("pd-small", 4)):
        host = cluster.add_engine(MigratableSimEngine(name, num_blocks=blocks, max_model_len=1024, time_scale=1.0))
        if name == "pd-small":
            host.heartbeater.phase = "decode"  # reported by the engine itself (engine.phase)
    yield cluster
    cluster.stop()


@pytest.fixture
async def client(pd_cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    c = await DroverClient(pd_cluster.url, name="pd-client").connect()
    await c.wait_for_instances(3, timeout_s=20)
    await c.policy({"migration_enabled": "false", "dispatch_policy": "least_loaded"})  # only handoffs move
    for _ in range(200):  # pd-small's first beats may predate its phase: wait until it reports decode
        status = await c.status()
        if any(i.info.instance_id == "pd-small" and i.phase == "decode" for i in status.instances):
            break
        await asyncio.sleep(0.05)
    yield c
    await c.close()


def drover(cluster: InProcessCluster, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--nats-url", cluster.url, *args], env={"DROVER_AUDIT__OPERATOR": "pd-op"})
    return result.exit_code, result.output


async def set_phases(cluster: InProcessCluster, client: DroverClient, phases: dict[str, str]) -> None:
    for instance, phase in phases.items():
        code, out = await asyncio.to_thread(drover, cluster, "phase", "set", instance, phase)
        assert code == 0, out
    status = await client.status()
    shown = {i.info.instance_id: i.phase for i in status.instances}
    assert {k: shown[k] for k in phases} == phases


async def run_tapped(client: DroverClient, cluster: InProcessCluster, request_id: str) -> tuple[RequestResult, list]:
    """Generate, with a second subscriber on the request's inbox that sees every message sent to it."""
    seen: list[Message] = []

    async def tap(msg: Msg) -> None:
        seen.append(decode(msg.data))

    stream = await client.submit("p" * 200, max_tokens=MAX_TOKENS, request_id=request_id)
    assert stream._subscription is not None
    tap_nc = await nats.connect(cluster.url)
    try:
        await tap_nc.subscribe(stream._subscription.subject, cb=tap)
        result = await stream.result()
        for _ in range(100):  # the done, then anything sent late
            if any(isinstance(m, RequestDone) for m in seen):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    finally:
        await tap_nc.drain()
    return result, seen


async def free_blocks(client: DroverClient) -> dict[str, int]:
    for _ in range(100):  # engines report every 0.05 s: wait until nothing runs anywhere
        status = await client.status()
        if not status.requests and all(i.load.num_running == 0 for i in status.instances):
            return {i.info.instance_id: i.load.num_free_blocks for i in status.instances}
        await asyncio.sleep(0.1)
    raise AssertionError("requests still running")


async def test_handoff_gives_the_colocated_tokens_exactly_once(
    client: DroverClient, pd_cluster: InProcessCluster
) -> None:
    await set_phases(pd_cluster, client, {"pd-p": "both", "pd-d": "both"})
    colocated = {}
    for i in range(3):
        result = await client.generate("p" * 200, max_tokens=MAX_TOKENS, request_id=f"pd-{i}")
        assert result.done is not None and len(result.done.instances) == 1  # colocated: no move
        colocated[f"pd-{i}"] = result.token_ids
    before = await free_blocks(client)

    await set_phases(pd_cluster, client, {"pd-p": "prefill", "pd-d": "decode"})
    for i in range(3):
        result, seen = await run_tapped(client, pd_cluster, f"pd-{i}")  # the same ids: the same sampling seeds
        assert result.token_ids == colocated[f"pd-{i}"]
        assert result.done is not None and result.done.instances == ["pd-p", "pd-d"]
        assert result.done.num_tokens == MAX_TOKENS
        # on the wire: chunks cover 0..n-1 with no token sent twice, and one done
        chunks = sorted((m for m in seen if isinstance(m, TokenChunk)), key=lambda c: c.index)
        covered = [c.index + k for c in chunks for k in range(len(c.token_ids))]
        assert covered == list(range(MAX_TOKENS))
        assert sum(isinstance(m, RequestDone) for m in seen) == 1
    assert await free_blocks(client) == before  # no block leaked on either side


async def test_request_stays_where_it_is_when_decode_cannot_take_it(
    client: DroverClient, pd_cluster: InProcessCluster
) -> None:
    # the only decode instance left (pd-small, 4 blocks) has no room: both requests finish where they began
    await set_phases(pd_cluster, client, {"pd-p": "prefill", "pd-d": "prefill"})
    results = await asyncio.gather(
        *(client.generate("p" * 200, max_tokens=MAX_TOKENS, request_id=f"pd-full-{i}") for i in range(2))
    )
    for result in results:
        assert result.done is not None and len(result.done.instances) == 1
        assert result.done.instances[0] in ("pd-p", "pd-d") and result.done.num_tokens == MAX_TOKENS
    # no decode instance at all (pd-small, drained, takes no dispatch: it is too small for these requests)
    assert (await client.drain("pd-small")).ok
    try:
        await set_phases(pd_cluster, client, {"pd-small": "both"})
        result = await client.generate("p" * 200, max_tokens=MAX_TOKENS, request_id="pd-none")
        assert result.done is not None and result.done.instances in (["pd-p"], ["pd-d"])
        assert result.done.num_tokens == MAX_TOKENS
    finally:
        await set_phases(pd_cluster, client, {"pd-small": "decode"})
        await client.drain("pd-small", undo=True)


async def test_phase_commands_are_audited_and_bad_ones_are_one_line(
    client: DroverClient, pd_cluster: InProcessCluster, audit_file: Path
) -> None:
    await set_phases(pd_cluster, client, {"pd-d": "decode"})
    code, out = await asyncio.to_thread(drover, pd_cluster, "phase", "set", "no-such-instance", "decode")
    assert code == 1 and "no instance no-such-instance" in out and "Traceback" not in out
    code, out = await asyncio.to_thread(drover, pd_cluster, "phase", "set", "pd-p", "sideways")
    assert code == 2 and "unknown phase" in out and len(out.strip().splitlines()) == 1
    code, out = await asyncio.to_thread(drover, pd_cluster, "status", "--json")
    assert code == 0 and '"phase"' in out
    records = [r for r in read_audit(audit_file) if r["command"] == "phase_set"]
    assert records and all(r["operator"] == "pd-op" for r in records)
    assert records[-1]["params"] == {"instance_id": "no-such-instance", "phase": "decode"}
    assert records[-1]["ok"] is False and records[-1]["result"].startswith("unknown_instance")
    assert any(r["ok"] and r["params"]["phase"] == "decode" for r in records)


@pytest.mark.parametrize("stage", ["mid_copy", "commit"])
async def test_a_handoff_that_fails_mid_transfer_runs_the_request_exactly_once(
    client: DroverClient, pd_cluster: InProcessCluster, stage: str
) -> None:
    """A fault injected into the handoff's migration: before the commit the request stays on the prefill
    instance (after its retry fails too); a lost commit still leaves it on the decode instance. Either way
    every token reaches the client once, and no block leaks."""
    await set_phases(pd_cluster, client, {"pd-p": "prefill", "pd-d": "decode"})
    before = await free_blocks(client)
    pd_cluster.settings.migration.fault_stage = stage  # the migrator reads it at each step
    try:
        result, seen = await run_tapped(client, pd_cluster, f"pd-fault-{stage}")
    finally:
        pd_cluster.settings.migration.fault_stage = ""
    assert result.done is not None and result.done.num_tokens == MAX_TOKENS
    assert result.done.instances == (["pd-p", "pd-d"] if stage == "commit" else ["pd-p"])
    chunks = sorted((m for m in seen if isinstance(m, TokenChunk)), key=lambda c: c.index)
    assert [c.index + k for c in chunks for k in range(len(c.token_ids))] == list(range(MAX_TOKENS))
    assert sum(isinstance(m, RequestDone) for m in seen) == 1
    assert await free_blocks(client) == before
