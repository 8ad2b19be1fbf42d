"""A test-only web server for browser tests: ``/client.js`` from the relay's own
resource (iw_relay.clientjs), and ``/`` a blank page to run scripts in. Run as
``python3 -m tests.page_server``; it prints ``listening on PORT`` and serves until it is
killed (`PageServer` starts it for a test). The page's origin differs from the relay's, as
an application's would."""

from __future__ import annotations

import re
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from iw_relay.clientjs import ClientScriptResource
from tests.relay_process import CHECKOUT, relay_environment

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


class PageServer:
    """tests/page_server.py in a subprocess, on a free loopback port."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.page_server"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=CHECKOUT,
            env=relay_environment(), text=True)
        line = self.process.stdout.readline()  # bounded: the process prints or exits
        found = re.match(r"listening on (\d+)", line)
        if not found:
            self.stop()
            raise AssertionError(f"the page server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{found.group(1)}/"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


if __name__ == "__main__":
    main()
