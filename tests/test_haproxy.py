"""The deployment that scales, for real: Debian's haproxy with conf/haproxy.cfg in front of
three `twistd -n iwrelay --redis` nodes and a redis-server, all on free loopback ports.

The members of 20 rooms join through HAProxy, half by /room/{id} and half by ?room=:
each room lands wholly on one node. Then one node stops: its rooms move to the
survivors, their clients rejoin, and no other room notices. The nginx equivalent is
checked with `nginx -t`.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.clients import RelayClient, connect
from tests.cluster_harness import CONF, HAProxy, binary
from tests.helpers import until, within
from tests.relay_process import start_nodes, stats

ROOMS = [f"haRoom-{n:02d}-x{n * 7919 % 1000}" for n in range(20)]


@pytest.fixture
def haproxy(tmp_path: Path):
    """start(node ports) -> an HAProxy in front of them, stopped at teardown."""
    started: list[HAProxy] = []

    def start(nodes: list[int]) -> HAProxy:
        started.append(HAProxy(tmp_path, nodes))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


async def join_via(port: int, room: str, by_query: bool) -> RelayClient:
    path = f"/?room={room}" if by_query else f"/room/{room}"
    client = await connect(reactor, port, path)
    await within(client.wait_for(1))
    assert client.received[0]["type"] == "connected", client.received
    return client


async def node_stats(ports: list[int]) -> list[dict]:
    return [await stats(port) for port in ports]


@pytest_twisted.ensureDeferred
async def test_haproxy_keeps_each_room_on_one_node_and_moves_only_a_stopped_node_s_rooms(
        spawn, redis_server, haproxy):
    nodes = await start_nodes(spawn, redis_server.url, 3, "--node-heartbeat", "0.5s")
    ports = [node.port for node in nodes]
    proxy = haproxy(ports)
    front = proxy.port
    await until(lambda: set(proxy.states().values()) == {"UP"}, "every node UP", 20)

    members: dict[str, list[RelayClient]] = {}
    for number, room in enumerate(ROOMS):
        first = await join_via(front, room, by_query=number % 2 == 1)
        second = await join_via(front, room, by_query=number % 2 == 0)
        assert second.received[0]["userCount"] == 2
        members[room] = [first, second]
    before = await node_stats(ports)
    # Wholly on one node each: a split room would count on two nodes.
    assert sum(s["currentRooms"] for s in before) == 20
    assert sum(s["currentConnections"] for s in before) == 40
    assert sum(1 for s in before if s["currentRooms"]) >= 2  # spread over the nodes
    for room, pair in members.items():
        pair[0].send_json({"type": "op", "room": room})
    await until(lambda: all(second.messages_of("op") for _, second in members.values()),
                "every room relays")
    after_ops = await node_stats(ports)
    assert [s["cluster"]["messagesFromOtherNodes"] for s in after_ops] == [0, 0, 0]

    # Stop the node with the most rooms: it drains, HAProxy takes it out, its members
    # reconnect and land together on the survivors.
    victim = max(range(3), key=lambda i: before[i]["currentRooms"])
    moved_count = before[victim]["currentRooms"]
    nodes[victim].process.send_signal(signal.SIGTERM)
    await nodes[victim].wait_exit()
    await until(lambda: proxy.states().get(f"node{victim}") != "UP",
                "the stopped node out of the rotation", 15)
    moved = [room for room, pair in members.items() if pair[0].close_code is not None]
    assert len(moved) == moved_count
    for room in moved:
        assert [c.close_code for c in members[room]] == [1001, 1001]
    stayed = [room for room in ROOMS if room not in moved]
    for number, room in enumerate(moved):
        members[room] = [await join_via(front, room, by_query=number % 2 == 0),
                         await join_via(front, room, by_query=number % 2 == 1)]
        assert members[room][1].received[0]["userCount"] == 2
    survivors = [port for i, port in enumerate(ports) if i != victim]
    after = await node_stats(survivors)
    assert sum(s["currentRooms"] for s in after) == 20
    assert sum(s["currentConnections"] for s in after) == 40
    # No other room noticed: nobody closed, left or joined, and it still relays.
    for room in stayed:
        for client in members[room]:
            assert client.close_code is None
            assert [m["type"] for m in client.received if m["type"] != "op"] == (
                ["connected"] if client is members[room][1] else ["connected",
                                                                  "user-joined"])
        members[room][1].send_json({"type": "op", "again": True})
    await until(lambda: all(len(members[room][0].messages_of("op")) == 1 for room in stayed),
                "the staying rooms still relay")
    assert [s["cluster"]["messagesFromOtherNodes"] for s in await node_stats(survivors)] == [
        0, 0]
    for room in ROOMS:
        for client in members[room]:
            client.sendClose(1000)


def test_the_nginx_equivalent_is_valid_and_logs_no_room_id(tmp_path):
    exe = binary("nginx", "IWRELAY_REQUIRE_NGINX")
    text = (CONF / "nginx-cluster.conf").read_text()
    text = text.replace("pid /tmp/iwrelay-nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    checked = subprocess.run([exe, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c",
                              str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    formats = re.findall(r"log_format\s+\w+\s+((?:'[^']*'\s*)+);", text)
    assert formats, "the relay's access log has a format of its own"
    for variable in ("$request ", "$request_uri", "$uri", "$args", "$query_string",
                     "$arg_", "$http_referer", "$iwrelay_room"):
        assert all(variable not in f for f in formats), variable
    assert re.search(r"access_log\s+\S+\s+iwrelay;", text)
    assert re.search(r"hash \$iwrelay_room consistent;", text)
