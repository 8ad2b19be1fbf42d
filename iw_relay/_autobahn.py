"""Every reach into Autobahn's or Twisted's internals, in one module.

`LeanServerProtocol` is Autobahn's server protocol made cheaper and stricter for the
relay; protocol.py subclasses it and only implements the relay's own logic. What it
relies on that Autobahn or Twisted do not document is listed in `_RELIED_ON` and checked
when this module is imported: an Autobahn release that renames any of it fails at start
with an ImportError naming the attribute, not silently under load.

- The lean frame path (fastframe.py): whole, masked, small text/binary frames are parsed
  here and handed to onMessage; anything else goes to Autobahn's parser.
- Control and continuation frames are put to `frame_allowed()` (the rate limit) before
  Autobahn handles them; a refused ping or pong is dropped unread (no pong goes back).
  A pong that answers no ping of ours is passed on without Autobahn's warning per pong.
- `pause_reading()`: no frame is parsed, and the socket is not read, until it ends.
- Autobahn's own writes other than the close frame (pongs) go to `queue_frame()`, so the
  subclass bounds them like everything else it sends.
- `close()` sends any close code (Autobahn's sendClose refuses 1008, 1011, 1013).
- Memory: no per-connection send queue, no handshake record once open, and Autobahn's
  ~30 options on a class of the factory's own instead of on every connection.
- `connectionMade()` leaves the transport details to be made on first use.
- The 101 answer goes to `queue_handshake_answer()`, so the subclass can send it with
  the first frames in one write.
- `write_now()` writes straight to a plain TCP socket when nothing waits before it;
  `write_now_each()` does it for a fan-out's members in one loop.
- `tune_autobahn()`: process-wide, opt-in (the twistd plugin calls it): Autobahn's debug
  log arguments (pformat, hltype, hlval) are no longer built when nobody reads them.
- `lean_reactor_dispatch()`: opt-in too: the epoll reactor hands a ready socket to
  Twisted's own read/write handling without a legacy log context per event, and runs
  `end_of_turn()` functions without a timer per turn; `turn_state()` tells whether the
  turn being handled had one ready socket.
"""

from __future__ import annotations

import errno
import functools
import inspect
import operator
import pprint
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

import autobahn
import txaio
from autobahn import util
from autobahn.twisted import websocket as twisted_websocket
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from autobahn.websocket import protocol as websocket_protocol
from autobahn.websocket.protocol import PreparedMessage, TrafficStats, WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import abstract, epollreactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python import log
from twisted.python.failure import Failure

from iw_relay.fastframe import next_simple_frame

#: The Autobahn releases this module was tested with (setup.py bounds the dependency).
TESTED_AUTOBAHN = "26.10"

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
# How Autobahn's succeedHandshake starts its answer (any other start: Autobahn's write).
_SWITCHING = b"HTTP/1.1 101 "
_CLOSING = WebSocketProtocol.STATE_CLOSING
#: A connection in this state writes nothing more.
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED
_CONTINUATION, _CLOSE, _PING, _PONG = 0x0, 0x8, 0x9, 0xA

# Autobahn's record of the opening handshake, unused once the connection is open.
_HANDSHAKE_STATE = ("http_request_data", "http_headers", "http_status_line",
                    "http_request_uri", "http_request_path", "http_request_params",
                    "http_request_host", "http_response_data", "websocket_origin", "_wskey")

class _NoSendQueue(deque[Any]):
    """Autobahn's send queue for connections that never use it: it queues only "sync"
    and chopped sends, which the relay never makes. One shared, always empty instance
    instead of a deque per connection saves ~700 bytes each; adding to it is a bug."""

    def append(self, item: Any) -> None:
        raise RuntimeError("the relay never queues in Autobahn's send queue")


_NO_SEND_QUEUE = _NoSendQueue()

