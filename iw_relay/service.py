"""RelayService: the RoomRegistry plus one listening Site per --port, as one service."""

from __future__ import annotations

import time
from collections.abc import Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime

from iw_relay.config import RelayConfig
from iw_relay.protocol import RelayServerFactory, prepare_frame
from iw_relay.registry import RoomRegistry
from iw_relay.web import RelayResource, RelaySite


class RelayService(MultiService):
    """Adopt it with `setServiceParent(application)`, or mount `.resource` in a Site.

    With `listen=False` no port is opened: the embedding application serves `.resource`.
    """

    def __init__(
        self,
        config: RelayConfig,
        reactor: object | None = None,
        clock: IReactorTime | None = None,
        wall_clock: Callable[[], float] = time.time,
        listen: bool = True,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        clock = clock if clock is not None else reactor
        self.config = config
        self.registry = RoomRegistry(config, clock, prepare_frame, wall_clock)
        self.registry.setServiceParent(self)
        self.factory = RelayServerFactory(self.registry, config, clock, wall_clock)
        self.resource = RelayResource(self.registry, WebSocketResource(self.factory), wall_clock)
        # The Site's idle timeout is also the deadline for a request to arrive: a client that
        # opens TCP and never sends its handshake (slowloris) is dropped after it.
        self.site = RelaySite(self.resource, timeout=config.handshake_timeout, reactor=clock)
        # Listening services come last, so that they stop first: no new client arrives
        # while the registry says goodbye to the connected ones.
        if listen:
            for description in config.ports:
                strports.service(description, self.site, reactor=reactor).setServiceParent(self)
