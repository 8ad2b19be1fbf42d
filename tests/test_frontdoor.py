"""The front door over real loopback sockets: one strict, bounded parse of each request
head, connections counted from accept, no request bodies, an absolute deadline, proxy
addresses, HTTP hygiene, and no request path in any log line."""

from __future__ import annotations

import io
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher

from iw_relay import logs
from iw_relay.config import RelayConfig
from iw_relay.frontdoor import HeadError, head_end, parse_head
from tests.clients import client_factory, join
from tests.relay_process import TWISTD, RelayProcess, relay_environment, stop_relay

KEY_HEADERS = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def config(**changes) -> RelayConfig:
    return RelayConfig(ping_interval=0, **changes)


def upgrade(target: bytes = b"/room/abc", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + KEY_HEADERS + extra + b"\r\n"


def rss() -> int:
    """This process's resident memory in bytes (the in-process server's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawClient(Protocol):
    """Sends `payload` on connect; `head` fires with what came back once a response head
    (or the end of the connection) arrived; `lost` when the connection is gone."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.received = b""
        self.head: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.head.called:
            self.head.callback(self.received)

    def connectionLost(self, reason: object = None) -> None:
        if not self.head.called:
            self.head.callback(self.received)
        self.lost.callback(None)


async def raw(port: int, payload: bytes = b"", bind: str | None = None) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                  bindAddress=(bind, 0) if bind else None)
    client = RawClient(payload)
    await endpoint.connect(Factory.forProtocol(lambda: client))
    return client


async def exchange(port: int, payload: bytes, bind: str | None = None) -> bytes:
    """Send `payload`, return the response head (and whatever came with it)."""
    client = await raw(port, payload, bind)
    response = await client.head.addTimeout(5, reactor)
    client.transport.abortConnection()
    await client.lost
    return response


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response
    return int(response.split(b" ", 2)[1])


def headers_of(response: bytes) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return found


async def connect_as(port: int, path: str, headers: dict[str, str] | None = None,
                     bind: str | None = None):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                  bindAddress=(bind, 0) if bind else None)
    client = await endpoint.connect(
        client_factory(f"ws://127.0.0.1:{port}{path}", headers=headers))
    await client.opened.addTimeout(5, reactor)
    return client


async def close_all(clients) -> None:
    for client in clients:
        client.sendClose(1000)
    for client in clients:
        await client.closed.addTimeout(5, reactor)


# -- the parser, alone ----------------------------------------------------------------

@pytest.mark.parametrize(("head", "status_code"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),          # duplicated Host
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                # no Host in 1.1
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),                   # malformed Host
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),          # obs-fold
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),                    # space before colon
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),               # bare CR
    (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", 400),                 # NUL
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10737418240\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
])
def test_refused_heads(head, status_code):
    with pytest.raises(HeadError) as refused:
        parse_head(head[:head_end(head)])
    assert refused.value.status == status_code


def test_accepted_heads():
    head = parse_head(b"GET /room/a%2Fb?x=1 HTTP/1.1\nHost: [::1]:3000\nX-Forwarded-For: a\n"
                      b"x-forwarded-for: b\r\nContent-Length: 0\r\nX-Utf8: caf\xc3\xa9\r\n\n")
    assert (head.method, head.target, head.version) == (b"GET", b"/room/a%2Fb?x=1", b"HTTP/1.1")
    assert head.get(b"x-forwarded-for") == b"a, b"
    assert parse_head(b"GET / HTTP/1.0\r\n\r\n").headers == {}
    crlf, lf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.1\nHost: a\n\n"
    assert (head_end(crlf + b"rest"), head_end(lf + b"rest")) == (len(crlf), len(lf))
    assert head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") == -1


# -- defect 4: header smuggling ------------------------------------------------------------

@pytest.mark.parametrize("byte", [b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85",
                                  b"\r", b"\x00"])
@pytest_twisted.ensureDeferred
async def test_a_line_breaking_byte_cannot_forge_x_forwarded_for(serve, byte):
    service, port = await serve(config(trusted_proxies=("127.0.0.0/8",)))
    smuggled = b"X-Note: a" + byte + b"X-Forwarded-For: 198.51.100.66\r\n"
    response = await exchange(port, upgrade(extra=smuggled))
    assert status(response) == 400
    assert "198.51.100.66" not in service.registry.connections.per_address
    assert service.registry.stats.connectionsTotal == 0
    # The same request without the smuggled byte is an ordinary, successful upgrade.
    assert status(await exchange(port, upgrade())) == 101


