"""The control core's migration stage machine, which both the MigratorActor and the simulator drive."""

from __future__ import annotations

import pytest

from control.core.migration import MigrationStages, StageStep
from control.policy.params import PolicyParams


def test_stop_once_few_blocks_remain() -> None:
    machine = MigrationStages(PolicyParams(last_stage_max_blocks=4, max_stages=3))
    assert machine.after_stage(10) is StageStep.COPY
    assert machine.after_stage(4) is StageStep.STOP_AND_COPY
    assert machine.stages == 2


@pytest.mark.parametrize(("after", "step"), [("stop_and_copy", StageStep.STOP_AND_COPY), ("abort", StageStep.ABORT)])
def test_after_max_stages(after: str, step: StageStep) -> None:
    machine = MigrationStages(PolicyParams(last_stage_max_blocks=0, max_stages=2, after_max_stages=after))  # type: ignore[arg-type]
    assert machine.after_stage(5) is StageStep.COPY
    assert machine.after_stage(5) is step


def test_default_is_one_behaviour_for_both_shells() -> None:
    # The live defaults and the simulator's share PolicyParams' after_max_stages.
    from control.settings import LIVE_POLICY_DEFAULTS

    assert LIVE_POLICY_DEFAULTS.after_max_stages == PolicyParams().after_max_stages


def test_reservation_grows_with_headroom() -> None:
    machine = MigrationStages(PolicyParams(), headroom_blocks=2)
    assert machine.first_reservation(10) == 12
    assert machine.grow_reservation(10) is None
    assert machine.grow_reservation(13) == 15 and machine.reserved == 15


def test_reservation_keeps_room_for_what_the_request_wrote_during_the_last_round() -> None:
    machine = MigrationStages(PolicyParams(), headroom_blocks=2, decoded_factor=2.0)
    assert machine.first_reservation(10) == 12
    assert machine.grow_reservation(10) is None  # it wrote nothing: the headroom is enough
    assert machine.grow_reservation(14) == 14 + 2 + 2 * 4  # 4 blocks in one round: room for 8 more
    assert machine.grow_reservation(15) is None  # 1 block: 15 + 2 + 2 = 19 fit in 24
    assert machine.grow_reservation(25) == 25 + 2 + 20


def test_bad_after_max_stages_is_refused() -> None:
    with pytest.raises(ValueError, match="after_max_stages"):
        PolicyParams().with_updates(after_max_stages="retry")
