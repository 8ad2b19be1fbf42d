"""End to end: a real `twistd -n iwrelay` process, real clients over loopback sockets.

Each test starts its own relay process on 127.0.0.1 (port 0, the port read back from the
"starting on N" log line, or a free port found by the test when the log level hides that
line), waits for it by polling (bounded by a deadline), and stops it with a signal; the
`spawn` fixture (conftest.py) kills whatever is still running at teardown.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater

from iw_relay.registry import room_hash
from tests.clients import RelayClient, connect, join
from tests.helpers import (
    NOT_FOUND_TEXT,
    SHUTDOWN_MESSAGE,
    free_port,
    get_json,
    http_get,
    now_ms,
    until,
    within,
)
from tests.relay_process import (
    LOOPBACK,
    TWISTD,
    assert_exited_by,
    relay_environment,
    script,
    start_relay,
    stop_relay,
)

ROOM_ID_REQUIRED = "Room ID required. Use /room/{roomId} or /?room={roomId}"
ROOM_ID_INVALID = (
    "Invalid room ID format. Use alphanumeric characters, dash, or underscore only."
)
CONNECTION_ID = re.compile(r"^[0-9a-f]{16}$")


# -- HTTP and raw WebSocket helpers --------------------------------------------------------


async def stats_when(port: int, ready: Callable[[dict[str, Any]], bool],
                     what: str) -> dict[str, Any]:
    """Poll /stats until `ready(stats)`; every snapshot must keep the counter invariant."""
    deadline = time.monotonic() + 10
    while True:
        stats = await get_json(port, "/stats")
        assert (stats["connectionsTotal"] - stats["disconnectionsTotal"]
                == stats["currentConnections"]), stats
        if ready(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats never showed {what}: {stats}")
        await deferLater(reactor, 0.02, lambda: None)


def websocket_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked server frames in `data`."""
    frames, at = [], 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length in (126, 127):
            size = 2 if length == 126 else 8
            length = int.from_bytes(data[at:at + size], "big")
            at += size
        frames.append((opcode, data[at:at + length]))
        at += length
    return frames


class SilentPeer(Protocol):
    """Does the opening handshake by hand, then never answers anything, not even a close."""

    def __init__(self, port: int, path: str) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.data = b""
        self.upgraded: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.upgraded.called and b"\r\n\r\n" in self.data:
            self.upgraded.callback(self.data.split(b"\r\n", 1)[0])

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)

    def frames(self) -> list[tuple[int, bytes]]:
        return websocket_frames(self.data.split(b"\r\n\r\n", 1)[1])


async def silent_peer(port: int, path: str) -> SilentPeer:
    peer = SilentPeer(port, path)
    await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer))
    status = await within(peer.upgraded)
    assert status == b"HTTP/1.1 101 Switching Protocols", status
    return peer


async def barrier(client: RelayClient) -> None:
    """Send junk and wait for its PARSE_ERROR: anything the relay wrote to this client
    before it read the junk has arrived by then."""
    count = len(client.received)
    client.sendMessage(b"barrier: not JSON")
    received = await within(client.wait_for(count + 1))
    assert received[count]["code"] == "PARSE_ERROR", received[count:]


def ops(client: RelayClient) -> list[dict[str, Any]]:
    return client.messages_of("op")


