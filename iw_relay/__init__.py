"""iw-relay: a WebSocket relay for real-time collaborative editing (Twisted + Autobahn)."""

from iw_relay._autobahn import lean_reactor_dispatch, tune_autobahn
from iw_relay.config import RelayConfig
from iw_relay.service import RelayService

#: The release docs/changelog.rst describes at its top (".dev0" while unreleased).
__version__ = "0.2.0.dev0"
__all__ = ["RelayConfig", "RelayService", "__version__", "lean_reactor_dispatch",
           "tune_autobahn"]
