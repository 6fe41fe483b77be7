"""GroupHysteresis.poll: the one automatic KunServe poll both shells run (restores first, then drops among
instances not cooling down)."""

from __future__ import annotations

from control.core.memory import GroupHysteresis, MemoryCommands, restore_snapshot
from control.policy.memory import MemoryParams, MemorySnapshot

GIB = 1 << 30


def overloaded(instance_id: str) -> MemorySnapshot:
    """Full KV pool with a queue that needs more than is free: it votes for a drop."""
    return MemorySnapshot(
        instance_id=instance_id,
        num_layers=32,
        weight_bytes=13 * GIB,
        kv_block_bytes=8 << 20,
        num_total_blocks=1000,
        num_free_blocks=0,
        pending_blocks=200,
        num_waiting=10,
        compat_key="m",
    )


def test_a_poll_forms_a_group_of_overloaded_instances_and_restores_an_idle_old_one() -> None:
    hysteresis = GroupHysteresis(MemoryParams(max_group_size=2, min_group_s=1.0, cooldown_s=5.0))
    first = hysteresis.poll([overloaded("a"), overloaded("b")], [], now=0.0)
    assert first.restores == () and [p.members for p in first.drops] == [("a", "b")]
    hysteresis.formed("g", now=0.0)
    idle = restore_snapshot("g", 2000, 2000, 0, 1000)
    assert hysteresis.poll([], [idle], now=0.5) == MemoryCommands()  # younger than min_group_s
    assert hysteresis.poll([], [idle], now=1.0).restores == ("g",)


def test_instances_cooling_down_are_left_out_of_a_poll() -> None:
    hysteresis = GroupHysteresis(MemoryParams(max_group_size=2, min_group_s=0.0, cooldown_s=5.0))
    hysteresis.ended("g", ["a", "b"], now=10.0)
    assert hysteresis.poll([overloaded("a"), overloaded("b")], [], now=14.0).drops == ()
    assert hysteresis.poll([overloaded("a"), overloaded("b")], [], now=15.0).drops != ()
