"""docs/protocol.rst, row by row: the real protocol and real Autobahn clients over
in-memory transports, time driven by a Clock."""

import json
import re
import struct

import pytest

from iw_relay.config import RelayConfig
from iw_relay.messages import ROOM_ID_INVALID, ROOM_ID_REQUIRED

WALL_MS = 1_700_000_000_000


def masked_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame, masked with a zero key (so the payload stays readable)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if len(payload) < 126:
        header = bytes([first, 0x80 | len(payload)])
    else:
        header = bytes([first, 0x80 | 126]) + struct.pack("!H", len(payload))
    return header + b"\x00\x00\x00\x00" + payload


def check_counters(relay):
    stats = relay.registry.stats
    assert stats.connectionsTotal - stats.disconnectionsTotal == relay.registry.connection_count


# -- connecting ----------------------------------------------------------------------

def test_connected_message(relay):
    client = relay.connect("/room/abc_DEF-1")
    (connected,) = client.received
    # The original's four fields, plus `peers` (WebRTC signaling, README).
    assert set(connected) == {"type", "connectionId", "roomId", "userCount", "peers"}
    assert connected["type"] == "connected"
    assert re.fullmatch(r"[0-9a-f]{16}", connected["connectionId"])
    assert connected["roomId"] == "abc_DEF-1"
    assert connected["userCount"] == 1
    assert connected["peers"] == []


@pytest.mark.parametrize(("path", "room"), [
    ("/room/abc", "abc"),
    ("/room/abc/x/y", "abc"),          # extra segments are ignored
    ("/room//abc", "abc"),             # as the original splits the path
    ("/?room=abc", "abc"),
    ("/anything?room=abc", "abc"),
    ("/room/abc?room=xyz", "abc"),     # the path wins over the query
    ("/?room=abc%2Dx", "abc-x"),       # the query is percent-decoded
    ("/?room=abc&room=def", "abc"),
    ("/room/" + "a" * 128, "a" * 128),
])
def test_room_id_sources(relay, path, room):
    client = relay.connect(path)
    assert client.received[0]["roomId"] == room
    assert relay.servers[-1] in relay.registry.rooms[room].members.values()


@pytest.mark.parametrize(("path", "reason"), [
    ("/", ROOM_ID_REQUIRED),
    ("/room/", ROOM_ID_REQUIRED),
    ("/room", ROOM_ID_REQUIRED),
    ("/room/?room=abc", ROOM_ID_REQUIRED),   # /room/... never falls back to the query
    ("/?room=", ROOM_ID_REQUIRED),
    ("/health", ROOM_ID_REQUIRED),
    ("/room/a.b", ROOM_ID_INVALID),
    ("/room/a%2Db", ROOM_ID_INVALID),        # the path is not percent-decoded
    ("/?room=a%20b", ROOM_ID_INVALID),
    ("/?room=abc%0A", ROOM_ID_INVALID),
    ("/?room=%C3%A9t%C3%A9", ROOM_ID_INVALID),
    ("/room/" + "a" * 129, ROOM_ID_INVALID),
])
def test_refused_room_ids_complete_the_handshake_then_close_1008(relay, path, reason):
    client = relay.connect(path)
    assert client.opened.called  # the handshake completed: a browser can read the reason
    assert (client.close_code, client.close_reason) == (1008, reason)
    assert client.received == []
    stats = relay.registry.stats
    assert (stats.connectionsTotal, stats.disconnectionsTotal) == (0, 0)


def test_room_ids_are_case_sensitive(relay):
    lower, upper = relay.join("abc"), relay.join("ABC")
    lower.send_json({"type": "op"})
    relay.flush()
    assert [m["type"] for m in upper.received] == ["connected"]
    assert lower.received[0]["userCount"] == upper.received[0]["userCount"] == 1


# -- presence ----------------------------------------------------------------------

def test_joined_and_left_with_counts(relay):
    a, b = relay.join(), relay.join()
    c = relay.join()
    b_id = b.received[0]["connectionId"]
    c_id = c.received[0]["connectionId"]
    assert a.received[1:] == [
        {"type": "user-joined", "connectionId": b_id, "userCount": 2},
        {"type": "user-joined", "connectionId": c_id, "userCount": 3},
    ]
    b.sendClose(1000)
    relay.flush()
    assert a.received[-1] == c.received[-1] == {
        "type": "user-left", "connectionId": b_id, "userCount": 2}
    check_counters(relay)


