"""A minimal, fast WebSocket client for the relay protocol, on asyncio (or uvloop).

Only what the benchmark needs (RFC 6455 client side, no extensions): the opening
handshake, masked text frames out, unmasked frames in, ping -> pong, the closing
handshake. Incoming ``bench`` messages are counted and timed on the hot path without
a JSON parse; everything else is decoded as JSON and dispatched.

A general library (``websockets``, Autobahn) costs several times more CPU per received
message, and the generator must not be the bottleneck.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
from array import array
from time import monotonic_ns
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BENCH_PREFIX = b'{"type":"bench","s":'
MAX_HANDSHAKE_BYTES = 65536

try:  # the C helper that the websockets package ships, when it is installed
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _c_apply_mask = None


def _py_apply_mask(payload: bytes, mask: bytes) -> bytes:
    length = len(payload)
    if not length:
        return b""
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")


apply_mask = _c_apply_mask or _py_apply_mask


def encode_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, masked client frame."""
    length = len(payload)
    mask = random.getrandbits(32).to_bytes(4, "big")
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + mask + apply_mask(payload, mask)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def parse_bench(data: bytes, start: int, end: int) -> tuple[bytes, int] | None:
    """(step as digits, send time in ns) of the relayed bench message in
    ``data[start:end]``, read at the positions the generator wrote them
    (``{"type":"bench","s":STEP,"t":NS...``); None when it is not laid out like that
    (then it is decoded as JSON)."""
    if not data.startswith(BENCH_PREFIX, start):
        return None
    digits = start + len(BENCH_PREFIX)
    comma = data.find(b',"t":', digits, end)
    if comma < 0:
        return None
    last = data.find(b",", comma + 5, end)
    if last < 0:
        last = end - 1  # the closing brace
    try:
        return data[digits:comma], int(data[comma + 5:last])
    except ValueError:
        return None


class Tally:
    """What every connection of a worker adds to: bench deliveries of the current step
    and their latencies, late ones, errors. Shared, so the hot path touches one object."""

    __slots__ = ("closed_unexpectedly", "errors", "latencies", "other", "received",
                 "stale", "step", "step_digits")

    def __init__(self) -> None:
        self.step = -1
        self.step_digits = b"-1"
        self.received = 0
        self.stale = 0
        self.errors = 0
        self.other = 0
        self.closed_unexpectedly = 0
        self.latencies = array("q")

    def reset(self, step: int) -> None:
        self.step = step
        self.step_digits = str(step).encode()
        self.received = 0
        self.stale = 0
        self.errors = 0
        self.other = 0
        self.closed_unexpectedly = 0
        self.latencies = array("q")


class BenchClient(asyncio.Protocol):
    """One relay connection. `opened` resolves on the relay's ``connected`` message,
    `closed` when the TCP connection is gone."""

    def __init__(self, tally: Tally, host_header: str, path: str, room: str = "",
                 room_size: int = 0, sender: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.tally = tally
        self.host_header = host_header
        self.path = path
        self.room = room
        self.room_size = room_size
        self.sender = sender
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[BenchClient] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.connection_id: str | None = None
        self.user_count = 0
        self.sent = 0  # bench messages sent in the current step
        self.received = 0  # bench messages of the current step received
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_error: dict[str, Any] | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._upgraded = False
        self._closing = False
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._count_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.write(request.encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self.tally.closed_unexpectedly += 1
        problem = ConnectionError(
            f"connection closed before joining ({self.close_code} {self.close_reason})"
            if exc is None else f"connection lost: {exc}"
        )
        if not self.opened.done():
            self.opened.set_exception(problem)
        for _, waiter in self._count_waiters:
            if not waiter.done():
                waiter.set_exception(problem)
        self._count_waiters = []
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if not self._upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HANDSHAKE_BYTES:
                    self._fail("handshake response too long")
                else:
                    self._buffer = data
                return
            if not self._check_handshake(data[:end]):
                return
            self._upgraded = True
            data = data[end + 4:]
        now = monotonic_ns()
        tally = self.tally
        size = len(data)
        pos = 0
        while size - pos >= 2:
            first = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                self._fail("the server sent a masked frame")
                return
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                start = pos + 4
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            pos = end
            if first == 0x81:  # a final text frame
                parsed = parse_bench(data, start, end)
                if parsed is None:
                    self._on_message(data[start:end])
                elif parsed[0] == tally.step_digits:  # the hot path
                    tally.received += 1
                    tally.latencies.append(now - parsed[1])
                    self.received += 1
                    if self._count_waiters:
                        self._check_count_waiters()
                else:
                    tally.stale += 1
            else:
                self._on_frame(first, data[start:end])
                if self.transport is None or self.transport.is_closing():
                    return
        if pos < size:
            self._buffer = data[pos:]

    # -- frames ---------------------------------------------------------------------

    def _on_frame(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        final = first & 0x80
        if opcode in (0x1, 0x2):
            if final:
                self._on_message(payload)
            else:
                self._fragments = [payload]
        elif opcode == 0x0:
            if self._fragments is None:
                self._fail("unexpected continuation frame")
                return
            self._fragments.append(payload)
            if final:
                whole = b"".join(self._fragments)
                self._fragments = None
                self._on_message(whole)
        elif opcode == 0x9:
            self._write(encode_frame(payload, 0xA))
        elif opcode == 0x8:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode("utf-8", "replace")
            if not self._closing:  # the server closes first: not what a benchmark wants
                self._closing = True
                self.tally.closed_unexpectedly += 1
                self._write(encode_frame(payload[:2], 0x8))
            if self.transport is not None:
                self.transport.close()

    def _on_message(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
            kind = message.get("type")
        except (ValueError, AttributeError):
            self.tally.other += 1
            return
        if kind == "bench":
            step, sent = message.get("s"), message.get("t")
            tally = self.tally
            if step == tally.step and isinstance(sent, int):
                tally.received += 1
                tally.latencies.append(monotonic_ns() - sent)
                self.received += 1
                self._check_count_waiters()
            else:
                tally.stale += 1
        elif kind == "connected":
            self.connection_id = message.get("connectionId")
            self._set_count(message.get("userCount"))
            if not self.opened.done():
                self.opened.set_result(self)
        elif kind in ("user-joined", "user-left"):
            self._set_count(message.get("userCount"))
        elif kind == "error":
            self.tally.errors += 1
            self.last_error = message
        else:
            self.tally.other += 1

    def _set_count(self, count: Any) -> None:
        if isinstance(count, int):
            self.user_count = count

    def _check_handshake(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            self._fail(f"handshake refused: {lines[0].decode('latin-1')}")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != accept_key(self._key):
            self._fail("bad Sec-WebSocket-Accept")
            return False
        return True

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(reason))
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    # -- what the worker calls ------------------------------------------------------

    def send(self, payload: bytes) -> None:
        self._write(encode_frame(payload))

    def wait_received(self, count: int) -> asyncio.Future[None]:
        """Resolves once `count` bench messages of the current step have arrived."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.received >= count:
            waiter.set_result(None)
        else:
            self._count_waiters.append((count, waiter))
        return waiter

    def _check_count_waiters(self) -> None:
        still = []
        for count, waiter in self._count_waiters:
            if self.received >= count:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((count, waiter))
        self._count_waiters = still

    def close(self) -> None:
        """Start the closing handshake (1000); the server closes the TCP connection."""
        if self._closing:
            return
        self._closing = True
        self._write(encode_frame(b"\x03\xe8", 0x8))

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
