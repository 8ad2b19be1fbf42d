"""The WebRTC demo page (``--demo``): ``/demo``, one static HTML file with its script.

Two people open ``/demo#some-room`` (or type a room in the form); the page joins
``ws(s)://<this host>/room/<room>``, takes ICE servers from ``/ice-servers`` when the
relay serves them, and opens an RTCPeerConnection with every other member (the newcomer
offers, ``to`` carries offers, answers and candidates to one peer), with a data channel
carrying a shared text area. Nothing but signaling goes through the relay.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

# The page's script is inline, plus the relay's own /client.js; nothing else may run, and
# it may connect to its own origin only: CSP Level 3's 'self' covers ws: and wss: to the
# same host and port.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)


def page() -> bytes:
    return files(__name__).joinpath("index.html").read_bytes()


class DemoResource(Resource):
    """The page, read once; served at ``/demo`` and ``/demo/``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._page = page()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")  # the hash holds the room
        request.setHeader(b"cache-control", b"no-store")
        return self._page
