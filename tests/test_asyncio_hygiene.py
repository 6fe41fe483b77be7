"""The session's asyncio hygiene check (tests/conftest.py) fails a test that leaves a task pending or a
coroutine never awaited, and passes a clean one: run on a small test file in a separate pytest process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEAKY = """
import asyncio


async def forever():
    await asyncio.sleep(3600)


def test_leaves_a_task_pending():
    loop = asyncio.new_event_loop()
    loop.create_task(forever())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def test_never_awaits_a_coroutine():
    forever()


def test_is_clean():
    asyncio.run(asyncio.sleep(0))
"""


# A task kept alive past the end of its module is frozen there (tests/conftest.py leaves what is alive when a
# module begins out of each test's collections); when a later module drops it, it is still found.
HELD = """
import asyncio

HELD = []


async def forever():
    await asyncio.sleep(3600)


def test_holds_a_pending_task_past_its_module():
    loop = asyncio.new_event_loop()
    HELD.append(loop.create_task(forever()))
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
"""

DROPS = """
import test_held


def test_drops_it():
    test_held.HELD.clear()
"""


def test_leaked_tasks_and_unawaited_coroutines_fail_their_test(tmp_path: Path) -> None:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    (tmp_path / "test_held.py").write_text(HELD)
    (tmp_path / "test_held_dropped.py").write_text(DROPS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "ERROR test_leaky.py::test_leaves_a_task_pending" in out, out
    assert "ERROR test_leaky.py::test_never_awaits_a_coroutine" in out, out
    assert "ERROR test_held_dropped.py::test_drops_it" in out, out
    assert "5 passed, 3 errors" in out, out  # the clean tests pass; the three leaky ones error at teardown
