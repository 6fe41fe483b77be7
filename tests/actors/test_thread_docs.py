"""Every method of the live shell's actors says which thread runs it (``Thread: ...`` in its docstring, the
convention of actors/threads.py): one thread owns each piece of state, and a reader must be able to tell
which one a method runs on without tracing its callers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ACTORS = Path(__file__).resolve().parents[2] / "actors"
MODULES = (
    "scheduler",
    "engine_actor",
    "migrator",
    "autoscaler",
    "request_classes",
    "memory_manager",
    "supervisor",
    "dispatching",
    "scheduler_admin",
    "scheduler_clients",
    "scheduler_ends",
    "scheduler_failover",
    "scheduler_instances",
    "scheduler_migration",
)


def undocumented(source: str) -> list[str]:
    missing = []
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if "Thread:" not in (ast.get_docstring(fn) or ""):
                missing.append(f"{cls.name}.{fn.name}")
    return missing


@pytest.mark.parametrize("module", MODULES)
def test_every_method_says_which_thread_runs_it(module: str) -> None:
    assert undocumented((ACTORS / f"{module}.py").read_text()) == []


def test_the_check_finds_a_method_without_its_thread() -> None:
    source = (
        'class A:\n    def f(self):\n        """Thread: the bus loop."""\n\n    def g(self):\n        """Does g."""\n'
    )
    assert undocumented(source) == ["A.g"]
