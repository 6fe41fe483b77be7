"""The SchedulerActor is a thin shell: each of its jobs lives in a module of its own that takes its
collaborators explicitly (the issue: helpers were handed the actor's ``self`` and called its private
methods). None of those modules may reach back for the actor."""

from __future__ import annotations

import ast
from pathlib import Path

ACTORS = Path(__file__).resolve().parents[2] / "actors"
JOBS = (
    "dispatching",
    "scheduler_admin",
    "scheduler_clients",
    "scheduler_ends",
    "scheduler_failover",
    "scheduler_instances",
    "scheduler_migration",
)


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_the_schedulers_jobs_take_collaborators_not_the_actor() -> None:
    for job in JOBS:
        assert "actors.scheduler" not in _imported_modules(ACTORS / f"{job}.py"), job


def test_the_scheduler_wires_every_job() -> None:
    wired = _imported_modules(ACTORS / "scheduler.py")
    assert {f"actors.{job}" for job in JOBS} <= wired
