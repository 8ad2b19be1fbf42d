"""iw_relay._autobahn: its import-time check, its opt-in process-wide tuning, and each
lean path run against Autobahn's own (writes and their order, pongs, closes) on the same
random scripts: what clients observe and what the relay counts must be the same.
(tests/test_fastframe.py does the same for incoming frames.)"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from autobahn.twisted import websocket as twisted_websocket
from autobahn.websocket import protocol as websocket_protocol
from autobahn.websocket.protocol import WebSocketServerProtocol
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone

import iw_relay
from iw_relay import _autobahn
from iw_relay.config import RelayConfig
from iw_relay.protocol import RelayServerProtocol
from iw_relay.service import RelayService
from tests.clients import MemoryRelay

# -- the import-time check ---------------------------------------------------------------


def test_the_installed_autobahn_has_everything_relied_on():
    _autobahn.check_internals()


def test_a_missing_class_attribute_fails_loudly(monkeypatch):
    monkeypatch.setattr(_autobahn, "_RELIED_ON", (
        *_autobahn._RELIED_ON, (WebSocketServerProtocol, "processDataRenamed")))
    with pytest.raises(ImportError, match=r"26\.10.*WebSocketServerProtocol\."
                                          r"processDataRenamed"):
        _autobahn.check_internals()


def test_a_missing_instance_attribute_fails_loudly(monkeypatch):
    monkeypatch.setattr(_autobahn, "_SET_BY", (
        *_autobahn._SET_BY, (websocket_protocol.WebSocketProtocol._connectionMade,
                             "frame_parser_state")))
    with pytest.raises(ImportError, match=r"_connectionMade setting self\."
                                          r"frame_parser_state"):
        _autobahn.check_internals()


# -- process-wide tuning is opt-in ---------------------------------------------------------


def test_building_the_relay_leaves_autobahn_as_it_was(monkeypatch):
    originals = {(module, name): getattr(module, name)
                 for module in (websocket_protocol, twisted_websocket)
                 for name in ("hltype", "hlval")}
    originals[(websocket_protocol, "pformat")] = websocket_protocol.pformat
    for (module, name), value in originals.items():  # as if never tuned in this process
        monkeypatch.setattr(module, name, getattr(_autobahn.util, name, value))
    before = {key: getattr(*key) for key in originals}
    RelayService(RelayConfig(ping_interval=0), listen=False)
    assert {key: getattr(*key) for key in originals} == before
    iw_relay.tune_autobahn()  # what the twistd plugin's makeService calls
    assert websocket_protocol.pformat is _autobahn._pformat
    assert twisted_websocket.hltype is _autobahn._hltype


def test_the_twistd_plugin_tunes_autobahn_and_the_reactor(monkeypatch):
    """makeService (what `twistd iwrelay` runs) opts in to both process-wide changes."""
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from iw_relay import tap

    calls = []
    monkeypatch.setattr(tap, "tune_autobahn", lambda: calls.append("tune_autobahn"))
    monkeypatch.setattr(tap, "lean_reactor_dispatch", calls.append)
    options = tap.Options(environ={}, reactor=Clock())
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
    tap.makeService(options)
    assert calls == ["tune_autobahn", reactor]


# -- lean paths against Autobahn's own -------------------------------------------------------

ACTIONS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from("ab"), st.integers(0, 3)),
    st.tuples(st.just("ping"), st.sampled_from("ab"), st.binary(max_size=20)),
    st.tuples(st.just("junk"), st.sampled_from("ab")),          # an error reply
    st.tuples(st.just("flush"),),
    st.tuples(st.just("advance"), st.sampled_from([0.3, 1.0])),
    st.tuples(st.just("close"), st.sampled_from("ab")),
    st.tuples(st.just("shutdown"),),
)


def run(script, lean: bool, write_through: bool = False) -> dict:
    """`write_through`: every reactor turn counts as one with a single ready socket, so
    that relayed frames are written at once when nothing waits before them."""
    RelayServerProtocol.lean_writes = lean
    relay = MemoryRelay(RelayConfig(ping_interval=0, rate_limit=4, flood_windows=2,
                                    shutdown_timeout=1.0))
    if write_through:
        relay.service.front_door.websocket.turn = _single_turn()
    try:
        clients = {"a": relay.join(), "b": relay.join()}
        names = {c.received[0]["connectionId"]: name for name, c in clients.items()}
        seen = {name: [] for name in clients}
        for name, client in clients.items():
            def on_message(payload, is_binary, name=name):
                message = json.loads(payload)
                message.pop("timestamp", None)
                if "connectionId" in message:
                    message["connectionId"] = names.get(message["connectionId"])
                seen[name].append(("message", message))

            client.onMessage = on_message
            client.onPong = lambda payload, name=name: seen[name].append(("pong", payload))
        for action, *args in script:
            client = clients[args[0]] if args and args[0] in clients else None
            if client is not None and client.state != client.STATE_OPEN:
                continue
            if action == "send":
                for n in range(args[1]):
                    client.send_json({"type": "op", "n": n})
            elif action == "ping":
                client.sendPing(args[1])
            elif action == "junk":
                client.sendMessage(b"not json")
            elif action == "flush":
                relay.flush()
            elif action == "advance":
                relay.advance(args[0])
            elif action == "close":
                client.sendClose(1000)
            elif action == "shutdown":
                relay.service.registry.stopService()
        relay.flush()
        relay.advance(3)
        stats = relay.registry.stats
        return {
            "seen": seen,
            "closes": {name: (c.close_code, c.close_reason) for name, c in clients.items()},
            "counters": (stats.messagesRelayed, stats.disconnectionsTotal,
                         stats.rateLimitsHit, stats.bytesReceived, stats.bytesSent),
        }
    finally:
        relay.close()
        RelayServerProtocol.lean_writes = True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, min_size=1, max_size=12))
@example([("junk", "a"), ("ping", "a", b"x")])  # a pong after a queued reply
@example([("send", "b", 2), ("ping", "a", b"p"), ("junk", "a"), ("flush",),
          ("advance", 1.0), ("send", "a", 6), ("ping", "a", b"q")])  # a flood's close
@example([("send", "a", 2), ("shutdown",), ("ping", "b", b"s")])
def test_lean_writes_pongs_and_closes_behave_like_autobahns(script):
    autobahns = run(script, lean=False)
    assert run(script, lean=True) == autobahns
    assert run(script, lean=True, write_through=True) == autobahns


def _single_turn() -> _autobahn.TurnState:
    turn = _autobahn.TurnState()
    turn.single = True
    return turn


def members_in_a_single_turn(relay, count: int):
    """`count` members joined, their factory in a turn with one ready socket: the
    factory, the server side of each and the client side of each, in joining order."""
    clients = [relay.join() for _ in range(count)]
    factory = relay.service.front_door.websocket
    factory.turn = _single_turn()
    servers = {server.connection_id: server for server in relay.servers}
    return factory, [servers[c.received[0]["connectionId"]] for c in clients], clients


def test_write_through_writes_at_once_and_behind_what_is_queued(relay):
    """In a turn with one ready socket a relayed frame is written at once (no end-of-turn
    pass) to a member with nothing queued; behind a queued frame it is queued after it;
    to a paused member it goes to the backlog. Through the fan-out and deliver() alike."""
    from iw_relay.protocol import prepare_frame

    factory, (server_a, server_b), (_, b) = members_in_a_single_turn(relay, 2)
    written = server_b.transport.stream
    before = len(written)
    relay.registry.broadcast(server_a, b'{"type":"op","n":1}')
    factory.turn.single = True  # (written through: a burst's next message is gathered)
    server_b.deliver(prepare_frame(b'{"type":"op","n":2}'))
    assert factory.flusher.dirty == [] and server_b._outbox is None
    assert written[before:] == [b'\x81\x13{"type":"op","n":1}', b'\x81\x13{"type":"op","n":2}']
    server_b.enqueue(b'\x81\x0c{"type":"q"}')  # already queued for b this turn
    factory.turn.single = True
    relay.registry.broadcast(server_a, b'{"type":"op","n":3}')
    factory.turn.single = True
    server_b.deliver(prepare_frame(b'{"type":"op","n":4}'))
    assert factory.flusher.dirty == [server_b] and len(server_b._outbox) == 3
    relay.flush()
    assert [(m["type"], m.get("n")) for m in b.received[-5:]] == [
        ("op", 1), ("op", 2), ("q", None), ("op", 3), ("op", 4)]
    server_b.pauseProducing()  # b's socket buffer is full
    before = len(written)
    factory.turn.single = True
    relay.registry.broadcast(server_a, b'{"type":"op","n":5}')
    assert written[before:] == [] and server_b._backlog == [b'\x81\x13{"type":"op","n":5}']


def test_a_burst_in_one_read_is_written_through_once_then_gathered(relay):
    """Several messages from the one ready socket's read: the first goes out at once,
    the others are gathered for the end of the turn (one write per member for all of
    them, not one per message), in order."""
    factory, (server_a, server_b), (_, b) = members_in_a_single_turn(relay, 2)
    written = server_b.transport.stream
    before = len(written)
    for n in range(1, 5):
        relay.registry.broadcast(server_a, b'{"type":"op","n":%d}' % n)
    assert written[before:] == [b'\x81\x13{"type":"op","n":1}']
    assert not factory.turn.single and len(server_b._outbox) == 3
    relay.flush()
    assert len(written) == before + 2
    assert [m.get("n") for m in b.received[-4:]] == [1, 2, 3, 4]


def test_a_member_whose_write_through_fails_is_closed_with_1011(relay, logged_failures):
    """The registry's one delivery-failure rule holds for the fan-out's write-through
    too: the failure is logged, the member closed with 1011, and the others still get
    the frame."""
    _, (server_a, server_b, server_c), (_, b, _) = members_in_a_single_turn(relay, 3)
    write, failures = server_b.transport.write, []

    def fails_once(data):
        if not failures:
            failures.append(data)
            raise RuntimeError("broken transport")
        write(data)

    server_b.transport.write = fails_once
    seen_by_c = len(server_c.transport.stream)
    relay.registry.broadcast(server_a, b'{"type":"op","n":1}')
    assert server_c.transport.stream[seen_by_c] == b'\x81\x13{"type":"op","n":1}'
    assert len(logged_failures.take()) == 1
    relay.flush()
    assert b.close_code == 1011
    assert relay.registry.closes[1011] == 1


def test_the_comparison_sees_pongs_order_and_closes():
    """The runner observes what the property compares (so that it can fail)."""
    result = run([("ping", "a", b"1"), ("send", "b", 2), ("ping", "a", b"2"),
                  ("send", "a", 5), ("flush",), ("advance", 1.0), ("send", "a", 5),
                  ("flush",)],
                 lean=True)
    seen_by_a = result["seen"]["a"]
    assert ("pong", b"1") in seen_by_a and ("pong", b"2") in seen_by_a
    assert [m["n"] for kind, m in seen_by_a if kind == "message" and m["type"] == "op"] == [
        0, 1]
    assert result["closes"]["a"] == (1008, "Rate limit exceeded")


def test_pongs_answering_nothing_are_not_logged_one_by_one(make_relay):
    """Autobahn warns once per pong that does not answer its pending ping: a client could
    fill the log at will (up to its rate limit)."""
    from twisted.logger import globalLogPublisher

    relay = make_relay(RelayConfig(ping_interval=5, ping_timeout=4))
    client = relay.join()
    client.onPing = lambda payload: None  # it does not answer the server's pings
    relay.advance(5)  # the server's ping is pending now
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for n in range(5):
            client.sendPong(b"%d" % n)
        relay.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "pong" in str(e.get("log_format", "")).lower()]
    assert relay.servers[0].autoPingPending  # (still pending: the real pong never came)


def test_an_open_connection_carries_only_what_differs_from_its_class(relay):
    client = relay.join()
    server = relay.servers[0]
    state = vars(server)
    assert len(state) < 30  # Autobahn sets ~65
    assert not set(state) & set(_autobahn._OPEN_DEFAULTS)
    assert server.wasClean is False and server.http_request_uri is None  # from the class
    client.sendClose(1000)
    relay.flush()
    assert server.wasClean is True and vars(server)["wasClean"] is True  # written back
    assert type(server).wasClean is False


def test_prepare_frame_builds_what_autobahn_builds():
    from autobahn.websocket.protocol import PreparedMessage

    from iw_relay._autobahn import prepare_frame
    for length in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
        assert vars(prepare_frame(payload)) == vars(
            PreparedMessage(payload, False, False, False)), length


def test_an_idle_open_connection_holds_ten_attributes_at_most(relay):
    """Autobahn's futures, UTF-8 validator, traffic counts, transport details and peer
    are made again on first use; a dict of up to 10 keys is the 16-slot size."""
    relay.join()
    server = relay.servers[0]
    assert len(vars(server)) <= 10, sorted(vars(server))
    assert server.peer.startswith("tcp4:127.0.0.1:")  # made again when read
    assert server.trafficStats.incomingWebSocketMessages == 0
    closed = server.is_closed
    assert not closed.called and server.is_open.called


def test_lazily_made_attributes_serve_autobahns_own_paths(relay):
    """A fragmented text message (Autobahn's parser: UTF-8 validator, traffic counts,
    the "message" event) and a close (is_closed) after the connection was compacted."""
    sender, peer = relay.join(), relay.join()
    server = relay.servers[0]
    closed = server.is_closed
    sender.beginMessage(isBinary=False)
    for part in (b'{"type":"x",', b'"a":"\xc3', b'\xa9"}'):  # é split between frames
        sender.beginMessageFrame(len(part))
        sender.sendMessageFrameData(part)
    sender.endMessage()
    relay.flush()
    assert peer.received[-1]["a"] == "\u00e9"
    assert server.trafficStats.incomingWebSocketMessages == 1
    sender.sendClose(1000)
    relay.flush()
    assert closed.called and server.is_closed is closed


# -- the reactor's dispatch ------------------------------------------------------------------


class _Reader:
    """A selectable on one end of a socket pair that records what the reactor makes of
    each event: doRead, and connectionLost with its reason when doRead says so."""

    def __init__(self, sock, outcome):
        self.sock = sock
        self.outcome = outcome  # None, a reason to return, or an exception to raise
        self.seen = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "reader"

    def doRead(self):
        self.seen.append(("read", self.sock.recv(100)))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def connectionLost(self, reason):
        self.seen.append(("lost", reason.type.__name__))


def _dispatch(lean, outcome):
    import socket

    from twisted.internet import epollreactor

    reactor = epollreactor.EPollReactor()
    if lean:
        assert _autobahn.lean_reactor_dispatch(reactor)
    mine, theirs = socket.socketpair()
    try:
        reader = _Reader(mine, outcome)
        reactor.addReader(reader)
        theirs.send(b"ready")
        reactor.doIteration(0)
        reactor.doIteration(0)  # nothing more to read: no second doRead
        return reader.seen, reader in reactor.getReaders()
    finally:
        mine.close()
        theirs.close()
        reactor._poller.close()


@pytest.mark.parametrize("outcome", [None, ConnectionDone(), ValueError("bug")],
                         ids=["read", "reason", "raises"])
def test_the_lean_dispatch_does_what_twisteds_does(outcome):
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        theirs = _dispatch(False, outcome)
        errors_theirs = sum(1 for event in logged if event.get("isError"))
        lean = _dispatch(True, outcome)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert lean == theirs
    assert sum(1 for event in logged if event.get("isError")) == 2 * errors_theirs
    assert theirs[0][0] == ("read", b"ready")


def test_the_lean_dispatch_is_only_for_the_epoll_reactor():
    assert _autobahn.lean_reactor_dispatch(object()) is False


def test_end_of_turn_runs_after_the_turns_events_and_before_the_reactor_waits():
    import socket

    from twisted.internet import epollreactor

    reactor = epollreactor.EPollReactor()
    assert _autobahn.lean_reactor_dispatch(reactor)
    run_after_turn = _autobahn.end_of_turn(reactor)
    mine, theirs = socket.socketpair()
    try:
        reader = _Reader(mine, None)

        def read_then_ask():
            reader.seen.append(("read", mine.recv(100)))
            run_after_turn(lambda: reader.seen.append("after"))

        reader.doRead = read_then_ask
        reactor.addReader(reader)
        # Asked for outside the events (as a timed call would): runs before the wait,
        # here making the socket readable for the same iteration.
        run_after_turn(lambda: (reader.seen.append("before"), theirs.send(b"x")))
        reactor.doIteration(5)  # would wait 5 s if the pending call ran after the poll
        assert reader.seen == ["before", ("read", b"x"), "after"]
    finally:
        mine.close()
        theirs.close()
        reactor._poller.close()


def test_a_turn_is_single_while_its_one_ready_socket_is_handled():
    import socket

    from twisted.internet import epollreactor

    reactor = epollreactor.EPollReactor()
    assert _autobahn.lean_reactor_dispatch(reactor)
    turn = _autobahn.turn_state(reactor)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        seen = []
        for mine, _ in pairs:
            reader = _Reader(mine, None)
            reader.doRead = lambda mine=mine: seen.append((mine.recv(100), turn.single))
            reactor.addReader(reader)
        pairs[0][1].send(b"one")
        reactor.doIteration(0)
        assert seen == [(b"one", True)] and not turn.single
        for _, theirs in pairs:
            theirs.send(b"two")
        reactor.doIteration(0)
        assert seen[1:] == [(b"two", False), (b"two", False)] and not turn.single
    finally:
        for sockets in pairs:
            for sock in sockets:
                sock.close()
        reactor._poller.close()


def test_a_turn_is_never_single_on_other_clocks():
    from twisted.internet.task import Clock

    assert not _autobahn.turn_state(Clock()).single


def test_end_of_turn_is_a_zero_delay_call_on_other_clocks():
    from twisted.internet.task import Clock

    clock, ran = Clock(), []
    _autobahn.end_of_turn(clock)(lambda: ran.append(1))
    assert ran == []
    clock.advance(0)
    assert ran == [1]
@pytest.mark.parametrize("lean", [True, False])
def test_the_101_goes_out_with_connected_in_one_write(relay, monkeypatch, lean):
    """The 101 waits for the joiner's first frame: one write (no writer to register, no
    second send); Autobahn's own path writes them apart. A refusal still gets its answer."""
    from twisted.test import iosim

    writes: list[bytes] = []
    write = iosim.FakeTransport.write

    def recording(transport, data):
        if transport.isServer:
            writes.append(data)
        write(transport, data)

    monkeypatch.setattr(iosim.FakeTransport, "write", recording)
    monkeypatch.setattr(RelayServerProtocol, "lean_writes", lean)
    relay.join()
    assert writes[0].startswith(b"HTTP/1.1 101 ")
    assert (b'"type":"connected"' in writes[0]) is lean
    writes.clear()
    refused = relay.connect("/room/bad%20id")  # refused after the handshake: 1008
    assert refused.close_code == 1008 and writes[0].startswith(b"HTTP/1.1 101 ")
    assert b"".join(writes).split(b"\r\n\r\n", 1)[1][0] == 0x88  # then the close frame


