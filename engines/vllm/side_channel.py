"""Side channel between a :class:`~engines.vllm.engine.VllmEngine` and its migration connector's two halves.

vLLM runs the connector in two other processes (the scheduler side in EngineCore, the worker side in the
worker), and the process that owns ``AsyncLLM`` can only reach them per request (``kv_transfer_params``).
Migration needs more: commands for a running request (stage, stop), reservations on an idle destination,
and events back (a stage was acknowledged, the exact token state at stop). So the engine listens on a Unix
socket whose path it hands to the connector through ``kv_connector_extra_config``; each half connects and
says who it is; then both directions carry length-prefixed msgpack frames of the structs below. Commands
carry a ``seq`` answered by one :class:`Reply`; events have ``seq == 0``.

The engine side is asyncio (:class:`ControlServer`); the connector side is a thread (:class:`ControlClient`),
since vLLM's processes have no event loop we may use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import msgspec

from control.errors import DroverError

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")


class _Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    seq: int = 0


class Hello(_Frame, frozen=True, tag="hello"):
    """First frame of each connector half. The worker adds its data-plane address and KV geometry."""

    role: str  # "scheduler" | "worker"
    pid: int
    data_address: str = ""
    kv_layout: str = ""
    block_nbytes: int = 0
    staging_blocks: int = 0


class Reply(_Frame, frozen=True, tag="reply"):
    ok: bool
    error: str = ""
    data: dict[str, Any] = {}


# Engine -> scheduler side (source of a migration) ------------------------------------------------------


class Begin(_Frame, frozen=True, tag="begin"):
    migration_id: str
    request_id: str
    destination: str  # data-plane address of the destination worker


class Stage(_Frame, frozen=True, tag="stage"):
    """Copy the full blocks written since the last stage; answered once planned (data follows)."""

    migration_id: str


class Stop(_Frame, frozen=True, tag="stop"):
    """Arm the stop: the engine aborts the request next, and the connector freezes it when it finishes."""

    migration_id: str


class Cancel(_Frame, frozen=True, tag="cancel"):
    """Abandon a migration; the request (if still running) goes on at the source."""

    migration_id: str


# Engine -> worker side (destination) -------------------------------------------------------------------


class Reserve(_Frame, frozen=True, tag="reserve"):
    migration_id: str
    num_blocks: int


class Release(_Frame, frozen=True, tag="release"):
    migration_id: str


class ReservationGrown(_Frame, frozen=True, tag="reservation_grown"):
    """Engine -> worker (destination), no reply: the answer to a :class:`GrowReservation` (the engine grew the
    reservation with a :class:`Reserve` first, or ``error`` says why it could not)."""

    migration_id: str
    num_blocks: int
    error: str = ""


class PreloadPlan(_Frame, frozen=True, tag="preload_plan"):
    """Engine -> worker (destination), no reply: whether a received stage is being preloaded. The worker
    acknowledges the stage to the source only once that preload ran, so the source stops the request
    when the destination is not busy with it."""

    migration_id: str
    stage: int
    preload: bool


# Events (connector -> engine) --------------------------------------------------------------------------


class StageSent(_Frame, frozen=True, tag="stage_sent"):
    """Worker (source): the destination acknowledged a stage, or it failed (``error``)."""

    migration_id: str
    stage: int
    num_blocks: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    final: bool = False
    error: str = ""


class Frozen(_Frame, frozen=True, tag="frozen"):
    """Scheduler (source): the stopped request's exact state. KV covers ``num_computed_tokens`` tokens."""

    migration_id: str
    token_ids: list[int]
    num_computed_tokens: int
    num_blocks: int
    final_stage: int
    final_blocks: int


class MigrationEnded(_Frame, frozen=True, tag="migration_ended"):
    """Scheduler (source): the migration cannot go on (the request finished or was preempted)."""

    migration_id: str
    reason: str
    request_finished: bool = False


class StageReceived(_Frame, frozen=True, tag="stage_received"):
    """Worker (destination): every block of a stage is in staging."""

    migration_id: str
    stage: int
    num_blocks: int
    meta: dict[str, Any] = {}


class GrowReservation(_Frame, frozen=True, tag="grow_reservation"):
    """Worker (destination): a stage arriving now needs the reservation to hold ``num_blocks``; its receiver
    waits for the engine's :class:`ReservationGrown` (the engine owns the accounting of free blocks)."""

    migration_id: str
    num_blocks: int


class Loaded(_Frame, frozen=True, tag="loaded"):
    """Worker (destination): the resumed request's KV was scattered from staging into its blocks."""

    migration_id: str
    num_blocks: int
    seconds: float
    missing_blocks: int = 0
    preload: bool = False


