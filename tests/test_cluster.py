"""Cluster mode in one process: several RoomRegistry nodes over the Redis backplane, on
one real redis-server.

Members are fakes and each node's time is a Clock (expiry, heartbeats); only the bytes to
and from Redis go over real loopback sockets, waited for by bounded polling.
"""

from __future__ import annotations

import json
import re
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from iw_relay.backplane.local import LocalBackplane
from iw_relay.backplane.redis import redis_backplane
from iw_relay.config import RelayConfig
from iw_relay.registry import RoomRegistry
from iw_relay.registry import room_key as cluster_hash
from iw_relay.service import RelayService
from iw_relay.tap import Options
from tests.helpers import until
from tests.members import Member, h
from tests.redis_process import RedisServer


def publish_count(server, command: str = "publish") -> int:
    """PUBLISH (or `command`) commands Redis has run, from INFO commandstats (scripts'
    own not counted)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as conn:
        conn.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"\r\n\r\n" not in data[-8:] and (chunk := conn.recv(65536)):
            data += chunk
            if data.startswith(b"$") and len(data.split(b"\r\n", 1)[-1]) >= int(
                    data[1:data.index(b"\r\n")]):
                break
    found = re.search(rb"cmdstat_%s:calls=(\d+)" % command.encode(), data)
    return int(found.group(1)) if found else 0


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.nodes: list[RoomRegistry] = []

    def node(self, **settings: object) -> RoomRegistry:
        config = RelayConfig(redis=self.url, **{"room_expiry": 100, "cleanup_interval": 10,
                                                "node_heartbeat": 1.0, **settings})
        clock = Clock()
        node = RoomRegistry(config, clock,
                            backplane=redis_backplane(config, clock, reactor))
        node.startService()
        self.nodes.append(node)
        return node

    async def connected(self, *nodes: RoomRegistry) -> None:
        await until(lambda: all(n.backplane.state == "connected"
                                for n in nodes or self.nodes),
                    "every node connected to Redis")

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                pytest_twisted.blockon(node.stopService())
        # txredisapi parses a read's remaining replies on a callLater(0) of its own.
        pytest_twisted.blockon(deferLater(reactor, 0.05, lambda: None))


@pytest.fixture
def cluster(redis_server):
    made = Cluster(redis_server.url)
    yield made
    made.stop()


async def joined(member: Member, room: str) -> Member:
    member.registry.join(member, room)
    await until(lambda: member.of("connected"), f"{member.connection_id} connected")
    return member


@pytest_twisted.ensureDeferred
async def test_members_on_two_nodes_share_a_room(cluster):
    a, b = cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    b1 = await joined(Member(b, "b1"), "room")
    b2 = await joined(Member(b, "b2"), "room")
    other = await joined(Member(a, "o1"), "other")
    assert b1.presence()[0] == ("connected", "b1", 2)
    assert b2.presence()[0] == ("connected", "b2", 3)
    await until(lambda: len(a1.presence()) == 3, "a1 told of b1 and b2")
    assert a1.presence() == [("connected", "a1", 1), ("user-joined", "b1", 2),
                             ("user-joined", "b2", 3)]
    assert b1.presence() == [("connected", "b1", 2), ("user-joined", "b2", 3)]

    for n in range(50):
        a.broadcast(a1, json.dumps({"type": "op", "n": n, "connectionId": "a1"}).encode())
    b.broadcast(b1, b'{"type":"op","from":"b1","connectionId":"b1"}')
    await until(lambda: len(b1.of("op")) == 50 and len(b2.of("op")) == 51
                and len(a1.of("op")) == 1, "every message everywhere")
    assert [m["n"] for m in b1.of("op")] == list(range(50))  # per-sender order
    assert [m["n"] for m in b2.of("op") if "n" in m] == list(range(50))
    assert a1.of("op") == [{"type": "op", "from": "b1", "connectionId": "b1"}]
    assert other.of("op") == []
    assert a.stats.messagesRelayed == 50 and b.stats.messagesRelayed == 1
    assert a.backplane.stats.messagesFromOtherNodes == 1

    b.leave(b2, 1000)
    await until(lambda: ("user-left", "b2", 2) in a1.presence(), "a1 told b2 left")
    assert b1.presence()[-1] == ("user-left", "b2", 2)
    # Nothing was received twice (exactly once, own echoes dropped).
    await until(lambda: a.backplane.store.in_flight == b.backplane.store.in_flight == 0,
                "quiet")
    assert len(a1.of("op")) == 1 and len(b1.of("op")) == 50
    assert (a.stats.connectionsTotal, a.stats.disconnectionsTotal) == (2, 0)
    assert (b.stats.connectionsTotal, b.stats.disconnectionsTotal) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_expiry_is_fixed_by_the_first_join_anywhere_and_swept_everywhere(cluster):
    a = cluster.node()
    b = cluster.node(cleanup_interval=1000)  # B's own sweep comes too late: A's tells it
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    b.clock.advance(60)  # B joins a minute later: the room still ends at A's deadline
    b1 = await joined(Member(b, "b1"), "room")
    room_a, room_b = a.rooms["room"], b.rooms["room"]
    assert room_a.expires_at == room_b.expires_at == 100
    b.clock.advance(40)
    a.clock.pump([10] * 10)  # A's sweep expires it at 100 and tells B
    assert a1.closed_with[0] == 1000 and a1.of("room-expired")
    await until(lambda: b1.closed_with is not None, "B expires the room too")
    assert b1.closed_with[0] == 1000 and b1.of("room-expired")
    assert not b1.of("user-left") and not a1.of("user-left")
    assert a.rooms == {} and b.rooms == {}
    assert a.stats.disconnectionsTotal == 1 and b.stats.disconnectionsTotal == 1
    # The room id is free at once: a new join creates a new room, with a new deadline.
    again = await joined(Member(b, "b2"), "room")
    assert again.presence() == [("connected", "b2", 1)]
    assert b.rooms["room"].expires_at == 200


@pytest_twisted.ensureDeferred
async def test_redis_holds_hashes_only_and_every_key_expires(cluster, redis_server):
    a = cluster.node()
    await cluster.connected()
    room = "secret-room-id"
    a1 = await joined(Member(a, "a1"), room)
    a.broadcast(a1, b'{"type":"op","body":"private text"}')
    a.clock.advance(1)
    await until(lambda: len(redis_server.keys()) >= 4, "keys written")
    keys = redis_server.keys()
    assert all(room not in key for key in keys), keys
    assert any(cluster_hash(room) in key for key in keys)
    for key in keys:
        assert int(redis_server.command("PTTL", key)[1:]) > 0, key
        dump = redis_server.command("DUMP", key) or ""
        assert "private" not in dump and room not in dump


@pytest_twisted.ensureDeferred
async def test_a_dead_node_s_members_leave_within_three_heartbeats(cluster):
    a = cluster.node(node_heartbeat=0.2)
    b = cluster.node(node_heartbeat=0.2)
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    await joined(Member(b, "b1"), "room")
    await until(lambda: ("user-joined", "b1", 2) in a1.presence(), "a1 sees b1")
    b.backplane._heartbeat.stop()
    await b.backplane.store.disconnect()  # as if killed: no leave, no goodbye; its key expires
    b.running = False  # nothing left to stop
    a.clock.advance(1)  # A has been connected long enough to judge others

    def told() -> bool:
        a.clock.advance(0.2)
        return ("user-left", "b1", 1) in a1.presence()

    await until(told, "a1 told that b1 left with its dead node", timeout=5)
    assert a.backplane.stats.deadNodesSeen == 1
    late = await joined(Member(a, "a2"), "room")
    assert late.presence() == [("connected", "a2", 2)]


@pytest_twisted.ensureDeferred
async def test_redis_restart_local_relaying_goes_on_then_presence_is_repaired(
        cluster, redis_server):
    a, b = cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    a2 = await joined(Member(a, "a2"), "room")
    b1 = await joined(Member(b, "b1"), "room")
    b2 = await joined(Member(b, "b2"), "room")
    await until(lambda: len(a1.presence()) == 4, "a1 sees everyone")

    redis_server.kill()
    await until(lambda: a.backplane.state == b.backplane.state == "disconnected",
                "both nodes see the outage")
    assert a.backplane.status()["redis"] == "disconnected"
    a.broadcast(a1, b'{"type":"op","n":1}')
    assert a2.of("op") == [{"type": "op", "n": 1}]  # local relaying goes on
    assert a.backplane.stats.crossNodeDropped == 1
    b.leave(b2, 1000)  # leaves during the outage
    assert b1.presence()[-1] == ("user-left", "b2", 3)
    a3 = Member(a, "a3")
    a.join(a3, "room")  # joins during the outage: welcomed at once
    assert a3.presence() == [("connected", "a3", 5)]

    redis_server.start()
    await cluster.connected()
    await until(lambda: ("user-left", "b2", 4) in a1.presence(), "a1 told b2 left")
    await until(lambda: ("user-joined", "a3", 4) in b1.presence(), "b1 told a3 joined")
    # Nobody still connected was reported gone.
    for member in (a1, a2, b1):
        assert {m["connectionId"] for m in member.of("user-left")} <= {"b2"}
    b.broadcast(b1, b'{"type":"op","n":2}')
    await until(lambda: all(m.of("op")[-1:] == [{"type": "op", "n": 2}]
                            for m in (a1, a2, a3)), "relaying across nodes again")
    assert a.backplane.stats.redisReconnects == 1  # the first connection is not one


@pytest_twisted.ensureDeferred
async def test_a_stalled_redis_cannot_stall_local_relaying(cluster, redis_server):
    a = cluster.node(redis_queue_size=5)
    b = cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    a2 = await joined(Member(a, "a2"), "room")
    b1 = await joined(Member(b, "b1"), "room")
    await until(lambda: a.rooms["room"].nodes, "a knows b1")
    redis_server.pause()
    try:
        for n in range(20):  # twenty reactor turns: one PUBLISH each, none answered
            a.broadcast(a1, json.dumps({"type": "op", "n": n}).encode())
            await deferLater(reactor, 0, lambda: None)
        assert [m["n"] for m in a2.of("op")] == list(range(20))  # at once, all of them
        assert a.backplane.store.in_flight == 5
        assert a.backplane.stats.crossNodeDropped == 15
    finally:
        redis_server.resume()
    await until(lambda: len(b1.of("op")) == 5, "the queued five reach the other node")
    assert [m["n"] for m in b1.of("op")] == list(range(5))


@pytest_twisted.ensureDeferred
async def test_a_redis_that_answers_no_publish_is_dropped_after_three_heartbeats(
        cluster, redis_server):
    # Publishes carry no timer of their own (they are written straight to the socket);
    # the store's watchdog must still see that Redis stopped answering them.
    a = cluster.node(node_heartbeat=0.2)
    b = cluster.node(node_heartbeat=0.2)
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    await joined(Member(b, "b1"), "room")
    await until(lambda: a.rooms["room"].nodes, "a knows b1")
    redis_server.pause()
    try:
        a.broadcast(a1, b'{"type":"op"}')  # one PUBLISH; the Clock sends no heartbeat
        await deferLater(reactor, 0, lambda: None)
        assert a.backplane.store.in_flight == 1 and a.backplane.state == "connected"
        await until(lambda: a.backplane.state == "disconnected", "the stall is noticed",
                    timeout=5)
        assert b.backplane.state == "connected"  # it sent nothing: nothing to notice
    finally:
        redis_server.resume()
    await cluster.connected()


@pytest_twisted.ensureDeferred
async def test_publishes_are_unanswered_and_confirmed_by_one_ping(cluster, redis_server):
    """A PUBLISH costs its node no reply to read (CLIENT REPLY SKIP): the publishes of
    twenty turns count as in flight until one PING's answer confirms them all."""
    a, b = cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    b1 = await joined(Member(b, "b1"), "room")
    await until(lambda: a.rooms["room"].nodes, "a knows b1")
    await until(lambda: a.backplane.store.in_flight == 0, "a idle")
    skips = publish_count(redis_server, r"client\|reply")
    pings = publish_count(redis_server, "ping")
    for n in range(20):  # twenty reactor turns: one PUBLISH each
        a.broadcast(a1, json.dumps({"type": "op", "n": n}).encode())
        await deferLater(reactor, 0, lambda: None)
    assert a.backplane.store.in_flight == 20
    await until(lambda: [m["n"] for m in b1.of("op")] == list(range(20)), "all relayed")
    await until(lambda: a.backplane.store.in_flight == 0, "the publishes confirmed")
    assert publish_count(redis_server, r"client\|reply") - skips == 20  # CLIENT REPLY SKIP each
    assert publish_count(redis_server, "ping") - pings <= 2  # not one per PUBLISH
    # With no reply to carry Redis's ACK, Nagle would hold each PUBLISH written while the
    # previous one is unacknowledged until Redis's delayed ACK, 40 ms later.
    sock = a.backplane.store.commands.transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.fixture
