"""`drover scale` and `drover autoscale status` against a real control plane (in-process, real nats-server,
sim engines started by the in-process provisioner)."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from control.apps.cli import app
from tests.actors.test_autoscaler import Plane, plane  # noqa: F401 - the fixture

runner = CliRunner()


def drover(url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--nats-url", url, *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("plane", [(False, None)], indirect=True)
def test_scale_and_autoscale_status(plane: Plane) -> None:  # noqa: F811
    code, out = drover(plane.url, "autoscale", "status")
    assert code == 0, out
    assert "autoscaler disabled" in out and "interactive" in out and "recent scale events" in out
    code, out = drover(plane.url, "scale", "batch", "1")
    assert code == 0, out
    assert "batch: 0 -> 1" in out
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, out = drover(plane.url, "autoscale", "status", "--json")
        assert code == 0, out
        status = json.loads(out)
        batch = next(r for r in status["roles"] if r["role"] == "batch")
        if batch["instances"] == 1:
            break
        time.sleep(0.5)
    assert batch["pinned"] and batch["instances"] == 1
    assert any(e["action"] == "ready" for e in status["events"])
    code, out = drover(plane.url, "scale", "gpu", "1")
    assert code == 1 and "unknown role" in out
    code, out = drover(plane.url, "scale", "batch", "--auto")
    assert code == 0 and "automatic" in out
