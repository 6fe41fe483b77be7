"""KV-block data plane: moves whole KV blocks, as raw bytes, from a source engine's worker into a destination
worker's staging buffers, stage by stage.

Live migration copies a request's KV while it keeps decoding, so the copy must run beside the engine loop
(threads; socket calls release the GIL) and must not buffer unboundedly. The unit of transfer (a *chunk*)
is one KV block over every layer (the bytes of block ``i`` in layer 0, then layer 1, ...): 128 KiB for the
tiny test model, 1 MiB for the migration benchmark model. Blocks are copied whole because on CPU K is
packed inside a block in an ISA-dependent layout: a block is opaque bytes here.

Wire protocol (one TCP connection per migration, source -> destination)::

    HELLO {migration_id, layout, block_nbytes}      -> ACK {ok, error}
    repeated per stage:
      STAGE {stage, num_blocks, meta, total_blocks}
      BLOCK <u32 index> <block_nbytes raw bytes>     x num_blocks
      END {stage}                                    -> ACK {ok, error, blocks, nbytes}
    BYE

Back-pressure: the sender writes straight from the KV memory with blocking ``sendmsg``; TCP flow control
stops it once the destination's receive buffer and the sender's send buffer (``SOCKET_BUFFER_BYTES`` each)
are full, so at most ``2 * SOCKET_BUFFER_BYTES / block_nbytes`` chunks are in flight and the receiver reads
each chunk directly into its preallocated staging slot (no intermediate copy, no allocation). A stage is
complete only when the receiver has acknowledged it.

Reservations grow on demand: a STAGE header carries the request's size once the stage is in
(``total_blocks``). A live request keeps decoding between the size its reservation was last grown to and a
stage's snapshot, and above all until its stop, so the last stage may write past the reservation. Before it
takes the stage's blocks the receiver asks its sink to grow the reservation to ``total_blocks`` from the
destination's free capacity (the sink's engine counts it in its KV use, so its scheduler never over-commits);
only when the destination really has no room is the stage refused ("exceeds the reservation"), and the
migration aborts cleanly.

Transports are pluggable by address scheme (:func:`register_transport`): ``tcp://host:port`` is built in;
NCCL or NIXL transports for GPU memory can register their own schemes behind the same interfaces.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from control.errors import DroverError

log = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
"""SO_SNDBUF / SO_RCVBUF requested on data connections: bounds the bytes in flight."""
ACK_TIMEOUT_S = 60.0
"""Longest wait for the destination to acknowledge a stage or a hello."""

_HELLO, _ACK, _STAGE, _BLOCK, _END, _BYE = (ord(c) for c in "HASBEY")
_FRAME = struct.Struct("!BI")  # kind, payload length (or block index for BLOCK frames)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])


class KvTransferError(DroverError):
    """A KV transfer failed (peer gone, refused, protocol error); the migration should abort."""

    default_code = "kv_transfer_failed"


BlockSegments = Sequence[memoryview]
"""The bytes of one block, as contiguous segments (one per layer); their sizes sum to ``block_nbytes``."""


@dataclass(frozen=True, slots=True)
class StageAck:
    """What the destination confirmed it holds after one stage."""

    stage: int
    num_blocks: int
    nbytes: int
    seconds: float


class KvSender(Protocol):
    """One migration's outgoing stream of blocks."""

    def send_stage(
        self,
        stage: int,
        blocks: Sequence[tuple[int, BlockSegments]],
        meta: dict[str, Any],
        total_blocks: int = 0,
    ) -> StageAck:
        """Send ``(logical index, segments)`` blocks and return once the destination acknowledged them.

        ``total_blocks``: the blocks the request holds once this stage is in; the destination grows its
        reservation to that many if it can (0: ask for nothing; a block past the reservation is refused)."""
        ...

    def close(self) -> None:
        """End the stream (idempotent); a blocked ``send_stage`` in another thread fails."""
        ...


class StagingSink(Protocol):
    """Where a receiver puts incoming blocks: the destination worker's staging pool."""

    def accept(self, migration_id: str, layout: str, block_nbytes: int) -> str | None:
        """Admit an incoming migration; an error message refuses it."""
        ...

    def block_buffer(self, migration_id: str, index: int) -> memoryview | None:
        """A writable ``block_nbytes`` buffer for logical block ``index``; None past the reservation."""
        ...

    def grow(self, migration_id: str, total_blocks: int) -> str | None:
        """Make the reservation hold ``total_blocks`` before a stage that needs them arrives (may block while
        the destination's engine decides); None once it does, else why not."""
        ...

    def stage_received(self, migration_id: str, stage: int, num_blocks: int, meta: dict[str, Any]) -> None:
        """Every block of ``stage`` is in its buffer."""
        ...

    def connection_closed(self, migration_id: str, error: str | None) -> None: ...


