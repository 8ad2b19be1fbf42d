"""Cluster semantics on the memory backplane: N nodes in this process, one Clock, no
sockets. The same node-side code (iw_relay.backplane.shared) runs over Redis in
test_cluster.py; here every exchange is deterministic (`bus.settle()` runs it)."""

from __future__ import annotations

import json

import pytest
from twisted.logger import globalLogPublisher

from iw_relay.backplane.base import encode_header, encode_message, encode_presence
from iw_relay.backplane.memory import MemoryBus, memory_backplane
from iw_relay.config import RelayConfig
from iw_relay.registry import RoomRegistry, room_key
from tests.members import Member


class Cluster:
    def __init__(self) -> None:
        self.bus = MemoryBus()
        self.clock = self.bus.clock
        self.nodes: list[RoomRegistry] = []

    def node(self, **settings: object) -> RoomRegistry:
        config = RelayConfig(**{"room_expiry": 100, "cleanup_interval": 10,
                                "node_heartbeat": 1.0, **settings})
        node_id = f"{len(self.nodes) + 1:016x}"
        node = RoomRegistry(config, self.clock,
                            backplane=memory_backplane(self.bus, config, node_id))
        node.startService()
        self.nodes.append(node)
        self.bus.settle()
        return node

    def join(self, node: RoomRegistry, connection_id: str, room: str = "room") -> Member:
        member = Member(node, connection_id)
        node.join(member, room)
        self.bus.settle()
        return member

    def messages_published(self) -> list[tuple[str, bytes]]:
        return [(node, envelope) for node, envelope in self.bus.published
                if envelope[17:18] in (b"m", b"u")]


def op(n: int, sender: str = "") -> bytes:
    return json.dumps({"type": "op", "n": n, "connectionId": sender}).encode()


@pytest.fixture
def cluster():
    made = Cluster()
    yield made
    for node in made.nodes:
        if node.running:
            node.stopService()
    made.bus.settle()


def cid(n: int) -> str:
    return f"{n:016x}"


def test_presence_and_relaying_across_nodes(cluster):
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(0xA1))
    b1 = cluster.join(b, cid(0xB1))
    b2 = cluster.join(b, cid(0xB2))
    assert b1.presence()[0] == ("connected", cid(0xB1), 2)
    assert b1.of("connected")[0]["peers"] == [cid(0xA1)]
    assert sorted(b2.of("connected")[0]["peers"]) == [cid(0xA1), cid(0xB1)]
    assert a1.presence() == [("connected", cid(0xA1), 1), ("user-joined", cid(0xB1), 2),
                             ("user-joined", cid(0xB2), 3)]
    for n in range(30):
        a.broadcast(a1, op(n))
    b.broadcast(b1, op(100))
    cluster.bus.settle()
    assert b1.ops() == list(range(30))
    assert b2.ops() == [100, *range(30)]  # its own node first, then the batch
    assert a1.ops() == [100]
    assert a.backplane.stats.messagesFromOtherNodes == 1
    assert b.backplane.stats.messagesFromOtherNodes == 30  # once per node, not per member
    b.leave(b2, 1000)
    cluster.bus.settle()
    assert a1.presence()[-1] == ("user-left", cid(0xB2), 2)
    assert b1.presence()[-1] == ("user-left", cid(0xB2), 2)
    assert a.room_size("room") == b.room_size("room") == 2


def test_a_room_on_one_node_costs_the_backplane_nothing_per_message(cluster):
    a, b = cluster.node(), cluster.node()
    a1, a2 = cluster.join(a, cid(1), "here"), cluster.join(a, cid(2), "here")
    b1, b2 = cluster.join(b, cid(3), "there"), cluster.join(b, cid(4), "there")
    published = len(cluster.bus.published)
    for n in range(50):
        a.broadcast(a1, op(n))
        b.broadcast(b1, op(n))
    assert a.unicast(a1, cid(2), b'{"type":"offer"}')
    cluster.bus.settle()
    assert a2.ops() == b2.ops() == list(range(50)) and a2.of("offer")
    assert len(cluster.bus.published) == published  # nothing at all went to the bus