# -- relaying ----------------------------------------------------------------------

def test_relay_stamps_and_reaches_the_others_only(relay):
    a, b, c = relay.join("r"), relay.join("r"), relay.join("r")
    outsider = relay.join("other")
    a_id = a.received[0]["connectionId"]
    a.send_json({"type": "op", "connectionId": "forged", "nested": {"k": [1, 2.5, None]},
                 "text": "héllo ✓"})
    relay.flush()
    expected = {"type": "op", "connectionId": a_id, "nested": {"k": [1, 2.5, None]},
                "text": "héllo ✓", "timestamp": WALL_MS}
    assert b.received[-1] == c.received[-1] == expected
    assert all(m["type"] != "op" for m in a.received + outsider.received)
    assert relay.registry.stats.messagesRelayed == 1


def test_a_message_to_an_empty_room_is_counted_once(relay):
    alone = relay.join("r")
    for _ in range(3):
        alone.send_json({"type": "op"})
    relay.flush()
    assert relay.registry.stats.messagesRelayed == 3
    assert [m["type"] for m in alone.received] == ["connected"]


def test_lone_surrogates_reach_peers_unchanged(relay):
    a, b = relay.join(), relay.join()
    a.sendMessage(b'{"type":"op","text":"\\ud83d","pair":"\\ud83d\\ude00"}')
    relay.flush()
    assert b"\\ud83d" in b.raw[-1]
    assert b.received[-1]["text"] == "\ud83d"
    assert b.received[-1]["pair"] == "😀"


def test_binary_frames_are_json_like_text(relay):
    a, b = relay.join(), relay.join()
    a.sendMessage(b'{"type":"op","v":1}', isBinary=True)
    a.sendMessage(b"\xff\xfe not utf-8", isBinary=True)
    relay.flush()
    assert b.received[-1]["v"] == 1
    assert a.received[-1]["code"] == "PARSE_ERROR"


# -- bad messages --------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"not json", b"{", b'{"type": "op",}', b"NaN", b'{"type": "op", "v": NaN}',
    b'{"type": "op", "v": Infinity}', b'{"type": "op", "v": -Infinity}',
    b'{"type": "op", "v": 1e999}', b"[" * 100_000, b'{"a":' * 50_000,
    b'{"type": "op", "v": ' + b"9" * 5000 + b"}", b"",
])
def test_parse_error(relay, payload):
    a, b = relay.join(), relay.join()
    a.sendMessage(payload)
    relay.flush()
    assert a.received[-1] == {"type": "error", "code": "PARSE_ERROR",
                              "message": "Invalid message format - must be valid JSON"}
    assert [m["type"] for m in b.received] == ["connected"]
    assert relay.registry.stats.messagesRelayed == 0
    # The connection stays open and usable.
    a.send_json({"type": "op"})
    relay.flush()
    assert b.received[-1]["type"] == "op"


@pytest.mark.parametrize("payload", [
    b"null", b"[]", b"42", b'"op"', b"{}", b'{"type": ""}', b'{"type": 5}',
    b'{"type": null}', b'{"type": ["op"]}', b'{"kind": "op"}',
])
def test_invalid_message(relay, payload):
    a, b = relay.join(), relay.join()
    a.sendMessage(payload)
    relay.flush()
    assert a.received[-1] == {"type": "error", "code": "INVALID_MESSAGE",
                              "message": "Message must have a type field"}
    assert [m["type"] for m in b.received] == ["connected"]
    assert relay.registry.stats.messagesRelayed == 0
    assert a.close_code is None


# -- rate limit ------------------------------------------------------------------------