def test_connection_made_sets_what_autobahns_does_but_the_details_made_later(relay):
    """The same state as after Autobahn's own connectionMade; the transport details,
    made on first use, equal the ones Autobahn makes at once, and so does the peer."""
    from twisted.internet.address import IPv4Address
    from twisted.test import iosim

    def connected(autobahns: bool):
        protocol = relay.service.front_door.websocket.buildProtocol(None)
        transport = iosim.FakeTransport(
            protocol, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 3000),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40001))
        if autobahns:
            protocol.connected, protocol.transport = 1, transport  # as makeConnection does
            twisted_websocket.WebSocketAdapterProtocol.connectionMade(protocol)
            protocol.send_queue = _autobahn._NO_SEND_QUEUE
        else:
            protocol.makeConnection(transport)
        return protocol

    def shape(protocol):
        return {name: value if isinstance(value, (int, float, str, bytes, type(None)))
                else type(value) for name, value in vars(protocol).items()}

    lean, autobahns = connected(False), connected(True)
    made_later = {"_transport_details"}
    assert not made_later & set(vars(lean))
    assert made_later <= set(vars(autobahns))
    assert shape(lean) == {name: value for name, value in shape(autobahns).items()
                           if name not in made_later}
    assert lean.peer == autobahns.peer == "tcp4:198.51.100.7:40001"
    assert lean._transport_details.marshal() == autobahns._transport_details.marshal()


