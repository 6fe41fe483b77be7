"""A started control plane runs with the collector as long-running services set it (control/gc_tuning.py) and
gives it back when it stops."""

from __future__ import annotations

import gc

from control import gc_tuning
from tests.integration.conftest import make_sim_cluster


def test_control_plane_start_freezes_the_collector_and_stop_restores_it(nats_url: str) -> None:
    before = gc.get_threshold()
    cluster = make_sim_cluster(nats_url, instances=1)
    try:
        assert gc.get_freeze_count() > 0  # start-up's objects: out of the collector's reach
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
    finally:
        cluster.stop()
    assert gc.get_threshold() == before  # (the suite's own freeze stays: tests/conftest.py)