@pytest_twisted.ensureDeferred
async def test_an_upgrade_with_bare_lf_line_ends_is_refused(serve):
    """Autobahn looks for CRLF CRLF: an LF-only upgrade would wait there for ever."""
    _service, port = await serve(config())
    assert status(await exchange(port, upgrade().replace(b"\r\n", b"\n"))) == 400
    lf_health = b"GET /health HTTP/1.1\nHost: x\n\n"  # plain HTTP may use bare LF
    assert status(await exchange(port, lf_health)) == 200


# -- defect 5: request bodies ------------------------------------------------------------

@pytest.mark.parametrize(("head", "sent"), [
    (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n\r\n", 4),
    (upgrade(extra=b"Content-Length: 209715200\r\n"), 8),
    (upgrade(extra=b"Transfer-Encoding: chunked\r\n"), 4),
])
@pytest_twisted.ensureDeferred
async def test_a_request_body_is_refused_413_without_being_read(serve, head, sent):
    service, port = await serve(config())
    before = rss()
    client = await raw(port, head)
    response = await client.head.addTimeout(5, reactor)  # answered before any body byte
    assert status(response) == 413
    chunk = b"\0" * 2**20
    for _ in range(sent):  # the body the client insists on sending is not kept
        if client.lost.called:
            break
        client.transport.write(chunk)
    await client.lost.addTimeout(5, reactor)
    assert rss() - before < (sent + 8) * 2**20
    assert service.registry.stats.connectionsTotal == 0
    assert service.registry.connections.total == 0


# -- defect 6: an absolute deadline, and half-open connections count --------------------------

class Trickler(Protocol):
    lost = False

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def test_limit_refusals_are_logged_by_limit_at_most_once_a_second(make_relay):
    from twisted.logger import capturedLogs

    relay = make_relay(config(max_connections_per_ip=1))
    relay.join()
    with capturedLogs() as events:
        for _ in range(5):
            relay.connect("/room/abc")
        relay.advance(1.0)
        relay.connect("/room/abc")
    lines = [e for e in events if e.get("reason") == "max-connections-per-ip"]
    assert [line["count"] for line in lines] == [1, 5]
    assert relay.registry.refusals["max-connections-per-ip"] == 6


def test_join_refusals_are_logged_by_reason_at_most_once_a_second(make_relay):
    """A join refused after the handshake (a bad room id, a full room) costs the client
    nothing either: logged as the limits are, one line per reason a second with the
    count, and with no room in it."""
    from twisted.logger import capturedLogs

    relay = make_relay(config(max_room_size=1))
    relay.join("full")
    with capturedLogs() as events:
        for _ in range(5):
            relay.connect("/room/bad%20id")
            relay.connect("/room/full")
        relay.advance(1.0)
        relay.connect("/room/bad%20id")
        relay.connect("/room/full")
    refusals = [e for e in events if "refused" in e.get("log_format", "")]
    assert [(e["reason"], e["count"]) for e in refusals] == [
        ("Invalid room ID format", 1), ("room is full", 1),
        ("Invalid room ID format", 5), ("room is full", 5)]
    assert not [e for e in refusals if "room" in e]


def test_a_head_trickled_a_byte_at_a_time_is_dropped_at_the_deadline(make_relay):
    relay = make_relay(config(handshake_timeout=5))
    trickler = Trickler()
    relay.connect(client=trickler)
    head = upgrade()
    for second in range(1, 50):
        relay.advance(0.5)
        if second < 10:
            assert not trickler.lost, f"dropped after {second / 2} s"
        trickler.transport.write(head[second:second + 1])
        relay.flush()
        if trickler.lost:
            break
    assert trickler.lost and second == 10  # at 5 s, though a byte came every 0.5 s
    assert relay.registry.connections.total == 0


@pytest_twisted.ensureDeferred
async def test_a_trickled_head_is_dropped_at_the_deadline_over_a_real_socket(serve):
    _service, port = await serve(config(handshake_timeout=1.0))
    client = await raw(port)
    head = iter(upgrade())
    trickle = LoopingCall(lambda: client.transport.write(bytes([next(head)])))
    trickle.start(0.05)
    try:
        started = reactor.seconds()
        await client.lost.addTimeout(4, reactor)
        assert reactor.seconds() - started < 2.5
    finally:
        trickle.stop()


@pytest_twisted.ensureDeferred
async def test_300_half_open_connections_from_one_address_hit_its_limit(serve):
    # Loopback is not a proxy here: its connections count against 127.0.0.1 from accept.
    service, port = await serve(config(max_connections_per_ip=64, handshake_timeout=30,
                                       trusted_proxies=("192.0.2.0/24",)))
    refused: list[RawClient] = []
    all_refused: defer.Deferred = defer.Deferred()

    def answered(response: bytes, client: RawClient) -> None:
        refused.append(client)
        if len(refused) == 300 - 64:
            all_refused.callback(None)

    clients = []
    for _ in range(300):
        client = await raw(port, b"GET /room/abc HTTP/1.1\r\n")  # never finished
        client.head.addCallback(answered, client)
        clients.append(client)
    await all_refused.addTimeout(10, reactor)
    for client in refused:
        assert status(client.received) == 503
        assert client.received.endswith(b"Too many connections from this address")
    assert service.registry.refusals["max-connections-per-ip"] == 236
    assert service.registry.connections.per_address["127.0.0.1"] == 64
    # Another address still gets /health and relays.
    health = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", bind="127.0.0.2")
    assert status(health) == 200
    a = await connect_as(port, "/room/other", bind="127.0.0.2")
    b = await connect_as(port, "/room/other", bind="127.0.0.2")
    await b.wait_for(1)
    a.send_json({"type": "op"})
    (_, relayed) = await b.wait_for(2).addTimeout(5, reactor)
    assert relayed["type"] == "op"
    await close_all([a, b])
    for client in clients:
        client.transport.abortConnection()
    await defer.gatherResults([client.lost for client in clients])
    await _until(lambda: service.registry.connections.total == 0)


async def _until(condition) -> None:
    """Let the reactor run (at most 200 turns) until the server has seen every close."""
    from twisted.internet.task import deferLater

    for _ in range(200):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    assert condition()


@pytest_twisted.ensureDeferred
async def test_the_two_limits_are_refused_distinctly(serve):
    service, port = await serve(config(max_connections=2, max_connections_per_ip=0))
    held = [await raw(port), await raw(port)]
    response = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 503
    assert response.endswith(b"Server connection limit reached")
    assert service.registry.refusals["max-connections"] == 1
    for client in held:
        client.transport.abortConnection()
        await client.lost
    await _until(lambda: service.registry.connections.total == 0)


# -- defects 8 and 10: proxies ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_forwarded_for_garbage_never_charges_the_proxy(serve):
    service, port = await serve(config(max_connections_per_ip=1,
                                       trusted_proxies=("127.0.0.0/8",)))
    clients = []
    for forwarded in ("unknown, 203.0.113.7", "198.51.100.10:51234", "x, [2001:db8::7]:443",
                      "203.0.113.8, unknown"):
        client = await connect_as(port, "/room/abc", {"X-Forwarded-For": forwarded})
        await client.wait_for(1)
        clients.append(client)
    assert set(service.registry.connections.per_address) == {
        "203.0.113.7", "198.51.100.10", "2001:db8::7", "unparsed:unknown"}
    await close_all(clients)


@pytest_twisted.ensureDeferred
async def test_a_proxy_on_the_same_host_is_trusted_by_default(serve):
    _service, port = await serve(config(max_connections_per_ip=1))
    clients = []
    for address in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        client = await connect_as(port, "/room/abc", {"X-Forwarded-For": address})
        await client.wait_for(1)
        clients.append(client)
    await close_all(clients)


@pytest_twisted.ensureDeferred
async def test_a_given_trusted_proxy_replaces_the_loopback_default(serve):
    service, port = await serve(config(max_connections_per_ip=1,
                                       trusted_proxies=("10.0.0.0/8",)))
    first = await connect_as(port, "/room/abc", {"X-Forwarded-For": "198.51.100.1"})
    await first.wait_for(1)
    with pytest.raises(ConnectionError, match=r"\[503\]"):
        await connect_as(port, "/room/abc", {"X-Forwarded-For": "198.51.100.2"})
    assert service.registry.refusals["max-connections-per-ip"] == 1
    await close_all([first])


# -- defect 11: HTTP hygiene -----------------------------------------------------------------

@pytest.mark.parametrize("path", [b"/health", b"/stats", b"/", b"/room/abc"])
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"TRACE", b"PATCH",
                                    b"OPTIONS", b"FROB"])