def test_rate_limit_fixed_windows(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, rate_limit=5, rate_window=1.0))
    a, b = relay.join(), relay.join()
    relay.advance(0.5)
    for n in range(8):
        a.send_json({"type": "op", "n": n})
    a.sendMessage(b"junk")  # junk counts against the allowance too
    relay.flush()
    assert [m["n"] for m in b.messages_of("op")] == [0, 1, 2, 3, 4]
    errors = a.messages_of("error")
    assert errors == [{"type": "error", "code": "RATE_LIMIT_EXCEEDED",
                       "message": "Rate limit exceeded (5 messages/second)"}]
    stats = relay.registry.stats
    assert (stats.rateLimitsHit, stats.messagesRelayed) == (4, 5)
    # The first window began when the connection opened, so it ends 1 s after the join.
    relay.advance(0.49)
    a.send_json({"type": "op", "n": 100})
    relay.flush()
    assert b.received[-1]["type"] != "op" or b.received[-1]["n"] != 100
    relay.advance(0.02)
    a.send_json({"type": "op", "n": 101})
    relay.flush()
    assert b.received[-1]["n"] == 101
    assert a.close_code is None


# -- departures ------------------------------------------------------------------------

def leave_and_check(relay, how):
    a, b = relay.join(), relay.join()
    b_id = b.received[0]["connectionId"]
    how(b)
    relay.flush()
    assert a.messages_of("user-left") == [
        {"type": "user-left", "connectionId": b_id, "userCount": 1}]
    assert relay.registry.stats.disconnectionsTotal == 1
    check_counters(relay)
    return b


def test_clean_close_leaves_once(relay):
    leave_and_check(relay, lambda b: b.sendClose(1000))


def test_dropped_tcp_leaves_once(relay):
    leave_and_check(relay, lambda b: b.transport.loseConnection())


def test_invalid_utf8_closes_1007_and_leaves_once(relay):
    b = leave_and_check(relay, lambda b: b.transport.write(masked_frame(0x1, b"\xff\xfe")))
    assert b.close_code == 1007


def test_unmasked_frame_closes_1002_and_leaves_once(relay):
    b = leave_and_check(relay, lambda b: b.transport.write(b"\x81\x02hi"))
    assert b.close_code == 1002


def test_reserved_bits_and_bad_opcodes_close_1002(relay):
    leave_and_check(relay, lambda b: b.transport.write(masked_frame(0x1, b"{}", rsv=4)))
    c = relay.join("other")
    c.transport.write(masked_frame(0x3, b"{}"))
    relay.flush()
    assert c.close_code == 1002


def test_oversized_message_closes_1009(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, max_message_size=1024))
    a, b = relay.join(), relay.join()
    a.send_json({"type": "op", "pad": "x" * 900})
    relay.flush()
    assert b.received[-1]["type"] == "op"
    a.send_json({"type": "op", "pad": "x" * 2000})
    relay.flush()
    assert a.close_code == 1009
    assert b.received[-1]["type"] == "user-left"


def test_oversized_fragmented_message_closes_1009(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, max_message_size=1024))
    a, _b = relay.join(), relay.join()
    a.transport.write(masked_frame(0x1, b"x" * 600, fin=False))
    a.transport.write(masked_frame(0x0, b"x" * 600, fin=True))
    relay.flush()
    assert a.close_code == 1009


def test_fragmented_message_with_a_ping_between_is_relayed(relay):
    a, b = relay.join(), relay.join()
    a.transport.write(masked_frame(0x1, b'{"type":', fin=False))
    a.transport.write(masked_frame(0x9, b"ping"))
    a.transport.write(masked_frame(0x0, b'"op"}', fin=True))
    relay.flush()
    assert b.received[-1]["type"] == "op"


def test_dead_peer_is_dropped_after_ping_timeout(make_relay):
    relay = make_relay(RelayConfig(ping_interval=30, ping_timeout=10))
    a, _b = relay.join(), relay.join()
    relay.pumps[-1].clientIO.write = lambda data: None  # b goes silent: never a pong
    relay.advance(30)   # the ping goes out
    relay.advance(9)
    assert a.messages_of("user-left") == []
    # No pong within 10 s: the server fails the connection (and drops it once its close
    # frame goes unanswered for the close-handshake timeout).
    for _ in range(4):
        relay.advance(1)
    assert len(a.messages_of("user-left")) == 1
    check_counters(relay)


def test_live_peer_survives_pings(make_relay):
    relay = make_relay(RelayConfig(ping_interval=30, ping_timeout=10))
    a, b = relay.join(), relay.join()
    for _ in range(20):
        relay.advance(10)
    assert a.messages_of("user-left") == [] and b.close_code is None


