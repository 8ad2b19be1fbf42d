"""The listening protocol: each connection's request head, read once, with hard bounds.

From accept, a connection counts against ``--max-connections`` and
``--max-connections-per-ip`` until it closes, handshake phase included. Its request head
is bounded (request line, header count, total size) and must be complete, and an upgrade
answered, within ``--handshake-timeout`` of accept: an absolute deadline, not an idle
timer. The head is parsed once and strictly (a byte that another parser could take for a
line break is refused), request bodies are refused, and then:

- a WebSocket upgrade is handed to Autobahn as the exact bytes the client sent, and the
  transport delivers to Autobahn's protocol directly from then on;
- any other request goes to the relay's twisted.web Site, one request per connection.

Nothing here logs a request line, a header or a path: they carry room ids and tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.server import Site

from iw_relay.admission import (
    ConnectionCounter,
    client_address,
    is_trusted_proxy,
    proxy_networks,
)
from iw_relay.config import RelayConfig

if TYPE_CHECKING:
    from iw_relay.protocol import RelayServerProtocol

MAX_REQUEST_LINE = 8192
MAX_HEAD = 16384
MAX_HEADERS = 100
#: How long a refused connection is kept reading (and discarding) after its answer, so
#: that closing it does not reset the connection before the client has read the answer.
REFUSAL_LINGER = 1.0

# Control bytes, DEL, NEL (0x85) and a CR not followed by LF: Python's str.splitlines
# (which Autobahn applies to the head, decoded as latin-1) breaks lines at \x0b \x0c
# \x1c-\x1e \x85 and a bare CR, so such a byte could start a header nobody else saw.
_FORBIDDEN = frozenset([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85])
# bytes.translate(None, _ALLOWED) deletes every allowed byte: what remains is forbidden.
_ALLOWED = bytes(byte for byte in range(256) if byte not in _FORBIDDEN)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# One header line: a token, a colon, the value less surrounding blanks (no blank before
# the colon, no folded continuation line).
_HEADER_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\n]*)\n", re.M)
_TARGET = re.compile(rb"/[\x21-\x7e]*")
# host[:port]; also an IPv6 literal without brackets, as Autobahn's own client sends it.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~!$&'()*+,;=%]*)(?::[0-9]*)?|[0-9A-Fa-f:.]+")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# Headers that mean one thing only once: a second copy is a smuggling attempt.
_SINGLETONS = frozenset((
    b"host", b"content-length", b"transfer-encoding", b"upgrade", b"origin", b"x-real-ip",
    b"sec-websocket-key", b"sec-websocket-version", b"authorization",
))
_PHRASES = {
    400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    406: b"Not Acceptable", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 426: b"Upgrade Required", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
}
#: What a refused connection reads on the wire, per limit (the keys are the refusal
#: reasons counted in /metrics).
LIMIT_REASONS = {
    "max-connections": b"Server connection limit reached",
    "max-connections-per-ip": b"Too many connections from this address",
}

# The reaches into Twisted internals, checked here at import: once the upgrade is handed
# over, the transport delivers straight to Autobahn's protocol (a plain TCP connection
# calls `.protocol`; a wrapper, TLS or the PROXY protocol, calls `.wrappedProtocol`); and
# a PROXY-protocol port is recognised by its wrapper's class (its module is private).
assert issubclass(TLSMemoryBIOProtocol, ProtocolWrapper)
assert issubclass(HAProxyProtocolWrapper, ProtocolWrapper)
assert "protocol" in tcp.Connection.__init__.__code__.co_varnames


class HeadError(Exception):
    """A request refused before it reaches a Site or Autobahn: status and headers."""

    def __init__(self, status: int, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: dict[bytes, list[bytes]]  # lower-case names, values in order

    def get(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return b", ".join(values) if values else None

    @property
    def is_upgrade(self) -> bool:
        """Any WebSocket upgrade, on any path, is the relay's (as in the original)."""
        return b"websocket" in (self.get(b"upgrade") or b"").lower()


def head_end(buffer: bytes, start: int = 0) -> int:
    """The index just past the empty line that ends the head, or -1 (lines end in LF or
    CRLF). `start` skips what an earlier call already searched."""
    start = max(0, start - 2)
    bare, crlf = buffer.find(b"\n\n", start), buffer.find(b"\n\r\n", start)
    if bare < 0:
        return crlf + 3 if crlf >= 0 else -1
    return bare + 2 if crlf < 0 or bare < crlf else crlf + 3


