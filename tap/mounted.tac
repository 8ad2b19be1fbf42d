"""An existing Twisted web application that serves the relay under /relay of its own
Site: run it with

    twistd -ny tap/mounted.tac

and clients connect to ws://HOST:PORT/relay/room/{roomId} (or /relay/?room={roomId});
/relay/health and /relay/stats are the relay's, everything else is the application's.

APP_PORT is the application's own endpoint (default tcp:8080). The relay's settings come
from the environment exactly as `twistd iwrelay` (and tap/iwrelay.tac) read them: every
IWRELAY_* variable, and the original relay's LOG_LEVEL and NODE_ENV. IWRELAY_PORT and
PORT are not used: the relay opens no port of its own here.
"""

import os

from twisted.application import service, strports
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from iw_relay import RelayService
from iw_relay.tap import config_from_environment

application = service.Application("my-web-app")

# The relay's settings, read and checked exactly as the twistd plugin reads them. The
# relay's own ports are not opened (listen=False), so PORT and IWRELAY_PORT are left out.
environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "IWRELAY_PORT")}
config = config_from_environment(environ)

# listen=False: no port of its own, but the service is still adopted by the application,
# so the registry's expiry sweep runs and, on stop, every member gets server-shutdown
# and a 1001 close.
relay = RelayService(config, listen=False)
relay.setServiceParent(application)

root = Resource()
root.putChild(b"", Data(b"<!doctype html><title>My app</title><p>My app's own page.\n",
                        "text/html; charset=utf-8"))
# The relay's root resource rewrites the request URI relative to where it is mounted, so
# /relay/room/abc is room "abc".
root.putChild(b"relay", relay.resource)


class AppSite(Site):
    """The application's Site. Its access log keeps the app's own requests, but not the
    relay's: their paths and queries carry room ids, which are secrets."""

    def log(self, request):
        if request.path == b"/relay" or request.path.startswith(b"/relay/"):
            return
        super().log(request)


# Adopted after the relay, so that it stops first: no new client arrives while the relay
# says goodbye to its members.
strports.service(os.environ.get("APP_PORT", "tcp:8080"), AppSite(root)).setServiceParent(
    application)
