"""Cluster mode end to end: real `twistd -n iwrelay --redis` nodes and a real redis-server
of the test's own (free port, loopback, no persistence), real clients over loopback.

Faults are real too: a node is SIGKILLed, Redis is killed and started again on its port.
Waits are bounded polls or Deferreds with deadlines, never sleeps.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from tests.clients import RelayClient, connect, join
from tests.helpers import until, within
from tests.relay_process import (
    health,
    start_nodes,
    stats,
    stop_relay,
    until_health,
)

SHARED, LONELY = "sharedRoom-7Qx", "lonelyRoom-9Zk"


def presence(client: RelayClient) -> list[tuple[str, int]]:
    return [(m["type"], m["userCount"]) for m in client.received
            if m["type"] in ("connected", "user-joined", "user-left")]


def ops(client: RelayClient) -> list[dict[str, Any]]:
    return client.messages_of("op")


@pytest_twisted.ensureDeferred
async def test_three_nodes_behave_as_one(spawn, redis_server):
    nodes = await start_nodes(spawn, redis_server.url, 3, "--node-heartbeat", "0.5s",
                              "--room-expiry", "8s", "--cleanup-interval", "0.25s")
    ports = [node.port for node in nodes]
    for port in ports:
        code, body = await health(port)
        assert (code, body["status"], body["redis"]) == (200, "healthy", "connected")

    # One member per node in SHARED, one more on node 0; LONELY on node 1 only.
    members = []
    for number, port in enumerate([*ports, ports[0]]):
        client = await join(reactor, port, SHARED)
        assert presence(client)[0] == ("connected", number + 1)
        members.append(client)
    lonely = await join(reactor, ports[1], LONELY)
    assert presence(lonely) == [("connected", 1)]
    ids = [m.received[0]["connectionId"] for m in members]
    for number, member in enumerate(members):
        later = len(members) - 1 - number
        await within(member.wait_for(1 + later))
        assert presence(member)[1:] == [("user-joined", n + 1)
                                        for n in range(number + 1, len(members))]

    # Relay: every other member on every node, once, in order; never the sender or
    # another room.
    for n in range(30):
        members[0].send_json({"type": "op", "n": n})
    members[2].send_json({"type": "op", "from": 2})
    await until(lambda: all(len([o for o in ops(m) if "n" in o]) == 30 for m in members[1:])
                and all(len([o for o in ops(m) if "from" in o]) == 1
                        for m in (members[0], members[1], members[3])), "the ops everywhere")
    assert not [o for o in ops(members[2]) if "from" in o]
    for member in members[1:]:
        got = [m["n"] for m in ops(member) if "n" in m]
        assert got == list(range(30))
        assert all(m["connectionId"] == ids[0] for m in ops(member) if "n" in m)
    assert ops(members[0]) == [m for m in ops(members[1]) if "from" in m] == [
        m for m in ops(members[3]) if "from" in m]
    assert ops(members[0])[0]["connectionId"] == ids[2]
    # Errors go to the sender only and are not relayed.
    members[1].sendMessage(b"not json")
    members[1].send_json({"no": "type"})
    await until(lambda: len(members[1].messages_of("error")) == 2, "two errors")
    assert [m["code"] for m in members[1].messages_of("error")] == [
        "PARSE_ERROR", "INVALID_MESSAGE"]
    counted = [await stats(port) for port in ports]
    assert [s["messagesRelayed"] for s in counted] == [30, 0, 1]
    assert [s["currentConnections"] for s in counted] == [2, 2, 1]  # this node's own
    assert all(s["cluster"]["redis"] == "connected" for s in counted)
    # The first connection is not a reconnection, and no outage is reported after it.
    assert [s["cluster"]["redisReconnects"] for s in counted] == [0, 0, 0]
    assert not any("could not reach the other nodes" in node.stdout for node in nodes)
    assert not any(m.messages_of("error") for m in (*members[:1], *members[2:], lonely))
    assert ops(lonely) == []

    # Leave: a member on node 2 goes; the others, on every node, are told with the count.
    members[2].sendClose(1000)
    await within(members[2].closed)
    for member in (members[0], members[1], members[3]):
        await until(lambda m=member: ("user-left", 3) in presence(m), "user-left everywhere")
        assert member.messages_of("user-left")[-1]["connectionId"] == ids[2]

    # Expiry: fixed when SHARED was created; every node expires it at once.
    remaining = [members[0], members[1], members[3], lonely]
    for member in remaining:
        code, reason = await within(member.closed, 15)
        assert (code, reason) == (1000, "Room expired after 8 seconds")
        assert member.received[-1]["type"] == "room-expired"
    for member in remaining:
        assert [m["connectionId"] for m in member.messages_of("user-left")] == (
            [] if member is lonely else [ids[2]])
    for port in ports:
        got = await stats(port)
        assert got["currentRooms"] == got["currentConnections"] == 0
    keys = redis_server.keys()
    assert not [key for key in keys if ":m:" in key or ":r:" in key], keys

    for node in nodes:
        assert await stop_relay(node) == 0
        output = node.stdout + node.stderr
        assert SHARED not in output and LONELY not in output  # room ids are secrets
        assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_a_killed_node_s_members_leave_everywhere_within_a_bounded_time(
        spawn, redis_server):
    survivor, victim = await start_nodes(spawn, redis_server.url, 2,
                                         "--node-heartbeat", "0.3s")
    staying = await join(reactor, survivor.port, "room")
    doomed = await join(reactor, victim.port, "room")
    doomed_id = doomed.received[0]["connectionId"]
    await within(staying.wait_for(2))
    assert presence(staying) == [("connected", 1), ("user-joined", 2)]

    victim.process.send_signal(signal.SIGKILL)
    await victim.wait_exit()
    # Dead after three missed heartbeats (0.9 s); allow for polling and a slow machine.
    await within(staying.wait_for(3), 5)
    assert staying.received[2] == {"type": "user-left", "connectionId": doomed_id,
                                   "userCount": 1}
    late = await join(reactor, survivor.port, "room")
    assert presence(late) == [("connected", 2)]
    # Its members are gone from Redis too: the room holds only the survivor's two.
    members = [k for k in redis_server.keys() if ":m:" in k]
    assert len(members) == 1
    assert redis_server.command("HLEN", members[0]) == ":2"
    assert (await stats(survivor.port))["cluster"]["deadNodesSeen"] == 1
    assert await stop_relay(survivor, [staying, late]) == 0


@pytest_twisted.ensureDeferred
async def test_redis_restart_nodes_relay_locally_then_repair(spawn, redis_server):
    one, two = await start_nodes(spawn, redis_server.url, 2, "--node-heartbeat", "0.3s")
    a1 = await join(reactor, one.port, "room")
    a2 = await join(reactor, one.port, "room")
    b1 = await join(reactor, two.port, "room")
    b2 = await join(reactor, two.port, "room")
    for member, count in ((a1, 4), (a2, 3), (b1, 2), (b2, 1)):
        await within(member.wait_for(count))

    redis_server.kill()
    body = await until_health(one.port, 503)
    assert (body["status"], body["redis"]) == ("degraded", "disconnected")
    await until_health(two.port, 503)
    # Meanwhile: local relaying goes on; what cannot cross is counted and logged.
    a1.send_json({"type": "op", "n": 1})
    await within(a2.wait_for(4))
    assert ops(a2) == [ops(a2)[0]] and ops(a2)[0]["n"] == 1
    b2.sendClose(1000)  # leaves during the outage
    await within(b2.closed)
    await within(b1.wait_for(3))
    assert presence(b1)[-1] == ("user-left", 3)

    redis_server.start()
    for node in (one, two):
        await until_health(node.port, 200, timeout=20)
    # Presence repaired: node one's members learn of b2's departure, once.
    for member in (a1, a2):
        await until(lambda m=member: ("user-left", 3) in presence(m), "b2's departure")
    a2.send_json({"type": "op", "n": 2})
    await until(lambda: [m.get("n") for m in ops(b1)] == [2] and ops(a1)[-1:] != []
                and ops(a1)[-1]["n"] == 2, "relaying across nodes again")
    for member in (a1, a2, b1):  # nobody still connected was reported gone
        assert len(member.messages_of("user-left")) == 1
    dropped = (await stats(one.port))["cluster"]["crossNodeDropped"]
    assert dropped == 1
    await until(lambda: "1 messages could not reach the other nodes" in one.stdout,
                "the outage's count in the log")
    assert "Traceback" not in one.stdout + one.stderr + two.stdout + two.stderr
    # A graceful stop removes the node's members at once: the others hear of it.
    assert await stop_relay(two, [b1]) == 0
    b1_id = b1.received[0]["connectionId"]
    for member in (a1, a2):
        await until(lambda m=member: [x["connectionId"] for x in m.messages_of("user-left")]
                    [-1:] == [b1_id], "b1's departure with its node", timeout=5)
        assert presence(member)[-1] == ("user-left", 2)
    assert await stop_relay(one, [a1, a2]) == 0


@pytest_twisted.ensureDeferred
async def test_webrtc_signaling_across_two_nodes(spawn, redis_server):
    """`peers` lists members on the other node; a unicast reaches its target there only;
    UNKNOWN_PEER for one who is not in the room."""
    node_a, node_b = await start_nodes(spawn, redis_server.url, 2)
    a1 = await join(reactor, node_a.port, "signal-room")
    a1_id = a1.received[0]["connectionId"]
    b1 = await join(reactor, node_b.port, "signal-room")
    b1_id = b1.received[0]["connectionId"]
    assert b1.received[0]["peers"] == [a1_id]
    await until(lambda: a1.messages_of("user-joined"), "a1 told of b1")
    b2 = await join(reactor, node_b.port, "signal-room")
    assert sorted(b2.received[0]["peers"]) == sorted([a1_id, b1_id])
    await until(lambda: len(a1.messages_of("user-joined")) == 2, "a1 told of b2")

    a1.send_json({"type": "offer", "to": b1_id, "sdp": "v=0"})
    a1.send_json({"type": "op"})  # a broadcast after it: b1 gets both, in order
    await until(lambda: b1.messages_of("op") and b2.messages_of("op"), "the broadcast")
    assert [m["type"] for m in b1.received[1:]] == ["user-joined", "offer", "op"]
    assert b1.messages_of("offer")[0]["connectionId"] == a1_id
    assert b2.messages_of("offer") == []
    b1.send_json({"type": "answer", "to": a1_id, "sdp": "v=0"})
    await until(lambda: a1.messages_of("answer"), "the answer at a1")

    a1.send_json({"type": "offer", "to": "0123456789abcdef"})
    await until(lambda: a1.messages_of("error"), "UNKNOWN_PEER")
    assert a1.messages_of("error")[0]["code"] == "UNKNOWN_PEER"
    await stop_relay(node_a, [a1])
    await stop_relay(node_b, [b1, b2])


@pytest_twisted.ensureDeferred
async def test_max_room_size_holds_across_nodes(spawn, redis_server):
    """Two joins back to back on a second node cannot overfill a room capped at 2."""
    node_a, node_b = await start_nodes(spawn, redis_server.url, 2, "--max-room-size", "2")
    a1 = await join(reactor, node_a.port, "capped")
    b1, b2 = await gatherResults([
        Deferred.fromCoroutine(connect(reactor, node_b.port, "/room/capped")),
        Deferred.fromCoroutine(connect(reactor, node_b.port, "/room/capped"))])
    await within(b1.wait_for(1))
    await within(b2.wait_for(1))
    kinds = sorted(client.received[0]["type"] for client in (b1, b2))
    assert kinds == ["connected", "error"]
    refused = b1 if b1.received[0]["type"] == "error" else b2
    assert refused.received[0]["code"] == "ROOM_FULL"
    assert await within(refused.closed) == (1008, "Room is full")
    await until(lambda: len(a1.received) == 2, "a1 told of the one who got in")
    assert [m["userCount"] for m in a1.received] == [1, 2]
    stopped = [await stop_relay(node_a, [a1]),
               await stop_relay(node_b, [c for c in (b1, b2) if c is not refused])]
    assert stopped == [0, 0]