def redis_without_client(tmp_path):
    server = RedisServer(tmp_path, "--rename-command", "CLIENT", "").start()
    yield server
    server.kill()


@pytest_twisted.ensureDeferred
async def test_a_redis_without_client_reply_skip_is_refused(redis_without_client):
    """Publishes rely on CLIENT REPLY SKIP; a Redis where CLIENT is renamed away would
    answer them out of step with the commands' replies: the node never joins it."""
    cluster = Cluster(redis_without_client.url)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    a = cluster.node()
    try:
        def refusals() -> int:
            return sum("CLIENT REPLY SKIP" in formatEvent(e) for e in events)

        await until(lambda: refusals() >= 2, "a reconnection, refused again")
        assert a.backplane.state == "disconnected"
        assert a.backplane._generation == 0  # never linked, not even for a turn
    finally:
        globalLogPublisher.removeObserver(events.append)
        await a.stopService()
        await deferLater(reactor, 0.05, lambda: None)


def test_the_single_node_backplane_stays_the_default():
    registry = RelayService(RelayConfig(), listen=False).registry
    assert type(registry.backplane) is LocalBackplane and registry.backplane.status() is None
    service = RelayService(RelayConfig(redis="redis://127.0.0.1:1/0"), listen=False)
    assert service.registry.backplane.status()["redis"] == "disconnected"
    assert RoomRegistry(RelayConfig(), Clock()).backplane.status() is None