# -- rooms and relaying ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_messages_reach_only_the_other_members_of_the_same_room(spawn):
    relay = await start_relay(spawn, "--port", LOOPBACK)
    port = relay.port

    a1 = await join(reactor, port, "roomA")
    hello = a1.received[0]
    assert set(hello) == {"type", "connectionId", "roomId", "userCount", "peers"}
    assert (hello["type"], hello["roomId"], hello["userCount"]) == ("connected", "roomA", 1)
    assert CONNECTION_ID.match(hello["connectionId"])
    a2 = await join(reactor, port, "roomA")
    # The query form, with a percent-encoded dash, joins room "room-B_2".
    b1 = await connect(reactor, port, "/?room=room%2DB_2")
    await within(b1.wait_for(1))
    # Extra path segments are ignored and the path form wins over the query.
    a3 = await connect(reactor, port, "/room/roomA/ignored/extra?room=other")
    await within(a3.wait_for(1))
    b2 = await join(reactor, port, "room-B_2")
    # Room ids are case-sensitive: "rooma" is a room of its own.
    c1 = await join(reactor, port, "rooma")

    rooms = {"roomA": [a1, a2, a3], "room-B_2": [b1, b2], "rooma": [c1]}
    ids = {}
    for room, members in rooms.items():
        for count, member in enumerate(members, 1):
            connected = member.received[0]
            assert connected["roomId"] == room
            assert connected["userCount"] == count
            ids[member] = connected["connectionId"]
    assert len(set(ids.values())) == 6
    # Each earlier member heard of each later one, with the count after the join.
    await within(a1.wait_for(3))
    await within(a2.wait_for(2))
    await within(b1.wait_for(2))
    assert a1.received[1:3] == [
        {"type": "user-joined", "connectionId": ids[a2], "userCount": 2},
        {"type": "user-joined", "connectionId": ids[a3], "userCount": 3},
    ]
    assert a2.received[1] == {"type": "user-joined", "connectionId": ids[a3], "userCount": 3}
    assert b1.received[1] == {"type": "user-joined", "connectionId": ids[b2], "userCount": 2}
    assert len(a3.received) == len(b2.received) == len(c1.received) == 1

    before = now_ms()
    already = {member: len(member.received) for members in rooms.values() for member in members}
    names = {}
    for room, members in rooms.items():
        for number, member in enumerate(members):
            names[member] = f"{room}/{number}"
            member.send_json({"type": "op", "from": names[member], "connectionId": "forged",
                              "nested": {"list": [1, 2.5, None, True], "text": "é ✓"}})
    # A lone surrogate escape (an emoji split by the editor) is relayed unchanged.
    a1.sendMessage(b'{"type":"op","from":"roomA/0","text":"\\ud83d"}')
    sent = 7
    expected = {  # member -> number of ops it must receive
        a1: 2, a2: 3, a3: 3, b1: 1, b2: 1, c1: 0,
    }
    for member, count in expected.items():
        await within(member.wait_for(already[member] + count))
    await stats_when(port, lambda s: s["messagesRelayed"] == sent, f"{sent} relayed")
    for member in expected:
        await barrier(member)
    after = now_ms()

    for members in rooms.values():
        for member in members:
            got = ops(member)
            assert len(got) == expected[member]
            senders = {m["from"] for m in got}
            assert senders == {names[m] for m in members if m is not member}
            for message in got:
                sender = next(m for m in members if names[m] == message["from"])
                assert message["connectionId"] == ids[sender]
                assert isinstance(message["timestamp"], int)
                assert before - 1000 <= message["timestamp"] <= after + 1000
                if "nested" in message:
                    assert message["nested"] == {"list": [1, 2.5, None, True],
                                                 "text": "é ✓"}
    # No join was announced across rooms either.
    joined = {a1: [a2, a3], a2: [a3], a3: [], b1: [b2], b2: [], c1: []}
    for member, later in joined.items():
        assert [m["connectionId"] for m in member.messages_of("user-joined")] == [
            ids[m] for m in later]
    surrogate = [raw for raw in a2.raw if b"\\ud83d" in raw]
    assert len(surrogate) == 1 and surrogate == [raw for raw in a3.raw if b"\\ud83d" in raw]

    # A clean close and a dropped TCP connection each give exactly one user-left.
    seen = len(a1.received)
    a2.sendClose(1000)
    await within(a2.closed)
    await within(a1.wait_for(seen + 1))
    assert a1.received[seen] == {"type": "user-left", "connectionId": ids[a2], "userCount": 2}
    a3.transport.abortConnection()
    await within(a3.closed)
    await within(a1.wait_for(seen + 2))
    assert a1.received[seen + 1] == {
        "type": "user-left", "connectionId": ids[a3], "userCount": 1}
    seen = len(b2.received)
    b1.sendClose(1000)
    await within(b1.closed)
    await within(b2.wait_for(seen + 1))
    assert b2.received[seen] == {"type": "user-left", "connectionId": ids[b1], "userCount": 1}
    stats = await stats_when(port, lambda s: s["currentConnections"] == 3, "3 connections")
    assert (stats["currentRooms"], stats["connectionsTotal"], stats["disconnectionsTotal"]) \
        == (3, 6, 3)

    returncode = await stop_relay(relay, [a1, b2, c1])
    assert_exited_by(returncode, signal.SIGTERM, relay)
    for member in (a1, b2, c1):
        assert member.received[-1] == SHUTDOWN_MESSAGE
        assert [m["connectionId"] for m in member.messages_of("user-left")] == {
            a1: [ids[a2], ids[a3]], b2: [ids[b1]], c1: []}[member]


