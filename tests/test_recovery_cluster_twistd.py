"""Connection recovery in a cluster end to end: real `twistd -n iwrelay --redis` nodes with
--recovery-window, a real redis-server of the test's own, real clients over loopback.

A connection is cut by aborting its TCP connection (no close handshake: the relay sees
1006, as when a phone changes networks); a node is killed with SIGKILL. Waits are
bounded polls or Deferreds with deadlines, never sleeps.
"""

from __future__ import annotations

import signal
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
from twisted.internet import reactor

from tests.clients import RelayClient, connect, join
from tests.helpers import until_async, within
from tests.relay_process import start_nodes, stats, stop_relay

ROOM = "recoveryRoom-4Hq"
OPTIONS = ("--recovery-window", "30s", "--node-heartbeat", "0.3s")


def ops(client: RelayClient) -> list[tuple[int, int]]:
    """(n, seq) of every op, in the order received."""
    return [(m["n"], m["seq"]) for m in client.messages_of("op")]


def cut(client: RelayClient) -> None:
    client.transport.abortConnection()


async def resume(port: int, old: RelayClient) -> RelayClient:
    connected = old.received[0]
    seen = [m["seq"] for m in old.received[1:] if "seq" in m]
    query = urlencode({"resume": connected["resumeToken"],
                       "since": max([connected["seq"], *seen]), "epoch": connected["epoch"]})
    client = await connect(reactor, port, f"/room/{ROOM}?{query}")
    await within(client.wait_for(1))
    return client


async def send_ops(sender: RelayClient, numbers: range, *watchers: RelayClient) -> None:
    for n in numbers:
        sender.send_json({"type": "op", "n": n})
    for watcher in watchers:
        await within(_until_op(watcher, numbers[-1]))


async def _until_op(client: RelayClient, n: int) -> None:
    async def arrived() -> bool:
        return any(m.get("n") == n for m in client.received)

    await until_async(arrived, f"op {n}")


def presence(client: RelayClient) -> list[str]:
    return [m["type"] for m in client.received if m["type"].startswith(("user-", "conn"))]


@pytest_twisted.ensureDeferred
async def test_a_client_resumes_on_the_other_node_with_everything_in_order_once(
        spawn, redis_server):
    one, two = await start_nodes(spawn, redis_server.url, 2, *OPTIONS)
    peer = await join(reactor, two.port, ROOM)
    mover = await join(reactor, one.port, ROOM)
    assert mover.received[0]["recovered"] is False
    await send_ops(peer, range(5), mover)
    cut(mover)
    await mover.closed
    await send_ops(peer, range(5, 15))
    back = await resume(two.port, mover)
    connected = back.received[0]
    assert connected["recovered"] is True
    assert connected["connectionId"] == mover.received[0]["connectionId"]
    await within(_until_op(back, 14))
    seqs = [seq for _, seq in ops(mover)]
    assert ops(back) == [(n, seqs[0] + n) for n in range(5, 15)]  # in order, once
    back.send_json({"type": "op", "n": 99})
    await within(_until_op(peer, 99))
    assert presence(peer) == ["connected", "user-joined"]  # no user-left, no second join
    body: dict[str, Any] = await stats(two.port)
    assert body["recoveriesSucceeded"] == 1
    output = one.stdout + one.stderr + two.stdout + two.stderr
    assert ROOM not in output and connected["resumeToken"] not in output
    assert await stop_relay(two, [peer, back]) == 0


@pytest_twisted.ensureDeferred
async def test_kill_9_of_its_node_then_resume_elsewhere_misses_nothing(spawn, redis_server):
    victim, survivor = await start_nodes(spawn, redis_server.url, 2, *OPTIONS)
    peer = await join(reactor, survivor.port, ROOM)
    mover = await join(reactor, victim.port, ROOM)
    await send_ops(peer, range(3), mover)
    victim.process.send_signal(signal.SIGKILL)
    await victim.wait_exit()
    await within(mover.closed)
    await send_ops(peer, range(3, 20))

    async def found_dead() -> bool:
        return (await stats(survivor.port))["cluster"]["deadNodesSeen"] == 1

    await until_async(found_dead, "the victim found dead")
    back = await resume(survivor.port, mover)
    assert back.received[0]["recovered"] is True
    await within(_until_op(back, 19))
    assert [n for n, _ in ops(back)] == list(range(3, 20))
    seqs = [seq for _, seq in ops(mover) + ops(back)]
    assert seqs == list(range(seqs[0], seqs[0] + 20))  # nothing missing, nothing twice
    assert presence(peer) == ["connected", "user-joined"]  # the peer saw no user-left
    assert await stop_relay(survivor, [peer, back]) == 0


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_s_client_resumes_elsewhere_and_its_peer_sees_nothing(
        spawn, redis_server):
    leaving, staying = await start_nodes(spawn, redis_server.url, 2, *OPTIONS)
    peer = await join(reactor, staying.port, ROOM)
    mover = await join(reactor, leaving.port, ROOM)
    await send_ops(peer, range(3), mover)
    assert await stop_relay(leaving, [mover]) == 0  # SIGTERM: closed with 1001
    await send_ops(peer, range(3, 10))
    back = await resume(staying.port, mover)
    assert back.received[0]["recovered"] is True
    await within(_until_op(back, 9))
    assert [n for n, _ in ops(back)] == list(range(3, 10))
    back.send_json({"type": "op", "n": 99})
    await within(_until_op(peer, 99))
    assert presence(peer) == ["connected", "user-joined"]
    assert await stop_relay(staying, [peer, back]) == 0