def parse_head(head: bytes) -> RequestHead:
    """Parse a complete head (up to and including its empty line), strictly."""
    if head.translate(None, _ALLOWED) or head.count(b"\r") != head.count(b"\r\n"):
        raise HeadError(400)  # a forbidden byte, or a CR that does not end a line
    request_line, _, block = head.replace(b"\r\n", b"\n").partition(b"\n")
    block = block[:-1]  # every header line, each ending in LF; the empty line dropped
    if len(request_line) > MAX_REQUEST_LINE:
        raise HeadError(414)
    lines = block.count(b"\n")
    if lines > MAX_HEADERS:
        raise HeadError(431)
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HeadError(400)
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or version not in _VERSIONS or not _TARGET.fullmatch(
            target):
        raise HeadError(400)
    fields = _HEADER_LINE.findall(block)
    if len(fields) != lines:  # a line that is no "name: value" (a folded one, too)
        raise HeadError(400)
    headers: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        name, value = name.lower(), value.rstrip(b" \t")
        if name in headers:
            if name in _SINGLETONS:
                raise HeadError(400)
            headers[name].append(value)
        else:
            headers[name] = [value]
    host = headers.get(b"host")
    if (host is None and version == b"HTTP/1.1") or (host and not _HOST.fullmatch(host[0])):
        raise HeadError(400)
    length = headers.get(b"content-length")
    if length is not None:
        if not length[0].isdigit():
            raise HeadError(400)
        if length[0].strip(b"0"):
            raise HeadError(413)
    if b"transfer-encoding" in headers:
        raise HeadError(413)
    return RequestHead(method, target, version, headers)


