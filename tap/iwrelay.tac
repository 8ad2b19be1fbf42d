"""An existing Twisted application that adopts the relay: run it with

    twistd -ny tap/iwrelay.tac

`RelayService` is an ordinary `MultiService`: adopted by the application, it listens on
its ports when the application starts, sweeps expired rooms while it runs, and on stop
(SIGTERM, SIGINT) tells every member `server-shutdown`, closes them with 1001 and lets the
process exit once they are gone or the shutdown timeout has passed.

The relay's settings come from the environment exactly as `twistd iwrelay` reads them:
every IWRELAY_* variable (IWRELAY_PORT holds one or more whitespace-separated Twisted
endpoint strings, default tcp:3000), and the original relay's PORT, LOG_LEVEL and
NODE_ENV. Code may build a `RelayConfig(...)` of its own instead.
"""

from twisted.application import service

from iw_relay import RelayService
from iw_relay.tap import config_from_environment

application = service.Application("my-app")

config = config_from_environment()
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
