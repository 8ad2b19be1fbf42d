"""``GET /ice-servers``: STUN URIs and time-limited TURN credentials for WebRTC peers.

The credentials follow the TURN REST API scheme (draft-uberti-behave-turn-rest) that
coturn implements with ``use-auth-secret`` / ``static-auth-secret``: the relay and the
TURN server share a secret and never talk to each other.

- username   = ``"<expiry unix time>:<user>"``
- credential = ``base64(HMAC-SHA1(secret, username))``

The TURN server recomputes the credential from the username and refuses it once the
expiry time has passed, so a credential leaked from a browser is worth ``--turn-ttl`` at
most. The answer is what ``new RTCPeerConnection({iceServers})`` takes, plus ``ttl``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from iw_relay.admission import origin_allowed
from iw_relay.config import RelayConfig


def turn_credentials(secret: bytes, user: str, expires_at: int) -> tuple[str, str]:
    """(username, credential) valid until `expires_at` (Unix time) for coturn's
    ``use-auth-secret`` with ``static-auth-secret=secret``."""
    username = f"{expires_at}:{user}"
    digest = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(config: RelayConfig, now: float, user: str) -> dict[str, Any]:
    """The /ice-servers answer for `user` at Unix time `now`."""
    servers: list[dict[str, Any]] = []
    ttl = int(config.turn_ttl)
    if config.turn_uris and config.turn_secret is not None:
        username, credential = turn_credentials(config.turn_secret, user, int(now) + ttl)
        servers.append({"urls": list(config.turn_uris), "username": username,
                        "credential": credential})
    if config.stun_uris:
        servers.append({"urls": list(config.stun_uris)})
    return {"iceServers": servers, "ttl": ttl}


def ice_enabled(config: RelayConfig) -> bool:
    return bool(config.turn_uris or config.stun_uris)


class IceServersResource(Resource):
    """Fresh credentials on every GET, for a random user name (nothing is recorded).

    With ``--allowed-origin``, a browser page of another origin is refused (403) as its
    WebSocket handshake would be; allowed origins may read the answer across origins.
    """

    isLeaf = True

    def __init__(self, config: RelayConfig,
                 wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._config = config
        self._wall_clock = wall_clock
        self._allowed_origins = frozenset(config.allowed_origins)

    def render_GET(self, request: Request) -> bytes:
        origin = request.getHeader(b"origin")
        origin_text = origin.decode("latin-1") if origin is not None else None
        if not origin_allowed(origin_text, self._allowed_origins):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain")
            return b"Origin not allowed"
        if origin is not None:
            request.setHeader(b"access-control-allow-origin",
                              origin if self._allowed_origins else b"*")
            request.setHeader(b"vary", b"Origin")
        body = ice_servers(self._config, self._wall_clock(), secrets.token_hex(8))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()
