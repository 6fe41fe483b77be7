"""RayProvisioner without a Ray cluster: the settings it is chosen and shaped by, the actor options each role's
shape becomes, and the settings an engine on a Ray node runs with (the live behaviour is
tests/integration/test_ray_provisioning.py, on a real Ray cluster)."""

from __future__ import annotations

import time

import pytest

from control.apps.provisioning import make_provisioner
from control.apps.ray_provisioner import RayProvisioner
from control.settings import Settings, SettingsError, load_settings


def ray_settings(**provisioner: object) -> Settings:
    return load_settings(
        overrides={
            "nats": {"url": "nats://127.0.0.1:4222", "user": "control", "password": "secret"},
            "engine": {"kind": "sim"},
            "autoscaler": {"instance_prefix": "gpu"},
            "provisioner": {"kind": "ray", **provisioner},
        }
    )


def test_kind_ray_makes_a_ray_provisioner_and_local_stays_the_default() -> None:
    assert load_settings().provisioner.kind == "local"
    provisioner = make_provisioner(ray_settings(ray_address="auto"))  # no Ray here: connecting fails, logged
    try:
        assert isinstance(provisioner, RayProvisioner) and provisioner.name == "ray"
        assert provisioner.instances() == []
    finally:
        provisioner.close()


def test_role_shapes_become_ray_actor_options() -> None:
    settings = ray_settings(
        ray_namespace="prod",
        ray_shapes={
            "interactive": {"num_cpus": 4, "num_gpus": 1, "memory_gib": 16, "resources": {"node_h100": 0.001}},
            "batch": {"num_cpus": 2, "num_gpus": 0.5},
        },
    )
    provisioner = RayProvisioner(settings, connect=False)
    interactive = provisioner.actor_options("gpu-interactive-1", "interactive")
    assert interactive == {
        "name": "gpu-interactive-1",
        "namespace": "prod",
        "lifetime": "detached",
        "num_cpus": 4.0,
        "num_gpus": 1.0,
        "memory": 16 * 2**30,
        "resources": {"node_h100": 0.001},
        "max_restarts": 0,  # a lost engine is replaced by the autoscaler, never restarted under its old id
        "max_concurrency": 4,
        "scheduling_strategy": "SPREAD",
    }
    batch = provisioner.actor_options("gpu-batch-2", "batch")
    assert (batch["num_cpus"], batch["num_gpus"]) == (2.0, 0.5) and "resources" not in batch and "memory" not in batch
    # A role without a shape asks for one CPU; Ray's default placement on request.
    packed = RayProvisioner(ray_settings(ray_shapes={}, ray_scheduling="default"), connect=False)
    mixed = packed.actor_options("gpu-mixed-3", "mixed")
    assert (mixed["num_cpus"], mixed["num_gpus"]) == (1.0, 0.0) and "scheduling_strategy" not in mixed


def test_bad_shapes_are_refused_with_the_field_named() -> None:
    with pytest.raises(SettingsError, match="ray_shapes"):
        ray_settings(ray_shapes={"gpu": {"num_gpus": 1}})
    with pytest.raises(SettingsError, match="num_gpus"):
        ray_settings(ray_shapes={"mixed": {"num_gpus": -1}})
    with pytest.raises(SettingsError, match="kind"):
        ray_settings(kind="kubernetes")


def test_engines_get_their_role_the_engine_nats_url_and_none_of_the_control_planes_credentials() -> None:
    settings = ray_settings(engine_nats_url="nats://nats.drover.svc:4222")
    data = RayProvisioner(settings, connect=False).engine_settings("batch")
    engine = Settings(**data)  # what the Ray actor rebuilds on its node
    assert engine.nats.url == "nats://nats.drover.svc:4222"
    assert engine.nats.user is None and engine.nats.password is None
    assert (engine.engine.role, engine.engine.kind, engine.engine.local_autoscaler) == ("batch", "sim", True)
    same_url = RayProvisioner(ray_settings(), connect=False).engine_settings("mixed")
    assert same_url["nats"]["url"] == "nats://127.0.0.1:4222"


def test_an_unreachable_ray_cluster_fails_the_start_not_the_provisioner(caplog: pytest.LogCaptureFixture) -> None:
    # "auto" with no Ray running on this machine: ray.init fails at once (Ray never starts one of its own).
    provisioner = RayProvisioner(ray_settings(ray_address="auto"), connect=False)
    try:
        iid = provisioner.start("mixed")  # returns at once; the provisioner's thread talks to Ray
        assert iid == "gpu-mixed-1"
        seconds = provisioner.mark_ready(iid, at=time.monotonic() + 2.5)  # its first heartbeat, 2.5 s on
        assert seconds == pytest.approx(2.5, abs=0.5)
        assert provisioner.mark_ready(iid) is None  # once
        assert provisioner.startup_samples() == [seconds]
        assert provisioner.startup_estimate_s(9.0) == seconds
        deadline = time.monotonic() + 30
        while provisioner.instances() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert provisioner.instances() == [], "a start that could not reach Ray still counts as an instance"
        assert "ray provisioner: start gpu-mixed-1 failed" in caplog.text
        assert provisioner.start("mixed") == "gpu-mixed-2"  # the provisioner lives on
        provisioner.stop("gpu-mixed-2")
    finally:
        provisioner.close()
    assert provisioner.instances() == []
    with pytest.raises(RuntimeError, match="closed"):
        provisioner.start("mixed")