def test_one_publish_per_destination_node_per_turn(cluster):
    a, b, c = cluster.node(), cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    b1, c1 = cluster.join(b, cid(2)), cluster.join(c, cid(3))
    for n in range(100):
        a.broadcast(a1, op(n))
        assert a.unicast(a1, cid(2), json.dumps({"type": "candidate", "n": n}).encode())
    cluster.bus.settle()
    sent = cluster.messages_published()
    assert sorted(node for node, _ in sent) == [b.backplane.node_id, c.backplane.node_id]
    assert c1.ops() == list(range(100))
    # Broadcasts and unicasts keep the sender's order.
    assert [(m["type"], m["n"]) for m in b1.delivered if "n" in m] == [
        (kind, n) for n in range(100) for kind in ("op", "candidate")]


def test_unicast_across_nodes_and_unknown_peers(cluster):
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    b1, b2 = cluster.join(b, cid(2)), cluster.join(b, cid(3))
    other = cluster.join(b, cid(4), "other")
    assert a.unicast(a1, cid(2), b'{"type":"offer"}')
    cluster.bus.settle()
    assert b1.of("offer") == [{"type": "offer"}] and b2.of("offer") == []
    for target in ("nobody", cid(4), cid(1)):
        assert a.unicast(a1, target, b'{"type":"offer"}') is False
    b.leave(b2, 1000)
    cluster.bus.settle()
    assert a.unicast(a1, cid(3), b'{"type":"offer"}') is False
    assert other.of("offer") == []
    assert a.stats.messagesRelayed == 1


def test_max_room_size_holds_across_nodes(cluster):
    a, b = cluster.node(max_room_size=2), cluster.node(max_room_size=2)
    a1 = cluster.join(a, cid(1))
    b1 = Member(b, cid(2))
    b2 = Member(b, cid(3))
    b.join(b1, "room")
    b.join(b2, "room")  # back to back: B's own view still says one member
    cluster.bus.settle()
    assert b1.presence() == [("connected", cid(2), 2)]
    assert b2.delivered == [{"type": "error", "message": "Room is full",
                             "code": "ROOM_FULL"}]
    assert b2.closed_with == (1008, "Room is full")
    assert a1.presence() == [("connected", cid(1), 1), ("user-joined", cid(2), 2)]
    assert (b.stats.connectionsTotal - b.stats.disconnectionsTotal
            == b.connection_count == 1)
    assert cluster.bus.members[room_key("room")] == {
        cid(1): a.backplane.node_id, cid(2): b.backplane.node_id}


def test_ordering_when_another_node_s_first_member_joins(cluster):
    """A member gets every message sent after its `connected` reached... see registry:
    nothing its node got before the join was committed, everything after."""
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    b1 = Member(b, cid(2))
    b.join(b1, "room")  # B's first member: the script runs, the markers are in flight
    a.broadcast(a1, op(0))  # A has not heard of b1: sent before it could know
    assert not a.rooms["room"].nodes  # ...so it costs nothing and goes nowhere
    cluster.bus.settle()
    assert b1.presence() == [("connected", cid(2), 2)]
    assert a1.presence()[-1] == ("user-joined", cid(2), 2)
    a.broadcast(a1, op(1))  # after a1 was told b1 joined
    cluster.bus.settle()
    assert b1.ops() == [1]


def test_ordering_when_the_node_already_has_members(cluster):
    """A message Redis passed to the node before the join's marker never reaches the new
    member; every one after does, and the member's own early sends wait for it."""
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    b1 = cluster.join(b, cid(2))
    a.broadcast(a1, op(0))
    a.backplane._flush()  # published now: ahead of the join below in the bus's order
    b2 = Member(b, cid(3))
    b.join(b2, "room")
    b.broadcast(b2, op(7))  # sent before its connected: kept, relayed once it is in
    a.broadcast(a1, op(1))  # after the join, in the bus's order
    cluster.bus.settle()
    assert b1.ops() == [0, 7, 1]
    assert b2.presence()[0] == ("connected", cid(3), 3)
    assert b2.ops() == [1]
    assert a1.ops() == [7]