Frame: TypeAlias = (
    Hello
    | Reply
    | Begin
    | Stage
    | Stop
    | Cancel
    | Reserve
    | Release
    | PreloadPlan
    | ReservationGrown
    | StageSent
    | Frozen
    | MigrationEnded
    | StageReceived
    | Loaded
    | GrowReservation
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _LENGTH.pack(len(body)) + body


class ControlError(DroverError):
    """The connector refused a command or is unreachable."""

    default_code = "connector_channel"


# ---------------------------------------------------------------------------------------------------------
# Engine side (asyncio)
# ---------------------------------------------------------------------------------------------------------


class _Peer:
    def __init__(self, hello: Hello, writer: asyncio.StreamWriter) -> None:
        self.hello = hello
        self.writer = writer


class ControlServer:
    """Listens for the two connector halves; sends them commands and hands their events to ``on_event``."""

    def __init__(
        self, path: str, on_event: Callable[[Frame], None], on_disconnect: Callable[[str], None] | None = None
    ) -> None:
        self.path = path
        self._on_event = on_event
        self._on_disconnect = on_disconnect
        self._server: asyncio.base_events.Server | None = None
        self._peers: dict[str, _Peer] = {}
        self._joined: dict[str, asyncio.Event] = {"scheduler": asyncio.Event(), "worker": asyncio.Event()}
        self._pending: dict[int, tuple[str, asyncio.Future[Reply]]] = {}
        self._seq = itertools.count(1)
        self._closed = False

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)

    async def wait_joined(self, timeout_s: float) -> None:
        """Wait until both connector halves have said hello."""
        async with asyncio.timeout(timeout_s):
            for event in self._joined.values():
                await event.wait()

    def hello(self, role: str) -> Hello:
        peer = self._peers.get(role)
        if peer is None:
            raise ControlError(f"the connector's {role} side is not connected")
        return peer.hello

    async def call(self, role: str, frame: Frame, timeout_s: float = 30.0) -> Reply:
        """Send a command and wait for its reply; a refusal raises :class:`ControlError`."""
        peer = self._peers.get(role)
        if peer is None:
            raise ControlError(f"the connector's {role} side is not connected")
        seq = next(self._seq)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[seq] = (role, future)
        try:
            peer.writer.write(encode_frame(msgspec.structs.replace(frame, seq=seq)))
            async with asyncio.timeout(timeout_s):
                reply = await future
        except TimeoutError:
            raise ControlError(f"{role} side did not answer {type(frame).__name__} in {timeout_s} s") from None
        finally:
            self._pending.pop(seq, None)
        if not reply.ok:
            raise ControlError(reply.error)
        return reply

    def notify(self, role: str, frame: Frame) -> None:
        """Send a frame that has no reply; dropped if that side is not connected."""
        peer = self._peers.get(role)
        if peer is not None:
            peer.writer.write(encode_frame(frame))

    def expect_disconnect(self) -> None:
        """The engine is shutting vLLM down: its connector halves leaving is no news."""
        self._closed = True

    async def close(self) -> None:
        self._closed = True
        for peer in self._peers.values():
            peer.writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self._fail_pending(None, "engine shut down")

    def _fail_pending(self, role: str | None, why: str) -> None:
        for pending_role, future in self._pending.values():
            if (role is None or pending_role == role) and not future.done():
                future.set_exception(ControlError(why))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        role = ""
        try:
            while True:
                header = await reader.readexactly(_LENGTH.size)
                frame = _decoder.decode(await reader.readexactly(_LENGTH.unpack(header)[0]))
                if isinstance(frame, Hello):
                    role = frame.role
                    self._peers[role] = _Peer(frame, writer)
                    self._joined.setdefault(role, asyncio.Event()).set()
                elif isinstance(frame, Reply):
                    pending = self._pending.get(frame.seq)
                    if pending is not None and not pending[1].done():
                        pending[1].set_result(frame)
                else:
                    self._on_event(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("control channel from the connector's %s side failed", role or "unknown")
        finally:
            if role and self._peers.get(role) is not None and self._peers[role].writer is writer:
                del self._peers[role]
                if not self._closed:
                    log.warning("the migration connector's %s side disconnected", role)
                    self._fail_pending(role, f"the connector's {role} side disconnected")
                    if self._on_disconnect is not None:
                        self._on_disconnect(role)
            writer.close()


# ---------------------------------------------------------------------------------------------------------
# Connector side (threads)
# ---------------------------------------------------------------------------------------------------------


class ControlClient:
    """A connector half's end of the channel: a reader thread feeding ``on_command``; thread-safe sends."""

    def __init__(self, path: str, hello: Hello, on_command: Callable[[Frame], None]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._on_command = on_command
        self._send_lock = threading.Lock()
        self.send(hello)
        self._thread = threading.Thread(target=self._read_loop, name=f"drover-control-{hello.role}", daemon=True)
        self._thread.start()

    def send(self, frame: Frame) -> None:
        data = encode_frame(frame)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:  # the engine went away; vLLM will be shut down by it
                log.warning("control channel send failed: %s", exc)

    def reply(self, command: Frame, ok: bool = True, error: str = "", **data: Any) -> None:
        self.send(Reply(seq=command.seq, ok=ok, error=error, data=data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read_loop(self) -> None:
        try:
            while True:
                header = self._recv_exact(_LENGTH.size)
                frame = _decoder.decode(self._recv_exact(_LENGTH.unpack(header)[0]))
                try:
                    self._on_command(frame)
                except Exception as exc:
                    log.exception("connector failed on %s", type(frame).__name__)
                    if frame.seq:
                        self.reply(frame, ok=False, error=f"{type(exc).__name__}: {exc}")
        except (OSError, EOFError):
            return

    def _recv_exact(self, nbytes: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < nbytes:
            chunk = self._sock.recv(nbytes - len(chunks))
            if not chunk:
                raise EOFError
            chunks += chunk
        return bytes(chunks)