def test_cluster_options_from_the_command_line_and_the_environment():
    options = Options(environ={"IWRELAY_REDIS": "redis://10.0.0.5:6380/2"})
    options.parseOptions(["--node-heartbeat", "2s", "--redis-queue-size", "50"])
    config = options.config
    assert (config.redis, config.node_heartbeat, config.redis_queue_size) == (
        "redis://10.0.0.5:6380/2", 2.0, 50)
    assert Options(environ={}).parseOptions([]) is None
    for bad in (["--redis", "http://x"], ["--redis", "redis://host:6379/x"],
                ["--node-heartbeat", "0"], ["--redis-queue-size", "0"]):
        with pytest.raises(Exception, match=r"redis|heartbeat|queue|at least|longer"):
            Options(environ={}).parseOptions(bad)


@pytest_twisted.ensureDeferred
async def test_health_stats_and_metrics_tell_whether_the_node_reaches_redis(
        cluster, redis_server):
    from treq.testing import StubTreq

    from iw_relay.metrics import RelayCollector
    from iw_relay.web import RelayResource

    node = cluster.node()
    http = StubTreq(RelayResource(node, Resource()))

    async def get(path: str) -> tuple[int, dict]:
        response = await http.get(f"http://relay{path}")
        return response.code, json.loads(await response.text())

    await cluster.connected()
    code, health = await get("/health")
    assert (code, health["status"], health["redis"]) == (200, "healthy", "connected")
    metrics = {m.name: m.samples[0].value for m in RelayCollector(node).collect()
               if m.samples}
    assert metrics["iwrelay_redis_connected"] == 1
    redis_server.kill()
    await until(lambda: node.backplane.state == "disconnected", "the node sees the outage")
    code, health = await get("/health")
    assert (code, health["status"], health["redis"]) == (503, "degraded", "disconnected")
    code, stats = await get("/stats")
    assert code == 200 and stats["cluster"]["redis"] == "disconnected"
    assert stats["cluster"]["node"] == node.backplane.node_id
    metrics = {m.name: m.samples[0].value for m in RelayCollector(node).collect()
               if m.samples}
    assert metrics["iwrelay_redis_connected"] == 0
    assert "iwrelay_cross_node_dropped" in metrics


