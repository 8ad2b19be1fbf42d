"""Rules inside an open connection, over real loopback sockets: reserved message types,
the room id read from the raw request target, the rate limit's burst contract, and
floods of control and continuation frames (against a real `twistd` process, with
flooders in processes of their own that stop by themselves)."""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from iw_relay.config import RelayConfig
from iw_relay.messages import ROOM_ID_INVALID, ROOM_ID_REQUIRED
from tests import rawws
from tests.clients import join
from tests.helpers import http_get
from tests.relay_process import CHECKOUT, relay_environment, start_relay

RESERVED = ["connected", "user-joined", "user-left", "room-expired", "server-shutdown",
            "error"]


def config(**changes) -> RelayConfig:
    return RelayConfig(ping_interval=0, **changes)


async def close_pair(*clients) -> None:
    for client in clients:
        if client.close_code is None:
            client.sendClose(1000)
            await client.closed


# -- reserved types ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reserved_types_are_refused_to_the_sender_only(serve):
    _service, port = await serve(config())
    alice = await join(reactor, port, "res")
    bob = await join(reactor, port, "res")
    for kind in RESERVED:
        alice.send_json({"type": kind, "connectionId": "0123456789abcdef", "userCount": 9})
    alice.send_json({"type": "op", "n": 1})
    alice.send_json({"type": "Connected"})  # not reserved: types are case-sensitive
    received = await bob.wait_for(3).addTimeout(5, reactor)
    assert [m["type"] for m in received] == ["connected", "op", "Connected"]
    errors = await alice.wait_for(2 + len(RESERVED)).addTimeout(5, reactor)
    assert errors[2:] == [{"type": "error", "code": "RESERVED_TYPE",
                           "message": "Message type is reserved for the server"}] * 6
    assert alice.close_code is None
    await close_pair(alice, bob)


# -- the room id comes from the raw request target -----------------------------------------


class RawUpgrade(Protocol):
    """Sends one upgrade request byte for byte, answers the server's close frame, and
    fires `done` with the frames it got once the connection is closed."""

    def __init__(self, port: int, target: str) -> None:
        self.head = rawws.request_head(port, target)
        self.buffer = b""
        self.frames: list[tuple[int, bytes]] = []
        self.first_frame: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        _head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        self.frames = []
        while (parsed := rawws.next_frame(rest)) is not None:
            opcode, payload, rest = parsed
            self.frames.append((opcode, payload))
            if not self.first_frame.called:
                self.first_frame.callback(payload)
            if opcode == rawws.CLOSE:
                self.transport.write(rawws.frame(rawws.CLOSE, payload[:2]))
                self.transport.loseConnection()

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.frames)


async def raw_upgrade(port: int, target: str) -> list[tuple[int, bytes]]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = RawUpgrade(port, target)
    await connectProtocol(endpoint, client)
    return await client.done.addTimeout(5, reactor)


@pytest.mark.parametrize(("target", "reason"), [
    ("/room/%61bc", ROOM_ID_INVALID),
    ("/room/abc;zzz", ROOM_ID_INVALID),
    ("/room/abc%3B", ROOM_ID_INVALID),
    ("/room/abc%20", ROOM_ID_INVALID),
    ("/room/a%2Fb", ROOM_ID_INVALID),
    ("/room%2Fabc", ROOM_ID_REQUIRED),
])
@pytest_twisted.ensureDeferred
async def test_room_id_is_read_from_the_raw_target(serve, target, reason):
    service, port = await serve(config())
    member = await join(reactor, port, "abc")  # a join would show up here
    (close_opcode, close_payload), = await raw_upgrade(port, target)
    assert close_opcode == rawws.CLOSE
    assert struct.unpack("!H", close_payload[:2])[0] == 1008
    assert close_payload[2:].decode() == reason
    assert [m["type"] for m in member.received] == ["connected"]
    assert service.registry.room_size("a") == 0
    await close_pair(member)


@pytest.mark.parametrize(("target", "room"), [
    ("/room/abc", "abc"),
    ("/?room=%61bc", "abc"),    # only the query form is percent-decoded
    ("/room/abc/x%2Fy", "abc"),
])
@pytest_twisted.ensureDeferred
async def test_valid_raw_targets_join(serve, target, room):
    _service, port = await serve(config())
    client = RawUpgrade(port, target)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await connectProtocol(endpoint, client)
    first = await client.first_frame.addTimeout(5, reactor)
    assert json.loads(first)["roomId"] == room
    client.transport.write(rawws.frame(rawws.CLOSE, struct.pack("!H", 1000)))
    await client.done.addTimeout(5, reactor)


