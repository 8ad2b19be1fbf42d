"""A member that stops reading is dropped; the others keep every message, in order."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from iw_relay.config import RelayConfig
from tests import rawws
from tests.clients import join
from tests.helpers import until

MAX_SEND_BUFFER = 256 * 1024
PAD = "x" * 32 * 1024
FLOOD = 400  # 400 x 32 KiB = 12.5 MiB: more than loopback socket buffers can hide


@pytest.fixture
def server(serve):
    config = RelayConfig(ping_interval=0, rate_limit=100_000, max_send_buffer=MAX_SEND_BUFFER)
    return pytest_twisted.blockon(serve(config))


def largest_backlog(service):
    return max((member._backlog_bytes for room in service.registry.rooms.values()
                for member in room.members.values()), default=0)


@pytest_twisted.ensureDeferred
async def test_stalled_reader_is_dropped_and_others_lose_nothing(server):
    service, port = server
    sender = await join(reactor, port, "r")
    watcher = await join(reactor, port, "r")
    stalled = await join(reactor, port, "r")
    stalled.transport.pauseProducing()  # it stops reading its socket
    await watcher.wait_for(2)           # (watcher saw the stalled client join)

    peaks = []
    watcher_on_message = watcher.onMessage

    def sample_then_receive(payload, is_binary):
        peaks.append(largest_backlog(service))
        watcher_on_message(payload, is_binary)

    watcher.onMessage = sample_then_receive
    for n in range(FLOOD):
        sender.send_json({"type": "op", "n": n, "pad": PAD})

    received = await watcher.wait_for(2 + FLOOD + 1).addTimeout(30, reactor)
    ops = [m["n"] for m in received if m["type"] == "op"]
    assert ops == list(range(FLOOD))
    left = [m for m in received if m["type"] == "user-left"]
    assert len(left) == 1 and left[0]["userCount"] == 2
    assert service.registry.stats.slowConsumersDropped == 1
    # What the server held for the stalled peer never passed the limit by more than a frame.
    assert max(peaks) <= MAX_SEND_BUFFER + 40 * 1024
    stalled.transport.resumeProducing()
    code, _ = await stalled.closed
    assert code in (1013, None, 1006)
    for client in (sender, watcher):
        client.sendClose(1000)
        await client.closed



class NonReadingPinger(Protocol):
    """Upgrades, sends `count` full-size pings at once, and never reads a byte."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.head = b""
        self.transport.write(rawws.request_head(self.port, "/room/pinger"))

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:  # upgraded: from now on, never read again
            self.transport.pauseProducing()
            self.transport.write(rawws.frame(rawws.PING, b"p" * 125) * self.count)

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_pongs_to_a_peer_that_does_not_read_are_bounded_like_relayed_frames(serve):
    """Pongs used to be written outside the backlog: a pinger that never read made the
    server buffer without bound. Now they count against --max-send-buffer (1013)."""
    service, port = await serve(RelayConfig(ping_interval=0, rate_limit=10_000_000,
                                            max_send_buffer=64 * 1024))
    pinger = NonReadingPinger(port, 100_000)  # 12.7 MB of pongs: more than sockets hold
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), pinger)
    registry = service.registry
    # (The pinger reads nothing: only the server side can tell that it was closed.)
    await until(lambda: registry.stats.slowConsumersDropped == 1
                and registry.connections.total == 0, "the pinger to be dropped", 14)
    pinger.transport.abortConnection()
    await pinger.lost


class _Transport:
    """Just what Outbox uses of a transport; not plain TCP, so write_now calls write()."""

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


def test_frames_queued_before_a_pause_wait_in_the_backlog_in_order():
    """A pause can only come from a write, when nothing is queued; should frames be
    waiting anyway, they go out after the pause, before the later ones, and count."""
    from twisted.internet.task import Clock

    from iw_relay.outbox import Outbox, TurnFlusher

    class Member(Outbox):
        state = 1  # open
        max_send_buffer = 10

        def __init__(self):
            self.transport = _Transport()
            self.factory = type("Factory", (), {"flusher": TurnFlusher(Clock())})()
            self.slow = False

        def slow_consumer(self):
            self.slow = True

    member = Member()
    member.enqueue(b"a")
    member.pauseProducing()
    member.enqueue(b"b")
    member.flush_outbox()  # the end of the turn: nothing is written while paused
    assert member.transport.written == [] and member._backlog_bytes == 2
    member.resumeProducing()
    assert member.transport.written == [b"ab"]
    member.enqueue(b"c")
    member.flush_outbox()
    assert member.transport.written == [b"ab", b"c"]
    member.pauseProducing()
    member.enqueue(b"x" * 11)
    assert member.slow