# -- HTTP endpoints and counters ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_stats_not_found_and_refused_rooms(spawn):
    started_ms = now_ms()
    relay = await start_relay(spawn, "--port", LOOPBACK)
    port = relay.port

    health = await get_json(port, "/health")
    assert set(health) >= {"status", "uptime", "timestamp", "rooms", "connections", "memory"}
    assert health["status"] == "healthy"
    assert isinstance(health["uptime"], (int, float)) and 0 <= health["uptime"] < 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", health["timestamp"])
    assert abs(datetime.fromisoformat(health["timestamp"]).timestamp() - time.time()) < 60
    assert (health["rooms"], health["connections"]) == (0, 0)
    assert set(health["memory"]) == {"heapUsed", "heapTotal"}
    assert all(re.fullmatch(r"\d+MB", v) and int(v[:-2]) > 0 for v in health["memory"].values())

    stats = await get_json(port, "/stats")
    # The original's fields, with these values; later issues may add counters of their own.
    assert {name: stats[name] for name in (
        "messagesRelayed", "connectionsTotal", "disconnectionsTotal", "rateLimitsHit",
        "currentRooms", "currentConnections")} == {
        "messagesRelayed": 0, "connectionsTotal": 0, "disconnectionsTotal": 0,
        "rateLimitsHit": 0, "currentRooms": 0, "currentConnections": 0}
    assert isinstance(stats["startTime"], int)
    assert started_ms - 1000 <= stats["startTime"] <= now_ms() + 1000
    assert isinstance(stats["uptime"], (int, float)) and 0 <= stats["uptime"] < 60
    whole = int(stats["uptime"])
    assert stats["uptimeFormatted"] == (f"{whole}s" if whole else "0s")

    for path in ("/", "/nothing", "/room", "/health/x", "/room/abc", "/?room=abc"):
        code, headers, body = await http_get(port, path)
        assert (code, body) == (404, NOT_FOUND_TEXT), path
        assert headers["content-type"] == ["text/plain"]

    a = await join(reactor, port, "counted")
    await stats_when(port, lambda s: s["connectionsTotal"] == 1, "the first join")

    refused = {
        "/room/": ROOM_ID_REQUIRED,
        "/": ROOM_ID_REQUIRED,
        "/?room=": ROOM_ID_REQUIRED,
        "/health": ROOM_ID_REQUIRED,
        "/stats": ROOM_ID_REQUIRED,
        "/room/bad.room": ROOM_ID_INVALID,
        "/?room=a%20b": ROOM_ID_INVALID,
        "/?room=" + "x" * 129: ROOM_ID_INVALID,
    }
    for path, reason in refused.items():
        client = await connect(reactor, port, path)
        assert await within(client.closed) == (1008, reason), path
        assert client.received == [], path
    # 128 characters is the longest id accepted.
    longest = await join(reactor, port, "y" * 128)
    assert longest.received[0]["roomId"] == "y" * 128

    stats = await stats_when(port, lambda s: s["connectionsTotal"] == 2, "two joins")
    assert (stats["currentConnections"], stats["disconnectionsTotal"]) == (2, 0)
    health = await get_json(port, "/health")
    assert (health["rooms"], health["connections"]) == (2, 2)

    b = await join(reactor, port, "counted")
    a.send_json({"type": "op"})
    await within(b.wait_for(2))
    b.sendMessage(b"{not json")
    b.sendMessage(b"NaN")
    for junk in (b"{}", b'{"type": ""}', b"[]", b"null", b'{"type": 7}'):
        b.sendMessage(junk)
    errors = await within(b.wait_for(9))
    assert [e["code"] for e in errors[2:]] == ["PARSE_ERROR"] * 2 + ["INVALID_MESSAGE"] * 5
    assert all(set(e) == {"type", "message", "code"} and e["type"] == "error"
               for e in errors[2:])
    longest.send_json({"type": "alone"})  # relayed to nobody, still counted
    stats = await stats_when(port, lambda s: s["messagesRelayed"] == 2, "2 relayed")
    assert (stats["connectionsTotal"], stats["currentConnections"]) == (3, 3)

    a.sendClose(1000)
    await within(a.closed)
    stats = await stats_when(port, lambda s: s["disconnectionsTotal"] == 1, "a clean close")
    assert (stats["currentConnections"], stats["currentRooms"]) == (2, 2)
    b.transport.abortConnection()
    await within(b.closed)
    stats = await stats_when(port, lambda s: s["disconnectionsTotal"] == 2, "a dropped TCP")
    assert (stats["currentConnections"], stats["currentRooms"]) == (1, 1)
    assert stats["messagesRelayed"] == 2 and stats["rateLimitsHit"] == 0

    returncode = await stop_relay(relay, [longest])
    assert_exited_by(returncode, signal.SIGTERM, relay)


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Any]:
    """A root CA, an intermediate, and a server certificate for localhost and 127.0.0.1,
    written as Let's Encrypt names its files."""
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    server = intermediate.issue_cert("localhost", "127.0.0.1")
    leaf, chain = server.cert_chain_pems
    paths = {name: tmp_path / f"{name}.pem" for name in ("privkey", "cert", "chain",
                                                          "fullchain")}
    server.private_key_pem.write_to_path(str(paths["privkey"]))
    leaf.write_to_path(str(paths["cert"]))
    chain.write_to_path(str(paths["chain"]))
    paths["fullchain"].write_bytes(leaf.bytes() + chain.bytes())
    return {"trust": Certificate.loadPEM(ca.cert_pem.bytes()), **paths}