def test_handshake_timeout_drops_a_silent_connection(make_relay):
    from twisted.internet.protocol import Protocol

    class Silent(Protocol):  # opens TCP and never sends a byte
        lost = False

        def connectionLost(self, reason):
            self.lost = True

    relay = make_relay(RelayConfig(ping_interval=0, handshake_timeout=5))
    silent = Silent()
    relay.connect(client=silent)
    relay.advance(4.5)
    assert not silent.lost
    relay.advance(1)  # Autobahn batches its timers in 200 ms buckets
    assert silent.lost


def test_exception_in_a_handler_closes_1011_and_harms_no_one(relay, logged_failures,
                                                              monkeypatch):
    a, b, c = relay.join(), relay.join(), relay.join()
    import iw_relay.messages as messages

    real = messages.stamped

    def explode(payload, *args):
        if b"boom" in payload:
            raise RuntimeError("handler bug")
        return real(payload, *args)

    monkeypatch.setattr(messages, "stamped", explode)
    a.send_json({"type": "boom"})
    relay.flush()
    assert a.close_code == 1011
    assert len(logged_failures.take()) == 1
    b.send_json({"type": "op"})
    relay.flush()
    assert c.received[-1]["type"] == "op"
    assert c.messages_of("user-left")[0]["userCount"] == 2


def test_exception_while_joining_closes_1011(relay, logged_failures, monkeypatch):
    def broken_join(member, room_id):
        raise RuntimeError("join bug")

    monkeypatch.setattr(relay.registry, "join", broken_join)
    client = relay.connect("/room/abc")
    assert client.close_code == 1011
    assert len(logged_failures.take()) == 1


# -- expiry and shutdown ----------------------------------------------------------------

def test_room_expiry_closes_1000_and_counts(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, room_expiry=7200, cleanup_interval=3600))
    relay.service.startService()
    a, b = relay.join("r"), relay.join("r")
    relay.advance(3600)
    other = relay.join("s")  # created an hour later: expires an hour later
    assert a.close_code is None
    relay.advance(3600)
    for client in (a, b):
        assert client.messages_of("room-expired") == [
            {"type": "room-expired", "message": "Room expired after 2 hours"}]
        assert (client.close_code, client.close_reason) == (1000, "Room expired after 2 hours")
    assert other.close_code is None
    assert relay.registry.stats.disconnectionsTotal == 2
    check_counters(relay)
    relay.service.stopService()
    relay.flush()


def test_shutdown_sends_notice_and_1001(relay):
    relay.service.startService()
    a, b = relay.join("r"), relay.join("s")
    stopped = relay.service.stopService()
    relay.flush()
    for client in (a, b):
        assert client.received[-1] == {"type": "server-shutdown",
                                       "message": "Server is shutting down"}
        assert (client.close_code, client.close_reason) == (1001, "Server shutting down")
    assert stopped.called
    check_counters(relay)


def test_error_replies_have_exactly_three_fields(relay):
    a = relay.join()
    a.sendMessage(b"{}")
    a.sendMessage(b"nope")
    relay.flush()
    for reply in a.messages_of("error"):
        assert set(reply) == {"type", "message", "code"}


def test_relayed_json_is_compact_and_valid(relay):
    a, b = relay.join(), relay.join()
    a.send_json({"type": "op", "big": 10**30, "neg": -0.5})
    relay.flush()
    assert json.loads(b.raw[-1])["big"] == 10**30


def test_an_open_connection_keeps_no_handshake_and_no_copy_of_the_options(relay):
    """What makes an idle connection small (README, Performance): the request's headers
    are dropped once open, and Autobahn's options live on the class, not on each one."""
    relay.join()
    server = relay.servers[-1]
    assert server.http_headers is None and server.http_request_data is None
    assert "maxMessagePayloadSize" not in vars(server)
    assert server.maxMessagePayloadSize == relay.config.max_message_size


def test_a_client_offering_compression_still_connects(relay):
    """Browsers offer permessage-deflate; the relay declines it and the join succeeds
    (a bug once: the accept function, moved onto the protocol class, became a method)."""
    from autobahn.websocket.compress import PerMessageDeflateOffer

    from tests.clients import client_factory

    factory = client_factory("ws://127.0.0.1:3000/room/abc")
    factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
    client = relay.connect(client=factory.buildProtocol(None))
    assert client.received[0]["type"] == "connected"