@pytest_twisted.ensureDeferred
async def test_a_node_found_dead_while_alive_writes_its_members_back(
        cluster, redis_server):
    a, b = cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    await joined(Member(b, "b1"), "room")
    await until(lambda: ("user-joined", "b1", 2) in a1.presence(), "a1 sees b1")
    # B stalls past its heartbeat's expiry (its key is gone): A finds it dead.
    assert redis_server.command("DEL", f"iwrelay:n:{b.backplane.node_id}") == ":1"
    a.clock.advance(3)
    await until(lambda: ("user-left", "b1", 1) in a1.presence(), "a1 told b1 left")
    # B's next heartbeat finds its key gone and writes its members back.
    b.clock.advance(1)
    await until(lambda: a1.presence()[-1] == ("user-joined", "b1", 2), "b1 is back")
    assert b.backplane.state == "connected"
    await until(lambda: redis_server.command(
        "HLEN", f"iwrelay:m:{cluster_hash('room')}") == ":2", "both in Redis again")


@pytest_twisted.ensureDeferred
async def test_what_arrives_from_redis_is_checked_before_anyone_gets_it(
        cluster, redis_server):
    a = cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    a2 = await joined(Member(a, "a2"), "room")
    inbox = f"iwrelay:i:{a.backplane.node_id}"
    key = cluster_hash("room")
    for junk in ("hello", f"1{'f' * 16}m{key}0:", f"1{'f' * 16}m{key}3:abc",
                 f"1{'f' * 16}jx{key}", f"1{'f' * 16}j{key}PHANTOM-MEMBER!!"):
        assert redis_server.command("PUBLISH", inbox, junk) == ":1"
    await until(lambda: a.backplane.stats.badEnvelopes == 5, "five dropped")
    assert len(a1.delivered) == 2 and len(a2.delivered) == 1
    a3 = await joined(Member(a, "a3"), "room")
    assert a3.of("connected")[0]["peers"] == ["a1", "a2"]