@pytest_twisted.ensureDeferred
async def test_tls_and_plain_ports_serve_the_same_rooms(spawn, certificates):
    files = certificates
    tls_endpoint = (f"ssl:0:privateKey={files['privkey']}:certKey={files['fullchain']}"
                    f":extraCertChain={files['chain']}:interface=127.0.0.1")
    relay = await start_relay(spawn, "--port", LOOPBACK, "--port", tls_endpoint, listening=2)
    assert len(relay.ports) == len(relay.tls_ports) == 1
    plain_port, tls_port = relay.port, relay.tls_ports[0]
    trust = files["trust"]

    secure = await join(reactor, tls_port, "mixed",
                        tls_options=optionsForClientTLS("localhost", trustRoot=trust))
    plain = await join(reactor, plain_port, "mixed")
    assert plain.received[0]["userCount"] == 2
    await within(secure.wait_for(2))
    assert secure.received[1]["connectionId"] == plain.received[0]["connectionId"]
    secure.send_json({"type": "op", "via": "wss"})
    plain.send_json({"type": "op", "via": "ws"})
    assert (await within(plain.wait_for(2)))[1]["via"] == "wss"
    assert (await within(secure.wait_for(3)))[2]["via"] == "ws"

    health = await get_json(tls_port, "/health", trust=trust)
    assert (health["status"], health["connections"]) == ("healthy", 2)
    stats = await get_json(tls_port, "/stats", trust=trust)
    assert stats["messagesRelayed"] == 2
    code, _, body = await http_get(tls_port, "/elsewhere", trust=trust)
    assert (code, body) == (404, NOT_FOUND_TEXT)

    # The client really verifies: a client trusting another CA is refused.
    stranger = Certificate.loadPEM(trustme.CA().cert_pem.bytes())
    with pytest.raises(ConnectionError):
        await within(connect(reactor, tls_port, "/room/mixed",
                             tls_options=optionsForClientTLS("localhost", trustRoot=stranger)))
    assert (await get_json(plain_port, "/health"))["connections"] == 2

    returncode = await stop_relay(relay, [secure, plain])
    assert_exited_by(returncode, signal.SIGTERM, relay)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_certificate_and_nobody_is_dropped(spawn, certificates):
    files = certificates
    port = free_port()
    relay = await start_relay(
        spawn, "--port", LOOPBACK, "--port",
        f"ssl:{port}:privateKey={files['privkey']}:certKey={files['cert']}"
        f":extraCertChain={files['chain']}:interface=127.0.0.1", listening=2)
    before = await join(reactor, port, "renewal",
                        tls_options=optionsForClientTLS("localhost", trustRoot=files["trust"]))

    # certbot renews: new files in place (here from a new CA), then SIGHUP.
    new_ca = trustme.CA()
    renewed = new_ca.issue_cert("localhost", "127.0.0.1")
    renewed.private_key_pem.write_to_path(str(files["privkey"]))
    renewed.cert_chain_pems[0].write_to_path(str(files["cert"]))
    new_ca.cert_pem.write_to_path(str(files["chain"]))
    relay.process.send_signal(signal.SIGHUP)
    await until(lambda: "certificates reloaded" in relay.stdout, "the reload", 10)

    new_trust = Certificate.loadPEM(new_ca.cert_pem.bytes())
    after = await join(reactor, port, "renewal",
                       tls_options=optionsForClientTLS("localhost", trustRoot=new_trust))
    with pytest.raises(ConnectionError):  # the old certificate is not served any more
        await within(connect(reactor, port, "/room/renewal", tls_options=optionsForClientTLS(
            "localhost", trustRoot=files["trust"])))
    before.send_json({"type": "op", "from": "before"})  # still connected, still relaying
    assert (await within(after.wait_for(2)))[1]["from"] == "before"
    assert before.close_code is None
    returncode = await stop_relay(relay, [before, after])
    assert_exited_by(returncode, signal.SIGTERM, relay)


