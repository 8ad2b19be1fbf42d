"""The WebSocket side of the relay (Autobahn): handshake, room id, message pipeline, close.

Wire protocol in short (SPEC.md has the whole contract):
- connect to ``/room/{roomId}`` or ``/?room={roomId}``; a missing or malformed id completes
  the handshake and is then closed with 1008 and a reason a browser can read;
- the joiner gets ``connected`` (with ``peers``, the others' connection ids), the others
  ``user-joined``; a departure sends ``user-left`` once;
- every client frame is rate limited, parsed (``PARSE_ERROR`` / ``INVALID_MESSAGE`` back to
  the sender only), stamped with ``connectionId`` and ``timestamp`` and relayed to the other
  members of its room, framed once for all of them; a message with a string ``to`` goes
  to that member only (``UNKNOWN_PEER`` back when it is no other member of the room).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from iw_relay import autobahn_tuning, messages
from iw_relay.admission import (
    origin_allowed,
    parse_networks,
    token_allows,
)
from iw_relay.config import RelayConfig
from iw_relay.fastframe import next_simple_frame
from iw_relay.ratelimit import FixedWindowLimiter
from iw_relay.registry import RoomRegistry, room_hash

# Autobahn's record of the opening handshake, unused once the connection is open.
_HANDSHAKE_STATE = ("http_request_data", "http_headers", "http_status_line",
                    "http_request_uri", "http_request_path", "http_request_params",
                    "http_request_host", "http_response_data", "websocket_origin")
ROOM_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# How long a closing peer has to answer our close frame before its TCP connection is dropped.
CLOSE_HANDSHAKE_TIMEOUT = 2.0


def prepare_frame(payload: bytes) -> PreparedMessage:
    """Frame a text message once, for every recipient (server frames are unmasked)."""
    return PreparedMessage(payload, False, False, False)


def requested_room(path: str, params: dict[str, list[str]]) -> str | None:
    """The room id a handshake asks for, as the original reads it; None when there is none.

    The path form wins and ignores the query: ``/room/abc/x`` asks for ``abc``. On any
    other path, the (percent-decoded) ``room`` query parameter.
    """
    if path.startswith("/room/"):
        segments = [segment for segment in path.split("/") if segment]
        return segments[1] if len(segments) >= 2 else None
    values = params.get("room")
    return values[0] if values else None


def room_problem(room_id: str | None) -> str | None:
    """The close reason for a room id the relay refuses, or None when it is acceptable."""
    if not room_id:
        return messages.ROOM_ID_REQUIRED
    if not ROOM_ID.fullmatch(room_id):
        return messages.ROOM_ID_INVALID
    return None


def write_now(transport: Any, data: bytes) -> None:
    """Write `data`, straight to the socket when nothing is waiting before it.

    Twisted's write() only buffers: the bytes leave at the next reactor turn, after two
    epoll_ctl calls (start and stop watching for writability) per connection per turn.
    Sending at once when the buffer is empty skips both; what the socket does not take
    goes through transport.write() as usual, behind nothing, so the order is kept.
    """
    # Only a plain TCP connection: a TLS transport would pass `.socket` through to the
    # TCP one underneath, and plaintext would go out on it.
    if (type(transport) is tcp.Server and transport.connected
            and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, EINTR, or a broken connection Twisted will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def set_tcp_nodelay(transport: object) -> None:
    """Turn Nagle off; Autobahn tries too early and silently fails (40 ms stalls)."""
    while transport is not None:
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:  # not a TCP socket (e.g. a UNIX socket)
                pass
            return
        transport = getattr(transport, "transport", None)


@implementer(IPushProducer)
class RelayServerProtocol(WebSocketServerProtocol):
    """One client connection: a member of one room once the handshake is done.

    It is also the producer registered on its own transport, which is how it learns that
    the peer is not reading: Twisted pauses it when the socket's buffer passes 64 KiB.
    While paused, frames wait in a backlog; a backlog over --max-send-buffer closes the
    peer with 1013, so one stalled reader never makes the server buffer without bound.
    """

    _log = Logger()
    factory: RelayServerFactory

    connection_id: str = ""
    #: The front door's count of this connection (frontdoor.Admission), released on close.
    admission: Any = None
    _requested_room: str | None = None
    _token: str | None = None
    _limiter: FixedWindowLimiter | None = None
    _joined = False
    #: Take simple frames on the lean path; False leaves every frame to Autobahn.
    fast_frames = True
    _paused = False
    _outbox: list[bytes] | None = None  # frames waiting for the end of this reactor turn
    _backlog: list[bytes] | None = None
    _backlog_bytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        set_tcp_nodelay(self.transport)
        # Autobahn queues only "sync" and chopped sends, which the relay never makes; an
        # empty tuple instead of its deque saves ~700 bytes a connection.
        self.send_queue = ()

    def onConnect(self, request: ConnectionRequest) -> None:
        try:
            self._admit(request)
        except ConnectionDeny:
            raise
        except Exception:
            self._log.failure("admitting a connection failed")
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR) from None

    def _admit(self, request: ConnectionRequest) -> None:
        """Refuse handshakes while draining and from foreign origins (HTTP 503 / 403).
        Connection limits are the front door's (frontdoor.py): counted from accept."""
        factory = self.factory
        headers = request.headers
        if factory.registry.stopping:
            factory.registry.count_refused("shutting-down")
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "Server shutting down")
        if not origin_allowed(headers.get("origin"), factory.allowed_origins):
            factory.registry.count_refused("origin")
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin not allowed")
        self._requested_room = requested_room(request.path, request.params)
        self._token = (request.params.get("token") or [None])[0]

    def connectionLost(self, reason: object = None) -> None:
        if self.admission is not None:
            self.admission.release()
            self.admission = None
        super().connectionLost(reason)

    def onOpen(self) -> None:
        try:
            self._join()
        except Exception:
            self._log.failure("joining a room failed")
            self.close(messages.CLOSE_INTERNAL_ERROR, messages.INTERNAL_ERROR_REASON)

    def _join(self) -> None:
        factory = self.factory
        problem = room_problem(self._requested_room)
        if problem is not None:
            self._log.info("refused a connection: {problem}", problem=problem.split(".")[0])
            self.close(messages.CLOSE_POLICY_VIOLATION, problem)
            return
        config = factory.config
        room_id = self._requested_room
        if config.auth_secret is not None and not token_allows(
            self._token, config.auth_secret, room_id
        ):
            self._log.info("refused a connection: invalid authentication token")
            self.close(messages.CLOSE_POLICY_VIOLATION, messages.AUTH_REASON)
            return
        if config.max_room_size and factory.registry.room_size(room_id) >= config.max_room_size:
            self._log.info("refused a connection: room {room} is full", room=room_hash(room_id))
            self._reply(messages.error(messages.ROOM_FULL, messages.ROOM_FULL_MESSAGE))
            self.close(messages.CLOSE_POLICY_VIOLATION, messages.ROOM_FULL_MESSAGE)
            return
        self._watch_send_buffer()
        self._forget_handshake()
        self.connection_id = secrets.token_hex(8)
        self._limiter = FixedWindowLimiter(
            config.rate_limit, config.rate_window, factory.clock.seconds()
        )
        self._joined = True
        factory.registry.join(self, room_id)

    def dataReceived(self, data: bytes) -> None:
        """Take simple frames on the lean path (fastframe.py); hand the rest to Autobahn."""
        if (not self.fast_frames or self.state != WebSocketProtocol.STATE_OPEN or self.data
                or self.current_frame is not None or self.inside_message):
            super().dataReceived(data)
            return
        start = 0
        # Both Autobahn limits are --max-message-size (RelayServerFactory): one number.
        max_size = self.maxMessagePayloadSize
        stats = self.trafficStats
        while start < len(data) and self.state == WebSocketProtocol.STATE_OPEN:
            frame = next_simple_frame(data, start, max_size)
            if frame is None:
                break
            payload, is_binary, end = frame
            # What Autobahn would have done for this frame, besides delivering it.
            stats.incomingOctetsWireLevel += end - start
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            start = end
            self.onMessage(payload, is_binary)
        if start < len(data):
            super().dataReceived(data[start:] if start else data)

    def _forget_handshake(self) -> None:
        """Drop the opening request Autobahn keeps (raw bytes, headers, URI): ~1 KB a
        connection that nothing reads once the socket is open."""
        for name in _HANDSHAKE_STATE:
            if name in self.__dict__:
                self.__dict__[name] = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self._joined:
            return
        self.factory.registry.stats.bytesReceived += len(payload)
        try:
            self._relay(payload)
        except Exception:
            self._log.failure("handling a message from {connection_id} failed",
                              connection_id=self.connection_id)
            self.close(messages.CLOSE_INTERNAL_ERROR, messages.INTERNAL_ERROR_REASON)

    def _relay(self, payload: bytes) -> None:
        factory = self.factory
        limiter = self._limiter
        if not limiter.allow(factory.clock.seconds()):
            factory.registry.count_rate_limited()
            if limiter.first_refusal:
                flood_windows = factory.config.flood_windows
                if flood_windows and limiter.flooded_windows >= flood_windows:
                    self._log.info("{connection_id} kept flooding: closed",
                                   connection_id=self.connection_id)
                    self.close(messages.CLOSE_POLICY_VIOLATION, messages.FLOOD_REASON)
                    return
                self._log.info("{connection_id} is over its rate limit",
                               connection_id=self.connection_id)
                self._reply(factory.rate_limit_error)
            return
        try:
            relayed, target = messages.stamped(
                payload, self.connection_id, int(factory.wall_clock() * 1000)
            )
        except messages.MessageError as refused:
            self._log.debug("{connection_id} sent a message refused with {code}",
                            connection_id=self.connection_id, code=refused.code)
            self._reply(messages.error(refused.code, refused.message))
            return
        if target is None:
            factory.registry.broadcast(self, relayed)
        elif not factory.registry.unicast(self, target, relayed):
            self._log.debug("{connection_id} sent a message to an unknown peer",
                            connection_id=self.connection_id)
            self._reply(factory.unknown_peer_error)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._joined:
            self._joined = False
            # The code this side sent when it closed first, else the peer's (1006: dropped).
            close_code = self.localCloseCode if self.closedByMe else self.remoteCloseCode
            self.factory.registry.leave(self, close_code)

    # -- flow control (IPushProducer) ----------------------------------------------------

    def _watch_send_buffer(self) -> None:
        # Under WebSocketResource the HTTP channel is still the transport's producer.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """The peer's socket buffer is full (called again on every write while it is)."""
        if not self._paused:
            self._paused = True
            self._backlog = []

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog, self._backlog_bytes = self._backlog, None, 0
        if backlog and self.state == WebSocketProtocol.STATE_OPEN:
            self.transport.write(b"".join(backlog))

    def stopProducing(self) -> None:
        self._backlog, self._backlog_bytes = None, 0

    # -- the registry's Member interface ------------------------------------------------

    def deliver(self, frame: PreparedMessage) -> None:
        """Queue an already framed message (framed once for all of its recipients); the
        queue goes out in one write at the end of this reactor turn."""
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        data = frame.payloadHybi
        self.factory.registry.stats.bytesSent += len(data)
        if not self._paused:
            if self._outbox is None:
                self._outbox = [data]
                self.factory.flush_later(self)
            else:
                self._outbox.append(data)
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self.factory.config.max_send_buffer:
            self._drop_slow_consumer()

    def flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox and self.state != WebSocketProtocol.STATE_CLOSED:
            write_now(self.transport, outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes (close frames, pongs, replies) go after queued frames."""
        if self._outbox:
            self.flush_outbox()
        super().sendData(data, sync, chopsize)

    def _drop_slow_consumer(self) -> None:
        self._log.info("{connection_id} is not reading: closed as a slow consumer",
                       connection_id=self.connection_id)
        self._backlog, self._backlog_bytes = None, 0
        self.factory.registry.count_slow_consumer()
        # The close frame waits behind unread data: the close-handshake timeout drops it.
        self.close(messages.CLOSE_TRY_AGAIN_LATER, messages.SLOW_CONSUMER_REASON)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any code (Autobahn's sendClose refuses 1008)."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    def _reply(self, payload: bytes) -> None:
        """A message to this client only; queued behind what it has not read yet."""
        self.deliver(prepare_frame(payload))


class RelayServerFactory(WebSocketServerFactory):
    """Builds a RelayServerProtocol per connection, all sharing one RoomRegistry.

    It also sends what members have queued, once per reactor turn: one write per member
    however many messages reached it in that turn.
    """

    _log = Logger()

    def flush_later(self, protocol: RelayServerProtocol) -> None:
        if not self._dirty:
            self.clock.callLater(0, self._flush_dirty)
        self._dirty.append(protocol)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for protocol in dirty:
            try:
                protocol.flush_outbox()
            except Exception:
                self._log.failure("sending to {connection_id} failed",
                                  connection_id=protocol.connection_id)

    protocol = RelayServerProtocol

    def __init__(
        self,
        registry: RoomRegistry,
        config: RelayConfig,
        clock: IReactorTime,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        autobahn_tuning.apply()
        super().__init__(server="iw-relay")
        self.registry = registry
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.rate_limit_error = messages.rate_limit_error(config.rate_limit, config.rate_window)
        self.unknown_peer_error = messages.error(messages.UNKNOWN_PEER,
                                                 messages.UNKNOWN_PEER_MESSAGE)
        self._dirty: list[RelayServerProtocol] = []
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        self.allowed_origins = frozenset(config.allowed_origins)
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            failByDrop=False,  # send 1007/1002/1009 close frames: clients learn why
            allowNullOrigin=True,
        )
        # Autobahn copies ~30 options from the factory onto every connection, unless the
        # protocol class already has them: give them to a class of this factory's own,
        # once, rather than to each of thousands of connections.
        options = {name: getattr(self, name) for name in RelayServerProtocol.CONFIG_ATTRS}
        # A function stored on a class becomes a method: keep callables (such as
        # perMessageCompressionAccept) plain functions, as they were on the factory.
        options = {name: staticmethod(value) if callable(value) else value
                   for name, value in options.items()}
        self.protocol = type("RelayServerProtocol", (RelayServerProtocol,), options)
