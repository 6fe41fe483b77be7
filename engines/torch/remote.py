"""A pipeline stage in another process: ``StageServer`` serves a :class:`ModelStage` over TCP and
``RemoteStage`` is its proxy, usable wherever a local stage is (``PipelineGroup([local, RemoteStage(addr)])``).

Activations cross as :class:`~engines.torch.batch.StageBatch` / ``StageResult`` bytes, one request/reply per
step and stage. This is not the KV data plane (:mod:`transport.kv_data`): that one streams fixed-size KV
blocks into reserved staging slots, while a pipeline hop is a small synchronous call whose reply the next
stage waits for. KV of layers that change owner moves through ``export_kv`` / ``import_kv`` calls here
(or through the data plane between migratable engines).

Wire: each frame is a 4-byte big-endian length and a msgpack ``_Call`` / ``_Reply``; tensors ride in
``payload`` as :func:`~engines.torch.batch.encode_tensors` bytes. One connection carries one caller's calls
in order; the server runs each connection in a thread and serialises calls on its stage.

    python -m engines.torch.remote MODEL_DIR --first 2 --last 4 [--block-size 32 --num-blocks 512]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import socket
import struct
import sys
import threading
from typing import Any

import msgspec
import torch

from control.errors import DroverError
from engines.torch.batch import StageBatch, StageResult, decode_tensors, encode_tensors
from engines.torch.stage import MemoryReport, ModelStage
from transport.kv_data import parse_tcp_address

_LENGTH = struct.Struct("!I")


class RemoteStageError(DroverError):
    """The remote stage failed a call or the connection broke."""

    default_code = "remote_stage_failed"


class _Call(msgspec.Struct, frozen=True):
    op: str
    args: dict[str, Any] = {}
    payload: bytes = b""


class _Reply(msgspec.Struct, frozen=True):
    ok: bool
    error: str = ""
    result: dict[str, Any] = {}
    payload: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(_Call)
_reply_decoder = msgspec.msgpack.Decoder(_Reply)


def _send(sock: socket.socket, body: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, _LENGTH.size)
    return None if header is None else _recv_exact(sock, _LENGTH.unpack(header)[0])


def _recv_or_none(sock: socket.socket) -> bytes | None:
    """A frame, or None when the peer (or :meth:`StageServer.close`) ended the connection."""
    try:
        return _recv(sock)
    except OSError:
        return None


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            return None
        view = view[n:]
    return bytes(buffer)


def _kv_to_named(kv: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(layer): tensor for layer, tensor in kv.items()}


def _kv_from_named(named: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {int(layer): tensor for layer, tensor in named.items()}


ParkedKv = dict[str, tuple[int, dict[int, torch.Tensor]]]
"""Requests a member handed to its group's leader when it joined: request id -> (tokens the KV covers, KV of
every layer). The leader takes each (``take_parked``): the member writes its own layers' share into its pools
and sends the rest."""


class StageServer:
    """Serves one stage to remote callers (threads; the stage computes in the calling connection's thread)."""

    def __init__(
        self, stage: ModelStage, host: str = "127.0.0.1", port: int = 0, parked: ParkedKv | None = None
    ) -> None:
        """``parked``: KV of requests this member handed to the leader, until the leader takes it (calls
        serialise on the server's lock; the owner fills it before serving and empties it after closing)."""
        self.stage = stage
        self.parked: ParkedKv = parked if parked is not None else {}
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port))
        self._host = host
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="stage-server", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"tcp://{self._host}:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        """Stop listening and cut every connection (as the process exiting would)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), name="stage-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        self._connections.add(sock)
        with sock:
            while (frame := _recv_or_none(sock)) is not None:
                try:
                    call = _call_decoder.decode(frame)
                    with self._lock:
                        reply = self._handle(call)
                except Exception as exc:  # a failed call is answered, never kills the server
                    reply = _Reply(ok=False, error=f"{type(exc).__name__}: {exc}")
                try:
                    _send(sock, _encoder.encode(reply))
                except OSError:
                    break
        self._connections.discard(sock)

    def _handle(self, call: _Call) -> _Reply:
        stage, args = self.stage, call.args
        if call.op == "info":
            return _Reply(ok=True, result={"layer_range": list(stage.layer_range), "num_blocks": stage.num_blocks})
        if call.op == "forward":
            return _Reply(ok=True, payload=stage.forward(StageBatch.from_bytes(call.payload)).to_bytes())
        if call.op == "export_kv":
            kv = stage.export_kv(list(args["layers"]), list(args["block_ids"]))
            return _Reply(ok=True, payload=encode_tensors("kv", _kv_to_named(kv)))
        if call.op == "import_kv":
            stage.import_kv(_kv_from_named(decode_tensors(call.payload, "kv")), list(args["block_ids"]))
            return _Reply(ok=True)
        if call.op == "parked":
            return _Reply(ok=True, result={"requests": [[rid, n] for rid, (n, _) in sorted(self.parked.items())]})
        if call.op == "take_parked":
            entry = self.parked.pop(str(args["request_id"]), None)
            block_ids = args.get("block_ids")
            if entry is None or block_ids is None:  # unknown, or the leader has no room: the KV is dropped
                return _Reply(ok=True)
            held = set(stage.held_layers())
            kv = entry[1]
            stage.import_kv({layer: t for layer, t in kv.items() if layer in held}, list(block_ids))
            rest = {layer: t for layer, t in kv.items() if layer not in held}
            return _Reply(ok=True, payload=encode_tensors("kv", _kv_to_named(rest)))
        if call.op == "move_blocks":
            stage.move_blocks({int(old): int(new) for old, new in args["moves"]})
            return _Reply(ok=True)
        if call.op == "drop_layers":
            report = stage.drop_layers((int(args["first"]), int(args["last"])))
            return _Reply(ok=True, result=dataclasses.asdict(report))
        if call.op == "restore_layers":
            report = stage.restore_layers(num_blocks=args.get("num_blocks"))
            return _Reply(ok=True, result=dataclasses.asdict(report))
        raise ValueError(f"unknown op {call.op!r}")