class KvServer(Protocol):
    @property
    def address(self) -> str:
        """Where senders connect, e.g. ``tcp://10.0.0.5:41234``."""
        ...

    def close(self) -> None: ...


class KvTransport(Protocol):
    scheme: str

    def connect(self, address: str, migration_id: str, layout: str, block_nbytes: int) -> KvSender: ...

    def serve(self, host: str, sink: StagingSink) -> KvServer: ...


_TRANSPORTS: dict[str, KvTransport] = {}


def register_transport(transport: KvTransport) -> None:
    """Make ``transport`` handle addresses ``<scheme>://...``."""
    _TRANSPORTS[transport.scheme] = transport


def transport_for(address: str) -> KvTransport:
    scheme = address.partition("://")[0]
    try:
        return _TRANSPORTS[scheme]
    except KeyError:
        raise KvTransferError(f"no KV transport for address {address!r} (known: {sorted(_TRANSPORTS)})") from None


def connect(address: str, migration_id: str, layout: str, block_nbytes: int) -> KvSender:
    """Open a sender to ``address`` with whichever transport handles its scheme."""
    return transport_for(address).connect(address, migration_id, layout, block_nbytes)


# ---------------------------------------------------------------------------------------------------------
# TCP transport
# ---------------------------------------------------------------------------------------------------------


def parse_tcp_address(address: str) -> tuple[str, int]:
    if not address.startswith("tcp://"):
        raise KvTransferError(f"not a tcp:// address: {address!r}")
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise KvTransferError("connection closed by peer")
        view = view[n:]


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    buffer = bytearray(nbytes)
    _recv_exact_into(sock, memoryview(buffer))
    return bytes(buffer)


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """``sendmsg`` every buffer, resuming after partial sends (scatter-gather: no copy into one buffer)."""
    while buffers:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= buffers[0].nbytes:
            sent -= buffers[0].nbytes
            buffers.pop(0)
        if sent:
            buffers[0] = buffers[0][sent:]


def _send_frame(sock: socket.socket, kind: int, payload: dict[str, Any]) -> None:
    body = _encoder.encode(payload)
    sock.sendall(_FRAME.pack(kind, len(body)) + body)


def _read_frame_header(sock: socket.socket) -> tuple[int, int]:
    kind, value = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return kind, value


def _read_payload(sock: socket.socket, length: int) -> dict[str, Any]:
    return _decoder.decode(_recv_exact(sock, length))


def _expect_ack(sock: socket.socket) -> dict[str, Any]:
    kind, length = _read_frame_header(sock)
    if kind != _ACK:
        raise KvTransferError(f"expected ACK, got frame kind {kind}")
    ack = _read_payload(sock, length)
    if not ack.get("ok"):
        raise KvTransferError(f"destination refused: {ack.get('error')}")
    return ack


class TcpKvSender:
    """Sends one migration's blocks over a dedicated TCP connection (blocking; use from one thread)."""

    def __init__(self, address: str, migration_id: str, layout: str, block_nbytes: int) -> None:
        host, port = parse_tcp_address(address)
        self.migration_id = migration_id
        self.block_nbytes = block_nbytes
        self._closed = False
        try:
            self._sock = socket.create_connection((host, port), timeout=ACK_TIMEOUT_S)
            _tune(self._sock)
            _send_frame(
                self._sock,
                _HELLO,
                {"migration_id": migration_id, "layout": layout, "block_nbytes": block_nbytes},
            )
            _expect_ack(self._sock)
        except OSError as exc:
            raise KvTransferError(f"cannot open KV stream to {address}: {exc}") from exc

    def send_stage(
        self,
        stage: int,
        blocks: Sequence[tuple[int, BlockSegments]],
        meta: dict[str, Any],
        total_blocks: int = 0,
    ) -> StageAck:
        start = time.perf_counter()
        try:
            header = {"stage": stage, "num_blocks": len(blocks), "meta": meta, "total_blocks": total_blocks}
            _send_frame(self._sock, _STAGE, header)
            for index, segments in blocks:
                if sum(s.nbytes for s in segments) != self.block_nbytes:
                    raise KvTransferError(f"block {index} is not {self.block_nbytes} bytes")
                _send_all(self._sock, [memoryview(_FRAME.pack(_BLOCK, index)), *segments])
            _send_frame(self._sock, _END, {"stage": stage})
            ack = _expect_ack(self._sock)
        except OSError as exc:
            raise KvTransferError(f"KV stream of {self.migration_id} failed: {exc}") from exc
        return StageAck(stage, int(ack["blocks"]), int(ack["nbytes"]), time.perf_counter() - start)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            _send_frame(self._sock, _BYE, {})
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


