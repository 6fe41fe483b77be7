"""The TCP KV data plane: blocks land byte-exact in staging, reservations and layouts are enforced, and a
slow receiver holds the sender back (bounded in-flight data)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from transport import kv_data

BLOCK = 64 * 1024
LAYERS = 4
SEGMENT = BLOCK // LAYERS
LAYOUT = "test/vec/float32/L4"


class Recorder:
    """Collects what a StagingPool reports."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, int, int, dict[str, Any]]] = []

    def __call__(self, migration_id: str, stage: int, num_blocks: int, meta: dict[str, Any]) -> None:
        self.stages.append((migration_id, stage, num_blocks, meta))


@pytest.fixture
def staging() -> Iterator[tuple[kv_data.StagingPool, np.ndarray, Recorder, kv_data.KvServer]]:
    rows = np.zeros((32, BLOCK), dtype=np.uint8)
    recorder = Recorder()
    pool = kv_data.StagingPool(32, BLOCK, LAYOUT, buffer_of=lambda slot: memoryview(rows[slot]), on_stage=recorder)
    server = kv_data.TcpTransport().serve("127.0.0.1", pool)
    yield pool, rows, recorder, server
    server.close()


def source_blocks(count: int, seed: int = 0) -> np.ndarray:
    """A fake KV cache: [layers, blocks, segment] random bytes, so a block is LAYERS separate segments."""
    return np.random.default_rng(seed).integers(0, 256, size=(LAYERS, count, SEGMENT), dtype=np.uint8)


def segments(cache: np.ndarray, block_id: int) -> list[memoryview]:
    return [memoryview(cache[layer, block_id]) for layer in range(LAYERS)]


def test_stages_land_byte_exact(staging: Any) -> None:
    pool, rows, recorder, server = staging
    cache = source_blocks(10)
    assert pool.reserve("m1", 6)
    sender = kv_data.connect(server.address, "m1", LAYOUT, BLOCK)
    first = sender.send_stage(0, [(i, segments(cache, 9 - i)) for i in range(4)], {"tokens": [1, 2]})
    second = sender.send_stage(1, [(4, segments(cache, 2)), (5, segments(cache, 1))], {})
    sender.close()
    assert (first.num_blocks, first.nbytes, second.num_blocks) == (4, 4 * BLOCK, 2)
    assert [(s[1], s[2]) for s in recorder.stages] == [(0, 4), (1, 2)]
    assert recorder.stages[0][3] == {"tokens": [1, 2]}
    expected = {0: 9, 1: 8, 2: 7, 3: 6, 4: 2, 5: 1}
    slots = pool.slots_of("m1", list(expected))
    for (index, block_id), slot in zip(expected.items(), slots, strict=True):
        assert slot is not None, index
        assert bytes(rows[slot]) == cache[:, block_id].tobytes()
    assert pool.release("m1") == 6
    assert pool.reserved_blocks() == 0


def test_empty_stage_is_acknowledged(staging: Any) -> None:
    pool, _, recorder, server = staging
    assert pool.reserve("m2", 1)
    sender = kv_data.connect(server.address, "m2", LAYOUT, BLOCK)
    ack = sender.send_stage(0, [], {})
    sender.close()
    assert (ack.num_blocks, ack.nbytes) == (0, 0)
    assert recorder.stages == [("m2", 0, 0, {})]


def test_reservation_limits_and_refusals(staging: Any) -> None:
    pool, _, _, server = staging
    with pytest.raises(kv_data.KvTransferError, match="no reservation"):
        kv_data.connect(server.address, "unknown", LAYOUT, BLOCK)
    assert pool.reserve("m3", 2)
    with pytest.raises(kv_data.KvTransferError, match="incompatible KV layout"):
        kv_data.connect(server.address, "m3", "other/layout", BLOCK)
    sender = kv_data.connect(server.address, "m3", LAYOUT, BLOCK)
    cache = source_blocks(3)
    with pytest.raises(kv_data.KvTransferError, match="exceeds the reservation"):
        sender.send_stage(0, [(i, segments(cache, i)) for i in range(3)], {})
    sender.close()
    assert not pool.reserve("too-big", 31)  # 2 of 32 slots are held by m3
    assert pool.reserve("m3", 4)  # reservations grow
    pool.release("m3")
    assert pool.reserve("too-big", 31)


