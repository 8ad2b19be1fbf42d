"""``/client.js``: the browser class `IWRelaySocket` (iw_relay/static/client.js), served
as a static script with a strong ETag so browsers revalidate cheaply (304) and pick up a
new version within minutes of a relay upgrade."""

from __future__ import annotations

import hashlib
from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

CONTENT_TYPE = b"text/javascript; charset=utf-8"
# The URL carries no version: cache briefly, then revalidate with the ETag.
CACHE_CONTROL = b"public, max-age=600"


def script() -> bytes:
    return files("iw_relay.static").joinpath("client.js").read_bytes()


def _etag_matches(header: bytes | None, etag: bytes) -> bool:
    """If-None-Match uses the weak comparison: W/"x" matches "x"; * matches anything."""
    if header is None:
        return False
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


class ClientScriptResource(Resource):
    """The script, read once; GET and HEAD. Another site's pages may load it (a
    ``<script src>`` of the relay's origin), even under COEP."""

    isLeaf = True

    def __init__(self, body: bytes | None = None) -> None:
        super().__init__()
        self._body = script() if body is None else body
        self.etag = b'"' + hashlib.sha256(self._body).hexdigest()[:32].encode() + b'"'

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"etag", self.etag)
        request.setHeader(b"cache-control", CACHE_CONTROL)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cross-origin-resource-policy", b"cross-origin")
        if _etag_matches(request.getHeader(b"if-none-match"), self.etag):
            request.setResponseCode(304)
            return b""
        return self._body
