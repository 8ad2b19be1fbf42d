"""A TCP proxy for tests that cuts connections: it forwards loopback connections to a
relay, and on request drops every live connection (with a reset, as a network change
does) and refuses new ones for a while.

It runs in a thread of its own (the browser tests are synchronous), with one selector
and no sleeping: a socketpair wakes it when the test asks for something. Everything is
bounded: a refusal lasts at most `MAX_REFUSAL` seconds, and `stop()` ends it all.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

MAX_REFUSAL = 30.0
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer sees the connection drop."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class CuttingProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1",
                 now: Callable[[], float] = time.monotonic) -> None:
        """`now`: the refusal's clock (tests of the proxy itself drive a fake one)."""
        self._now = now
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._refuse_until = 0.0
        self._cut_requested = False
        self._stopping = False
        #: Counters the tests read: connections forwarded, refused, cut.
        self.accepted = 0
        self.refused = 0
        self.cut_count = 0
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)
        self._thread.start()

    # -- what tests call (any thread) ---------------------------------------------------

    def cut(self, refuse_for: float = 0.0) -> None:
        """Drop every live connection now and refuse new ones for `refuse_for` seconds."""
        with self._lock:
            self._refuse_until = self._now() + min(refuse_for, MAX_REFUSAL)
            self._cut_requested = True
        self._wake()

    def refusing(self) -> bool:
        with self._lock:
            return self._now() < self._refuse_until

    def live_connections(self) -> int:
        with self._lock:
            return len(self._pairs) // 2

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(10)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass

    # -- the proxy thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    cut, self._cut_requested = self._cut_requested, False
                if cut:
                    self._cut_all()
                for key, _ in self._selector.select(timeout=1.0):
                    if key.data == "wake":
                        try:
                            self._wake_reader.recv(4096)
                        except BlockingIOError:
                            pass
                    elif key.data == "accept":
                        self._accept()
                    else:
                        self._forward(key.fileobj)
        finally:
            self._cut_all(count=False)
            for sock in (self._listener, self._wake_reader, self._wake_writer):
                sock.close()
            self._selector.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.refusing():
            self.refused += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
        self._selector.register(client, selectors.EVENT_READ, "data")
        self._selector.register(upstream, selectors.EVENT_READ, "data")
        self.accepted += 1

    def _forward(self, source: socket.socket) -> None:
        with self._lock:
            target = self._pairs.get(source)
        if target is None:
            return
        try:
            data = source.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                target.settimeout(5)  # loopback: the other side reads promptly
                target.sendall(data)
                target.setblocking(False)
                return
            except OSError:
                pass
        self._close_pair(source, target, reset=False)

    def _close_pair(self, one: socket.socket, other: socket.socket, reset: bool) -> None:
        with self._lock:
            self._pairs.pop(one, None)
            self._pairs.pop(other, None)
        for sock in (one, other):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            _reset(sock) if reset else sock.close()

    def _cut_all(self, count: bool = True) -> None:
        with self._lock:
            pairs = {min(a, b, key=id): max(a, b, key=id) for a, b in self._pairs.items()}
        for one, other in pairs.items():
            self._close_pair(one, other, reset=True)
            if count:
                self.cut_count += 1