# Per-connection attributes Autobahn sets on every connection, and what they nearly
# always hold once it is open. As class attributes, an open connection need not carry
# them in its own __dict__ (see LeanServerProtocol.forget_handshake).
_OPEN_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(_HANDSHAKE_STATE),
    **dict.fromkeys((
        "_perMessageCompress", "autoPingPending", "autoPingPendingSent",
        "autoPingPendingCall", "autoPingTimeoutCall", "closeHandshakeTimeoutCall",
        "current_frame", "localCloseCode", "localCloseReason", "openHandshakeTimeoutCall",
        "remoteCloseCode", "remoteCloseReason", "trackedTimings", "wasNotCleanReason",
        "websocket_protocol_in_use")),
    **dict.fromkeys((
        "closedByMe", "droppedByMe", "failedByMe", "inside_message", "triggered",
        "wasClean", "wasCloseHandshakeTimeout", "wasMaxFramePayloadSizeExceeded",
        "wasMaxMessagePayloadSizeExceeded", "wasOpenHandshakeTimeout",
        "wasServerConnectionDropTimeout", "wasServingFlashSocketPolicyFile"), False),
    "autoPingPendingSeq": 0,
    "send_state": 0,
    "send_queue": _NO_SEND_QUEUE,
    "data": b"",
    "websocket_version": 13,  # RFC 6455's; Autobahn also accepts drafts 8 and 10
}

# (where, attribute): class attributes and methods, checked with hasattr.
_RELIED_ON: tuple[tuple[Any, str], ...] = (
    *((WebSocketServerProtocol, name) for name in (
        "CONFIG_ATTRS", "processData", "consumeData", "onFrameBegin", "processControlFrame",
        "sendData", "sendCloseFrame", "_cancelAutoPingTimeoutCall", "_dataReceived",
        "dataReceived", "connectionMade", "_connectionMade")),
    *((TrafficStats(), name) for name in (
        "incomingOctetsWireLevel", "incomingWebSocketFrames", "incomingWebSocketMessages")),
    (PreparedMessage(b"{}", False, False, False), "payloadHybi"),
    (abstract.FileDescriptor, "dataBuffer"),
    (websocket_protocol, "pformat"),
    *((module, name) for module in (websocket_protocol, twisted_websocket)
      for name in ("hltype", "hlval")),
    (util, "hltype"),
    (util, "hlval"),
    *((epollreactor.EPollReactor, name) for name in (
        "doPoll", "doIteration", "_doReadOrWrite")),
)
# (function, "self.<attribute> ="): instance attributes, checked in the source that sets
# them (they exist only on a connected protocol).
_SET_BY: tuple[tuple[Any, str], ...] = (
    *((WebSocketProtocol._connectionMade, name) for name in (
        "data", "send_queue", "trafficStats", "closedByMe", "localCloseCode",
        "remoteCloseCode", "autoPingTimeoutCall", "autoPingPending")),
    *((websocket_protocol.WebSocketServerProtocol.succeedHandshake, name)
      for name in ("current_frame", "inside_message")),
    (WebSocketProtocol.onFrameBegin, "control_frame_data"),
    # LeanServerProtocol.connectionMade leaves these two to _PerConnection.
    *((twisted_websocket.WebSocketAdapterProtocol.connectionMade, name)
      for name in ("_transport_details", "peer")),
    (websocket_protocol.WebSocketServerProtocol.processHandshake, "http_request_uri"),
    (abstract.FileDescriptor.__init__, "_tempDataBuffer"),
    (tcp.Connection.__init__, "socket"),
    *((epollreactor.EPollReactor.__init__, name) for name in ("_poller", "_selectables")),
    (Deferred.__init__, "_callbacks"),
)

_PREPARED_FIELDS = {"payload", "binary", "doNotCompress", "payloadHybi"}