@pytest_twisted.ensureDeferred
async def test_certkey_alone_does_not_send_the_intermediate(spawn, certificates):
    """Why conf/TLS.rst says extraCertChain=chain.pem: Twisted's ssl: endpoint reads only
    the first certificate of certKey, so fullchain.pem alone leaves the intermediate out
    and a client that trusts only the root refuses the server."""
    files = certificates
    relay = await start_relay(
        spawn, "--port",
        f"ssl:0:privateKey={files['privkey']}:certKey={files['fullchain']}:interface=127.0.0.1",
    )
    with pytest.raises(ConnectionError):
        await within(connect(reactor, relay.tls_ports[0], "/room/abc",
                             tls_options=optionsForClientTLS("localhost",
                                                             trustRoot=files["trust"])))
    assert_exited_by(await stop_relay(relay), signal.SIGTERM, relay)


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest_twisted.ensureDeferred
async def test_signal_tells_every_member_and_closes_with_1001(spawn, sig):
    relay = await start_relay(spawn, "--port", LOOPBACK, "--shutdown-timeout", "10s")
    members = [await join(reactor, relay.port, room) for room in ("s1", "s1", "s2")]
    await within(members[0].wait_for(2))

    started = time.monotonic()
    relay.process.send_signal(sig)
    for member in members:
        assert await within(member.closed, 10) == (1001, "Server shutting down")
        assert member.received[-1] == SHUTDOWN_MESSAGE
        assert member.messages_of("server-shutdown") == [SHUTDOWN_MESSAGE]
    returncode = await relay.wait_exit()
    # Everyone closed at once, so the 10 s shutdown timeout was not waited for.
    assert time.monotonic() - started < 5
    assert_exited_by(returncode, sig, relay)


@pytest_twisted.ensureDeferred
async def test_peer_that_never_answers_the_close_is_bounded_by_shutdown_timeout(spawn):
    # --log-level warn hides the "starting on" line: the test picks the port itself.
    port = free_port()
    relay = spawn([TWISTD, "-n", "--pidfile=", "iwrelay",
                   "--port", f"tcp:{port}:interface=127.0.0.1",
                   "--shutdown-timeout", "500ms", "--log-level", "warn"])
    await relay.wait_serving(port)
    polite = await join(reactor, port, "held")
    silent = await silent_peer(port, "/room/held")
    await within(polite.wait_for(2))
    assert polite.received[1]["type"] == "user-joined"

    started = time.monotonic()
    relay.process.send_signal(signal.SIGTERM)
    assert await within(polite.closed) == (1001, "Server shutting down")
    returncode = await relay.wait_exit()
    elapsed = time.monotonic() - started
    await within(silent.lost)
    assert_exited_by(returncode, signal.SIGTERM, relay, logs_info=False)
    # The silent peer held the stop for the 500 ms shutdown timeout, and no longer: the
    # process was gone before Autobahn's close-handshake timeout (2 s) dropped the peer,
    # which it logs at warn level.
    assert 0.45 <= elapsed < 4, elapsed
    assert "closing handshake timeout" not in relay.stdout + relay.stderr
    frames = silent.frames()
    texts = [json.loads(payload) for opcode, payload in frames if opcode == 1]
    closes = [payload for opcode, payload in frames if opcode == 8]
    assert texts[0]["type"] == "connected" and texts[-1] == SHUTDOWN_MESSAGE
    assert len(closes) == 1 and int.from_bytes(closes[0][:2], "big") == 1001
    # --log-level warn: none of the info lines a run at info level shows.
    output = relay.stdout + relay.stderr
    for info in ("starting on", "Starting factory", "joined room", "received SIGTERM",
                 "Server Shut Down.", "#info]", "#debug]"):
        assert info not in output, output
    assert all("#warn]" in line or "#error]" in line or "#critical]" in line
               for line in output.splitlines() if line.strip()), output