def test_a_dead_node_s_members_leave_within_three_heartbeats(cluster):
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    cluster.join(b, cid(2))
    cluster.clock.pump([1.0] * 4)  # both beat; A has been connected long enough
    b.backplane._heartbeat.stop()
    cluster.bus.cut(b.backplane.node_id)  # as if killed: no leave, no goodbye
    for _ in range(4):
        cluster.clock.advance(1.0)
        cluster.bus.settle()
    assert a1.presence()[-1] == ("user-left", cid(2), 1)
    assert a.backplane.stats.deadNodesSeen == 1
    assert cluster.bus.members[room_key("room")] == {cid(1): a.backplane.node_id}
    late = cluster.join(a, cid(3))
    assert late.presence() == [("connected", cid(3), 2)]


def test_outage_local_relaying_goes_on_then_presence_is_repaired(cluster):
    a, b = cluster.node(), cluster.node()
    a1, a2 = cluster.join(a, cid(1)), cluster.join(a, cid(2))
    b1, b2 = cluster.join(b, cid(3)), cluster.join(b, cid(4))
    assert a.backplane.stats.redisReconnects == 0  # the first connection is not one
    cluster.bus.cut(a.backplane.node_id)
    cluster.bus.cut(b.backplane.node_id)
    cluster.bus.wipe()
    assert a.backplane.status() == {
        "memory": "disconnected", "connected": False, "node": a.backplane.node_id,
        "crossNodeDropped": 0, "messagesFromOtherNodes": 0, "redisReconnects": 0,
        "deadNodesSeen": 0, "badEnvelopes": 0}
    a.broadcast(a1, op(1))
    assert a2.ops() == [1] and a.backplane.stats.crossNodeDropped == 1
    b.leave(b2, 1000)
    assert b1.presence()[-1] == ("user-left", cid(4), 3)
    a3 = Member(a, cid(5))
    a.join(a3, "room")
    assert a3.presence() == [("connected", cid(5), 5)]  # welcomed at once
    cluster.bus.restore(a.backplane.node_id)
    cluster.bus.restore(b.backplane.node_id)
    cluster.bus.settle()
    assert a.backplane.state == b.backplane.state == "connected"
    assert ("user-left", cid(4), 4) in a1.presence()
    assert ("user-joined", cid(5), 4) in b1.presence()
    for member in (a1, a2, b1):
        assert {m["connectionId"] for m in member.of("user-left")} <= {cid(4)}
    b.broadcast(b1, op(2))
    cluster.bus.settle()
    assert a3.ops() == [2] and a1.ops() == [2]
    assert a.backplane.stats.redisReconnects == 1


def test_a_member_failing_a_presence_delivery_is_closed_with_1011(cluster, logged_failures):
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))

    def broken(frame: bytes) -> None:
        raise RuntimeError("socket gone")

    a1.deliver = broken
    b1 = cluster.join(b, cid(2))  # a1 is told on node A: a remote presence event
    assert a1.closed_with == (1011, "Internal server error")
    assert len(logged_failures.take()) == 1
    cluster.bus.settle()
    assert b1.presence() == [("connected", cid(2), 2), ("user-left", cid(1), 1)]


def test_a_stalled_store_bounds_what_waits_and_never_stalls_local_relaying(cluster):
    a, b = cluster.node(redis_queue_size=3), cluster.node()
    a1, a2 = cluster.join(a, cid(1)), cluster.join(a, cid(2))
    b1 = cluster.join(b, cid(3))
    for n in range(10):  # ten turns, the store answering none
        a.broadcast(a1, op(n))
        a.backplane._flush()
    assert a2.ops() == list(range(10))
    assert a.backplane.store.in_flight == 3
    assert a.backplane.stats.crossNodeDropped == 7
    cluster.bus.settle()
    assert b1.ops() == [0, 1, 2]


