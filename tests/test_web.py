"""The HTTP side and the WebSocket upgrade over real loopback sockets, in-process."""

import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site

from iw_relay.config import RelayConfig
from iw_relay.service import RelayService
from iw_relay.web import format_uptime
from tests.clients import connect, join
from tests.helpers import NOT_FOUND_TEXT, get_json, http_get


@pytest.fixture
def server(serve):
    return pytest_twisted.blockon(serve(RelayConfig(ping_interval=0)))


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.9, "0s"), (59, "59s"), (60, "1m"), (3600, "1h"), (3661, "1h 1m 1s"),
    (86400 + 7200 + 180 + 4, "1d 2h 3m 4s"), (2 * 86400 + 5, "2d 5s"),
])
def test_uptime_format(seconds, text):
    assert format_uptime(seconds) == text


@pytest_twisted.ensureDeferred
async def test_health_and_stats(server):
    _service, port = server
    health = await get_json(port, "/health")
    assert set(health) == {"status", "uptime", "timestamp", "rooms", "connections", "memory"}
    assert health["status"] == "healthy"
    assert isinstance(health["uptime"], float) and health["uptime"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", health["timestamp"])
    assert re.fullmatch(r"\d+MB", health["memory"]["heapUsed"])
    assert re.fullmatch(r"\d+MB", health["memory"]["heapTotal"])

    a = await join(reactor, port, "r1")
    b = await join(reactor, port, "r1")
    c = await join(reactor, port, "r2")
    a.send_json({"type": "op"})
    await b.wait_for(2)
    health = await get_json(port, "/health?x=1")
    assert (health["rooms"], health["connections"]) == (2, 3)
    stats = await get_json(port, "/stats")
    assert set(stats) == {"messagesRelayed", "connectionsTotal", "disconnectionsTotal",
                          "rateLimitsHit", "slowConsumersDropped", "connectionsRefused",
                          "openWebSockets", "openConnections", "trackedAddresses",
                          "startTime", "currentRooms", "currentConnections", "uptime",
                          "uptimeFormatted"}
    assert stats["messagesRelayed"] == 1
    assert (stats["connectionsTotal"], stats["disconnectionsTotal"]) == (3, 0)
    assert (stats["currentRooms"], stats["currentConnections"]) == (2, 3)
    assert isinstance(stats["startTime"], int) and stats["startTime"] > 1.6e12
    assert stats["uptimeFormatted"] == format_uptime(stats["uptime"])
    for client in (a, b, c):
        client.sendClose(1000)
        await client.closed
    stats = await get_json(port, "/stats")
    assert (stats["connectionsTotal"], stats["disconnectionsTotal"]) == (3, 3)
    assert (stats["currentRooms"], stats["currentConnections"]) == (0, 0)
    # Every connection counts from accept until it closes: this /stats request too.
    assert (stats["openWebSockets"], stats["openConnections"],
            stats["trackedAddresses"]) == (0, 1, 1)


@pytest.mark.parametrize("path", ["/", "/room/abc", "/healthz", "/health/x", "/stats/"])
@pytest_twisted.ensureDeferred
async def test_other_paths_are_the_originals_404(server, path):
    _, port = server
    code, headers, body = await http_get(port, path)
    assert code == 404
    assert headers["content-type"] == ["text/plain"]
    assert body == NOT_FOUND_TEXT


@pytest.mark.parametrize("path", ["/health", "/stats", "/room/"])
@pytest_twisted.ensureDeferred
async def test_upgrade_without_a_room_is_closed_1008(server, path):
    service, port = server
    client = await connect(reactor, port, path)
    code, reason = await client.closed
    assert code == 1008 and reason.startswith("Room ID required")
    assert service.registry.stats.connectionsTotal == 0


@pytest_twisted.ensureDeferred
async def test_query_form_over_the_site(server):
    _, port = server
    a = await connect(reactor, port, "/?room=abc%2Dx")
    (connected,) = await a.wait_for(1)
    assert connected["roomId"] == "abc-x"
    b = await join(reactor, port, "abc-x")
    assert b.received[0]["userCount"] == 2
    for client in (a, b):
        client.sendClose(1000)
        await client.closed


@pytest_twisted.ensureDeferred
async def test_nagle_is_off_for_relay_connections(server):
    import socket

    service, port = server
    client = await join(reactor, port, "r")
    (member,) = service.registry.rooms["r"].members.values()
    handle = member.transport.getHandle()
    assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    client.sendClose(1000)
    await client.closed


class Page(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"the host application"


@pytest_twisted.ensureDeferred
async def test_mounted_under_a_path_of_another_site():
    relay = RelayService(RelayConfig(ping_interval=0), listen=False)
    relay.startService()
    root = Resource()
    root.putChild(b"", Page())
    root.putChild(b"relay", relay.resource)
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    port = listening.getHost().port
    try:
        _, _, page = await http_get(port, "/")
        assert page == b"the host application"
        health = await get_json(port, "/relay/health")
        assert health["status"] == "healthy"
        a = await connect(reactor, port, "/relay/room/abc")
        b = await connect(reactor, port, "/relay?room=abc")
        await b.wait_for(1)
        assert b.received[0] == {**b.received[0], "roomId": "abc", "userCount": 2}
        a.send_json({"type": "op"})
        (_, relayed) = await b.wait_for(2)
        assert relayed["type"] == "op"
        for client in (a, b):
            client.sendClose(1000)
            await client.closed
    finally:
        await listening.stopListening()
        await relay.stopService()