def check_internals() -> None:
    """ImportError naming the first internal attribute this module relies on that the
    installed Autobahn or Twisted does not have."""
    missing = [f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
               for owner, name in _RELIED_ON if not hasattr(owner, name)]
    for function, name in _SET_BY:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):  # no source installed: trust the class checks
            continue
        if f"self.{name} =" not in source and f"self.{name}:" not in source:
            missing.append(f"{function.__qualname__} setting self.{name}")
    # prepare_frame() builds a PreparedMessage without its constructor: the same fields.
    fields = set(vars(PreparedMessage(b"{}", False, False, False)))
    if fields != _PREPARED_FIELDS:
        missing.append(f"PreparedMessage with exactly {sorted(_PREPARED_FIELDS)}")
    if missing:
        raise ImportError(
            f"iw_relay._autobahn was tested with Autobahn {TESTED_AUTOBAHN}.x; the "
            f"installed Autobahn {autobahn.__version__} (or Twisted) lacks: "
            + ", ".join(missing))


check_internals()


_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """Write `data`, straight to the socket when nothing is waiting before it.

    Twisted's write() only buffers: the bytes leave at the next reactor turn, after two
    epoll_ctl calls (start and stop watching for writability) per connection per turn.
    Sending at once when the buffer is empty skips both; what the socket does not take
    goes through transport.write() as usual, behind nothing, so the order is kept.
    """
    # Only a plain TCP connection (a member's, or the Redis one): a TLS transport would
    # pass `.socket` through to the TCP one underneath, and plaintext would go out on it.
    if (type(transport) in _PLAIN_TCP and transport.connected
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


def write_now_each(transports: list[Any], data: bytes,
                   failed: Callable[[Any], object]) -> None:
    """`write_now(transport, data)` for each of `transports`, in one loop: a fan-out's
    writes leave back to back, with little Python between two sends. A transport that
    raises is given to `failed` (called while its exception is handled) and does not
    keep `data` from the others."""
    size = len(data)
    plain = _PLAIN_TCP
    for transport in transports:
        try:
            if (type(transport) in plain and transport.connected
                    and not transport.disconnecting
                    and not transport.dataBuffer and not transport._tempDataBuffer):
                try:
                    sent = transport.socket.send(data)
                except OSError:  # as in write_now
                    sent = 0
                if sent == size:
                    continue
                transport.write(data[sent:])
            else:
                transport.write(data)
        except Exception:
            failed(transport)


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


class _PerConnection:
    """A per-connection attribute made on first use, then kept on the connection."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, connection: Any, owner: type | None = None) -> Any:
        if connection is None:
            return self
        value = connection.__dict__[self._name] = self._make(connection)
        return value


def _peer(connection: Any) -> str:
    try:
        return peer2str(connection.transport)
    except Exception:  # no transport any more: only log lines read it
        return "unknown"


def _transport_details(connection: Any) -> TransportDetails:
    details = create_transport_details(connection.transport, True)
    details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
    return details


def _fresh_future(future: Any) -> bool:
    return not future.called and not future._callbacks


# When each lazily made attribute may be dropped from an open connection (it is then
# made again on first use, see LeanServerProtocol).
_LAZY_UNUSED: dict[str, Callable[[Any, Any], bool]] = {
    "is_closed": lambda connection, future: _fresh_future(future),
    "is_open": lambda connection, future: future.called and not future._callbacks,
    "utf8validator": lambda connection, validator: not connection.inside_message,
    "trafficStats": lambda connection, stats: True,
    # The front door's 0 per connection; once open, the factory's value reads alike.
    "openHandshakeTimeout": lambda connection, timeout: hasattr(
        type(connection), "openHandshakeTimeout"),
    "_results": lambda connection, results: results == {"message": None},
    "_valid_events": lambda connection, events: events == ["message"],
    "peer": lambda connection, peer: peer == _peer(connection),
    "_transport_details": lambda connection, details: (
        details is not None and not details.is_secure
        and details.marshal() == _transport_details(connection).marshal()),
}
# Empty lists Autobahn leaves from the handshake; an empty tuple on the class reads alike.
_EMPTY_WHEN_OPEN = ("websocket_extensions", "websocket_extensions_in_use",
                    "websocket_protocols")


class LeanServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol with the relay's lean paths (see the module)."""

    _compact_when_open = False
    # Made on first use once _compact() dropped them (an idle connection never does).
    # (txaio fills in its API at run time: the type checker cannot see create_future.)
    is_closed = _PerConnection(lambda connection: txaio.create_future())  # type: ignore[attr-defined]
    # Dropped only once fired: the opening handshake is over.
    is_open = _PerConnection(
        lambda connection: txaio.create_future(result=None))  # type: ignore[attr-defined]
    utf8validator = _PerConnection(lambda connection: Utf8Validator())
    trafficStats = _PerConnection(lambda connection: TrafficStats())
    _results = _PerConnection(lambda connection: {"message": None})
    _valid_events = ("message",)  # type: ignore[assignment]  # a tuple reads as Autobahn's list
    peer = _PerConnection(_peer)
    _transport_details = _PerConnection(_transport_details)
    # Empty tuples read as Autobahn's empty lists (see _EMPTY_WHEN_OPEN).
    websocket_extensions = websocket_extensions_in_use = websocket_protocols = ()  # type: ignore[assignment]

    #: Take simple frames on the lean path; False leaves every frame to Autobahn.
    fast_frames = True
    #: Send through the subclass's queue (queue_frame, its outbox); False leaves every
    #: write to Autobahn as it comes (tests compare the two).
    lean_writes = True
    _reading_paused = False
    _resume_call: Any = None
    _frame_refused = False  # the control frame being read was refused by frame_allowed()
    #: Autobahn's options (CONFIG_ATTRS), set on the class by protocol_class_for.
    openHandshakeTimeout: float
    logOctets: bool

    # -- hooks for the subclass ---------------------------------------------------------

    def frame_allowed(self) -> bool:
        """Called for each control (but close) and continuation frame of an open
        connection; False drops a ping or pong unread."""
        return True

    def queue_frame(self, data: bytes) -> bool:
        """Take one of Autobahn's own frames (a pong) to send it; False: write it now."""
        return False

    def queue_handshake_answer(self, data: bytes) -> bool:
        """Take the 101 answer to send it with what follows it in this reactor turn (the
        joiner's first message): one write instead of two (Autobahn would only add it to
        traffic counts that _compact() drops). False: write it now."""
        return False

    def before_write(self) -> None:
        """Called before Autobahn writes directly (handshake, close frame)."""

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Autobahn's connectionMade (twisted/websocket.py) less its transport details,
        made on first use instead (nothing in the relay reads them), and `peer`, made
        from the transport when _connectionMade reads it."""
        self.__dict__.pop("_transport_details", None)  # WebSocketProtocol.__init__'s blank
        set_tcp_nodelay(self.transport)
        self._connectionMade()
        self.send_queue = _NO_SEND_QUEUE

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume_call = None
        super().connectionLost(reason)

    @property
    def request_target(self) -> str:
        """The request target exactly as received (during the opening handshake)."""
        return self.http_request_uri

    def forget_handshake(self) -> None:
        """Drop the opening request Autobahn keeps (raw bytes, headers, URI): ~1 KB a
        connection that nothing reads once the socket is open; and, once Autobahn has
        finished opening (`succeedHandshake`), compact the connection (`_compact`)."""
        state = self.__dict__
        for name in _HANDSHAKE_STATE:
            if name in state:
                state[name] = None
        self._compact_when_open = True

    def succeedHandshake(self, res: Any) -> None:
        super().succeedHandshake(res)
        if self._compact_when_open and self.state == _OPEN:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the connection's __dict__ without what an open connection only pays
        for if it ever uses it:

        - the ~40 attributes that hold their class's value (None, False, 0:
          `_OPEN_DEFAULTS`): Autobahn set ~65 attributes one by one, and a dict never
          shrinks; reads fall back to the class, a later write adds it back;
        - objects Autobahn makes for every connection that an open relay connection
          seldom or never touches (`_LAZY`): made again on first use (`_PerConnection`).
          Traffic counts from before the handshake ended are not kept.

        ~1.6 KB less a connection, and a dict of ~12 keys instead of ~65."""
        state = self.__dict__
        state.pop("_compact_when_open", None)
        for name in _EMPTY_WHEN_OPEN:
            if state.get(name) == []:
                del state[name]
        for name, unused in _LAZY_UNUSED.items():
            if name in state and unused(self, state[name]):
                del state[name]
        cls = type(self)
        self.__dict__ = {name: value for name, value in state.items()
                         if getattr(cls, name, state) is not value}

    @property
    def close_code(self) -> int | None:
        """The code this side sent when it closed first, else the peer's (1006: dropped)."""
        return self.localCloseCode if self.closedByMe else self.remoteCloseCode

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any code (Autobahn's sendClose refuses 1008)."""
        if self.state == _OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    # -- reading ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Take simple frames on the lean path; hand the rest to Autobahn."""
        if (not self.fast_frames or self.state != _OPEN or self.data
                or self.current_frame is not None or self.inside_message
                or self._reading_paused):
            super().dataReceived(data)
            return
        start = 0
        # Both Autobahn limits are the same number (RelayServerFactory); read from the
        # factory, as Python 3.11 reads an attribute of the connection's class slowly.
        max_size = self.factory.maxMessagePayloadSize
        stats = self.trafficStats
        while True:  # the state and the pause were checked above, for the first frame
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
            if start == len(data) or self.state != _OPEN or self._reading_paused:
                break
        if start < len(data):
            super().dataReceived(data[start:] if start else data)

    def pause_reading(self, clock: Any, seconds: float | None) -> None:
        """Parse nothing more and stop reading the socket for `seconds` on `clock`
        (None: until the connection is dropped); TCP holds what the peer sends."""
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume_call = None
        self._reading_paused = True
        cast(IPushProducer, self.transport).pauseProducing()
        if seconds is not None:
            self._resume_call = clock.callLater(max(seconds, 0.0), self._resume_reading)

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def _resume_reading(self) -> None:
        self._resume_call = None
        self._reading_paused = False
        if self.state in (_OPEN, _CLOSING):
            cast(IPushProducer, self.transport).resumeProducing()
            if self.data:
                self.consumeData()  # what was read before the pause, then the socket

    def processData(self) -> bool:
        """Autobahn parses one frame per call: stop while reading is paused."""
        if self._reading_paused:
            return False
        return super().processData()

    def onFrameBegin(self) -> None:
        opcode = self.current_frame.opcode
        self._frame_refused = (opcode in (_CONTINUATION, _PING, _PONG)
                               and self.state == _OPEN and not self.frame_allowed())
        super().onFrameBegin()

    def processControlFrame(self) -> bool:
        if self._frame_refused and self.current_frame.opcode != _CLOSE:
            self._frame_refused = False
            # None, as Autobahn leaves it after a control frame (a list at the next one).
            self.control_frame_data = None  # type: ignore[assignment]
            return True
        if self.current_frame.opcode == _PONG and self.autoPingPending:
            payload = b"".join(self.control_frame_data)
            if payload != self.autoPingPending:
                # Autobahn logs a warning for each such pong: a log flood on demand.
                self.control_frame_data = None
                self._onPong(payload)
                return True
        return super().processControlFrame()

    # -- writing ------------------------------------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes: all but the close frame go to queue_frame() once open;
        the rest (handshake, close frame) go out now, after before_write()."""
        if (self.lean_writes and self.state == _OPEN and data and data[0] & 0x0F != _CLOSE
                and self.queue_frame(data)):
            return
        if (self.lean_writes and self.state == _CONNECTING and data.startswith(_SWITCHING)
                and not sync and not chopsize and not self.logOctets
                and self.queue_handshake_answer(data)):
            return
        self.before_write()
        super().sendData(data, sync, chopsize)


for _name, _value in _OPEN_DEFAULTS.items():
    if not hasattr(LeanServerProtocol, _name):
        setattr(LeanServerProtocol, _name, _value)


_Lean = TypeVar("_Lean", bound="LeanServerProtocol")


def protocol_class_for(factory: WebSocketServerFactory, base: type[_Lean]) -> type[_Lean]:
    """A subclass of `base` carrying `factory`'s Autobahn options as class attributes.

    Autobahn copies ~30 options from the factory onto every connection, unless the
    protocol class already has them: give them to a class of this factory's own, once,
    rather than to each of thousands of connections.
    """
    options = {name: getattr(factory, name) for name in base.CONFIG_ATTRS}
    # A function stored on a class becomes a method: keep callables (such as
    # perMessageCompressionAccept) plain functions, as they were on the factory.
    options = {name: staticmethod(value) if callable(value) else value
               for name, value in options.items()}
    options["__module__"] = base.__module__
    return cast("type[_Lean]", type(base.__name__, (base,), options))


# The header of an unmasked, final text frame, by payload length (up to 125).
_SMALL_TEXT_HEADERS = tuple(bytes((0x81, length)) for length in range(126))


def prepare_frame(payload: bytes) -> PreparedMessage:
    """Frame a text message once, for every recipient (server frames are unmasked).

    The same object as PreparedMessage(payload, False, False, False) builds, in a third
    of the time: its constructor is a measurable part of every broadcast.
    tests/test_lean_paths.py compares the two.
    """
    length = len(payload)
    if length < 126:
        header = _SMALL_TEXT_HEADERS[length]
    elif length < 0x10000:
        header = b"\x81\x7e" + length.to_bytes(2, "big")
    else:
        header = b"\x81\x7f" + length.to_bytes(8, "big")
    frame = _new_prepared(PreparedMessage)
    frame.payload = payload
    frame.binary = False
    frame.doNotCompress = False
    frame.payloadHybi = header + payload
    return frame


_new_prepared = object.__new__


#: The wire bytes of a prepared (uncompressed) frame: frame_bytes(frame) (a C-level
#: getter: it runs once per delivery).
frame_bytes: Callable[[PreparedMessage], bytes] = operator.attrgetter("payloadHybi")


# -- process-wide tuning (opt-in) -------------------------------------------------------


def _poll_and_dispatch(reactor: Any, timeout: float | None) -> None:
    """EPollReactor.doPoll without `log.callWithLogger` around each ready socket.

    That wrapper only gives legacy `log.msg` calls made while handling the event a
    "system" prefix (the relay and Autobahn log through twisted.logger, which ignores
    it), at the price of a logPrefix() call, a dict and a context push and pop per
    socket event. What it caught (an exception escaping `_doReadOrWrite`, which
    catches the selectable's own) is still logged with log.err.
    """
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout,
                                      len(reactor._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    turn = turn_state(reactor)
    turn.single = len(events) == 1
    try:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except BaseException:
                    log.err()
    finally:
        turn.single = False


def _run_all(calls: list[Callable[[], object]]) -> None:
    while calls:  # a call may add more: they run too, in this turn
        batch = calls[:]
        calls.clear()
        for call in batch:
            try:
                call()
            except BaseException:
                log.err()


_END_OF_TURN = "_iwrelay_end_of_turn"
_TURN_STATE = "_iwrelay_turn_state"


class TurnState:
    """What the lean dispatch knows of the reactor turn it is handling.

    `single` is True while it handles a turn in which epoll reported one ready socket:
    then nothing else in the turn can add a second frame for a member (but the same
    read), so gathering frames for the end of the turn would only delay them (one room
    of 200: each message arrives in a turn of its own). The relay sets it back to False
    once it has written one message through, so that the next messages of the same read
    (a burst) are gathered as in any other turn: two writes per member at most, not one
    per message. False at any other time, and always on a reactor without
    `lean_reactor_dispatch`.
    """

    __slots__ = ("single",)

    def __init__(self) -> None:
        self.single = False


_NEVER_SINGLE = TurnState()


def turn_state(clock: Any) -> TurnState:
    """`clock`'s TurnState: the lean dispatch's, or one that is never `single`."""
    return cast(TurnState, getattr(clock, _TURN_STATE, _NEVER_SINGLE))


def lean_reactor_dispatch(reactor: Any) -> bool:
    """Make `reactor`'s turn cheaper, when it is Twisted's epoll reactor (False, and
    nothing changed, for any other). Opt-in: the twistd plugin calls it.

    - Ready sockets are handled by `_poll_and_dispatch`.
    - `end_of_turn(reactor)` runs a function once this turn's events are handled (or,
      when it was asked for outside them, by a timed call, before the reactor waits
      again), without the DelayedCall that callLater(0) makes and sorts into the
      timer heap (one per connection: Autobahn's ping timers) every turn.
    - `turn_state(reactor).single` is True while a turn with one ready socket is
      handled: the relay then writes relayed frames at once (see outbox.py).
    Together, about a fifth of the relay's CPU per message in small rooms, and
    three fifths of its instructions per delivery in one room of 200.
    """
    if type(reactor) is not epollreactor.EPollReactor:
        return False
    if hasattr(reactor, _END_OF_TURN):
        return True
    pending: list[Callable[[], object]] = []

    def do_poll(timeout: float | None) -> None:
        _run_all(pending)
        _poll_and_dispatch(reactor, timeout)
        _run_all(pending)

    setattr(reactor, _END_OF_TURN, pending.append)
    setattr(reactor, _TURN_STATE, TurnState())
    for name in ("doPoll", "doIteration"):  # doIteration is doPoll, by another name
        setattr(reactor, name, do_poll)
    return True


def end_of_turn(clock: Any) -> Callable[[Callable[[], object]], object]:
    """A function that runs its argument once the reactor is done with this turn's
    events: the lean one on a reactor given `lean_reactor_dispatch`, else
    callLater(0) (any IReactorTime, task.Clock in tests)."""
    run_later = getattr(clock, _END_OF_TURN, None)
    if run_later is not None:
        return cast("Callable[[Callable[[], object]], object]", run_later)
    return functools.partial(clock.callLater, 0)


_VERBOSE = ("debug", "trace")
_debugging_when_tuned = False


def _debugging() -> bool:
    # Read once, in tune_autobahn(): these helpers run several times per message.
    return _debugging_when_tuned


def _pformat(obj: Any, *args: Any, **kwargs: Any) -> str:
    return pprint.pformat(obj, *args, **kwargs) if _debugging() else ""


def _hltype(obj: Any) -> str:
    if _debugging():
        return util.hltype(obj)
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _hlval(val: Any, *args: Any, **kwargs: Any) -> str:
    return util.hlval(val, *args, **kwargs) if _debugging() else f"{val}"


def tune_autobahn() -> None:
    """Stop Autobahn from formatting debug-log arguments nobody reads (process-wide).

    Autobahn builds the arguments of its debug log calls before the call, whatever the
    log level: on every new connection it pretty-prints its whole configuration
    (`pformat`), and it colours type names and values (`hltype`, `hlval`, through click)
    on several paths: ~40% of the CPU spent per new connection. This replaces those
    helpers, in the Autobahn modules the relay uses, by cheap equivalents that still give
    plain text, and by the real ones whenever txaio's log level is debug or trace.
    Idempotent; call it again after changing txaio's log level. It changes Autobahn for
    the whole process, so the twistd plugin calls it and an embedding application may.
    """
    global _debugging_when_tuned
    # txaio fills in its API at run time (txaio.use_twisted), and the helpers are replaced
    # where the Autobahn modules imported them: the type checker sees neither.
    _debugging_when_tuned = txaio.get_global_log_level() in _VERBOSE  # type: ignore[attr-defined]
    websocket_protocol.pformat = _pformat  # type: ignore[assignment]
    for module in (websocket_protocol, twisted_websocket):
        module.hltype = _hltype  # type: ignore[attr-defined]
        module.hlval = _hlval  # type: ignore[attr-defined]
