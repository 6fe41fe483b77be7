"""The admin CLI against a real cluster (in-process control plane and sim engines on a real nats-server),
and `drover up` end to end as real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from actors.local_cluster import InProcessCluster
from control.apps.cli import app
from tests.integration.conftest import make_sim_cluster
from transport.nats_server import EmbeddedNatsServer

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(nats_url: str) -> Iterator[InProcessCluster]:
    c = make_sim_cluster(nats_url, 2, time_scale=0.2, max_model_len=1024)
    yield c
    c.stop()


def drover(cluster: InProcessCluster, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--nats-url", cluster.url, *args])
    return result.exit_code, result.output


def test_submit_prints_the_output_and_the_serving_instance(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "submit", "hello", "--max-tokens", "5")
    assert code == 0, out
    assert "5 tokens" in out and "sim-" in out


def test_status_instances_requests(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "status")
    assert code == 0, out
    assert "sim-0" in out and "sim-1" in out and "scheduler=running" in out
    code, out = drover(cluster, "instances")
    assert code == 0 and "sim-0" in out and "dispatch: freeness" in out
    code, out = drover(cluster, "requests")
    assert code == 0 and "queued" in out
    code, out = drover(cluster, "status", "--json", "--timeout", "30")
    assert code == 0 and '"instances"' in out
    assert '"cached_blocks": -1' in out  # simulated engines report no prefix cache


def test_policy_get_and_set(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "policy", "set", "migrate_threshold=5", "dispatch_policy=least_loaded")
    assert code == 0, out
    assert "least_loaded" in out
    code, out = drover(cluster, "policy", "get")
    assert "migrate_threshold" in out and "5.0" in out
    code, out = drover(cluster, "policy", "set", "dispatch_policy=nonsense")
    assert code == 1 and "invalid_request" in out
    drover(cluster, "policy", "set", "dispatch_policy=freeness", "migrate_threshold=3")


def test_migrate_unknown_request_is_a_clear_error(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "migrate", "no-such-request", "--to", "sim-1")
    assert code == 1 and "unknown_request" in out


def test_drain_and_undrain(cluster: InProcessCluster) -> None:
    code, out = drover(cluster, "drain", "sim-1", "--timeout", "30")
    assert code == 0, out
    assert "drained" in out
    code, out = drover(cluster, "submit", "after drain", "--max-tokens", "2")
    assert code == 0 and "instances=sim-0" in out
    code, out = drover(cluster, "drain", "sim-1", "--undo")
    assert code == 0 and "back in service" in out


def test_no_control_plane_is_a_clear_error() -> None:
    result = runner.invoke(app, ["--nats-url", "nats://127.0.0.1:1", "status"])
    assert result.exit_code == 2
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.output


@pytest.fixture(scope="module")
def quiet_url() -> Iterator[str]:
    """A nats-server no control plane subscribes to."""
    with EmbeddedNatsServer() as server:
        yield server.url


@pytest.mark.parametrize(
    ("args", "subject"),
    [
        (["status"], "drover.v1.admin.status."),
        (["instances"], "drover.v1.admin.status."),
        (["requests"], "drover.v1.admin.status."),
        (["policy", "get"], "drover.v1.admin.policy"),
        (["autoscale", "status"], "drover.v1.admin.autoscale"),
    ],
)
def test_a_read_nobody_answers_is_one_line_naming_the_tries(quiet_url: str, args: list[str], subject: str) -> None:
    result = runner.invoke(app, ["--nats-url", quiet_url, *args, "--timeout", "1.5"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"drover: error: no control plane answered {subject}"), lines[0]
    assert " in 1.5 s (" in lines[0] and "no responders" in lines[0]  # --timeout reached the client
    assert quiet_url in lines[0]


def test_a_command_nobody_answers_is_not_repeated(quiet_url: str) -> None:
    result = runner.invoke(app, ["--nats-url", quiet_url, "drain", "sim-0", "--no-wait"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"drover: error: nothing answers on NATS at {quiet_url}: is a control plane running there?"
    )


def test_config_show_reflects_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROVER_ENGINE__MAX_NUM_SEQS", "7")
    result = runner.invoke(app, ["--nats-url", "nats://example:4222", "config", "show"])
    assert result.exit_code == 0
    assert "max_num_seqs = 7" in result.output and 'url = "nats://example:4222"' in result.output


def test_drover_up_runs_the_demo_on_sim_engines(tmp_path: object) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "control.apps.cli",
            "up",
            "--kind",
            "sim",
            "--requests",
            "6",
            "--max-tokens",
            "4",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**__import__("os").environ, "DROVER_OBSERVABILITY__EXPORTER": "none", "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Drover demo" in proc.stdout
    assert "served by engine-0" in proc.stdout and "served by engine-1" in proc.stdout