@pytest_twisted.ensureDeferred
async def test_max_room_size_holds_across_nodes(cluster):
    a, b = cluster.node(max_room_size=2), cluster.node(max_room_size=2)
    await cluster.connected()
    await joined(Member(a, "a1"), "room")
    b1, b2 = Member(b, "b1"), Member(b, "b2")
    b.join(b1, "room")
    b.join(b2, "room")  # back to back: B itself has not heard of any other member
    await until(lambda: b2.closed_with is not None, "b2 refused")
    assert b2.delivered == [{"type": "error", "message": "Room is full",
                             "code": "ROOM_FULL"}]
    assert b2.closed_with == (1008, "Room is full")
    assert b1.presence() == [("connected", "b1", 2)]


@pytest_twisted.ensureDeferred
async def test_unicast_reaches_its_target_on_another_node_only(
        cluster, redis_server):
    a, b, c = cluster.node(), cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    a2 = await joined(Member(a, "a2"), "room")
    b1 = await joined(Member(b, "b1"), "room")
    b2 = await joined(Member(b, "b2"), "room")
    await until(lambda: len(a.rooms["room"].remote) == 2, "a knows b1 and b2")
    c1 = await joined(Member(c, "c1"), "room")
    # `peers`: every other member of the room, on this node and on the others.
    assert b1.of("connected")[0]["peers"] == ["a1", "a2"]
    assert sorted(c1.of("connected")[0]["peers"]) == ["a1", "a2", "b1", "b2"]
    assert c1.of("connected")[0]["userCount"] == 5
    await until(lambda: len(a.rooms["room"].remote) == 3, "a knows c1")

    await until(lambda: all(node.backplane.store.in_flight == 0 for node in (a, b, c)), "idle")
    publishes = publish_count(redis_server)
    for n in range(20):
        a.broadcast(a1, json.dumps({"type": "op", "n": n}).encode())
        assert a.unicast(a1, h("b1"), json.dumps({"type": "candidate", "n": n}).encode())
    assert a.unicast(a1, h("a2"), b'{"type":"offer","local":true}')  # same node: no Redis
    assert a2.of("offer") == [{"type": "offer", "local": True}]
    await until(lambda: len(b1.of("op")) == 20 and len(c1.of("op")) == 20
                and len(b2.of("op")) == 20, "broadcasts everywhere")
    await until(lambda: len(b1.of("candidate")) == 20, "unicasts at b1")
    # In the sender's order, interleaved with its broadcasts.
    assert [(m["type"], m["n"]) for m in b1.delivered if "n" in m] == [
        (kind, n) for n in range(20) for kind in ("op", "candidate")]
    await until(lambda: all(node.backplane.store.in_flight == 0 for node in (a, b, c)), "quiet")
    assert b2.of("candidate") == c1.of("candidate") == a2.of("candidate") == []
    assert a1.of("candidate") == [] and b2.of("offer") == c1.of("offer") == []
    assert a.stats.messagesRelayed == 41
    assert b.backplane.stats.messagesFromOtherNodes == 40  # 20 broadcasts, 20 unicasts
    # Batched: one PUBLISH per destination node per reactor turn, however many messages.
    assert publish_count(redis_server) - publishes == 2
    assert c.backplane.stats.messagesFromOtherNodes == 20  # the broadcasts only

    # Unknown: nobody, a member of another room, the sender itself, one who left.
    d1 = await joined(Member(b, "d1"), "other")
    for target in ("nobody", h("d1"), h("a1")):
        assert a.unicast(a1, target, b'{"type":"offer"}') is False
    b.leave(b2, 1000)
    await until(lambda: h("b2") not in a.rooms["room"].remote, "a told b2 left")
    assert a.unicast(a1, h("b2"), b'{"type":"offer"}') is False
    assert a.stats.messagesRelayed == 41
    assert d1.of("offer") == []


@pytest_twisted.ensureDeferred
async def test_a_member_failing_a_presence_delivery_is_closed_as_on_one_node(
        cluster, logged_failures):
    a, b = cluster.node(), cluster.node()
    await cluster.connected()
    a1 = await joined(Member(a, "a1"), "room")
    told = a1.deliver

    def refuse_presence(frame: bytes) -> None:
        if b"user-joined" in bytes(frame):
            raise RuntimeError("socket gone")
        told(frame)

    a1.deliver = refuse_presence
    await joined(Member(b, "b1"), "room")  # a1 hears of it through Redis, and fails
    await until(lambda: a1.closed_with is not None, "a1 closed")
    assert a1.closed_with == (1011, "Internal server error")
    assert len(logged_failures.take()) == 1
