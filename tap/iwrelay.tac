"""An existing Twisted application that adopts the relay: run it with

    twistd -ny tap/iwrelay.tac

`RelayService` is an ordinary `MultiService`: adopted by the application, it listens on
its ports when the application starts, sweeps expired rooms while it runs, and on stop
(SIGTERM, SIGINT) tells every member `server-shutdown`, closes them with 1001 and lets the
process exit once they are gone or the shutdown timeout has passed.

IWRELAY_PORT holds one or more whitespace-separated Twisted endpoint strings
(default tcp:3000), e.g. "tcp:3000:interface=127.0.0.1 ssl:443:privateKey=...".
Every other setting is a `RelayConfig` field (see iw_relay/config.py).
"""

import os

from twisted.application import service

from iw_relay import RelayConfig, RelayService

application = service.Application("my-app")

config = RelayConfig(
    ports=tuple(os.environ.get("IWRELAY_PORT", "tcp:3000").split()),
    rate_limit=100,
    room_expiry=24 * 3600.0,
    shutdown_timeout=10.0,
)
RelayService(config).setServiceParent(application)

# The application's other services are adopted the same way, e.g.
# MyOtherService().setServiceParent(application).
#
# twistd logs this application with its default observer. To have the relay's level
# filtering and JSON lines instead (the plugin's --log-level / --log-format):
#
#     import sys
#     from twisted.logger import ILogObserver
#     from iw_relay import logs
#     application.setComponent(ILogObserver, logs.make_observer(config, sys.stdout))
