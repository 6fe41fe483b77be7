"""The control core's migration stage machine, which both the MigratorActor and the simulator drive."""

from __future__ import annotations

import pytest

from control.core.migration import MigrationStages, StageStep, request_max_blocks
from control.core.record import DecisionLog
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


def test_a_lagging_heartbeat_is_not_read_as_one_rounds_writes() -> None:
    """The first reservation is sized from the scheduler's view (vLLM's heartbeat counts the tokens its front
    end received, which lag the EngineCore on a starved loop); ``begin`` and the stages report the EngineCore's
    own size. Before, the growth after ``begin`` took the difference of the two views for one round's writes and
    asked for 2x it on top: 9 reported, 49 at ``begin`` -> 49 + 2 + 2 * 40 = 131 blocks. Now the rate is taken
    only between two of the source's own reports: the first growth keeps the headroom alone, and the margin
    follows what the request wrote from one stage to the next."""
    log = DecisionLog()
    machine = MigrationStages(PolicyParams(), headroom_blocks=2, decoded_factor=2.0, log=log, key="r")
    assert machine.first_reservation(9) == 11
    assert machine.grow_reservation(49) == 49 + 2  # was 131: the lag is not decode progress
    assert machine.grow_reservation(52) == 52 + 2 + 2 * 3  # 3 blocks written between begin and the first stage
    assert machine.grow_reservation(53) is None  # 1 block: 53 + 2 + 2 = 57 fit in 60
    grows = [d.inputs for d in log.entries() if d.what == "grow_reservation"]
    # each growth records the source's previous report the rate was measured from (None: none yet)
    assert grows == [(49, 2, 11, None), (52, 2, 51, 49), (53, 2, 60, 52)]


def test_no_reservation_exceeds_what_the_request_can_ever_hold() -> None:
    """No reservation asks for more than the request can ever hold (a 272 + 1,500-token request holds at most
    56 blocks of 32), even when the margin measured between two stages would: 49 -> 54 blocks in one round
    asks 54 + 2 + 2 * 5 = 66, capped at 56; without a known maximum it is unchanged."""
    cap = request_max_blocks(prompt_tokens=272, max_tokens=1500, max_model_len=2048, block_size=32)
    assert cap == 56
    machine = MigrationStages(PolicyParams(), headroom_blocks=2, decoded_factor=2.0, max_blocks=cap)
    assert machine.first_reservation(9) == 11
    assert machine.grow_reservation(49) == 51
    assert machine.grow_reservation(54) == 56 and machine.reserved == 56
    assert machine.grow_reservation(56) is None  # the request at its largest: already held
    uncapped = MigrationStages(PolicyParams(), headroom_blocks=2, decoded_factor=2.0)
    assert uncapped.first_reservation(9) == 11 and uncapped.grow_reservation(49) == 51
    assert uncapped.grow_reservation(54) == 66
    # near its end the headroom is cut to what it can still write; a size past the cap is still reserved whole
    near_end = MigrationStages(PolicyParams(), headroom_blocks=2, max_blocks=10)
    assert near_end.first_reservation(9) == 10
    assert near_end.grow_reservation(12) == 12


def test_a_requests_maximum_blocks() -> None:
    assert request_max_blocks(100, 28, 0, 32) == 4  # 128 tokens: 4 full blocks
    assert request_max_blocks(100, 29, 0, 32) == 5
    assert request_max_blocks(1000, 5000, 2048, 32) == 64  # the model's context bounds it
    assert request_max_blocks(100, 28, 2048, 0) == 0  # block size unknown: no cap


def test_bad_after_max_stages_is_refused() -> None:
    with pytest.raises(ValueError, match="after_max_stages"):
        PolicyParams().with_updates(after_max_stages="retry")