# -- logs and the environment -------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object with time, level and message."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), line
        assert record["level"] in ("debug", "info", "warn", "error", "critical"), line
        assert isinstance(record["message"], str), line
        records.append(record)
    return records


async def secret_scenario(port: int, room: str, body: str) -> list[RelayClient]:
    """Join, relay, every kind of refused message and connection, leave; returns the
    members still open. Every byte a client sends carries `room` or `body`."""
    alice = await join(reactor, port, room)
    bob = await connect(reactor, port, f"/?room={room}")
    await within(bob.wait_for(1))
    alice.send_json({"type": "op", "text": body})
    assert (await within(bob.wait_for(2)))[1]["text"] == body
    bob.sendMessage(f"{body} is not JSON".encode())
    bob.send_json({"kind": body})
    bob.send_json([body])
    await within(bob.wait_for(5))
    for path in (f"/room/{room}.bad", f"/?room={room}%20{body}"):
        refused = await connect(reactor, port, path)
        assert (await within(refused.closed))[0] == 1008
    # Over the rate limit (3 per minute in these runs).
    carol = await join(reactor, port, room)
    for number in range(4):
        carol.send_json({"type": "op", "text": f"{body} {number}"})
    await within(carol.wait_for(2))
    assert carol.received[1]["code"] == "RATE_LIMIT_EXCEEDED"
    # Over the size limit: closed with 1009.
    big = await join(reactor, port, room)
    big.send_json({"type": "op", "text": body * 100})
    assert (await within(big.closed))[0] == 1009
    bob.sendClose(1000)
    await within(bob.closed)
    carol.transport.abortConnection()
    await within(carol.closed)
    return [alice]


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_debug_logs_never_show_a_room_id_or_a_message_body(spawn, log_format):
    room, body = "SecretRoomQx81", "BodyMarkerZ7f3"
    relay = await start_relay(spawn, "--port", LOOPBACK, "--log-level", "debug",
                              "--log-format", log_format, "--rate-limit", "3",
                              "--rate-window", "1m", "--max-message-size", "1KiB")
    still_open = await secret_scenario(relay.port, room, body)
    returncode = await stop_relay(relay, still_open)
    assert_exited_by(returncode, signal.SIGTERM, relay)

    output = relay.stdout + relay.stderr
    assert room not in output and body not in output
    assert room.lower() not in output.lower() and body.lower() not in output.lower()
    # The scenario was logged, at debug level, under the room's hash.
    assert output.count(room_hash(room)) >= 4
    assert "joined room" in output and "PARSE_ERROR" in output
    if log_format == "json":
        levels = {record["level"] for record in json_lines(relay.stdout)}
        assert {"debug", "info"} <= levels
        assert relay.stderr == ""
    else:
        assert "#debug]" in output


@pytest_twisted.ensureDeferred
async def test_log_format_json_gives_one_object_per_line(spawn):
    relay = await start_relay(spawn, "--port", LOOPBACK, "--log-format", "json")
    alice = await join(reactor, relay.port, "jsonroom")
    bob = await join(reactor, relay.port, "jsonroom")
    alice.send_json({"type": "op"})
    await within(bob.wait_for(2))
    returncode = await stop_relay(relay, [alice, bob])
    assert_exited_by(returncode, signal.SIGTERM, relay)
    records = json_lines(relay.stdout)
    messages = [record["message"] for record in records]
    assert any("starting on" in m for m in messages)
    assert sum("joined room" in m for m in messages) == 2
    assert "Server Shut Down." in messages
    levels = {record["level"] for record in records}
    assert "info" in levels and "debug" not in levels  # info is the default level
    joined = next(r for r in records if "joined room" in r["message"])
    assert joined["room"] == room_hash("jsonroom") and joined["namespace"].startswith("iw_relay")