# -- write_now_each: a fan-out's writes on real loopback sockets -------------------------------


async def _tcp_connections(count: int):
    """`count` loopback TCP connections: the server side's transports, the client
    side's protocols (each keeps what it read in `.data`) and a cleanup coroutine."""
    from twisted.internet import protocol, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

    from tests.helpers import until

    servers: list = []

    class Server(protocol.Protocol):
        def connectionMade(self):
            servers.append(self)

    class Reader(protocol.Protocol):
        def __init__(self):
            self.data = b""

        def dataReceived(self, data):
            self.data += data

    factory = protocol.Factory.forProtocol(Server)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    readers = [Reader() for _ in range(count)]
    for reader in readers:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                              reader)
    await until(lambda: len(servers) == count, "every connection accepted")

    async def close():
        for server in servers:
            server.transport.loseConnection()
        await port.stopListening()

    return [server.transport for server in servers], readers, close


@pytest_twisted.ensureDeferred
async def test_write_now_each_sends_at_once_and_behind_what_twisted_holds():
    """An idle plain TCP transport gets the bytes by send() at once; one with bytes in
    Twisted's buffer gets them behind those; what the socket does not take is buffered
    in order. Each reader sees its bytes in the order written."""
    from tests.helpers import until

    (idle, busy), readers, close = await _tcp_connections(2)
    try:
        busy.write(b"held;")  # in Twisted's buffer until the reactor's next turn
        failed: list = []
        _autobahn.write_now_each([idle, busy], b"frame;", failed.append)
        assert not idle.dataBuffer and not idle._tempDataBuffer  # sent, not buffered
        assert busy._tempDataBuffer  # queued behind "held;"
        large = b"x" * (8 << 20)  # more than a loopback socket takes at once
        _autobahn.write_now_each([idle], large, failed.append)
        assert idle._tempDataBuffer or idle.dataBuffer
        _autobahn.write_now_each([idle], b";end", failed.append)
        assert failed == []
        await until(lambda: readers[1].data == b"held;frame;", "the busy reader's bytes")
        await until(lambda: len(readers[0].data) == 6 + len(large) + 4, "the large write",
                    timeout=30)
        assert readers[0].data == b"frame;" + large + b";end"
    finally:
        await close()