def error_response(status: int, body: bytes = b"",
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection."""
    phrase = _PHRASES.get(status, b"Error")
    body = body or phrase
    lines = [b"HTTP/1.1 %d %s" % (status, phrase if status != 503 else body),
             b"Server: iw-relay", b"Connection: close", b"Content-Type: text/plain",
             b"X-Content-Type-Options: nosniff", b"Content-Length: %d" % len(body),
             *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Admission:
    """One connection's place in the ConnectionCounter, from accept until it closes."""

    __slots__ = ("_counter", "_released", "_websocket", "key")

    def __init__(self, counter: ConnectionCounter, key: str | None) -> None:
        self._counter = counter
        self.key = key
        self._released = False
        self._websocket = False
        counter.add(key)

    def upgraded(self) -> None:
        """The connection was handed to the WebSocket protocol (/stats openWebSockets)."""
        if not self._released and not self._websocket:
            self._websocket = True
            self._counter.websockets += 1

    def move(self, key: str) -> None:
        if not self._released:
            self._counter.move(self.key, key)
        self.key = key

    def release(self) -> None:
        """Idempotent: whichever protocol sees the connection close calls it."""
        if not self._released:
            self._released = True
            self._counter.remove(self.key)
            if self._websocket:
                self._counter.websockets -= 1


def _attach(transport: Any, old: Protocol, new: Protocol) -> bool:
    """Make `transport` deliver to `new` instead of `old`; False when it cannot tell how
    (then `old` forwards)."""
    if isinstance(transport, ProtocolWrapper) and transport.wrappedProtocol is old:
        transport.wrappedProtocol = new
        return True
    if isinstance(transport, tcp.Connection) and transport.protocol is old:
        transport.protocol = new
        return True
    return False


class FrontDoor(Protocol):
    """One accepted connection until its request head has been dealt with."""

    factory: FrontDoorFactory
    transport: ITCPTransport  # an accepted connection's (set by makeConnection)
    _log = Logger()

    def __init__(self, factory: FrontDoorFactory, address: IAddress | None) -> None:
        self.factory = factory
        self._address = address
        self._buffer = b""
        self._deadline: IDelayedCall | None = None
        self._admission: Admission | None = None
        self._delegate: Protocol | None = None  # forwarded to, when the swap was impossible
        self._http_channel: Protocol | None = None
        self._proxy_protocol = False
        self._done = False  # the head was dealt with: later bytes are not ours to read

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self._peer = _host(self.transport)
        # A trusted proxy's connections count in the total only until the head names the
        # client, and so do those of a PROXY-protocol port until its header has named
        # the client; anyone else's count against its own address from the start.
        self._proxy_protocol = _behind_proxy_protocol(self.transport)
        key = None if self._proxy_protocol or factory.is_trusted_proxy(peer) else peer
        refusal = factory.refusal(key, check_total=True)
        if refusal is not None:
            self._refuse_for_limit(refusal)
            return
        self._admission = Admission(factory.counter, key)
        self._deadline = factory.clock.callLater(factory.config.handshake_timeout,
                                                 self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._done:
            if self._deadline is not None and self._deadline.active():  # lingering
                self.transport.loseConnection()
            return
        searched = len(self._buffer)
        buffer = self._buffer = self._buffer + data if searched else data
        end = head_end(buffer, searched)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._refuse(HeadError(431))
            elif len(buffer) > MAX_REQUEST_LINE + 1 and buffer.find(
                    b"\n", 0, MAX_REQUEST_LINE + 2) < 0:
                self._refuse(HeadError(414))
            return
        if end > MAX_HEAD:
            self._refuse(HeadError(431))
            return
        try:
            head = parse_head(buffer[:end])
        except HeadError as refused:
            self._refuse(refused)
            return
        self._buffer = b""
        self._done = True
        if not self._admit(head):
            return
        if head.is_upgrade:
            if head.method != b"GET":
                self._refuse(HeadError(405, ((b"Allow", b"GET, HEAD"),)))
            elif buffer.count(b"\n", 0, end) != buffer.count(b"\r\n", 0, end):
                self._refuse(HeadError(400))  # RFC 6455 wants CRLF; so does Autobahn
            else:
                self._upgrade(buffer)
        else:
            self._http(buffer[:end])

    def _admit(self, head: RequestHead) -> bool:
        """Charge a trusted proxy's connection to the client the head names."""
        admission = self._admission
        if admission is None or admission.key is not None:
            return True
        factory = self.factory
        peer = self._peer
        if self._proxy_protocol:
            peer = self._peer = _host(self.transport)  # the PROXY header's source by now
        forwarded_for, real_ip = head.get(b"x-forwarded-for"), head.get(b"x-real-ip")
        if (forwarded_for is None and real_ip is None) or not factory.is_trusted_proxy(peer):
            address = peer
        else:
            address = client_address(peer, _text(forwarded_for), _text(real_ip),
                                     factory.proxies)
        refusal = factory.refusal(address, check_total=False)
        if refusal is not None:
            admission.release()
            self._admission = None
            self._refuse_for_limit(refusal)
            return False
        admission.move(address)
        return True

    def _upgrade(self, raw: bytes) -> None:
        """Hand the exact bytes received to a new Autobahn protocol on this transport."""
        transport = self.transport
        protocol = cast("RelayServerProtocol",
                        self.factory.websocket.buildProtocol(self._address))
        # The head is complete and Autobahn answers it within this call: the front door's
        # deadline has done the opening-handshake timer's job (it would cost a timer).
        protocol.openHandshakeTimeout = 0
        admission, self._admission = self._admission, None
        if admission is not None:  # (the head was admitted: it is not)
            admission.upgraded()
        protocol.admission = admission  # released when that protocol closes
        if not _attach(transport, self, protocol):
            self._delegate = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        if protocol.state != WebSocketProtocol.STATE_CONNECTING:  # answered: 101 or refused
            self._cancel_deadline()

    def _http(self, head: bytes) -> None:
        """The Site's channel on this transport, fed this one request; the Site closes
        the connection after answering, so nothing after the head is read here."""
        self._cancel_deadline()
        channel = self.factory.site.buildProtocol(self._address)
        self._http_channel = channel
        channel.makeConnection(self.transport)
        if head.count(b"\n") != head.count(b"\r\n"):  # twisted.web reads CRLF lines only
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        channel.dataReceived(head)

    def _refuse_for_limit(self, reason: str) -> None:
        self.factory.registry.count_refused(reason)
        self.factory.registry.refusal_log(reason)
        self._answer(error_response(503, LIMIT_REASONS[reason]))

    def _refuse(self, refused: HeadError) -> None:
        self._log.debug("refused a request with HTTP {status}", status=refused.status)
        self._answer(error_response(refused.status, headers=refused.headers))

    def _answer(self, response: bytes) -> None:
        """Write a final answer; close when the client has sent something more (read and
        dropped) or after a short linger, whichever comes first."""
        self._done = True
        self._buffer = b""
        self._cancel_deadline()
        self.transport.write(response)
        self._deadline = self.factory.clock.callLater(REFUSAL_LINGER,
                                                      self.transport.abortConnection)

    def _too_slow(self) -> None:
        self._deadline = None
        self._log.debug("dropped a connection whose request head took too long")
        self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._admission is not None:
            self._admission.release()
            self._admission = None
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
        elif self._http_channel is not None:
            self._http_channel.connectionLost(reason)


def _host(transport: Any) -> str:
    return getattr(transport.getPeer(), "host", None) or "local"


def _behind_proxy_protocol(transport: Any) -> bool:
    """A `haproxy:` port: the peer is the proxy until the PROXY header has been read."""
    while transport is not None:
        if isinstance(transport, HAProxyProtocolWrapper):
            return True
        transport = getattr(transport, "transport", None)
    return False


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


class FrontDoorFactory(Factory["FrontDoor"]):
    """Builds a FrontDoor per accepted connection; shares the relay's Site, Autobahn
    factory and connection counter."""

    _log = Logger()

    def __init__(self, site: Site, websocket: WebSocketServerFactory, registry: Any,
                 config: RelayConfig, clock: IReactorTime) -> None:
        self.site = site
        self.websocket = websocket
        self.registry = registry
        self.counter: ConnectionCounter = registry.connections
        self.config = config
        self.clock = clock
        self.proxies = proxy_networks(config.trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}

    def logPrefix(self) -> str:
        """The name in "RelaySite starting on 3000", the line operators already know."""
        return "RelaySite"

    def buildProtocol(self, addr: IAddress | None) -> FrontDoor:
        return FrontDoor(self, addr)

    def is_trusted_proxy(self, peer: str) -> bool:
        trusted = self._trusted_cache.get(peer)
        if trusted is None:
            trusted = is_trusted_proxy(peer, self.proxies)
            if len(self._trusted_cache) < 4096:
                self._trusted_cache[peer] = trusted
        return trusted

    def refusal(self, address: str | None, check_total: bool) -> str | None:
        """The limit a connection from `address` would exceed, or None."""
        config = self.config
        return self.counter.refusal(address, config.max_connections if check_total else 0,
                                    config.max_connections_per_ip)