@pytest_twisted.ensureDeferred
async def test_relay_environment_variables(spawn):
    env = {
        "IWRELAY_PORT": f"{LOOPBACK} {LOOPBACK}",  # whitespace-separated endpoints
        "IWRELAY_RATE_LIMIT": "3",
        "IWRELAY_RATE_WINDOW": "1m",
        "IWRELAY_LOG_FORMAT": "json",
    }
    relay = await start_relay(spawn, env=env, listening=2)
    first, second = relay.ports
    alice = await join(reactor, first, "envroom")
    bob = await join(reactor, second, "envroom")  # both ports serve the same rooms
    for number in range(5):
        alice.send_json({"type": "op", "n": number})
    await within(alice.wait_for(3))
    assert alice.received[2] == {
        "type": "error", "code": "RATE_LIMIT_EXCEEDED",
        "message": "Rate limit exceeded (3 messages/60 seconds)",
    }
    stats = await stats_when(first, lambda s: s["rateLimitsHit"] == 2, "two refusals")
    assert stats["messagesRelayed"] == 3
    await barrier(bob)
    assert [m["n"] for m in ops(bob)] == [0, 1, 2]
    returncode = await stop_relay(relay, [alice, bob])
    assert_exited_by(returncode, signal.SIGTERM, relay)
    assert len(json_lines(relay.stdout)) >= 5


@pytest_twisted.ensureDeferred
async def test_original_relay_variables_and_the_command_line_wins(spawn):
    # PORT gives "tcp:PORT", on every interface, as the original did; the test only
    # connects to 127.0.0.1.
    port = free_port()
    env = {"PORT": str(port), "NODE_ENV": "production", "LOG_LEVEL": "debug",
           "IWRELAY_RATE_LIMIT": "50"}
    relay = spawn([TWISTD, "-n", "--pidfile=", "iwrelay", "--rate-limit", "1"], env)
    await relay.wait_serving(port)
    alice = await join(reactor, port, "origroom")
    bob = await join(reactor, port, "origroom")
    alice.send_json({"type": "op", "n": 1})
    alice.send_json({"type": "op", "n": 2})
    await within(alice.wait_for(3))
    assert alice.received[2]["code"] == "RATE_LIMIT_EXCEEDED"  # --rate-limit 1 won
    returncode = await stop_relay(relay, [alice, bob])
    assert_exited_by(returncode, signal.SIGTERM, relay)
    records = json_lines(relay.stdout)  # NODE_ENV=production: JSON
    assert f"starting on {port}" in " ".join(r["message"] for r in records)
    assert "debug" in {record["level"] for record in records}  # LOG_LEVEL=debug


