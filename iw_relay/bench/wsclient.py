"""The benchmark's WebSocket client: a picows listener per relay connection.

picows (Cython, asyncio or uvloop) does the handshake, framing, masking, pong and the
closing handshake; this module only counts and times what the relay delivers. Incoming
``bench`` messages and presence notices are read on the hot path without a JSON parse;
everything else is decoded as JSON and dispatched.

It replaced a hand-written client (handshake, framing, masking in Python): measured at
the same load against the same relay, the generator's CPU per message is the same within
the noise (figures in docs/performance.rst), and the protocol is a maintained library's.
"""

from __future__ import annotations

import asyncio
import json
import re
from array import array
from collections.abc import Callable
from time import monotonic_ns
from typing import Any

from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

BENCH_PREFIX = b'{"type":"bench","s":'
TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE
# A presence notice as both relays write it (compact JSON: type, connectionId, userCount):
# its user count is read without a JSON parse. Rooms of 100 make ~50 of them per
# connection opened, so the pattern is anchored field by field (half the cost of a scan).
PRESENCE = re.compile(
    rb'\{"type":"user-(?:joined|left)","connectionId":"[^"\\]*","userCount":(\d+)[,}]')
# Group 1 is the count; no match: decoded as JSON. The count is read only when asked for.
match_presence = PRESENCE.match
# What a failed connection may raise: its reason is then counted, and the run goes on.
CONNECT_ERRORS = (OSError, TimeoutError, WSError)


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


class JoinRefusedError(ConnectionError):
    """A connection that never reached the relay's ``connected``; the message says why
    in a form that groups well: ``HTTP 503 Too many connections``, ``close 1008 ...``,
    ``connection refused``, ``timeout``."""


def describe_failure(problem: BaseException) -> str:
    """One short, stable reason for a failed connection (equal reasons are counted
    together in the report)."""
    if isinstance(problem, JoinRefusedError):
        return str(problem)
    if isinstance(problem, WSHandshakeError):
        header = problem.raw_header or b""
        status_line = header.split(b"\r\n", 1)[0].decode("latin-1").strip()
        parts = status_line.split(" ", 1)
        if len(parts) == 2 and parts[0].startswith("HTTP/"):
            return f"HTTP {parts[1]}"
        return f"handshake failed: {problem}"
    if isinstance(problem, ConnectionRefusedError):
        return "connection refused"
    if isinstance(problem, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(problem, ConnectionResetError):
        return "connection reset"
    if isinstance(problem, OSError) and problem.strerror:
        return problem.strerror.lower()
    return f"{type(problem).__name__}: {problem}"


class BenchClient(WSListener):
    """One relay connection. `opened` resolves on the relay's ``connected`` message,
    `closed` when the connection is gone."""

    def __init__(self, tally: Tally, room: str = "", room_size: int = 0,
                 sender: bool = False) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.tally = tally
        self.room = room
        self.room_size = room_size
        self.sender = sender
        self.transport: WSTransport | None = None
        self.opened: asyncio.Future[BenchClient] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.connection_id: str | None = None
        self._user_count = 0
        # The latest presence notice, read when the count is asked for: most are never.
        self._presence: re.Match[bytes] | None = None
        self.sent = 0  # bench messages sent in the current step
        self.received = 0  # bench messages of the current step received
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_error: dict[str, Any] | None = None
        self._closing = False
        self._fragments: list[bytes] | None = None
        self._count_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- picows callbacks -----------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self._closing:
            self.tally.closed_unexpectedly += 1
        if self.close_code is not None:
            problem: ConnectionError = JoinRefusedError(
                f"close {self.close_code} {self.close_reason}".rstrip())
        else:
            problem = JoinRefusedError("connection lost before joining")
        if not self.opened.done():
            self.opened.set_exception(problem)
        for _, waiter in self._count_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection lost: {problem}"))
        self._count_waiters = []
        if not self.closed.done():
            self.closed.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is TEXT and frame.fin:
            data = frame.get_payload_as_bytes()
            if not data.startswith(BENCH_PREFIX):
                presence = match_presence(data)
                if presence is None:
                    self._on_message(data)
                else:
                    self._presence = presence
                return
            parsed = parse_bench(data, 0, len(data))
            if parsed is None:
                self._on_message(data)
                return
            tally = self.tally
            if parsed[0] == tally.step_digits:  # the hot path
                tally.received += 1
                tally.latencies.append(monotonic_ns() - parsed[1])
                self.received += 1
                if self._count_waiters:
                    self._check_count_waiters()
            else:
                tally.stale += 1
        elif kind is CLOSE:
            self.close_code = frame.get_close_code().value
            self.close_reason = (frame.get_close_message() or b"").decode("utf-8", "replace")
            if not self._closing:  # the server closes first: not what a benchmark wants
                self._closing = True
                self.tally.closed_unexpectedly += 1
                transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif kind is TEXT or kind is BINARY:
            if frame.fin:
                self._on_message(frame.get_payload_as_bytes())
            else:
                self._fragments = [frame.get_payload_as_bytes()]
        elif kind is CONTINUATION:
            if self._fragments is None:
                transport.send_close(WSCloseCode.PROTOCOL_ERROR)
                transport.disconnect()
                return
            self._fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                whole = b"".join(self._fragments)
                self._fragments = None
                self._on_message(whole)
        # PING is answered by picows (enable_auto_pong); PONG is not expected.

    # -- messages -------------------------------------------------------------------

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
            self._user_count = count
            self._presence = None

    @property
    def user_count(self) -> int:
        """The room's size as the relay last told it (``connected`` or a notice)."""
        if self._presence is not None:
            self._user_count = int(self._presence[1])
            self._presence = None
        return self._user_count

    # -- what the worker calls ------------------------------------------------------

    def send(self, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._closing:
            transport.send(TEXT, payload)

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
        if self.transport is not None:
            self.transport.send_close(WSCloseCode.OK)

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def open_client(url: str, host_header: str, factory: Callable[[], BenchClient],
                      ) -> BenchClient:
    """Connect, upgrade, and wait for the relay's ``connected``; raises what failed
    (describe_failure turns it into a reason)."""
    # The event loop's own create_connection (uvloop's, in C), not picows' default
    # aiofastnet one (Python): a quarter less of the generator's CPU per handshake.
    _, client = await ws_connect(
        factory, url, websocket_handshake_timeout=None, extra_headers={"Host": host_header},
        max_frame_size=16 * 2**20, enable_auto_pong=True, use_aiofastnet=False,
    )
    assert isinstance(client, BenchClient)
    try:
        await client.opened
    except BaseException:
        client.abort()
        raise
    return client