# -- the burst contract ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_of_150_lets_exactly_100_through(serve):
    service, port = await serve(config())
    sender = await join(reactor, port, "burst")
    watcher = await join(reactor, port, "burst")
    for n in range(150):
        sender.send_json({"type": "op", "n": n})
    await sender.wait_for(3).addTimeout(5, reactor)  # connected, user-joined, the error
    sender.sendClose(1000)
    await sender.closed
    # The close frame came after the 150: user-left comes after every relayed one.
    received = await watcher.wait_for(102).addTimeout(5, reactor)
    assert [m.get("n") for m in received[1:101]] == list(range(100))
    assert received[101]["type"] == "user-left"
    errors = sender.messages_of("error")
    assert [e["code"] for e in errors] == ["RATE_LIMIT_EXCEEDED"]
    assert service.registry.stats.rateLimitsHit == 50
    await close_pair(watcher)


# -- floods, against a real relay process ------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Flooder:
    """`python3 -m tests.rawws flood ...` in a process of its own (bounded: <= 15 s)."""

    def __init__(self, port: int, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.rawws", "flood", "--port", str(port), *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=CHECKOUT,
            env=relay_environment(), text=True)
        ready = self.process.stdout.readline()  # after its handshake (socket timeout 5 s)
        assert ready.strip() == "ready", ready + self.process.stderr.read()

    def running(self) -> bool:
        return self.process.poll() is None

    async def result(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while self.running():
            assert time.monotonic() < deadline, "the flooder did not stop by itself"
            await deferLater(reactor, 0.05, lambda: None)
        out, err = self.process.communicate()
        assert self.process.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.running():
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def flooders():
    started: list[Flooder] = []

    def start(port: int, *options: str) -> Flooder:
        flooder = Flooder(port, *options)
        started.append(flooder)
        return flooder

    yield start
    for flooder in started:
        flooder.kill()


@pytest_twisted.ensureDeferred
async def test_a_pinger_that_never_reads_is_closed_and_memory_stays_bounded(
        spawn, flooders):
    relay = await start_relay(spawn, "--port", "tcp:0:interface=127.0.0.1",
                              "--flood-windows", "3", "--ping-interval", "0")
    pid = relay.process.pid
    before = rss_bytes(pid)
    flooder = flooders(relay.port, "--mode", "ping", "--no-read", "--duration", "12")
    peak = before
    while flooder.running():
        peak = max(peak, rss_bytes(pid))
        await deferLater(reactor, 0.1, lambda: None)
    result = await flooder.result()
    # Closed by the flood rule after three windows (its close frame waits behind unread
    # pongs: the socket is dropped when the close handshake times out, 2 s later).
    assert result["ended_after"] is not None and result["ended_after"] < 10, result
    assert peak - before < 32 * 2**20, (before, peak)
    code, _, body = await http_stats(relay.port)
    assert code == 200 and body["currentConnections"] == 0


async def http_stats(port: int):
    code, headers, body = await http_get(port, "/stats")
    return code, headers, json.loads(body)


async def relay_latencies(alice, bob, count: int) -> list[float]:
    """`count` messages from alice to bob, one at a time: seconds each."""
    times = []
    for n in range(count):
        started = time.perf_counter()
        alice.send_json({"type": "op", "n": n})
        await bob.wait_for(len(bob.received) + 1).addTimeout(5, reactor)
        times.append(time.perf_counter() - started)
    return times


@pytest_twisted.ensureDeferred
async def test_control_and_continuation_floods_cost_other_rooms_nothing(
        spawn, flooders):
    relay = await start_relay(spawn, "--port", "tcp:0:interface=127.0.0.1",
                              "--flood-windows", "5", "--ping-interval", "0")
    alice = await join(reactor, relay.port, "quiet")
    bob = await join(reactor, relay.port, "quiet")
    await alice.wait_for(2)
    pings = flooders(relay.port, "--room", "f1", "--mode", "ping", "--duration", "12")
    fragments = flooders(relay.port, "--room", "f2", "--mode", "continuation",
                         "--duration", "12")
    latencies = await relay_latencies(alice, bob, 60)
    assert pings.running() and fragments.running()  # measured while both flood
    assert statistics.median(latencies) < 0.020, sorted(latencies)
    for flooder in (pings, fragments):
        result = await flooder.result()
        assert result["close"] == [1008, "Rate limit exceeded"], result
        assert result["ended_after"] < 9, result
    await close_pair(alice, bob)


@pytest_twisted.ensureDeferred
async def test_a_flood_that_pauses_and_bursts_is_closed(spawn, flooders):
    relay = await start_relay(spawn, "--port", "tcp:0:interface=127.0.0.1",
                              "--flood-windows", "5", "--ping-interval", "0")
    # Bursts of 2.5 s with 2.2 s pauses: with windows reset by a quiet one, this was
    # never more than 3 windows in a row, and never closed.
    flooder = flooders(relay.port, "--mode", "messages", "--burst", "2.5", "--pause",
                       "2.2", "--duration", "14")
    result = await flooder.result()
    assert result["close"] == [1008, "Rate limit exceeded"], result
    assert result["ended_after"] < 14, result
