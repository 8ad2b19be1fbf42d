"""Limits, floods, origins, proxies and room tokens (in memory, time from a Clock)."""

import time

import jwt
import pytest
import pytest_twisted
from twisted.internet.protocol import Protocol

from iw_relay.admission import ConnectionCounter, client_address, parse_networks, token_allows
from iw_relay.config import RelayConfig

SECRET = b"a-test-secret-of-at-least-32-bytes!"


def config(**changes):
    return RelayConfig(ping_interval=0, **changes)


def refused_with(client, status):
    return client.close_code == 1006 and f"[{status}]" in (client.close_reason or "")


# -- connection limits ---------------------------------------------------------------

def test_per_ip_limit_refuses_with_503_and_counts(make_relay):
    relay = make_relay(config(max_connections_per_ip=2))
    first, second = relay.join(), relay.join()
    third = relay.connect("/room/abc")
    assert refused_with(third, 503)
    assert relay.registry.stats.connectionsRefused == 1
    assert relay.registry.refusals["max-connections-per-ip"] == 1
    assert relay.registry.stats.connectionsTotal == 2
    relay.client_ip = "192.0.2.7"   # another address is not affected
    relay.join()
    relay.client_ip = "127.0.0.1"
    first.sendClose(1000)
    relay.flush()
    relay.join()                     # a slot was freed
    assert second.close_code is None


def test_server_wide_limit(make_relay):
    relay = make_relay(config(max_connections=2, max_connections_per_ip=0))
    relay.join()
    relay.client_ip = "192.0.2.8"
    relay.join()
    relay.client_ip = "192.0.2.9"
    assert refused_with(relay.connect("/room/abc"), 503)
    assert relay.registry.refusals["max-connections"] == 1


def test_refused_room_ids_do_not_leak_connection_slots(make_relay):
    relay = make_relay(config(max_connections_per_ip=1))
    for _ in range(3):
        assert relay.connect("/room/bad.id").close_code == 1008
    relay.join()


def test_connection_counter():
    counter = ConnectionCounter()
    counter.add("a")
    counter.add("a")
    assert counter.refusal("a", 0, 2) == "max-connections-per-ip"
    assert counter.refusal("b", 0, 2) is None
    assert counter.refusal("b", 2, 0) == "max-connections"
    counter.remove("a")
    counter.remove("a")
    assert (counter.total, dict(counter.per_address)) == (0, {})


# -- room size -----------------------------------------------------------------------

def test_room_full(make_relay):
    relay = make_relay(config(max_room_size=2))
    a, _b = relay.join(), relay.join()
    late = relay.connect("/room/abc")
    assert late.received == [{"type": "error", "code": "ROOM_FULL", "message": "Room is full"}]
    assert (late.close_code, late.close_reason) == (1008, "Room is full")
    assert [m["type"] for m in a.received] == ["connected", "user-joined"]
    assert relay.registry.stats.connectionsTotal == 2
    relay.join("other")  # other rooms are not affected


# -- floods --------------------------------------------------------------------------

def flood_one_window(relay, client, count):
    for n in range(count):
        client.send_json({"type": "op", "n": n})
    relay.flush()
    relay.advance(1.0)


def test_sustained_flood_is_closed_but_a_burst_is_not(make_relay):
    relay = make_relay(config(rate_limit=3, flood_windows=4))
    flooder, bursty, watcher = relay.join(), relay.join(), relay.join()
    # (under twice the limit a window: past that, reading pauses and the rest of a
    # window's frames are read in the next one; test_reading_pauses_... covers that)
    flood_one_window(relay, bursty, 5)   # one burst window...
    for _ in range(5):
        flood_one_window(relay, bursty, 2)   # ...then within the limit
    assert bursty.close_code is None
    for _ in range(3):
        flood_one_window(relay, flooder, 5)
    assert flooder.close_code is None
    flood_one_window(relay, flooder, 5)  # the fourth consecutive window over the limit
    relay.advance(2.0)  # (its close handshake times out: a flooder is no longer read)
    assert (flooder.close_code, flooder.close_reason) == (1008, "Rate limit exceeded")
    assert watcher.close_code is None


def test_an_idle_window_breaks_a_flood(make_relay):
    relay = make_relay(config(rate_limit=3, flood_windows=3))
    client = relay.join()
    for _ in range(2):
        flood_one_window(relay, client, 5)
    relay.advance(5)  # quiet for a while
    for _ in range(2):
        flood_one_window(relay, client, 5)
    assert client.close_code is None


# -- origins -------------------------------------------------------------------------

