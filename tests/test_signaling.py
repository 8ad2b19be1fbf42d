"""WebRTC signaling on one node: `peers` in `connected`, unicast with `to`, UNKNOWN_PEER.

Real Autobahn clients against the real protocol over in-memory transports (MemoryRelay).
"""

from __future__ import annotations

from twisted.internet.task import Clock

from iw_relay.config import RelayConfig
from iw_relay.registry import RoomRegistry
from tests.members import Member, h


def ids(*clients):
    return [client.received[0]["connectionId"] for client in clients]


def test_connected_lists_the_peers_already_in_the_room(relay):
    a = relay.join("r")
    b = relay.join("r")
    relay.join("elsewhere")
    c = relay.join("r")
    a_id, b_id, c_id = ids(a, b, c)
    assert a.received[0]["peers"] == []
    assert b.received[0]["peers"] == [a_id]
    assert c.received[0]["peers"] == [a_id, b_id]  # in the order they joined
    assert c.received[0]["userCount"] == 3
    b.sendClose(1000)
    relay.flush()
    d = relay.join("r")
    assert d.received[0]["peers"] == [a_id, c_id]


def test_a_message_with_to_reaches_that_member_only(relay):
    a, b, c = relay.join("r"), relay.join("r"), relay.join("r")
    other = relay.join("other")
    _, b_id, _ = ids(a, b, c)
    relay.wall_time = 1_700_000_123.456
    a.send_json({"type": "offer", "to": b_id, "sdp": "v=0\r\n", "connectionId": "forged"})
    relay.flush()
    assert b.messages_of("offer") == [{
        "type": "offer", "to": b_id, "sdp": "v=0\r\n",
        "connectionId": a.received[0]["connectionId"], "timestamp": 1_700_000_123_456,
    }]
    assert c.messages_of("offer") == [] and other.messages_of("offer") == []
    assert a.messages_of("offer") == [] and a.messages_of("error") == []
    assert relay.registry.stats.messagesRelayed == 1
    # Broadcasts are unchanged, and keep their order with unicasts from the same sender.
    a.send_json({"type": "op", "n": 1})
    a.send_json({"type": "candidate", "to": b_id, "n": 2})
    a.send_json({"type": "op", "n": 3})
    relay.flush()
    assert [m.get("n") for m in b.received if m["type"] in ("op", "candidate")] == [1, 2, 3]
    assert [m.get("n") for m in c.received if m["type"] in ("op", "candidate")] == [1, 3]
    assert relay.registry.stats.messagesRelayed == 4


def test_unknown_peer_is_an_error_for_the_sender_only(relay):
    a, b = relay.join("r"), relay.join("r")
    elsewhere = relay.join("elsewhere")
    a_id, _ = ids(a, b)
    (elsewhere_id,) = ids(elsewhere)
    for target in ("0123456789abcdef", elsewhere_id, a_id, ""):  # nobody, other room, self
        a.send_json({"type": "offer", "to": target})
    relay.flush()
    errors = a.messages_of("error")
    assert errors == [{"type": "error", "code": "UNKNOWN_PEER",
                       "message": "No such peer in this room"}] * 4
    assert b.messages_of("offer") == [] and elsewhere.messages_of("offer") == []
    assert relay.registry.stats.messagesRelayed == 0
    # The connection stays usable.
    a.send_json({"type": "op"})
    relay.flush()
    assert b.messages_of("op") and a.close_code is None


def test_a_peer_that_left_is_unknown(relay):
    a, b = relay.join("r"), relay.join("r")
    _, b_id = ids(a, b)
    b.sendClose(1000)
    relay.flush()
    a.send_json({"type": "answer", "to": b_id})
    relay.flush()
    assert a.messages_of("error")[-1]["code"] == "UNKNOWN_PEER"


def test_to_that_is_not_a_string_is_broadcast_as_before(relay):
    """Clients written before `to` existed may use the field for something else."""
    a, b, c = relay.join("r"), relay.join("r"), relay.join("r")
    for value in (None, 42, ["x"], {"id": "y"}):
        a.send_json({"type": "op", "to": value})
    relay.flush()
    assert [m["to"] for m in b.messages_of("op")] == [None, 42, ["x"], {"id": "y"}]
    assert [m["to"] for m in c.messages_of("op")] == [None, 42, ["x"], {"id": "y"}]
    assert a.messages_of("error") == []


def test_unicast_is_rate_limited_like_broadcast(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, rate_limit=3, flood_windows=0))
    a, b = relay.join("r"), relay.join("r")
    _, b_id = ids(a, b)
    for n in range(5):
        a.send_json({"type": "candidate", "to": b_id, "n": n})
    relay.flush()
    assert [m["n"] for m in b.messages_of("candidate")] == [0, 1, 2]
    assert [m["code"] for m in a.messages_of("error")] == ["RATE_LIMIT_EXCEEDED"]
    assert relay.registry.stats.rateLimitsHit == 2
    assert relay.registry.stats.messagesRelayed == 3


def test_unicast_bad_json_is_still_a_parse_error(relay):
    a, _b = relay.join("r"), relay.join("r")
    a.sendMessage(b'{"type": "offer", "to": ')
    a.send_json({"to": "x"})
    relay.flush()
    assert [m["code"] for m in a.messages_of("error")] == ["PARSE_ERROR", "INVALID_MESSAGE"]


def test_registry_unicast_counts_and_refuses():
    registry = RoomRegistry(RelayConfig(), Clock())
    a, b, c = Member(None, "a"), Member(None, "b"), Member(None, "c")
    registry.join(a, "r")
    registry.join(b, "r")
    registry.join(c, "other")
    assert registry.unicast(a, h("b"), b'{"type":"x"}') is True
    assert b.delivered[-1] == {"type": "x"}
    assert registry.unicast(a, h("c"), b'{"type":"x"}') is False  # another room
    assert registry.unicast(a, h("a"), b'{"type":"x"}') is False  # itself
    assert registry.unicast(a, "zz", b'{"type":"x"}') is False
    assert registry.stats.messagesRelayed == 1
    assert sum(registry.relay_seconds.counts) == 1