@dataclass
class _Connection:
    sock: socket.socket
    migration_id: str = ""
    block_nbytes: int = 0
    scratch: bytearray = field(default_factory=bytearray)


class TcpKvServer:
    """Accepts migration streams and writes their blocks into a :class:`StagingSink` (one thread each)."""

    def __init__(self, host: str, sink: StagingSink, port: int = 0) -> None:
        self._sink = sink
        self._listener = socket.create_server((host, port), backlog=16)
        self._host = host
        self._port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-data-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"tcp://{host}:{self._port}"

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in list(self._connections):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            _tune(sock)
            with self._lock:
                self._connections.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="kv-data-recv", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Connection(sock)
        error: str | None = None
        try:
            self._handshake(conn)
            self._receive_stages(conn)
        except (OSError, KvTransferError, msgspec.DecodeError) as exc:
            error = str(exc) or type(exc).__name__
            log.warning("KV stream %s failed: %s", conn.migration_id or "?", error)
        finally:
            with self._lock:
                self._connections.discard(sock)
            sock.close()
            if conn.migration_id:
                self._sink.connection_closed(conn.migration_id, error)

    def _handshake(self, conn: _Connection) -> None:
        kind, length = _read_frame_header(conn.sock)
        if kind != _HELLO:
            raise KvTransferError(f"expected HELLO, got frame kind {kind}")
        hello = _read_payload(conn.sock, length)
        migration_id, block_nbytes = str(hello["migration_id"]), int(hello["block_nbytes"])
        refusal = self._sink.accept(migration_id, str(hello.get("layout", "")), block_nbytes)
        _send_frame(conn.sock, _ACK, {"ok": refusal is None, "error": refusal or ""})
        if refusal is not None:
            raise KvTransferError(f"refused {migration_id}: {refusal}")
        conn.migration_id, conn.block_nbytes = migration_id, block_nbytes

    def _receive_stages(self, conn: _Connection) -> None:
        stage, num_blocks, meta, received, nbytes = -1, 0, {}, 0, 0
        problem = ""
        while True:
            kind, value = _read_frame_header(conn.sock)
            if kind == _BLOCK:
                buffer = self._sink.block_buffer(conn.migration_id, value)
                if buffer is None:  # past the reservation: drain it, refuse the stage at END
                    problem = problem or f"block {value} exceeds the reservation"
                    if len(conn.scratch) != conn.block_nbytes:
                        conn.scratch = bytearray(conn.block_nbytes)
                    buffer = memoryview(conn.scratch)
                _recv_exact_into(conn.sock, buffer)
                received += 1
                nbytes += conn.block_nbytes
            elif kind == _STAGE:
                header = _read_payload(conn.sock, value)
                stage, num_blocks, meta = int(header["stage"]), int(header["num_blocks"]), header.get("meta", {})
                received, nbytes, problem = 0, 0, ""
                total = int(header.get("total_blocks", 0))
                if total > 0:  # before its blocks: a stage that outgrew the reservation grows it, if there is room
                    problem = self._sink.grow(conn.migration_id, total) or ""
            elif kind == _END:
                _read_payload(conn.sock, value)
                if received != num_blocks:
                    problem = problem or f"stage {stage}: {received} of {num_blocks} blocks arrived"
                if not problem:
                    self._sink.stage_received(conn.migration_id, stage, received, meta)
                _send_frame(
                    conn.sock,
                    _ACK,
                    {"ok": not problem, "error": problem, "blocks": received, "nbytes": nbytes},
                )
            elif kind == _BYE:
                return
            else:
                raise KvTransferError(f"unexpected frame kind {kind}")


class TcpTransport:
    """Direct TCP between engine hosts: works across hosts, needs nothing but a reachable port."""

    scheme = "tcp"

    def connect(self, address: str, migration_id: str, layout: str, block_nbytes: int) -> KvSender:
        return TcpKvSender(address, migration_id, layout, block_nbytes)

    def serve(self, host: str, sink: StagingSink) -> KvServer:
        return TcpKvServer(host, sink)


register_transport(TcpTransport())


# ---------------------------------------------------------------------------------------------------------
# Staging pool: preallocated receive buffers with per-migration reservations
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Reservation:
    limit: int
    layout: str = ""
    slots: dict[int, int] = field(default_factory=dict)  # logical block index -> slot
    stages: int = 0


