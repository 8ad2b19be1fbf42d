"""A raw, blocking WebSocket client for tests that need frames no library sends: exact
request targets, pings, continuation frames, floods from a client that never reads.

Use it against a relay in another process (a `twistd` subprocess): it blocks. Run as a
script (``python3 -m tests.rawws flood ...``) it is a bounded flooder that stops by itself
and prints one JSON line with what happened.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import sys
import time

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame (zero mask: the payload stays as it is)."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        header = bytes([first, 0x80 | len(payload)])
    else:
        header = bytes([first, 0x80 | 126]) + struct.pack("!H", len(payload))
    return header + b"\x00\x00\x00\x00" + payload


def handshake(port: int, target: str, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Open a WebSocket on `target` (sent byte for byte); (socket, bytes after the head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request_head(port, target))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {head!r}")
        head += chunk
    status, _, rest = head.partition(b"\r\n\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"refused: {status.splitlines()[0]!r}")
    return sock, rest


def next_frame(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, payload, rest) of the server frame (unmasked) at the start of `data`."""
    if len(data) < 2:
        return None
    length, start = data[1] & 0x7F, 2
    if length == 126:
        if len(data) < 4:
            return None
        length, start = struct.unpack("!H", data[2:4])[0], 4
    elif length == 127:
        if len(data) < 10:
            return None
        length, start = struct.unpack("!Q", data[2:10])[0], 10
    if len(data) < start + length:
        return None
    return data[0] & 0x0F, data[start:start + length], data[start + length:]


def request_head(port: int, target: str) -> bytes:
    """An upgrade request for `target`, byte for byte."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


class Reader:
    """Server frames (unmasked) from a socket, with what was already read."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buffer = buffered

    def _parse(self) -> tuple[int, bytes] | None:
        parsed = next_frame(self.buffer)
        if parsed is None:
            return None
        opcode, payload, self.buffer = parsed
        return opcode, payload

    def next(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame; ConnectionError when the connection ends first."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk

    def drain(self) -> list[tuple[int, bytes]]:
        """Every whole frame readable now, without waiting."""
        frames = []
        while True:
            try:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError:
                chunk = b""
            if chunk:
                self.buffer += chunk
            while (parsed := self._parse()) is not None:
                frames.append(parsed)
            if not chunk:
                return frames

    def messages(self, timeout: float = 5.0) -> list[dict]:
        """JSON messages up to the close frame (or the end); the close is `close_code`."""
        found = []
        self.close_code = None
        try:
            while True:
                opcode, payload = self.next(timeout)
                if opcode == CLOSE:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if payload else None
                    self.close_reason = payload[2:].decode()
                    return found
                if opcode == TEXT:
                    found.append(json.loads(payload))
        except (ConnectionError, TimeoutError, OSError):
            return found


def close_of(frames: list[tuple[int, bytes]]) -> tuple[int | None, str] | None:
    for opcode, payload in frames:
        if opcode == CLOSE:
            return (struct.unpack("!H", payload[:2])[0] if payload else None,
                    payload[2:].decode(errors="replace"))
    return None


def flood(port: int, room: str, mode: str, duration: float, read: bool,
          burst: float, pause: float) -> dict:
    """Send `mode` frames as fast as the socket takes them, for at most `duration` s."""
    sock, rest = handshake(port, f"/room/{room}")
    reader = Reader(sock, rest)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    batch = {
        "ping": frame(PING) * 1000,
        "continuation": frame(CONTINUATION, fin=False) * 1000,
        "messages": frame(TEXT, b'{"type":"op"}') * 200,
    }[mode]
    if mode == "continuation":
        sock.sendall(frame(TEXT, b'{"type":', fin=False))
    print("ready", flush=True)
    started = time.monotonic()
    deadline = started + duration
    sent, close, ended = 0, None, None
    burst_started = started
    while time.monotonic() < deadline and close is None:
        now = time.monotonic()
        if pause and now - burst_started >= burst:
            if read:
                close = close_of(reader.drain())
            time.sleep(pause)  # the attack pattern itself, not a synchronisation
            burst_started = time.monotonic()
            continue
        sock.settimeout(0.1)
        try:
            sock.sendall(batch)
            sent += 1
        except TimeoutError:
            pass  # the relay stopped reading: TCP holds the rest
        except OSError:
            ended = time.monotonic() - started
            break
        if read:
            close = close_of(reader.drain())
    if close is None:
        close = close_of(reader.drain())
    if close is not None and ended is None:
        ended = time.monotonic() - started
    sock.close()
    return {"batches": sent, "close": close, "ended_after": ended,
            "elapsed": time.monotonic() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["flood"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--room", default="flood")
    parser.add_argument("--mode", choices=["ping", "continuation", "messages"],
                        default="ping")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--no-read", action="store_true")
    parser.add_argument("--burst", type=float, default=0.0, help="seconds of each burst")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between bursts")
    args = parser.parse_args(argv)
    result = flood(args.port, args.room, args.mode, min(args.duration, 15.0),
                   not args.no_read, args.burst, args.pause)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
