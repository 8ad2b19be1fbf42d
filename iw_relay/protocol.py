"""The WebSocket side of the relay: admission, join, relay, close.

Wire protocol in short (README's Protocol section has the whole contract):
- connect to ``/room/{roomId}`` or ``/?room={roomId}``; the id is read from the raw request
  target (only the query form is percent-decoded); a missing or malformed id completes
  the handshake and is then closed with 1008 and a reason a browser can read;
- the joiner gets ``connected`` (with ``peers``, the others' connection ids), the others
  ``user-joined``; a departure sends ``user-left`` once;
- every client frame is rate limited (messages, pings, pongs and continuation frames),
  parsed (``PARSE_ERROR`` / ``INVALID_MESSAGE`` / ``RESERVED_TYPE`` back to the sender
  only), stamped with ``connectionId`` and ``timestamp`` and relayed to the other members
  of its room, framed once for all of them; a message with a string ``to`` goes to that
  member only (``UNKNOWN_PEER`` back when it is no other member of the room).

Autobahn's and Twisted's internals are reached only through _autobahn.py; what a member
is sent goes through outbox.py.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from iw_relay import messages
from iw_relay._autobahn import (
    LeanServerProtocol,
    frame_bytes,
    prepare_frame,
    protocol_class_for,
    turn_state,
    write_now,
    write_now_each,
)
from iw_relay.admission import (
    origin_allowed,
    parse_networks,
    token_allows,
)
from iw_relay.config import RelayConfig
from iw_relay.frontdoor import error_response
from iw_relay.outbox import Outbox, TurnFlusher
from iw_relay.ratelimit import TokenBucket
from iw_relay.registry import ROOM_FULL_REASON, RelayStats, RoomRegistry

__all__ = ["RelayServerFactory", "RelayServerProtocol", "prepare_frame", "requested_room",
           "room_problem"]

ROOM_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# How long a closing peer has to answer our close frame before its TCP connection is dropped.
CLOSE_HANDSHAKE_TIMEOUT = 2.0
_OPEN = LeanServerProtocol.STATE_OPEN


def requested_room(target: str) -> str | None:
    """The room id a handshake asks for, read from the raw request target as the original
    reads it; None when there is none.

    The path form wins and ignores the query: ``/room/abc/x`` asks for ``abc``. The path
    is never percent-decoded nor split at ``;`` (``/room/%61bc`` and ``/room/abc;x`` ask
    for ids that are refused, ``/room%2Fabc`` for none). On any other path, the
    percent-decoded ``room`` query parameter.
    """
    parts = urlsplit(target)
    if parts.path.startswith("/room/"):
        segments = [segment for segment in parts.path.split("/") if segment]
        return segments[1] if len(segments) >= 2 else None
    values = parse_qs(parts.query).get("room")
    return values[0] if values else None


def room_problem(room_id: str | None) -> str | None:
    """The close reason for a room id the relay refuses, or None when it is acceptable."""
    if not room_id:
        return messages.ROOM_ID_REQUIRED
    if not ROOM_ID.fullmatch(room_id):
        return messages.ROOM_ID_INVALID
    return None


class RelayServerProtocol(Outbox, LeanServerProtocol):
    """One client connection: a member of one room once the handshake is done."""

    _log = Logger()
    factory: RelayServerFactory

    connection_id: str = ""
    #: The front door's count of this connection (frontdoor.Admission), released on close.
    admission: Any = None
    _requested_room: str | None = None
    _token: str | None = None
    #: (token, since, epoch) of a ``?resume=`` handshake, with recovery on.
    _resume: tuple[str | None, str | None, str | None] | None = None
    _limiter: TokenBucket | None = None
    _joined = False

    # -- admission ----------------------------------------------------------------------

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
        self._requested_room = requested_room(self.request_target)
        params = request.params
        self._token = (params.get("token") or [None])[0]
        if factory.owns_seq and "resume" in params:
            self._resume = tuple((params.get(name) or [None])[0]
                                 for name in ("resume", "since", "epoch"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.admission is not None:
            self.admission.release()
            self.admission = None
        super().connectionLost(reason)

    # -- join ---------------------------------------------------------------------------

    def onOpen(self) -> None:
        try:
            self._join()
        except Exception:
            self._log.failure("joining a room failed")
            self.close(messages.CLOSE_INTERNAL_ERROR, messages.INTERNAL_ERROR_REASON)

    def _join(self) -> None:
        factory = self.factory
        room_id = self._requested_room or ""  # room_problem refuses "" as it does None
        problem = room_problem(room_id)
        if problem is not None:
            factory.registry.refusal_log(problem.split(".")[0])
            self.close(messages.CLOSE_POLICY_VIOLATION, problem)
            return
        config = factory.config
        if config.auth_secret is not None and not token_allows(
            self._token, config.auth_secret, room_id
        ):
            factory.registry.refusal_log("invalid authentication token")
            self.close(messages.CLOSE_POLICY_VIOLATION, messages.AUTH_REASON)
            return
        resume, self._resume = self._resume, None
        if resume is not None:
            # A member coming back is counted in its room already: no room-size check.
            self._enter()
            if factory.registry.resume(self, room_id, *resume):
                self._joined = True
                return
        if config.max_room_size and factory.registry.room_size(room_id) >= config.max_room_size:
            factory.registry.refusal_log(ROOM_FULL_REASON)
            self._reply(messages.error(messages.ROOM_FULL, messages.ROOM_FULL_MESSAGE))
            self.close(messages.CLOSE_POLICY_VIOLATION, messages.ROOM_FULL_MESSAGE)
            return
        if resume is None:
            self._enter()
        self.connection_id = secrets.token_hex(8)
        self._joined = True
        factory.registry.join(self, room_id)

    def _enter(self) -> None:
        """What every member needs once admitted: bounded sends, a rate limit, and no
        copy of the handshake (room id, tokens) kept."""
        self.watch_send_buffer()
        self._requested_room = self._token = None
        self.forget_handshake()
        self._limiter = self.factory.bucket(self.factory.clock.seconds())

    # -- relay --------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self._joined:
            return
        self.factory.traffic.bytesReceived += len(payload)
        try:
            self._relay(payload)
        except Exception:
            self._log.failure("handling a message from {connection_id} failed",
                              connection_id=self.connection_id)
            self.close(messages.CLOSE_INTERNAL_ERROR, messages.INTERNAL_ERROR_REASON)

    def _relay(self, payload: bytes) -> None:
        factory = self.factory
        limiter = self._limiter
        # _within_rate's common case inlined: it runs once per message.
        if limiter is not None:
            now = factory.clock.seconds()
            if not limiter.allow(now):
                self._refused(limiter, now)
                return
        try:
            relayed, target = messages.stamped(
                payload, self.connection_id, int(factory.wall_clock() * 1000),
                factory.owns_seq,
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

    def frame_allowed(self) -> bool:
        """Pings, pongs and continuation frames count against the limit (a message's
        first frame is counted once the message is whole, in _relay)."""
        return self._within_rate()

    def _within_rate(self) -> bool:
        """Count one frame against the rate limit; False when it is refused.

        Over the limit: one RATE_LIMIT_EXCEEDED a window; a flood (--flood-windows) is
        closed with 1008; a connection that sent twice its allowance in this window is
        not read again before the window ends (TCP holds the rest), so a flood costs a
        bounded amount of work per window.
        """
        limiter = self._limiter
        if limiter is None:  # not joined yet: frames are not counted
            return True
        now = self.factory.clock.seconds()
        if limiter.allow(now):
            return True
        self._refused(limiter, now)
        return False

    def _refused(self, limiter: TokenBucket, now: float) -> None:
        """What follows a frame refused by the rate limit at `now` (see _within_rate)."""
        factory = self.factory
        factory.registry.count_rate_limited()
        if limiter.first_refusal:
            flood_windows = factory.config.flood_windows
            if flood_windows and limiter.flooded_windows >= flood_windows:
                self._log.info("{connection_id} kept flooding: closed",
                               connection_id=self.connection_id)
                self.close(messages.CLOSE_POLICY_VIOLATION, messages.FLOOD_REASON)
                self.pause_reading(factory.clock, None)  # nothing it sends matters now
                return
            self._log.info("{connection_id} is over its rate limit",
                           connection_id=self.connection_id)
            self._reply(factory.rate_limit_error)
        if limiter.overdrawn and not self.reading_paused:
            self.pause_reading(factory.clock, limiter.window_end - now)

    # -- close --------------------------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._joined:
            self._joined = False
            self.factory.registry.leave(self, self.close_code, self.closedByMe)

    # -- sending (outbox.py) ------------------------------------------------------------

    def deliver(self, frame: PreparedMessage) -> None:
        """The registry's Member interface: an already framed message (framed once for
        all of its recipients) goes out at the end of this reactor turn, or at once in a
        turn with one ready socket when nothing is queued before it (outbox.py)."""
        if self.state != _OPEN:
            return
        data = frame_bytes(frame)
        # Through the factory: attributes of the connection's class are slow to read
        # (Python 3.11 does not specialise them) and this runs once per delivery.
        factory = self.factory
        factory.traffic.bytesSent += len(data)
        if not self.lean_writes:
            self.sendPreparedMessage(frame)
        elif factory.turn.single and self._outbox is None:
            # Nothing queued before it, and no other frame for this member can come this
            # turn (Outbox.enqueue would gather frames for nothing): out now.
            write_now(self.transport, data)
            factory.turn.single = False  # the rest of a burst is gathered (TurnState)
        else:
            self.enqueue(data)

    def _reply(self, payload: bytes) -> None:
        """A message to this client only; queued behind what it has not read yet."""
        self.deliver(prepare_frame(payload))

    def queue_frame(self, data: bytes) -> bool:
        """Pongs go through the outbox once joined: bounded by --max-send-buffer."""
        if self._joined:
            self.enqueue(data)
        return self._joined

    def sendHttpErrorResponse(self, code: int, reason: str,
                              responseHeaders: Any = None) -> None:
        """Autobahn's refusals (a foreign origin's 403, draining's 503, a bad upgrade's
        400 or 426) answered as the front door answers: a body, a length, no sniffing."""
        headers = tuple((str(name).encode("latin-1", "replace"),
                         str(value).encode("latin-1", "replace"))
                        for name, value in responseHeaders or ())
        self.sendData(error_response(code, reason.encode("utf-8", "replace"), headers))

    def queue_handshake_answer(self, data: bytes) -> bool:
        """The 101 goes out with ``connected`` (or the refusal's close frame), in one
        write at the end of this reactor turn."""
        self.enqueue(data)
        return True

    def before_write(self) -> None:
        """The close frame goes out after the frames queued before it."""
        if self._outbox:
            self.flush_outbox()

    def slow_consumer(self) -> None:
        self._log.info("{connection_id} is not reading: closed as a slow consumer",
                       connection_id=self.connection_id)
        self.factory.registry.count_slow_consumer()
        # The close frame waits behind unread data: the close-handshake timeout drops it.
        self.close(messages.CLOSE_TRY_AGAIN_LATER, messages.SLOW_CONSUMER_REASON)


class RelayServerFactory(WebSocketServerFactory):
    """Builds a RelayServerProtocol per connection, all sharing one RoomRegistry, and
    writes what members queued once per reactor turn."""

    # Autobahn's factory subclasses Twisted's Factory without its type parameter, so its
    # protocol attribute expects the default protocol type, not this (narrower) one.
    protocol = RelayServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        registry: RoomRegistry,
        config: RelayConfig,
        clock: IReactorTime,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(server="iw-relay")
        self.registry = registry
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.flusher = TurnFlusher(clock)
        #: Whether the reactor turn being handled had one ready socket (deliver reads it).
        self.turn = turn_state(clock)
        self.bucket = TokenBucket.rule(config.rate_limit, config.rate_window,
                                       config.rate_burst)
        self.rate_limit_error = messages.rate_limit_error(config.rate_limit, config.rate_window)
        self.unknown_peer_error = messages.error(messages.UNKNOWN_PEER,
                                                 messages.UNKNOWN_PEER_MESSAGE)
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        self.allowed_origins = frozenset(config.allowed_origins)
        #: Connection recovery is on: the relay numbers messages (a client's seq goes).
        self.owns_seq = registry.recovery.enabled
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
        self.protocol = protocol_class_for(self, RelayServerProtocol)
        #: The registry's traffic counters, read per message and per delivery.
        self.traffic: RelayStats = registry.stats
        # What the outbox reads when a member is not reading, on the class.
        self.protocol.max_send_buffer = config.max_send_buffer

    def write_through(self, members: list[RelayServerProtocol], frame: PreparedMessage,
                      failed: Callable[[RelayServerProtocol], object],
                      ) -> list[RelayServerProtocol]:
        """The registry's fan-out, in a turn with one ready socket (`turn.single`):
        `frame` is written at once to every open member with nothing queued (what
        deliver() would do for each, in one loop; a member whose write raises is given
        to `failed`, the registry's delivery-failure rule); returns the members left
        for deliver() (something queued, paused, closing; all of them in other turns)."""
        if not self.turn.single or not self.protocol.lean_writes:
            return members
        idle, rest = [], []
        for member in members:
            if member._outbox is None and member.state == _OPEN:
                idle.append(member.transport)
            else:
                rest.append(member)
        if idle:
            data = frame_bytes(frame)
            self.traffic.bytesSent += len(data) * len(idle)
            write_now_each(idle, data, lambda transport: failed(
                next(member for member in members if member.transport is transport)))
            self.turn.single = False  # the rest of a burst is gathered (TurnState)
        return rest