def test_a_stage_past_the_reservation_grows_it_when_the_engine_has_room() -> None:
    """A stage whose header says the request now holds more blocks than reserved asks the pool's engine to
    grow the reservation before taking its blocks: granted, the stage lands; refused (the engine has no room),
    the stage is refused and nothing more is held."""
    rows = np.zeros((32, BLOCK), dtype=np.uint8)
    asked: list[tuple[str, int]] = []
    room = {"free": 3}  # the engine's free blocks beyond the first reservation

    def on_grow(migration_id: str, total_blocks: int) -> str | None:
        asked.append((migration_id, total_blocks))
        extra = total_blocks - 2
        if extra > room["free"]:
            return f"{room['free']} free blocks"
        room["free"] -= extra
        assert pool.reserve(migration_id, total_blocks)  # the engine reserves in staging itself
        return None

    pool = kv_data.StagingPool(32, BLOCK, LAYOUT, buffer_of=lambda slot: memoryview(rows[slot]), on_grow=on_grow)
    server = kv_data.TcpTransport().serve("127.0.0.1", pool)
    cache = source_blocks(8)
    try:
        assert pool.reserve("g1", 2)
        sender = kv_data.connect(server.address, "g1", LAYOUT, BLOCK)
        ack = sender.send_stage(0, [(i, segments(cache, i)) for i in range(2)], {}, total_blocks=2)
        assert ack.num_blocks == 2 and asked == []  # within the reservation: nothing asked
        ack = sender.send_stage(1, [(i, segments(cache, i)) for i in range(2, 5)], {}, total_blocks=5)
        sender.close()
        assert ack.num_blocks == 3 and asked == [("g1", 5)] and pool.reserved_blocks() == 5
        slots = pool.slots_of("g1", list(range(5)))
        for index, slot in enumerate(slots):
            assert slot is not None and bytes(rows[slot]) == cache[:, index].tobytes()
        pool.release("g1")
        room["free"] = 3  # the engine freed what g1 held

        assert pool.reserve("g2", 2)
        sender = kv_data.connect(server.address, "g2", LAYOUT, BLOCK)
        with pytest.raises(kv_data.KvTransferError, match=r"block 7 exceeds the reservation of 2 blocks \(3 free"):
            sender.send_stage(0, [(i, segments(cache, i)) for i in range(8)], {}, total_blocks=8)
        sender.close()
        assert asked[-1] == ("g2", 8) and pool.reserved_blocks() == 2
    finally:
        server.close()


def test_wrong_block_size_is_rejected_by_sender(staging: Any) -> None:
    pool, _, _, server = staging
    assert pool.reserve("m4", 1)
    sender = kv_data.connect(server.address, "m4", LAYOUT, BLOCK)
    with pytest.raises(kv_data.KvTransferError, match="not"):
        sender.send_stage(0, [(0, [memoryview(bytes(10))])], {})
    sender.close()


def test_unknown_scheme() -> None:
    with pytest.raises(kv_data.KvTransferError, match="no KV transport"):
        kv_data.connect("nccl://somewhere", "m", LAYOUT, BLOCK)
    assert kv_data.parse_tcp_address("tcp://10.1.2.3:4567") == ("10.1.2.3", 4567)


class CountingBlocks(Sequence[tuple[int, list[memoryview]]]):
    """Blocks handed to the sender lazily, counting how many it has taken so far."""

    def __init__(self, block: np.ndarray, count: int) -> None:
        self.block = block
        self.size = count
        self.taken = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            raise TypeError("no slicing")
        if index >= self.size:
            raise IndexError(index)
        self.taken = max(self.taken, index + 1)
        return (index, [self.block.data])


def test_slow_receiver_bounds_data_in_flight() -> None:
    """The sender blocks once the socket buffers are full: it cannot run ahead of the receiver."""
    block_nbytes = 1 << 20
    count = 128  # 128 MiB, far more than the socket buffers hold
    gate = threading.Event()
    scratch = np.zeros(block_nbytes, dtype=np.uint8)

    class GatedSink:
        def accept(self, migration_id: str, layout: str, nbytes: int) -> str | None:
            return None

        def block_buffer(self, migration_id: str, index: int) -> memoryview | None:
            gate.wait()
            return scratch.data

        def grow(self, migration_id: str, total_blocks: int) -> str | None:
            return "never asked: the stage says no total"

        def stage_received(self, migration_id: str, stage: int, num_blocks: int, meta: dict[str, Any]) -> None:
            pass

        def connection_closed(self, migration_id: str, error: str | None) -> None:
            pass

    server = kv_data.TcpKvServer("127.0.0.1", GatedSink())
    blocks = CountingBlocks(np.ones(block_nbytes, dtype=np.uint8), count)
    sender = kv_data.connect(server.address, "slow", LAYOUT, block_nbytes)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(sender.send_stage(0, blocks, {})))
    thread.start()
    thread.join(timeout=1.0)  # give it every chance to run ahead
    taken_while_blocked = blocks.taken
    gate.set()
    thread.join(timeout=60)
    sender.close()
    server.close()
    assert result and result[0].num_blocks == count
    # Kernel socket buffers (a few MiB each way, possibly auto-tuned) bound what left the sender.
    assert taken_while_blocked < count // 2


def test_a_refused_reservation_names_the_staging_pool_and_its_numbers() -> None:
    """A destination whose staging pool (not its KV blocks) is the limit says so: a vLLM destination with 1,023
    free KV blocks once refused 131 blocks with "131 blocks are not free on b", when its 128-slot staging pool
    was what could not hold them."""
    rows = np.zeros((128, 8), dtype=np.uint8)
    pool = kv_data.StagingPool(128, 8, LAYOUT, buffer_of=lambda slot: memoryview(rows[slot]))
    assert not pool.reserve("m", 131)
    assert pool.refusal("m", 131) == "staging pool holds 128 blocks (128 unreserved), asked 131"
    assert pool.reserve("m", 100) and pool.reserve("other", 20)
    assert not pool.reserve("m", 110)  # 10 more than this migration holds, 8 left
    held = "staging pool holds 128 blocks (8 unreserved, 100 held by this migration), asked 110"
    assert pool.refusal("m", 110) == held
