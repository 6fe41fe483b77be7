"""The KubeRay example (docs/deploy/kuberay/drover-ray.yaml) stays true: it parses and has every part, its
drover.toml loads and points the Ray provisioner at the RayCluster's head service, every role's resource shape
fits a worker group (GPUs, CPUs, memory, custom resources) and none fits the head, the control plane is a
Ray-free Deployment running a real `drover` command, engines reach NATS by the StatefulSet's names, and the
NATS config passes `nats-server -t`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from control.settings import RayShape, Settings, load_settings
from transport.nats_server import find_nats_server_binary

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "deploy" / "kuberay" / "drover-ray.yaml"


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]


def by_name(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def settings_from_configmap(tmp_path: Path) -> Settings:
    path = tmp_path / "drover.toml"
    path.write_text(by_name("ConfigMap", "drover-config")["data"]["drover.toml"])
    return load_settings(path)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (memory in GiB)."""
    text = str(value)
    for suffix, scale in (("Gi", 1.0), ("Mi", 1 / 1024), ("Ti", 1024.0)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * scale
    return float(text)


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources a group's `ray start` advertises (KubeRay wants the JSON quoted once more)."""
    text = group.get("rayStartParams", {}).get("resources")
    if text is None:
        return {}
    decoded = json.loads(text)
    return dict(json.loads(decoded) if isinstance(decoded, str) else decoded)


def fits(shape: RayShape, group: dict[str, Any]) -> bool:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    cpus = float(params.get("num-cpus", quantity(limits.get("cpu", 0))))
    gpus = float(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0))))
    memory = quantity(limits.get("memory", "0Gi"))
    provided = ray_resources(group)
    return (
        shape.num_cpus <= cpus
        and shape.num_gpus <= gpus
        and shape.memory_gib <= memory
        and all(provided.get(name, 0.0) >= amount for name, amount in shape.resources.items())
    )


def test_kuberay_example_parses_and_has_every_part() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {
        ("Namespace", "drover"),
        ("ConfigMap", "drover-config"),
        ("Service", "drover-nats"),
        ("StatefulSet", "drover-nats"),
        ("Deployment", "drover-control"),
        ("RayCluster", "drover-ray"),
        ("NetworkPolicy", "drover-ray-ingress"),
    } <= kinds
    assert by_name("StatefulSet", "drover-nats")["spec"]["replicas"] == 3
    cluster = by_name("RayCluster", "drover-ray")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu_groups = [
        g for g in groups if quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    ]
    assert len(gpu_groups) >= 2, "GPU worker groups"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_the_provisioner_points_at_the_ray_head_service(tmp_path: Path) -> None:
    settings = settings_from_configmap(tmp_path)
    assert settings.provisioner.kind == "ray" and settings.autoscaler.enabled
    address = urlparse(settings.provisioner.ray_address)
    cluster = by_name("RayCluster", "drover-ray")
    assert address.scheme == "ray"  # a Ray Client: the control plane is not a Ray node
    assert address.hostname is not None and address.hostname.split(".")[:2] == ["drover-ray-head-svc", "drover"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert address.port in {p["containerPort"] for p in head["ports"]}
    # Two control-plane replicas: the engines outlive a rolling update and the next leader adopts them.
    assert by_name("Deployment", "drover-control")["spec"]["replicas"] >= 2
    assert not settings.provisioner.ray_stop_on_close


def test_every_role_shape_fits_a_worker_group_and_never_the_head(tmp_path: Path) -> None:
    settings = settings_from_configmap(tmp_path)
    spec = by_name("RayCluster", "drover-ray")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for role in ("interactive", "mixed", "batch"):
        shape = settings.provisioner.ray_shapes.get(role, RayShape())
        assert shape.num_gpus >= 1, role
        assert any(fits(shape, g) for g in spec["workerGroupSpecs"]), f"{role}: no worker group fits {shape}"
        assert not fits(shape, head), f"{role} engines could land on the head"
    interactive = settings.provisioner.ray_shapes["interactive"]
    hosts = [g["groupName"] for g in spec["workerGroupSpecs"] if fits(interactive, g)]
    assert hosts == ["h100"]  # the node label keeps interactive engines on H100 pods


def test_control_plane_is_a_ray_free_deployment_running_a_drover_command() -> None:
    control = by_name("Deployment", "drover-control")
    pod = control["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "drover" and "ray" not in args
    assert not any(key.startswith("ray.io/") for key in pod["metadata"]["labels"])
    done = subprocess.run(
        [sys.executable, "-m", "control.cli", *args[1:], "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # The same image as the Ray pods: Ray Client needs the same Ray and Python on both sides.
    cluster = by_name("RayCluster", "drover-ray")["spec"]
    images = {cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    images |= {g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]}
    assert images == {container["image"]}
    # The NetworkPolicy lets the control plane (by its pod labels) reach the Ray pods.
    allowed = [
        peer["podSelector"]["matchLabels"]
        for peer in by_name("NetworkPolicy", "drover-ray-ingress")["spec"]["ingress"][0]["from"]
    ]
    assert any(labels.items() <= pod["metadata"]["labels"].items() for labels in allowed)


def test_engines_reach_nats_by_the_statefulset_names(tmp_path: Path) -> None:
    settings = settings_from_configmap(tmp_path)
    nats = by_name("StatefulSet", "drover-nats")
    url = settings.provisioner.engine_nats_url
    assert url is not None
    for server in url.split(","):
        host = urlparse(server).hostname or ""
        pod, service = host.split(".")[:2]
        assert service == nats["spec"]["serviceName"]
        assert pod.startswith("drover-nats-") and int(pod.rsplit("-", 1)[1]) < nats["spec"]["replicas"]


def test_nats_config_passes_nats_server_t(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(by_name("ConfigMap", "drover-config")["data"]["nats.conf"])
    env = {**os.environ, "POD_NAME": "drover-nats-0"}
    done = subprocess.run(
        [find_nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("text", ['"{\\"a\\": 1}"', '{"a": 1}'])
def test_ray_resources_reads_both_quotings(text: str) -> None:
    assert ray_resources({"rayStartParams": {"resources": text}}) == {"a": 1.0}