@pytest.mark.parametrize(
    ("options", "env", "named"),
    [
        (["--rate-limit", "abc"], {}, "--rate-limit: 'abc'"),
        (["--room-expiry", "5x"], {}, "--room-expiry: '5x'"),
        (["--port", "tcp:notaport"], {}, "--port 'tcp:notaport'"),
        (["--log-format", "xml"], {}, "--log-format: 'xml'"),
        (["--port", "ssl:0:privateKey=/nonexistent/key.pem"], {}, "--port 'ssl:0:"),
        ([], {"IWRELAY_RATE_WINDOW": "zz"}, "IWRELAY_RATE_WINDOW: 'zz'"),
        ([], {"IWRELAY_MAX_MESSAGE_SIZE": "1MB"}, "IWRELAY_MAX_MESSAGE_SIZE: '1MB'"),
        ([], {"PORT": "abc"}, "PORT: 'abc' is not a TCP port number"),
        (["--no-such-option"], {}, "option --no-such-option not recognized"),
    ],
    ids=["rate-limit", "room-expiry", "port", "log-format", "tls-files", "env-window",
         "env-size", "env-PORT", "unknown"],
)
@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_bad_option_value_is_one_line_before_listening(tmp_path, options, env, named,
                                                       program):
    """The error is all that is printed: not buried under the 90 lines of --help."""
    ports = [] if "PORT" in env else ["--port", f"tcp:{free_port()}:interface=127.0.0.1"]
    launcher = [TWISTD, "-n", "--pidfile="] if program == "twistd" else [script("twist")]
    finished = subprocess.run(
        [*launcher, "iwrelay", *ports, *options],
        env=relay_environment(env), cwd=tmp_path, capture_output=True, text=True,
        timeout=30, check=False,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    mentions = [line for line in lines if named in line]
    assert mentions, output
    # twistd prints its one-line synopsis, then the error; twist the error, then its
    # synopsis.
    assert len(lines) <= 2, output
    assert "--max-connections-per-ip" not in output and "Traceback" not in output
    assert "starting on" not in output and "Starting factory" not in output


@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_a_busy_port_is_one_line_and_a_failure(tmp_path, program):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        launcher = [TWISTD, "-n", "--pidfile="] if program == "twistd" else [
            script("twist")]
        finished = subprocess.run(
            [*launcher, "iwrelay", "--port", LOOPBACK, "--port", busy],
            env=relay_environment(), cwd=tmp_path, capture_output=True, text=True,
            timeout=30, check=False,
        )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 69, output
    assert finished.stderr.strip().splitlines() == [
        f"iwrelay: cannot listen on --port {busy}: Address already in use"], output
    assert "Traceback" not in output and "CannotListenError" not in output


@pytest_twisted.ensureDeferred
async def test_twist_runs_the_plugin_too(spawn):
    port = free_port()
    relay = spawn([script("twist"), "iwrelay", "--port", f"tcp:{port}:interface=127.0.0.1"])
    await relay.wait_serving(port)
    alice = await join(reactor, port, "TwistRoomW3")
    bob = await join(reactor, port, "TwistRoomW3")
    alice.send_json({"type": "op"})
    assert (await within(bob.wait_for(2)))[1]["connectionId"] == alice.received[0][
        "connectionId"]
    returncode = await stop_relay(relay, [alice, bob])
    assert returncode == 0
    output = relay.stdout + relay.stderr
    assert "joined room" in output and "TwistRoomW3" not in output


@pytest_twisted.ensureDeferred
async def test_twist_takes_the_relays_log_options_after_the_plugin_name(spawn):
    """`twist iwrelay --log-format json --log-level warn` logs as twistd would."""
    port = free_port()
    relay = spawn([script("twist"), "iwrelay", "--port", f"tcp:{port}:interface=127.0.0.1",
                   "--log-format", "json", "--log-level", "warn"])
    await relay.wait_serving(port)
    alice = await join(reactor, port, "TwistWarnRoom")
    returncode = await stop_relay(relay, [alice])
    assert returncode == 0
    assert "joined room" not in relay.stdout  # info: below warn
    assert "starting on" not in relay.stdout

    port = free_port()
    relay = spawn([script("twist"), "iwrelay", "--port", f"tcp:{port}:interface=127.0.0.1",
                   "--log-format", "json"])
    await relay.wait_serving(port)
    alice = await join(reactor, port, "TwistJsonRoom")
    returncode = await stop_relay(relay, [alice])
    assert returncode == 0
    records = json_lines(relay.stdout)  # every line is one plain JSON object
    joined = next(r for r in records if "joined room" in r["message"])
    assert joined["room"] == room_hash("TwistJsonRoom") and joined["level"] == "info"


def _cn_only_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate naming its host in the subject's CN only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now().astimezone()
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_certificates_without_subject_alt_name_are_named_at_start(
        spawn, tmp_path, certificates):
    key, cert = _cn_only_certificate(tmp_path, "cn-only.example")
    sni = tmp_path / "sni"
    sni.mkdir()
    (sni / "cn-only.example.pem").write_bytes(key.read_bytes() + cert.read_bytes())
    good = sni / "localhost.pem"
    good.write_bytes(certificates["privkey"].read_bytes()
                     + certificates["fullchain"].read_bytes())
    relay = await start_relay(
        spawn, "--port", LOOPBACK,
        "--port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        "--port", f"tls:{sni}:port={free_port()}:interface=127.0.0.1",
        "--port", f"ssl:0:privateKey={certificates['privkey']}"
                  f":certKey={certificates['cert']}:interface=127.0.0.1",
        listening=4)
    returncode = await stop_relay(relay)
    assert_exited_by(returncode, signal.SIGTERM, relay)
    warnings = [line for line in relay.stdout.splitlines() if "subjectAltName" in line]
    assert len(warnings) == 2, relay.stdout
    assert f"{cert} has no subjectAltName" in warnings[0]
    assert f"{sni / 'cn-only.example.pem'} has no subjectAltName" in warnings[1]
    assert "#warn]" in warnings[0]
