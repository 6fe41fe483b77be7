"""The deployment examples in docs/deploy stay true: the Kubernetes YAML parses and probes /healthz and /readyz
on the ports the settings serve them on, every systemd ExecStart names a real `drover` command with real
options (run with --help), the NATS configs pass `nats-server -t`, and the TOML settings load."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.settings import load_settings
from transport.nats_server import find_nats_server_binary

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "kubernetes" / "drover.yaml"


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def by_name(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


def drover_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`drover ARGS --help` (the CLI module, as the `drover` entry point runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "control.apps.cli", *args, "--help"], capture_output=True, text=True, timeout=60
    )


def test_kubernetes_manifest_parses_and_has_every_part() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {
        ("Namespace", "drover"),
        ("ConfigMap", "drover-config"),
        ("StatefulSet", "drover-nats"),
        ("Deployment", "drover-control"),
        ("StatefulSet", "drover-engine"),
        ("Deployment", "drover-gateway"),
        ("Service", "drover-gateway"),
    } <= kinds
    assert by_name("StatefulSet", "drover-nats")["spec"]["replicas"] == 3
    assert by_name("Deployment", "drover-control")["spec"]["replicas"] == 2
    for d in manifests():
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]


def test_kubernetes_probes_hit_health_endpoints_on_the_configured_ports() -> None:
    settings = drover_toml_from_configmap()
    expected = {
        ("Deployment", "drover-control"): settings.metrics.control_port,
        ("StatefulSet", "drover-engine"): settings.metrics.engine_port,
        ("Deployment", "drover-gateway"): settings.gateway.port,
    }
    for (kind, name), port in expected.items():
        c = container(by_name(kind, name))
        live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
        assert (live["path"], ready["path"]) == ("/healthz", "/readyz"), name
        assert port_number(c, live["port"]) == port_number(c, ready["port"]) == port, name
        assert settings.metrics.host == "0.0.0.0"  # probes come from the kubelet, not loopback


def drover_toml_from_configmap() -> Any:
    text = by_name("ConfigMap", "drover-config")["data"]["drover.toml"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"drover-k8s-{os.getpid()}.toml"
    path.write_text(text)
    try:
        return load_settings(path)
    finally:
        path.unlink()


def test_kubernetes_container_commands_exist() -> None:
    for kind, name in (
        ("Deployment", "drover-control"),
        ("StatefulSet", "drover-engine"),
        ("Deployment", "drover-gateway"),
    ):
        args = [a.replace("$(POD_NAME)", "drover-engine-0") for a in container(by_name(kind, name))["args"]]
        assert args[0] == "drover"
        done = drover_help(args[1:])
        assert done.returncode == 0, f"{name}: {args}: {done.stderr}"


def exec_start(unit: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return shlex.split(parser["Service"]["ExecStart"].replace("%i", "gpu0"))


@pytest.mark.parametrize("unit", ["drover-control.service", "drover-engine@.service", "drover-gateway.service"])
def test_systemd_units_run_existing_drover_commands(unit: str) -> None:
    command = exec_start(SYSTEMD / unit)
    assert Path(command[0]).name == "drover"
    done = drover_help(command[1:])
    assert done.returncode == 0, f"{unit}: {command}: {done.stderr}"
    assert "Usage" in done.stdout


def test_systemd_nats_unit_and_configs_pass_nats_server_t(tmp_path: Path) -> None:
    command = exec_start(SYSTEMD / "drover-nats.service")
    assert Path(command[0]).name == "nats-server" and command[1:] == ["-c", "/etc/drover/nats.conf"]
    binary = find_nats_server_binary()
    k8s_conf = tmp_path / "k8s-nats.conf"
    k8s_conf.write_text(by_name("ConfigMap", "drover-config")["data"]["nats.conf"])
    for conf in (SYSTEMD / "nats.conf", k8s_conf):
        env = {**os.environ, "NATS_SERVER_NAME": "nats-1", "POD_NAME": "drover-nats-0"}
        done = subprocess.run([binary, "-c", str(conf), "-t"], capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0, f"{conf}: {done.stdout}{done.stderr}"


def test_systemd_settings_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DROVER_AUDIT__PATH", raising=False)  # tests/conftest.py sets it; the file must say it
    settings = load_settings(SYSTEMD / "drover.toml")
    assert settings.nats.url and settings.nats.url.count("nats://") == 3
    assert settings.metrics.control_port and settings.metrics.engine_port
    assert settings.audit.path