class StagingPool:
    """A fixed array of block-sized slots, reserved per migration, that receivers write into directly.

    Preallocated (and touched) once: writing into fresh memory page-faults and was measured ~25x slower
    than into a warm buffer. ``buffer_of(slot)`` returns a writable view of one slot; the worker scatters
    slots into its KV cache when the migrated request resumes.
    """

    def __init__(
        self,
        num_slots: int,
        block_nbytes: int,
        layout: str,
        buffer_of: Callable[[int], memoryview],
        on_stage: Callable[[str, int, int, dict[str, Any]], None] | None = None,
        on_grow: Callable[[str, int], str | None] | None = None,
    ) -> None:
        """``on_grow(migration_id, total_blocks)``: asks the owning engine to grow a reservation that a stage
        outgrew (called on a receiver thread; it may block). The engine takes the blocks from its free
        capacity, counts them as used and calls :meth:`reserve` itself; it returns None then, else why not.
        Without it a stage past the reservation is refused."""
        self.num_slots = num_slots
        self.block_nbytes = block_nbytes
        self.layout = layout
        self._buffer_of = buffer_of
        self._on_stage = on_stage
        self._on_grow = on_grow
        self._free = list(range(num_slots - 1, -1, -1))
        self._reservations: dict[str, _Reservation] = {}
        self._lock = threading.Lock()

    def reserve(self, migration_id: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` slots in total for ``migration_id`` (grows an existing reservation)."""
        with self._lock:
            current = self._reservations.get(migration_id)
            held = current.limit if current else 0
            if num_blocks <= held:
                return True
            if num_blocks - held > self._unreserved():
                return False
            if current is None:
                self._reservations[migration_id] = _Reservation(num_blocks)
            else:
                current.limit = num_blocks
            return True

    def release(self, migration_id: str) -> int:
        """Drop a migration's reservation and return its slots to the pool; returns the slots freed."""
        with self._lock:
            reservation = self._reservations.pop(migration_id, None)
            if reservation is None:
                return 0
            self._free.extend(reservation.slots.values())
            return len(reservation.slots)

    def slots_of(self, migration_id: str, indices: Sequence[int]) -> list[int | None]:
        """The slot holding each logical block (None where it never arrived)."""
        with self._lock:
            reservation = self._reservations.get(migration_id)
            slots = reservation.slots if reservation else {}
            return [slots.get(i) for i in indices]

    def refusal(self, migration_id: str, num_blocks: int) -> str:
        """Why :meth:`reserve` refused ``num_blocks`` slots in total for ``migration_id``, with the numbers (the
        text a destination's refusal carries). Read after the refusal: a concurrent release may have changed
        the counts since, never the pool's size."""
        with self._lock:
            current = self._reservations.get(migration_id)
            held = current.limit if current else 0
            unreserved = self._unreserved()
        text = f"staging pool holds {self.num_slots} blocks ({unreserved} unreserved"
        text += f", {held} held by this migration)" if held else ")"
        return f"{text}, asked {num_blocks}"

    def reserved_blocks(self) -> int:
        with self._lock:
            return sum(r.limit for r in self._reservations.values())

    def _unreserved(self) -> int:
        return self.num_slots - sum(r.limit for r in self._reservations.values())

    # StagingSink ----------------------------------------------------------------------------------------

    def accept(self, migration_id: str, layout: str, block_nbytes: int) -> str | None:
        if layout != self.layout or block_nbytes != self.block_nbytes:
            return f"incompatible KV layout {layout!r}/{block_nbytes} (here {self.layout!r}/{self.block_nbytes})"
        with self._lock:
            if migration_id not in self._reservations:
                return f"no reservation for migration {migration_id}"
        return None

    def grow(self, migration_id: str, total_blocks: int) -> str | None:
        with self._lock:
            reservation = self._reservations.get(migration_id)
            if reservation is None:
                return f"no reservation for migration {migration_id}"
            held = reservation.limit
        if total_blocks <= held:
            return None
        why = "this destination does not grow reservations"
        if self._on_grow is not None:
            why = self._on_grow(migration_id, total_blocks) or ""
        with self._lock:
            reservation = self._reservations.get(migration_id)
            if not why and reservation is not None and reservation.limit >= total_blocks:
                return None
        return f"block {total_blocks - 1} exceeds the reservation of {held} blocks ({why or 'it was released'})"

    def block_buffer(self, migration_id: str, index: int) -> memoryview | None:
        with self._lock:
            reservation = self._reservations.get(migration_id)
            if reservation is None:
                return None
            slot = reservation.slots.get(index)
            if slot is None:
                if len(reservation.slots) >= reservation.limit or not self._free:
                    return None
                slot = self._free.pop()
                reservation.slots[index] = slot
        return self._buffer_of(slot)

    def stage_received(self, migration_id: str, stage: int, num_blocks: int, meta: dict[str, Any]) -> None:
        with self._lock:
            reservation = self._reservations.get(migration_id)
            if reservation is not None:
                reservation.stages += 1
        if self._on_stage is not None:
            self._on_stage(migration_id, stage, num_blocks, meta)

    def connection_closed(self, migration_id: str, error: str | None) -> None:
        if error:
            log.info("KV stream of %s closed with error: %s", migration_id, error)