@pytest.mark.parametrize("entry", [
    b"2" + b"0" * 16,  # unknown version
    b"1" + b"ZZ" * 8 + b"m",  # bad sender
    b"1" + b"f" * 16 + b"m" + b"g" * 32 + b"2:{}",  # bad room key
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"0:",  # empty frame
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"8:not json",
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"4:[42]",
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"11:{\"type\":\"\"}",
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"99:{\"type\":\"x\"}",
    b"1" + b"f" * 16 + b"m" + room_key("room").encode() + b"x:{}",
    b"1" + b"f" * 16 + b"j" + room_key("room").encode() + b"NOT-AN-ID-AT-ALL",
    b"1" + b"f" * 16 + b"j" + room_key("room").encode() + b"0123",
    b"1" + b"f" * 16 + b"q" + room_key("room").encode(),
    b"1" + b"f" * 16,
])
def test_malformed_envelopes_are_counted_and_dropped(cluster, entry):
    a = cluster.node()
    a1, a2 = cluster.join(a, cid(1)), cluster.join(a, cid(2))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        cluster.bus.inject(a.backplane.node_id, entry)
        cluster.bus.settle()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert a.backplane.stats.badEnvelopes == 1
    assert len(a1.delivered) == 2 and len(a2.delivered) == 1  # nothing new
    assert a.rooms["room"].remote == {}
    late = cluster.join(a, cid(3))
    assert late.of("connected")[0]["peers"] == [cid(1), cid(2)]  # no phantom
    assert any("malformed" in str(event.get("log_format")) for event in seen)


def test_a_good_entry_before_a_bad_one_still_counts(cluster):
    a = cluster.node()
    a1 = cluster.join(a, cid(1))
    key = room_key("room").encode()
    other = "e" * 16
    cluster.bus.inject(a.backplane.node_id, encode_header(other)
                       + encode_presence(b"j", key.decode(), cid(9))
                       + encode_message(key, b'{"type":"op","n":5}') + b"m" + key + b"3:{}")
    cluster.bus.settle()
    assert a1.presence()[-1] == ("user-joined", cid(9), 2)
    assert a1.ops() == [5]
    assert a.backplane.stats.badEnvelopes == 1


def test_expiry_is_fixed_by_the_first_join_anywhere(cluster):
    a, b = cluster.node(), cluster.node(cleanup_interval=1000)
    a1 = cluster.join(a, cid(1))
    cluster.clock.pump([1] * 60)
    b1 = cluster.join(b, cid(2))
    assert a.rooms["room"].expires_at == b.rooms["room"].expires_at == 100
    cluster.clock.pump([1] * 40)  # A's sweep at 100 expires it and tells B
    cluster.bus.settle()
    assert a1.closed_with[0] == 1000 and b1.closed_with[0] == 1000
    assert not a1.of("user-left") and not b1.of("user-left")
    assert a.rooms == {} and b.rooms == {}
    assert room_key("room") not in cluster.bus.members


def test_a_stalled_node_found_dead_comes_back_with_its_members(cluster):
    a, b = cluster.node(), cluster.node()
    a1 = cluster.join(a, cid(1))
    cluster.join(b, cid(2))
    cluster.clock.pump([1.0] * 4)
    b.backplane._heartbeat.stop()  # B stalls, still linked
    cluster.clock.pump([1.0] * 4)
    assert a1.presence()[-1] == ("user-left", cid(2), 1)
    assert cid(2) not in cluster.bus.members[room_key("room")]  # reaped
    b.backplane._heartbeat.start(1.0, now=True)  # B wakes: its key is gone
    cluster.bus.settle()
    assert a1.presence()[-1] == ("user-joined", cid(2), 2)
    assert cluster.bus.members[room_key("room")][cid(2)] == b.backplane.node_id
    cluster.clock.pump([1.0] * 4)
    assert a1.presence()[-1] == ("user-joined", cid(2), 2)  # and stays
