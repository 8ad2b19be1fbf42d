"""RelayService: the RoomRegistry plus one listening front door per --port, as one service."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from autobahn.twisted.resource import WebSocketResource
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.web.resource import Resource

from iw_relay.backplane.base import Backplane
from iw_relay.backplane.local import LocalBackplane
from iw_relay.clientjs import ClientScriptResource
from iw_relay.config import RelayConfig
from iw_relay.demo import DemoResource
from iw_relay.frontdoor import FrontDoorFactory
from iw_relay.ice import IceServersResource, ice_enabled
from iw_relay.metrics import metrics_root
from iw_relay.protocol import RelayServerFactory, prepare_frame
from iw_relay.registry import RoomRegistry
from iw_relay.web import FrontDoorSite, RelayResource, RelaySite

TLS_PREFIXES = ("ssl:", "tls:")
# Twisted listens with a backlog of 50: a burst of new clients overflows it, the kernel
# drops their SYNs and they retry a second later (p99 of a connect burst: 1.2 s). Node's
# default is 511; so is ours, unless the endpoint gives one.
LISTEN_BACKLOG = 511
_BACKLOG_ENDPOINTS = ("tcp", "tcp6", "ssl", "tls", "unix", "haproxy")
_log = Logger()

if TYPE_CHECKING:
    class RelayReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorFromThreads):
        """What the relay asks of a reactor, for the type checker only (as Twisted types
        its global reactor): every reactor Twisted installs provides all of it."""


def with_backlog(description: str) -> str:
    """`description` with backlog=511 added where the endpoint type takes one."""
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_ENDPOINTS or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def optional_pages(config: RelayConfig, wall_clock: Callable[[], float]) -> dict[bytes, Resource]:
    """/client.js (IWRelaySocket, always: against a relay with recovery off it is a plain
    WebSocket), /ice-servers when STUN or TURN URIs are configured, /demo with --demo."""
    pages: dict[bytes, Resource] = {b"client.js": ClientScriptResource()}
    if ice_enabled(config):
        pages[b"ice-servers"] = IceServersResource(config, wall_clock)
    if config.demo:
        pages[b"demo"] = DemoResource()
    return pages


def make_backplane(config: RelayConfig, clock: IReactorTime,
                   reactor: RelayReactor) -> Backplane:
    """How this node reaches the others: through Redis with --redis, else nobody."""
    if config.redis:
        from iw_relay.backplane.redis import redis_backplane

        return redis_backplane(config, clock, reactor)
    return LocalBackplane()


class RelayService(MultiService):
    """Adopt it with `setServiceParent(application)`, or mount `.resource` in a Site.

    Each --port listens with `.front_door`, which hands upgrades to `.factory` (Autobahn)
    and every other request to `.site`. With `listen=False` no port is opened: the
    embedding application listens with `.front_door`, or serves `.resource` in its own
    Site (then the connection limits are the application's to enforce).
    """

    def __init__(
        self,
        config: RelayConfig,
        reactor: RelayReactor | None = None,
        clock: IReactorTime | None = None,
        wall_clock: Callable[[], float] = time.time,
        listen: bool = True,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = cast("RelayReactor", installed)  # typed by Twisted as fewer interfaces
        clock = clock if clock is not None else reactor
        self.config = config
        self.registry = RoomRegistry(config, clock, prepare_frame, wall_clock,
                                     backplane=make_backplane(config, clock, reactor))
        self.registry.setServiceParent(self)
        self.factory = RelayServerFactory(self.registry, config, clock, wall_clock)
        self.registry.write_through = self.factory.write_through
        self.resource = RelayResource(self.registry, WebSocketResource(self.factory), wall_clock,
                                      optional_pages(config, wall_clock))
        # The front door drops a connection whose request head is not complete by
        # --handshake-timeout after accept; the Site's idle timeout bounds the answer.
        self.site = FrontDoorSite(self.resource, timeout=config.handshake_timeout,
                                  reactor=clock)
        self.front_door = FrontDoorFactory(self.site, self.factory, self.registry, config,
                                           clock)
        self._reactor = reactor
        self._listeners: dict[str, IService] = {}
        if listen:
            for description in config.ports:
                self._listeners[description] = self._listen(description)
            if config.metrics_port:
                metrics_site = RelaySite(metrics_root(self.registry), reactor=clock)
                strports.service(config.metrics_port, metrics_site,
                                 reactor=reactor).setServiceParent(self)

    def _listen(self, description: str) -> IService:
        listener = strports.service(with_backlog(description), self.front_door,
                                    reactor=self._reactor)
        listener.setServiceParent(self)
        return listener

    async def reload_certificates(self) -> None:
        """Re-read the certificate files of every TLS port (on SIGHUP, after a renewal).

        Each TLS port is parsed again (a broken file keeps the old one in use), then its
        listening socket is replaced. Open connections are not touched: they keep the
        certificate they started with; new ones get the new certificate.
        """
        for description, listener in list(self._listeners.items()):
            if not description.startswith(TLS_PREFIXES):
                continue
            try:
                serverFromString(self._reactor, description)
            except Exception:
                _log.failure("certificate reload failed; the old certificate stays in use")
                continue
            await listener.disownServiceParent()
            self._listeners[description] = self._listen(description)
        _log.info("certificates reloaded")

    def stopService(self) -> Deferred[None]:
        """Drain first, while still listening: /health says "draining" (503) so load
        balancers send new clients elsewhere, and new handshakes are refused. Then stop."""
        # A Deferred of our own: chained on the registry's, the stop would wait on
        # MultiService.stopService, which waits on the registry's stopService, which
        # returns that same Deferred, so it would never fire (SIGTERM never finished).
        drained: Deferred[None] = Deferred()
        self.registry.shut_down().addBoth(drained.callback)
        drained.addCallback(lambda _: super(RelayService, self).stopService())
        return drained