@pytest_twisted.ensureDeferred
async def test_every_method_but_get_and_head_is_405(serve, method, path):
    _service, port = await serve(config())
    response = await exchange(port, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == 405
    headers = headers_of(response)
    assert headers[b"allow"] == [b"GET, HEAD"]
    assert headers[b"x-content-type-options"] == [b"nosniff"]


@pytest.mark.parametrize(("request_line", "code"), [
    (b"GET /health", 200), (b"HEAD /health", 200), (b"GET /stats", 200),
    (b"GET /nowhere", 404), (b"HEAD /room/abc?token=t", 404), (b"GET /bad path", 400),
])
@pytest_twisted.ensureDeferred
async def test_no_twisted_server_header_and_nosniff_everywhere(serve, request_line, code):
    _service, port = await serve(config())
    response = await exchange(port, request_line + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(response) == code
    headers = headers_of(response)
    assert headers.get(b"server", [b"iw-relay"]) == [b"iw-relay"]
    assert b"Twisted" not in response
    assert headers[b"x-content-type-options"] == [b"nosniff"]
    if request_line.startswith(b"HEAD"):
        assert response.endswith(b"\r\n\r\n")  # no body
        assert int(headers[b"content-length"][0]) > 0


# -- defect 3: no room id, token or URI in any log line --------------------------------------

ROOM, TOKEN = "SecretRoomLq27", "tokenZq9p"


def leaks(text: str) -> list[str]:
    return [word for word in (ROOM, TOKEN, "/room/", "room=", "token=", "%20doc", "%23x")
            if word.lower() in text.lower()]


async def secret_requests(port: int) -> None:
    """HEAD with a room and a token, upgrades Autobahn used to log, malformed upgrades."""
    for head in (
        f"HEAD /room/{ROOM}?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"HEAD /x?room={ROOM}&token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        upgrade(f"/room/{ROOM}/my%20doc?token={TOKEN}".encode()),
        upgrade(f"/doc%23x?room={ROOM}".encode()),
        upgrade(f"/room/{ROOM}#frag".encode()),
        upgrade(f"/room/{ROOM}?token={TOKEN}".encode(), b"X-A: \x85B: c\r\n"),
        f"GET /room/{ROOM}?token={TOKEN} HTTP/1.1 x\r\nHost: x\r\n{KEY_HEADERS.decode()}\r\n"
        .encode(),
        f"GET /room/{ROOM}?token={TOKEN} HTTP/1.0\r\nHost: x\r\n{KEY_HEADERS.decode()}\r\n"
        .encode(),
        f"GET /room/{ROOM}?token={TOKEN} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
        .encode(),
    ):
        await exchange(port, head)


@pytest_twisted.ensureDeferred
async def test_no_room_id_token_or_uri_in_logs_in_either_format(serve):
    text, jsonl = io.StringIO(), io.StringIO()
    observers = [logs.make_observer(RelayConfig(log_level="debug", log_format=fmt), out)
                 for fmt, out in (("text", text), ("json", jsonl))]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        _service, port = await serve(config())
        await secret_requests(port)
        alice = await join(reactor, port, ROOM)  # something is logged, under the hash
        await close_all([alice])
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    assert "joined room" in text.getvalue()
    assert all(json.loads(line) for line in jsonl.getvalue().splitlines())
    assert leaks(text.getvalue() + jsonl.getvalue()) == []


def test_library_messages_that_carry_a_request_are_withheld():
    """The observer's backstop, for a relay mounted in another Site (Twisted's HEAD
    warning names the request, URI included)."""
    from twisted.logger import LogLevel

    class FakeRequest:
        def __repr__(self) -> str:
            return f"<Request at 0x1 method=HEAD uri=/room/{ROOM}?token={TOKEN}>"

    for fmt in ("text", "json"):
        out = io.StringIO()
        observer = logs.make_observer(RelayConfig(log_level="debug", log_format=fmt), out)
        observer({"log_namespace": "twisted.web.server.Request", "log_level": LogLevel.info,
                  "log_time": 0.0, "slf": FakeRequest(), "resrc": "r",
                  "log_format": "Warning: HEAD request {slf} for resource {resrc} is "
                                "returning a message body. I think I'll eat it."})
        observer({"log_namespace": "autobahn.websocket.protocol", "log_level": LogLevel.warn,
                  "log_time": 0.0, "reason": f"Bad HTTP request status line "
                                             f"'GET /room/{ROOM}/my doc HTTP/1.1'",
                  "log_format": "failing WebSocket opening handshake ('{reason}')"})
        observer({"log_namespace": "twisted.web.server", "log_level": LogLevel.info,
                  "log_time": 0.0, "log_format": "Site starting on {port}", "port": 3000})
        written = out.getvalue()
        assert leaks(written) == [] and written.count(logs.WITHHELD) == 2
        assert "Site starting on 3000" in written


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_a_twistd_relay_at_debug_logs_no_room_id_token_or_uri(log_format, tmp_path):
    relay = RelayProcess([TWISTD, "-n", "--pidfile=", "iwrelay", "--port",
                          "tcp:0:interface=127.0.0.1", "--log-level", "debug",
                          "--log-format", log_format], relay_environment(None), tmp_path, "p")
    try:
        await relay.wait_listening(1)
        await secret_requests(relay.port)
        alice = await join(reactor, relay.port, ROOM)
        assert await stop_relay(relay, [alice]) == 0
    finally:
        relay.kill()
    output = relay.stdout + relay.stderr
    assert "joined room" in output
    assert leaks(output) == []


# -- defect 7 on the mounted route --------------------------------------------------------------

@pytest.mark.parametrize("path", ["/relay/room/%61bc", "/relay/room/a%2Fb",
                                  "/relay/room/abc%20"])
@pytest_twisted.ensureDeferred
async def test_a_mounted_relay_reads_the_room_id_undecoded(path):
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from iw_relay.service import RelayService
    from tests.clients import connect

    relay = RelayService(config(), listen=False)
    relay.startService()
    root = Resource()
    root.putChild(b"relay", relay.resource)
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    try:
        client = await connect(reactor, listening.getHost().port, path)
        code, reason = await client.closed.addTimeout(5, reactor)
        assert code == 1008 and reason.startswith("Invalid room ID format")
        assert relay.registry.rooms == {}
    finally:
        await listening.stopListening()
        await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_a_mounted_relay_refuses_line_breaking_header_bytes():
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from iw_relay.service import RelayService

    relay = RelayService(config(), listen=False)
    relay.startService()
    root = Resource()
    root.putChild(b"relay", relay.resource)
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    port = listening.getHost().port
    try:
        smuggled = b"X-Note: a\x85X-Forwarded-For: 198.51.100.66\r\n"
        assert status(await exchange(port, upgrade(b"/relay/room/abc", smuggled))) == 400
        assert status(await exchange(port, upgrade(b"/relay/room/abc"))) == 101
        delete = b"DELETE /relay/health HTTP/1.1\r\nHost: x\r\n\r\n"
        assert status(await exchange(port, delete)) == 405
    finally:
        await listening.stopListening()
        await relay.stopService()


def test_the_security_page_is_valid_restructuredtext():
    from pathlib import Path

    docutils_core = pytest.importorskip("docutils.core", reason="docutils is not installed")
    page = Path(__file__).parent.parent / "docs" / "security.rst"
    docutils_core.publish_doctree(
        page.read_text(), settings_overrides={"halt_level": 2, "report_level": 2})


# -- the hand-over: TLS, IPv6, and nothing between the socket and Autobahn ---------------------

@pytest_twisted.ensureDeferred
async def test_upgrades_reach_autobahn_directly_over_tcp(serve):
    service, port = await serve(config())
    a = await join(reactor, port, "direct")
    b = await join(reactor, port, "direct")
    members = list(service.registry.rooms["direct"].members.values())
    for member in members:  # the socket delivers to the WebSocket protocol itself
        assert member.transport.protocol is member
    a.send_json({"type": "op"})
    (_, relayed) = await b.wait_for(2).addTimeout(5, reactor)
    assert relayed["type"] == "op"
    await close_all([a, b])


@pytest_twisted.ensureDeferred
async def test_tls_through_the_front_door(tmp_path):
    import trustme
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    from iw_relay.service import RelayService
    from tests.clients import connect

    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    service = RelayService(config(), listen=False)
    service.startService()
    listening = await serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    ).listen(service.front_door)
    port = listening.getHost().port
    trust = optionsForClientTLS("localhost", Certificate.loadPEM(ca.cert_pem.bytes()))
    try:
        a = await connect(reactor, port, "/room/tls", tls_options=trust)
        b = await connect(reactor, port, "/room/tls", tls_options=trust)
        await b.wait_for(1)
        for member in service.registry.rooms["tls"].members.values():
            assert member.transport.wrappedProtocol is member
        a.send_json({"type": "op"})
        (_, relayed) = await b.wait_for(2).addTimeout(5, reactor)
        assert relayed["type"] == "op"
        await close_all([a, b])
    finally:
        await listening.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_proxy_protocol_port_counts_the_client_it_names():
    from twisted.internet.endpoints import serverFromString

    from iw_relay.service import RelayService

    # Loopback is no trusted proxy here: the PROXY header alone names the client.
    service = RelayService(config(max_connections_per_ip=1,
                                  trusted_proxies=("192.0.2.0/24",)), listen=False)
    service.startService()
    listening = await serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1").listen(
        service.front_door)
    port = listening.getHost().port
    try:
        clients = []
        for source in ("203.0.113.9", "203.0.113.10"):
            client = await raw(port, f"PROXY TCP4 {source} 127.0.0.1 5555 {port}\r\n".encode()
                               + upgrade())
            assert status(await client.head.addTimeout(5, reactor)) == 101
            clients.append(client)
        assert dict(service.registry.connections.per_address) == {
            "203.0.113.9": 1, "203.0.113.10": 1}
        for client in clients:
            client.transport.abortConnection()
            await client.lost
        await _until(lambda: service.registry.connections.total == 0)
    finally:
        await listening.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_ipv6_through_the_front_door():
    from twisted.internet.endpoints import TCP6ServerEndpoint

    from iw_relay.service import RelayService

    service = RelayService(config(max_connections_per_ip=1), listen=False)
    service.startService()
    listening = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(
        service.front_door)
    port = listening.getHost().port
    try:
        clients = []
        for _ in range(2):
            endpoint = TCP6ClientEndpoint(reactor, "::1", port, timeout=5)
            client = await endpoint.connect(
                client_factory(f"ws://[::1]:{port}/room/six",
                               headers={"X-Forwarded-For": f"2001:db8::{len(clients) + 1}"}))
            await client.wait_for(1).addTimeout(5, reactor)
            clients.append(client)
        assert set(service.registry.connections.per_address) == {"2001:db8::1", "2001:db8::2"}
        await close_all(clients)
    finally:
        await listening.stopListening()
        await service.stopService()


@pytest.mark.parametrize(("extra", "code"), [
    (b"Origin: https://evil.example\r\n", 403),           # refused by the relay's _admit
    (b"Sec-WebSocket-Version: 12\r\n", 400),            # refused by Autobahn's handshake
])
@pytest_twisted.ensureDeferred
async def test_websocket_refusals_are_answered_like_the_front_doors(serve, extra, code):
    _service, port = await serve(config(allowed_origins=("https://editor.example.org",)))
    head = upgrade(b"/room/abc", extra)
    if b"Version" in extra:
        head = head.replace(b"Sec-WebSocket-Version: 13\r\n", b"", 1)
    response = await exchange(port, head)
    assert status(response) == code
    headers = headers_of(response)
    assert headers[b"server"] == [b"iw-relay"]
    assert headers[b"x-content-type-options"] == [b"nosniff"]
    assert headers[b"content-type"] == [b"text/plain"]
    assert int(headers[b"content-length"][0]) > 0
    if code == 400:  # Autobahn's own header, kept: the versions it speaks
        assert headers[b"sec-websocket-version"]