@pytest_twisted.ensureDeferred
async def test_write_now_each_goes_on_past_a_full_socket_and_a_failing_transport():
    """A socket that takes nothing has the bytes buffered by Twisted, in order; a
    transport whose write raises is given to `failed`; the sockets after either still
    get theirs at once."""
    from tests.helpers import until

    (first, full, last), readers, close = await _tcp_connections(3)
    try:
        filler = 0
        while True:  # the reader is not read meanwhile: its buffers fill up
            try:
                filler += full.socket.send(b"x" * 65536)
            except BlockingIOError:
                break
        write, failed = full.write, []

        def fails(data):
            raise RuntimeError("broken transport")

        full.write = fails
        _autobahn.write_now_each([first, full, last], b"frame;", failed.append)
        assert failed == [full]
        full.write = write
        _autobahn.write_now_each([first, full, last], b"next;", failed.append)
        assert failed == [full]
        for transport in (first, last):  # sent at once both times, nothing buffered
            assert not transport.dataBuffer and not transport._tempDataBuffer
        assert full._tempDataBuffer == [b"next;"]
        await until(lambda: len(readers[1].data) == filler + 5, "the full socket's bytes",
                    timeout=30)
        assert readers[1].data == b"x" * filler + b"next;"  # "frame;" was not written
        await until(lambda: readers[0].data == readers[2].data == b"frame;next;",
                    "the others' bytes")
    finally:
        await close()
