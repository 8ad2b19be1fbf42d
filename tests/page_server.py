"""A test-only web server for browser tests: ``/client.js`` from the relay's own
resource (iw_relay.clientjs), and ``/`` a blank page to run scripts in. Run as
``python3 -m tests.page_server``; it prints ``listening on PORT`` and serves until it is
killed. The page's origin differs from the relay's, as an application's would."""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from iw_relay.clientjs import ClientScriptResource

PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>IWRelaySocket under test</title>
<script src="/client.js"></script>
<body>test page</body>
"""


def site() -> Site:
    root = Resource()
    root.putChild(b"", Data(PAGE, "text/html; charset=utf-8"))
    root.putChild(b"client.js", ClientScriptResource())
    return Site(root)


def main() -> None:
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listening(port) -> None:
        print(f"listening on {port.getHost().port}", flush=True)

    endpoint.listen(site()).addCallbacks(listening, lambda failure: (
        print(failure.getTraceback(), file=sys.stderr), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
