"""MemoryManager: a member of a KunServe group that ended takes no dispatch until it reports from after its join.

Found by CI (stop 25, ``test_member_process_dying_while_pipelined_ends_the_group``): the member process was
killed while pipelined; the leader broke the group and served alone again. The last heartbeat of the member
the scheduler had read was from before its join ("standalone"), so from the group's end until the member was
declared dead (``instance_stale_after_s`` later) it looked like a free instance, and one of the evicted
requests, resumed, was dispatched to the dead member: its ``RequestDone.instances`` named an instance that
never served it (``['ks-lead', 'ks-proc', 'ks-lead']``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from actors.memory_manager import MemoryManager
from control.settings import MemorySettings
from transport.bus import Bus, BusOptions
from transport.messages import EngineInfo, EngineMemory, InstanceHeartbeat, InstanceLoad


def _beat(
    instance_id: str, sent_at: float, role: str = "standalone", group: str = "", *members: str
) -> InstanceHeartbeat:
    layers = [0, 4] if role == "standalone" else ([0, 2] if role == "leader" else [2, 4])
    return InstanceHeartbeat(
        info=EngineInfo(
            instance_id=instance_id,
            engine_kind="torch",
            model="tiny",
            dtype="float32",
            block_size=32,
            num_blocks=64,
            max_model_len=2048,
        ),
        load=InstanceLoad(num_total_blocks=64, num_free_blocks=64, num_running=0, num_waiting=0),
        seq=1,
        sent_at=sent_at,
        memory=EngineMemory(
            num_layers=4,
            layer_range=layers,
            model_weight_bytes=4_000,
            weight_bytes=4_000 if role == "standalone" else 2_000,
            kv_block_bytes=100,
            budget_bytes=10_400,
            home_num_blocks=64,
            group_id=group,
            group_role=role,
            group_members=list(members),
        ),
    )


@pytest.fixture
def manager(nats_url: str) -> Iterator[MemoryManager]:
    bus = Bus(BusOptions(url=nats_url, name="drover-test-memory-left")).start()
    try:
        yield MemoryManager(bus, MemorySettings(auto=False), lambda _instance: None)
    finally:
        bus.stop()


def test_a_member_whose_last_beat_predates_its_join_takes_no_dispatch_after_its_group_ends(
    manager: MemoryManager,
) -> None:
    before = time.time()
    manager.on_heartbeat(_beat("ks-proc", before))  # read before the join, and the last one before it dies
    manager.on_heartbeat(_beat("ks-lead", before))
    assert not manager.blocks_dispatch("ks-proc")
    # The leader reports the group (here adopted from its heartbeat; a formed group is known from the joins).
    manager.on_heartbeat(_beat("ks-lead", time.time() + 1, "leader", "g-1", "ks-lead", "ks-proc"))
    assert [g.members for g in manager.groups.values()] == [("ks-lead", "ks-proc")]
    assert manager.blocks_dispatch("ks-proc") and not manager.blocks_dispatch("ks-lead")

    # The member dies before any beat of it as a member is read; the leader breaks the group, serves alone.
    manager.on_heartbeat(_beat("ks-lead", time.time() + 2))
    assert not manager.groups
    assert not manager.blocks_dispatch("ks-lead")
    assert manager.blocks_dispatch("ks-proc")  # before the fix: False (its pre-join "standalone" let it in)
    manager.on_heartbeat(_beat("ks-proc", before))  # an old beat delivered late proves nothing either
    assert manager.blocks_dispatch("ks-proc")

    # A beat from after the join counts: as a member it still serves a stage; restored, it takes requests.
    manager.on_heartbeat(_beat("ks-proc", time.time() + 3, "member", "g-1"))
    assert manager.blocks_dispatch("ks-proc")
    manager.on_heartbeat(_beat("ks-proc", time.time() + 4))
    assert not manager.blocks_dispatch("ks-proc")
    assert not manager.left


def test_a_member_declared_dead_is_forgotten(manager: MemoryManager) -> None:
    manager.on_heartbeat(_beat("m", time.time()))
    manager.on_heartbeat(_beat("l", time.time() + 1, "leader", "g-2", "l", "m"))
    manager.on_heartbeat(_beat("l", time.time() + 2))
    assert manager.blocks_dispatch("m") and "m" in manager.left
    manager.on_instance_dead("m")
    assert "m" not in manager.left and not manager.blocks_dispatch("m")
