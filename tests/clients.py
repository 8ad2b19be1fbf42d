"""WebSocket clients for the tests: a real Autobahn client protocol, driven either over
in-memory transports with a Clock (`MemoryRelay`) or over real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.task import Clock
from twisted.test import iosim

from iw_relay.config import RelayConfig
from iw_relay.service import RelayService


class RelayClient(WebSocketClientProtocol):
    """Collects every message (decoded JSON) and how the connection closed."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.append(payload)
        self.received.append(json.loads(payload))
        still_waiting = []
        for count, waiter in self._waiting:
            if len(self.received) >= count:
                waiter.callback(self.received[:count])
            else:
                still_waiting.append((count, waiter))
        self._waiting = still_waiting

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        for _, waiter in self._waiting:
            waiter.errback(ConnectionError(f"closed with {code} {reason}"))
        self._waiting = []
        self.closed.callback((code, reason))

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode())

    def messages_of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == kind]

    def wait_for(self, count: int) -> defer.Deferred:
        """Fires with the first `count` messages once that many have arrived."""
        if len(self.received) >= count:
            return defer.succeed(self.received[:count])
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append((count, waiter))
        return waiter


def client_factory(url: str, origin: str | None = None,
                   headers: dict[str, str] | None = None) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(url, origin=origin, headers=headers)
    factory.protocol = RelayClient
    factory.setProtocolOptions(autoPingInterval=0, closeHandshakeTimeout=5)
    return factory


async def connect(reactor: Any, port: int, path: str, tls_options: Any = None,
                  host: str = "127.0.0.1") -> RelayClient:
    """A real client over loopback; returns once the handshake is done."""
    scheme = "wss" if tls_options is not None else "ws"
    name = "localhost" if tls_options is not None else host
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=10)
    if tls_options is not None:
        endpoint = wrapClientTLS(tls_options, endpoint)
    client = await endpoint.connect(client_factory(f"{scheme}://{name}:{port}{path}"))
    await client.opened
    return client


async def join(reactor: Any, port: int, room: str, **kwargs: Any) -> RelayClient:
    """Connect to /room/{room} and wait for `connected`."""
    client = await connect(reactor, port, f"/room/{room}", **kwargs)
    await client.wait_for(1)
    return client


class MemoryRelay:
    """The real RelayService and real Autobahn clients over in-memory transports.

    Time is a Clock (Autobahn's timers included, through txaio's loop); `flush()` moves
    every byte until nothing moves.
    """

    def __init__(self, config: RelayConfig | None = None, wall_time: float = 1_700_000_000.0):
        self.clock = Clock()
        self.wall_time = wall_time
        self._previous_loop = txaio.config.loop
        txaio.config.loop = self.clock
        self.config = config or RelayConfig(ping_interval=0)
        self.service = RelayService(
            self.config, reactor=self.clock, clock=self.clock,
            wall_clock=lambda: self.wall_time, listen=False,
        )
        self.registry = self.service.registry
        self.pumps: list[iosim.IOPump] = []
        self.client_ip = "127.0.0.1"  # the address the next connection comes from
        self.doors: list[Any] = []

    def connect(self, path: str = "/room/abc", flush: bool = True, client: Any = None,
                origin: str | None = None, headers: dict[str, str] | None = None,
                through_site: bool = False) -> RelayClient:
        """Connect a RelayClient for `path` (or the given protocol, e.g. a silent one)
        through the relay's front door, as a listening port does (`through_site` is
        the same: kept for the tests that name it)."""
        if client is None:
            factory = client_factory(f"ws://127.0.0.1:3000{path}", origin, headers)
            client = factory.buildProtocol(None)
            # In memory, tests read close_code/close_reason: a refused handshake is no error.
            client.opened.addErrback(lambda failure: None)
        peer = IPv4Address("TCP", self.client_ip, 40000 + len(self.pumps))
        server = self.service.front_door.buildProtocol(peer)
        server_address = IPv4Address("TCP", "127.0.0.1", 3000)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True, hostAddress=server_address,
                                        peerAddress=peer),
            client, iosim.FakeTransport(client, isServer=False, hostAddress=peer,
                                        peerAddress=server_address),
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.doors.append(server)
        if flush:
            self.flush()
        return client

    @property
    def servers(self) -> list[Any]:
        """The server side of each connection: the WebSocket protocol the front door
        handed it to, else the front door itself."""
        return [door._delegate or door for door in self.doors]

    def join(self, room: str = "abc") -> RelayClient:
        client = self.connect(f"/room/{room}")
        assert client.received and client.received[0]["type"] == "connected", client.received
        return client

    def flush(self) -> None:
        while any([pump.pump() for pump in self.pumps]):
            pass

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def close(self) -> None:
        """Drop every connection and restore txaio's loop."""
        for pump in self.pumps:
            pump.clientIO.loseConnection()
            pump.serverIO.loseConnection()
        self.flush()
        for call in self.clock.getDelayedCalls():
            call.cancel()
        txaio.config.loop = self._previous_loop
