"""Child processes that die with their parent: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``).

Pass :func:`die_with_parent` (or ``die_with_parent_by(sig)``) as ``preexec_fn`` to ``subprocess.Popen``: the
child gets the signal when the thread that started it exits, even if the parent was SIGKILLed and had no chance
to stop it. Start such children
from a long-lived thread (the main thread): the signal follows the spawning thread, not the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

# Resolved in the parent, so the forked child only makes one system call before exec (no imports, no locks).
_prctl = (
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl if sys.platform == "linux" else None
)


def die_with_parent_by(sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: in the forked child, ask the kernel for ``sig`` when the parent dies (no-op off Linux)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


die_with_parent = die_with_parent_by(signal.SIGTERM)