@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://editor.example.org", True),
    ("https://EDITOR.example.org:443", True),
    ("http://localhost:8080", True),
    (None, True),                        # not a browser: no Origin header
    ("https://evil.example", False),
    ("http://editor.example.org", False),
    ("https://editor.example.org:8443", False),
    ("null", False),
])
def test_allowed_origins(make_relay, origin, allowed):
    relay = make_relay(config(allowed_origins=("https://editor.example.org",
                                               "http://localhost:8080")))
    client = relay.connect("/room/abc", origin=origin)
    if allowed:
        assert client.received[0]["type"] == "connected"
    else:
        assert refused_with(client, 403)
        assert relay.registry.refusals["origin"] == 1


def test_any_origin_by_default(relay):
    assert relay.connect("/room/abc", origin="https://anywhere.example").received


# -- trusted proxies -----------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(("peer", "xff", "real_ip", "client"), [
    ("203.0.113.5", "198.51.100.1", None, "203.0.113.5"),   # untrusted peer: header ignored
    ("10.1.2.3", "198.51.100.1", None, "198.51.100.1"),
    ("10.1.2.3", "1.1.1.1, 198.51.100.1", None, "198.51.100.1"),   # rightmost untrusted
    ("10.1.2.3", "198.51.100.1, 10.9.9.9", None, "198.51.100.1"),  # skips trusted hops
    ("10.1.2.3", "10.4.4.4", None, "10.4.4.4"),              # all trusted: leftmost
    # Garbage never charges the connection to the proxy's own address (defect 8).
    ("10.1.2.3", "not-an-ip", None, "unparsed:not-an-ip"),
    ("10.1.2.3", "x, 203.0.113.7", None, "203.0.113.7"),
    ("10.1.2.3", "unknown, 203.0.113.7", None, "203.0.113.7"),
    ("10.1.2.3", "203.0.113.7, unknown", None, "unparsed:unknown"),
    ("10.1.2.3", "198.51.100.10:51234", None, "198.51.100.10"),
    ("10.1.2.3", "[2001:db8::7]:443", None, "2001:db8::7"),
    ("10.1.2.3", "[2001:db8::7]", None, "2001:db8::7"),
    ("10.1.2.3", "198.51.100.10:51234, 10.0.0.9:80", None, "198.51.100.10"),
    ("10.1.2.3", None, "198.51.100.9:1234", "198.51.100.9"),
    ("10.1.2.3", None, "198.51.100.9", "198.51.100.9"),
    ("::1", "2001:db8::1", None, "2001:db8::1"),
    ("::ffff:10.0.0.1", "198.51.100.1", None, "198.51.100.1"),
])
def test_client_address(peer, xff, real_ip, client):
    assert client_address(peer, xff, real_ip, PROXIES) == client


def test_per_ip_limit_uses_the_forwarded_address(make_relay):
    relay = make_relay(config(max_connections_per_ip=1, trusted_proxies=("10.0.0.0/8",)))
    relay.client_ip = "10.0.0.2"  # every connection arrives through the proxy
    relay.connect("/room/abc", headers={"X-Forwarded-For": "198.51.100.1"})
    relay.connect("/room/abc", headers={"X-Forwarded-For": "198.51.100.2"})
    again = relay.connect("/room/abc", headers={"X-Forwarded-For": "198.51.100.1"})
    assert refused_with(again, 503)
    assert relay.registry.stats.connectionsTotal == 2


# -- room tokens ---------------------------------------------------------------------

def token(claims, secret=SECRET, lifetime=60):
    return jwt.encode({"exp": int(time.time()) + lifetime, **claims}, secret, "HS256")


@pytest.mark.parametrize(("make_token", "ok"), [
    (lambda: token({"room": "abc"}), True),
    (lambda: token({"rooms": ["team-*", "abc"]}), True),
    (lambda: token({"rooms": ["a?c"]}), True),
    (lambda: token({"room": "abd"}), False),
    (lambda: token({"rooms": ["team-*"]}), False),
    (lambda: token({"room": "abc"}, lifetime=-10), False),         # expired
    (lambda: token({"room": "abc"}, secret=b"a-forged-secret-of-at-least-32-bytes"), False),
    (lambda: jwt.encode({"room": "abc"}, SECRET, "HS256"), False),  # never expires
    (lambda: jwt.encode({"room": "abc", "exp": int(time.time()) + 60}, "",
                        algorithm="none"), False),
    (lambda: None, False),
    (lambda: "garbage", False),
])
def test_token_allows(make_token, ok):
    assert token_allows(make_token(), SECRET, "abc") is ok


def test_auth_over_the_wire(make_relay):
    relay = make_relay(config(auth_secret=SECRET))
    good = relay.connect(f"/room/abc?token={token({'room': 'abc'})}")
    assert good.received[0]["type"] == "connected"
    forged = token({"room": "abc"}, secret=b"another-secret-of-at-least-32-bytes")
    for path in ("/room/abc", f"/room/abc?token={token({'room': 'xyz'})}",
                 f"/?room=abc&token={forged}"):
        bad = relay.connect(path)
        assert bad.opened.called  # the handshake completed: a browser can read the reason
        assert (bad.close_code, bad.close_reason) == (1008, "Invalid authentication token")
    assert relay.registry.stats.connectionsTotal == 1


