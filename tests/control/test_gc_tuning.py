"""The collector as Drover's long-running processes set it (control/gc_tuning.py): start-up frozen, young
collections 14x rarer, given back by the last holder; the simulator's runs hold it."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from control import gc_tuning
from control.simulator import runner
from control.simulator.presets import get_preset
from control.simulator.runner import RunOptions, run_policy
from control.simulator.workload import RequestSpec


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Nothing frozen during the test, as in a control plane's process; the suite's freeze (tests/conftest.py)
    put back after it."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.freeze()


def test_tuning_freezes_start_up_raises_the_young_threshold_and_the_last_holder_restores(unfrozen: None) -> None:
    if gc_tuning.held():
        pytest.skip("a control plane this session keeps running holds the setting")
    before = gc.get_threshold()
    gc_tuning.tune_for_service()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0  # every object alive at start-up: modules, this test's locals
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
        assert f"{frozen} objects frozen" in gc_tuning.describe()
        with gc_tuning.service_gc():  # a second holder (another control plane in this process): nothing moves
            assert gc.get_freeze_count() == frozen
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD  # the first holder still holds it
    finally:
        gc_tuning.restore()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_objects_someone_else_froze_stay_frozen() -> None:
    gc.freeze()  # as the suite does at each module's start (and leaves to undo at its end)
    frozen = gc.get_freeze_count()
    before = gc.get_threshold()
    with gc_tuning.service_gc():
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
    assert gc.get_threshold() == before and gc.get_freeze_count() >= frozen > 0


def test_a_simulation_runs_with_the_service_collector_and_gives_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    build = runner.fixed_simulator

    def recording(*args: Any) -> Any:  # the real simulator, built while the run holds the setting
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
        return build(*args)

    monkeypatch.setattr(runner, "fixed_simulator", recording)
    before = gc.get_threshold()
    workload = [RequestSpec(f"r{i}", 0.1 * i, 64, 8) for i in range(8)]
    row = run_policy("drover", workload, RunOptions(preset=get_preset("llama7b-a10"), instances=2)).row
    assert row["completed"] == 8
    assert len(seen) == 1 and seen[0][0] == gc_tuning.YOUNG_THRESHOLD and seen[0][1] > 0
    assert gc.get_threshold() == before  # (the suite's own freeze stays: tests/conftest.py)
