"""The audit log: migrate, drain and policy commands sent with the CLI to a real cluster (in-process control
plane, sim engines, real nats-server) each leave one JSON line saying who, what, when and the result."""

from __future__ import annotations

import asyncio
import getpass
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.local_cluster import InProcessCluster
from control.apps.cli import app
from control.client import DroverClient
from control.settings import load_settings
from engines.sim.live_migration import MigratableSimEngine
from engines.tokenizer import ByteTokenizer
from observability.audit import read_audit

runner = CliRunner()


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def cluster(nats_url: str, audit_file: Path) -> Iterator[InProcessCluster]:
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "engine": {"kind": "sim", "heartbeat_interval_s": 0.05},
            "audit": {"path": str(audit_file)},
        }
    )
    c = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    c.start_control()
    for name in ("audit-a", "audit-b"):
        c.add_engine(MigratableSimEngine(name, max_model_len=1024, time_scale=1.0))
    yield c
    c.stop()


def drover(cluster: InProcessCluster, *args: str, operator: str | None = None) -> tuple[int, str]:
    env = {"DROVER_AUDIT__OPERATOR": operator} if operator else {}
    result = runner.invoke(app, ["--nats-url", cluster.url, *args], env=env)
    return result.exit_code, result.output


async def test_admin_commands_are_audited(cluster: InProcessCluster, audit_file: Path) -> None:
    async with DroverClient(cluster.url, name="audit-client") as client:
        await client.wait_for_instances(2, timeout_s=10)
        await client.policy({"migration_enabled": "false"})  # from the client: operator is the OS user

        code, out = await asyncio.to_thread(drover, cluster, "policy", "set", "migrate_threshold=4", operator="alice")
        assert code == 0, out
        code, out = await asyncio.to_thread(drover, cluster, "policy", "set", "dispatch_policy=nope", operator="alice")
        assert code == 1, out
        code, out = await asyncio.to_thread(
            drover, cluster, "policy", "set", "step_budget_slo_share=0.5", operator="alice"
        )
        assert code == 1 and "[engine] step_budget_slo_share" in out, out  # read at engine start-up only

        stream = await client.submit("x" * 100, max_tokens=300, request_id="audited-1")
        async for _ in stream.events():
            if len(stream.result_data.token_ids) >= 5:
                break
        status = await client.status()
        source = next(r.instance_id for r in status.requests if r.request_id == "audited-1")
        assert source is not None
        destination = "audit-b" if source == "audit-a" else "audit-a"
        migrate = ("migrate", "audited-1", "--to", destination)
        code, out = await asyncio.to_thread(drover, cluster, *migrate, operator="bob")
        assert code == 0, out
        code, out = await asyncio.to_thread(drover, cluster, "migrate", "no-such-request", operator="bob")
        assert code == 1, out
        code, out = await asyncio.to_thread(drover, cluster, "drain", destination, "--no-wait", operator="carol")
        assert code == 0, out
        code, out = await asyncio.to_thread(drover, cluster, "drain", destination, "--undo", operator="carol")
        assert code == 0, out
        await stream.result()

    records = read_audit(audit_file)
    assert [(r["operator"], r["command"], r["ok"]) for r in records] == [
        (getpass.getuser(), "policy_update", True),
        ("alice", "policy_update", True),
        ("alice", "policy_update", False),
        ("alice", "policy_update", False),
        ("bob", "migrate", True),
        ("bob", "migrate", False),
        ("carol", "drain", True),
        ("carol", "drain", True),
    ]
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), record
        assert record["subject"].startswith("drover.v1.admin.") and record["duration_s"] >= 0
    assert records[1]["params"] == {"changes": {"migrate_threshold": "4"}}
    assert records[2]["result"].startswith("invalid_request")
    assert records[3]["result"].startswith("invalid_request") and "[engine]" in records[3]["result"]
    assert records[4]["params"]["request_id"] == "audited-1" and records[4]["params"]["destination"] == destination
    assert records[4]["details"]["stages"] >= 1  # the migration's figures come along
    assert records[5]["result"].startswith("unknown_request")
    assert records[6]["params"] == {"instance_id": destination, "undo": False}
    assert records[6]["result"].startswith(f"draining {destination}")
    assert records[7]["params"]["undo"] is True and "back in service" in records[7]["result"]