# -- slowloris -----------------------------------------------------------------------

class Silent(Protocol):
    """Opens TCP, sends `prefix` (maybe part of a request) and then nothing."""

    def __init__(self, prefix=b""):
        self.prefix = prefix
        self.lost = False

    def connectionMade(self):
        self.transport.write(self.prefix)

    def connectionLost(self, reason):
        self.lost = True


@pytest.mark.parametrize("prefix", [b"", b"GET /room/abc HTTP/1.1\r\nHost: x\r\n"])
def test_a_request_that_never_completes_is_dropped_after_the_handshake_timeout(
        make_relay, prefix):
    relay = make_relay(config(handshake_timeout=5))
    silent = Silent(prefix)
    relay.connect(client=silent, through_site=True)
    relay.advance(4.9)
    assert not silent.lost
    relay.advance(0.2)
    assert silent.lost


def test_the_http_timeout_does_not_touch_websockets(make_relay):
    relay = make_relay(config(handshake_timeout=5))
    a = relay.connect("/room/abc", through_site=True)
    b = relay.connect("/room/abc", through_site=True)
    for _ in range(10):
        relay.advance(5)
    a.send_json({"type": "op"})
    relay.flush()
    assert b.received[-1]["type"] == "op"
    assert a.close_code is None and b.close_code is None


@pytest_twisted.ensureDeferred
async def test_a_thousand_silent_connections_do_not_starve_real_clients(serve):
    """Real sockets: 1,000 connections that never send a byte; a real client still joins
    and relays at once, and every silent one is dropped after the handshake timeout."""
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory

    from tests.clients import join

    _service, port = await serve(config(handshake_timeout=3.0, max_connections_per_ip=0))
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    silent = []
    for _ in range(1000):
        peer = LostNotifier()
        silent.append(peer)
        await endpoint.connect(Factory.forProtocol(lambda peer=peer: peer))
    alice = await join(reactor, port, "busy")
    bob = await join(reactor, port, "busy")
    alice.send_json({"type": "op"})
    (_, relayed) = await bob.wait_for(2).addTimeout(5, reactor)
    assert relayed["type"] == "op"
    assert not any(peer.lost.called for peer in silent)  # (the timeout is still to come)
    await defer.gatherResults([peer.lost for peer in silent]).addTimeout(10, reactor)
    assert alice.close_code is None and bob.close_code is None
    for client in (alice, bob):
        client.sendClose(1000)
        await client.closed


class LostNotifier(Protocol):
    def __init__(self):
        from twisted.internet import defer

        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


def test_reading_pauses_for_the_rest_of_a_window_once_twice_over_the_limit(make_relay):
    relay = make_relay(config(rate_limit=3, flood_windows=0))
    sender, watcher = relay.join(), relay.join()
    for n in range(10):
        sender.send_json({"type": "op", "n": n})
    relay.flush()
    server = relay.servers[0]
    # 3 relayed, 3 refused; the other 4 wait unread until the window ends.
    assert [m["n"] for m in watcher.messages_of("op")] == [0, 1, 2]
    assert relay.registry.stats.rateLimitsHit == 3
    assert server.data
    relay.advance(0.5)
    assert len(watcher.messages_of("op")) == 3
    relay.advance(0.5)  # the next window: its allowance goes to the oldest waiting frames
    assert [m["n"] for m in watcher.messages_of("op")] == [0, 1, 2, 6, 7, 8]
    assert relay.registry.stats.rateLimitsHit == 4
    assert not server.data


def test_pings_over_the_limit_get_no_pong_and_count_as_a_flood(make_relay):
    relay = make_relay(config(rate_limit=3, flood_windows=2))
    pinger, watcher = relay.join(), relay.join()
    pongs = []
    pinger.onPong = pongs.append
    for n in range(5):
        pinger.sendPing(b"%d" % n)
    relay.flush()
    assert pongs == [b"0", b"1", b"2"]
    assert [e["code"] for e in pinger.messages_of("error")] == ["RATE_LIMIT_EXCEEDED"]
    relay.advance(1.0)
    for n in range(5):
        pinger.sendPing(b"%d" % n)
    relay.flush()
    # Nothing more is read from a flooder once it is closed: the close handshake ends
    # when its timeout (2 s) drops the connection.
    relay.advance(2.1)
    assert (pinger.close_code, pinger.close_reason) == (1008, "Rate limit exceeded")
    assert watcher.close_code is None
