"""Live fuzzing over loopback: many clients send random and malformed frames at once; the
server stays up and a watcher room receives every one of its messages, in order."""

import random
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from iw_relay.config import RelayConfig
from tests.clients import join

FUZZERS = 24
WATCHED_MESSAGES = 200


def frame(rng, opcode, payload, fin=True, rsv=0, mask=True, length=None):
    length = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length < 126:
        header = bytes([first, (0x80 if mask else 0) | length])
    elif length < 2**16:
        header = bytes([first, (0x80 if mask else 0) | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, (0x80 if mask else 0) | 127]) + struct.pack("!Q", length)
    if not mask:
        return header + payload
    key = rng.randbytes(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def malformed_frames(rng):
    """One bad thing after a few good ones, chosen at random."""
    good = [frame(rng, 0x1, b'{"type":"op"}') for _ in range(rng.randint(0, 3))]
    bad = rng.choice([
        lambda: frame(rng, rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x"),
        lambda: frame(rng, 0x1, b"{}", rsv=rng.randint(1, 7)),
        lambda: frame(rng, 0x9, b"ping", fin=False),                     # fragmented control
        lambda: frame(rng, 0x9, b"p" * 126),                              # control too long
        lambda: frame(rng, 0x1, b'{"type":"\xff\xfe"}'),                  # invalid UTF-8
        lambda: frame(rng, 0x1, b"", length=2**62)[:14],                  # oversized length
        lambda: frame(rng, 0x1, b'{"type":"op"}', mask=False),            # unmasked
        lambda: frame(rng, 0x0, b"continuation without a start"),
        lambda: frame(rng, 0x1, b'{"type":', fin=False) + frame(rng, 0x1, b"x"),
        lambda: frame(rng, 0x8, struct.pack("!H", 999) + b"bad close code"),
        lambda: frame(rng, 0x8, b"\x03"),                                  # 1-byte close
        lambda: rng.randbytes(rng.randint(1, 300)),                      # noise
        lambda: frame(rng, 0x2, rng.randbytes(rng.randint(0, 200))),     # binary junk
        lambda: frame(rng, 0x1, b"[" * 5000),                            # deep nesting
    ])()
    return b"".join(good) + bad


class Fuzzer(Protocol):
    def __init__(self, rng, room):
        self.rng = rng
        self.room = room
        self.upgraded = False
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(
            f"GET /room/{self.room} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())

    def dataReceived(self, data):
        if not self.upgraded and b" 101 " in data:
            self.upgraded = True
            self.transport.write(malformed_frames(self.rng))
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest.fixture
def server(serve):
    config = RelayConfig(ping_interval=0, rate_limit=10_000, max_connections_per_ip=0,
                         max_message_size=64 * 1024)
    return pytest_twisted.blockon(serve(config))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_fuzzers_do_not_disturb_a_watched_room(server, seed):
    service, port = server
    rng = random.Random(seed)
    sender = await join(reactor, port, "watched")
    watcher = await join(reactor, port, "watched")
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    fuzzers = []
    for n in range(FUZZERS):
        # Half of them join the watched room itself.
        fuzzer = Fuzzer(random.Random(rng.random()), "watched" if n % 2 else f"fuzz{n}")
        fuzzers.append(fuzzer)
        await endpoint.connect(Factory.forProtocol(lambda fuzzer=fuzzer: fuzzer))
        sender.send_json({"type": "op", "n": n})
    for n in range(FUZZERS, WATCHED_MESSAGES):
        sender.send_json({"type": "op", "n": n})
    await defer.gatherResults([f.lost for f in fuzzers]).addTimeout(20, reactor)

    # Wait until the watcher has every message and has seen every fuzzer of its room leave.
    def done(received):
        ops = [m for m in received if m["type"] == "op" and "n" in m]
        left = [m for m in received if m["type"] == "user-left"]
        return len(ops) >= WATCHED_MESSAGES and len(left) >= FUZZERS // 2

    while not done(watcher.received):
        await watcher.wait_for(len(watcher.received) + 1).addTimeout(20, reactor)
    ops = [m["n"] for m in watcher.received if m["type"] == "op" and "n" in m]
    assert ops == list(range(WATCHED_MESSAGES))
    registry = service.registry
    assert registry.connection_count == 2
    assert list(registry.rooms) == ["watched"]
    stats = registry.stats
    assert stats.connectionsTotal - stats.disconnectionsTotal == 2
    for client in (sender, watcher):
        client.sendClose(1000)
        await client.closed
