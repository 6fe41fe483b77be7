"""Python's cyclic garbage collector in a long-running Drover process, set as latency-sensitive Python services
set it: after start-up everything alive is frozen (``gc.freeze``) and young collections run 14 times less often.

Why (issue 17, measured): with Python's defaults a young (generation 0) collection starts after 700 more
container objects were allocated than freed, so a live control plane (bus messages, request records, engine
reports) ran one every ~8 requests, a generation-1 one every ~90 and 2-3 full collections of 42-58 ms in 3,000
short requests (``scripts/bench_gc_live.py``); every thread waits behind a collection, the scheduler's
dispatches too. In ``scripts/bench_policy_scale.py`` (dispatch decisions alone) collections ran in 7 of 5,000
decisions at 1,000 instances and 14 at 10,000: a seventh and a quarter of the slowest 1 %.

* ``gc.freeze()`` after a full collection moves every object alive at start-up (modules, settings, the
  tokenizer, a loaded trace) out of the collector's reach: a full collection no longer walks them (a full
  collection of a control-plane process after its imports: 40 ms before, microseconds after).
* ``YOUNG_THRESHOLD``: a young collection every 10,000 net allocations instead of 700, so 14x fewer pauses,
  and 14x fewer of the older generations' collections that follow them (their thresholds stay). Each young one
  is longer (about 1-5 ms live, 0.6-0.9 ms with the dispatch benchmark's heap items, against 40 µs): rarer and
  longer, out of the p99 and near the 4 ms scheduler-tick preemptions a shared host already puts into a
  decision's p99.9. Live: 12 young, 1 generation-1 and no full collection in the same 3,000 requests.

Nothing here changes what the program computes, only when unreachable cycles are freed. The setting is
process-wide, so it is taken and given back in pairs (:func:`service_gc`, or :func:`tune_for_service` then
:func:`restore`): the first taker freezes, the last one to give it back unfreezes and restores the thresholds,
so a test process that starts many control planes or simulations does not keep their objects frozen. Objects
someone else froze first (the test suite freezes each module's start, tests/conftest.py) stay frozen: unfreezing
is all or nothing, and it is theirs to undo.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000
"""Net container allocations between two young collections (Python's default: 700)."""

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None
_unfreeze = False  # whether the last restore unfreezes: nothing was frozen before the first take


def tune_for_service() -> None:
    """Collect, freeze what is alive and raise the young threshold (the first call; later ones only count)."""
    global _holders, _saved, _unfreeze
    with _lock:
        _holders += 1
        if _holders > 1:
            return
        _saved = gc.get_threshold()
        _unfreeze = gc.get_freeze_count() == 0
        gc.collect()  # garbage alive now would otherwise be frozen with the rest and never freed
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, _saved[1], _saved[2])


def restore() -> None:
    """Give back one :func:`tune_for_service`; the last one unfreezes and restores the thresholds."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders or _saved is None:
            return
        if _unfreeze:
            gc.unfreeze()  # the frozen objects join the oldest generation: collectable again
        gc.set_threshold(*_saved)
        _saved = None


@contextmanager
def service_gc() -> Iterator[None]:
    """:func:`tune_for_service` for the block's duration."""
    tune_for_service()
    try:
        yield
    finally:
        restore()


def held() -> bool:
    """Whether something in this process holds the setting now (a control plane, a simulation)."""
    with _lock:
        return _holders > 0


def describe() -> str:
    """The collector's settings now, for a benchmark's or a log's header."""
    young, middle, old = gc.get_threshold()
    state = "enabled" if gc.isenabled() else "disabled"
    return f"gc {state}, thresholds {young}/{middle}/{old}, {gc.get_freeze_count()} objects frozen"