class RemoteStage:
    """A proxy for a stage served by :class:`StageServer` (a :class:`~engines.torch.pipeline.Stage`)."""

    def __init__(self, address: str, timeout_s: float = 60.0) -> None:
        host, port = parse_tcp_address(address)
        self.address = address
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._refresh()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _call(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"") -> _Reply:
        with self._lock:
            try:
                _send(self._sock, _encoder.encode(_Call(op, args or {}, payload)))
                frame = _recv(self._sock)
            except OSError as exc:
                raise RemoteStageError(f"stage at {self.address}: {exc}") from exc
        if frame is None:
            raise RemoteStageError(f"stage at {self.address} closed the connection")
        reply = _reply_decoder.decode(frame)
        if not reply.ok:
            raise RemoteStageError(f"stage at {self.address}: {op} failed: {reply.error}")
        return reply

    def _refresh(self) -> None:
        result = self._call("info").result
        first, last = result["layer_range"]
        self._layer_range = (int(first), int(last))
        self._num_blocks = int(result["num_blocks"])

    @property
    def layer_range(self) -> tuple[int, int]:
        return self._layer_range

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def held_layers(self) -> list[int]:
        return list(range(*self._layer_range))

    def forward(self, batch: StageBatch) -> StageResult:
        return StageResult.from_bytes(self._call("forward", payload=batch.to_bytes()).payload)

    def export_kv(self, layers: list[int], block_ids: list[int]) -> dict[int, torch.Tensor]:
        reply = self._call("export_kv", {"layers": layers, "block_ids": block_ids})
        return _kv_from_named(decode_tensors(reply.payload, "kv"))

    def import_kv(self, kv: dict[int, torch.Tensor], block_ids: list[int]) -> None:
        self._call("import_kv", {"block_ids": block_ids}, encode_tensors("kv", _kv_to_named(kv)))

    def parked(self) -> list[tuple[str, int]]:
        """The requests (and the tokens their KV covers) this member handed to the leader when it joined."""
        return [(str(rid), int(n)) for rid, n in self._call("parked").result["requests"]]

    def take_parked(self, request_id: str, block_ids: list[int] | None) -> dict[int, torch.Tensor]:
        """Take a handed request's KV into ``block_ids`` of the group: the member writes its own layers there
        and returns every other layer's (for the caller to import); None drops it (no room: recomputed)."""
        reply = self._call("take_parked", {"request_id": request_id, "block_ids": block_ids})
        return _kv_from_named(decode_tensors(reply.payload, "kv")) if reply.payload else {}

    def move_blocks(self, moves: dict[int, int]) -> None:
        self._call("move_blocks", {"moves": [[old, new] for old, new in moves.items()]})

    def drop_layers(self, keep: tuple[int, int]) -> MemoryReport:
        result = self._call("drop_layers", {"first": keep[0], "last": keep[1]}).result
        self._refresh()
        return _report(result)

    def restore_layers(self, num_blocks: int | None = None) -> MemoryReport:
        result = self._call("restore_layers", {"num_blocks": num_blocks}).result
        self._refresh()
        return _report(result)


def _report(result: dict[str, Any]) -> MemoryReport:
    result = dict(result)
    for key in ("layers_before", "layers_after"):
        result[key] = tuple(result[key])
    return MemoryReport(**result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a layer range of a Llama model as a pipeline stage.")
    parser.add_argument("model_dir")
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--last", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--memory-budget-bytes", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stage = ModelStage(
        args.model_dir,
        layer_range=(args.first, args.last),
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        memory_budget_bytes=args.memory_budget_bytes,
        dtype=args.dtype,
    )
    server = StageServer(stage, args.host)
    print(f"listening {server.address}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    server.close()


if __name__ == "__main__":
    main()
