"""The HTTP side, on the same port as the WebSockets: /health, /stats, the upgrade, 404.

Any request asking for a WebSocket upgrade, on any path, goes to the relay (an upgrade on
/health without a room is a join without a room id, as in the original). Everything else
is /health, /stats or the original's plain-text 404. Every answer carries
``X-Content-Type-Options: nosniff``; every method but GET and HEAD is 405.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from iw_relay.registry import RoomRegistry

NOT_FOUND_TEXT = b"Impossible Writer Relay - Use WebSocket endpoint: ws://host/room/{roomId}"
ALLOWED_METHODS = (b"GET", b"HEAD")
SERVER_NAME = b"iw-relay"
# A byte Autobahn's re-parse (latin-1, str.splitlines) would take for a line break.
_LINE_BREAKING = re.compile(rb"[\x00\x0a-\x0d\x1c-\x1e\x85]")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def format_uptime(seconds: float) -> str:
    """'1d 2h 3m 4s' with zero parts left out; '0s' at start."""
    whole = int(seconds)
    parts = [
        (whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m"),
        (whole % 60, "s"),
    ]
    text = " ".join(f"{value}{unit}" for value, unit in parts if value)
    return text or "0s"


def memory_megabytes() -> tuple[str, str]:
    """Current and peak resident memory, as the original's heapUsed/heapTotal strings."""
    try:
        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        current = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"{round(current / 2**20)}MB", f"{round(max(peak, current) / 2**20)}MB"


def _json_response(request: Request, body: dict[str, Any]) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2).encode()


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, registry: RoomRegistry, wall_clock: Callable[[], float]) -> None:
        super().__init__()
        self._registry = registry
        self._wall_clock = wall_clock

    def render(self, request: Request) -> bytes:
        registry = self._registry
        now = datetime.fromtimestamp(self._wall_clock(), UTC)
        used, total = memory_megabytes()
        cluster = registry.backplane.status()
        status = "draining" if registry.stopping else "healthy"
        if cluster is not None and not cluster["connected"] and not registry.stopping:
            status = "degraded"  # a load balancer should send new clients to another node
        if status != "healthy":
            request.setResponseCode(503)
        body = {
            "status": status,
            "uptime": registry.clock.seconds() - registry.started_at,
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "rooms": len(registry.rooms),
            "connections": registry.connection_count,
            "memory": {"heapUsed": used, "heapTotal": total},
        }
        if cluster is not None:
            body["redis"] = cluster["redis"]
        return _json_response(request, body)


class StatsResource(Resource):
    isLeaf = True

    def __init__(self, registry: RoomRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render(self, request: Request) -> bytes:
        registry = self._registry
        uptime = registry.clock.seconds() - registry.started_at
        stats = registry.stats
        body = {
            "messagesRelayed": stats.messagesRelayed,
            "connectionsTotal": stats.connectionsTotal,
            "disconnectionsTotal": stats.disconnectionsTotal,
            "rateLimitsHit": stats.rateLimitsHit,
            "slowConsumersDropped": stats.slowConsumersDropped,
            "connectionsRefused": stats.connectionsRefused,
            "openWebSockets": registry.connections.websockets,
            "openConnections": registry.connections.total,
            "trackedAddresses": len(registry.connections.per_address),
            "startTime": registry.start_time_ms,
            "currentRooms": len(registry.rooms),
            "currentConnections": registry.connection_count,
            "uptime": uptime,
            "uptimeFormatted": format_uptime(uptime),
        }
        body.update(registry.recovery.snapshot())  # nothing while recovery is off
        cluster = registry.backplane.status()
        if cluster is not None:
            body["cluster"] = cluster
        return _json_response(request, body)


class NotFoundResource(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return NOT_FOUND_TEXT


class PlainError(Resource):
    """A short text/plain error page (405, 400) with optional extra headers."""

    isLeaf = True

    def __init__(self, status: int, text: bytes, headers: dict[bytes, bytes] | None = None
                 ) -> None:
        super().__init__()
        self._status, self._text, self._headers = status, text, headers or {}

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", b"text/plain")
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return self._text


METHOD_NOT_ALLOWED = PlainError(405, b"Method Not Allowed", {b"allow": b"GET, HEAD"})
BAD_REQUEST = PlainError(400, b"Bad Request")


def is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class RelayResource(Resource):
    """The relay's root: mount it at a Site's root, or under any path of another Site.

    Autobahn re-reads the request line, so before handing an upgrade over, the URI is
    made relative to where this resource is mounted: ``/relay/room/abc`` mounted at
    ``/relay`` is the room ``abc``.
    """

    def __init__(self, registry: RoomRegistry, websocket: WebSocketResource,
                 wall_clock: Callable[[], float] = time.time,
                 pages: dict[bytes, Resource] | None = None) -> None:
        super().__init__()
        self._websocket = websocket
        self._pages: dict[bytes, Resource] = {
            b"health": HealthResource(registry, wall_clock),
            b"stats": StatsResource(registry),
            **(pages or {}),
        }
        self._not_found = NotFoundResource()

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        refusal = _refusal(request)
        if refusal is not None:
            return refusal
        if is_websocket_upgrade(request):
            _make_uri_relative(request, len(request.prepath or ()) - 1)
            return self._websocket
        # /health, /stats and the optional pages (/ice-servers, /demo; /demo/ too).
        if not request.postpath or request.postpath == [b""]:
            page = self._pages.get(name)
            if page is not None and (not request.postpath or name == b"demo"):
                return page
        return self._not_found

    def render(self, request: Request) -> bytes | int:
        """The mount point itself, reached without a trailing slash."""
        refusal = _refusal(request)
        if refusal is not None:
            return refusal.render(request)
        if is_websocket_upgrade(request):
            _make_uri_relative(request, len(request.prepath or ()))
            return self._websocket.render(request)
        return self._not_found.render(request)


def _refusal(request: Request) -> Resource | None:
    """nosniff on everything; 405 for a method other than GET or HEAD; 400 for an upgrade
    whose headers Autobahn would split differently than twisted.web did (a relay mounted
    in another Site; the front door refuses those before any Site sees them)."""
    request.setHeader(b"x-content-type-options", b"nosniff")
    if request.method not in ALLOWED_METHODS:
        return METHOD_NOT_ALLOWED
    if is_websocket_upgrade(request) and any(
            _LINE_BREAKING.search(name) or any(_LINE_BREAKING.search(v) for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()):
        return BAD_REQUEST
    return None


def _make_uri_relative(request: Request, mount_depth: int) -> None:
    """Cut the `mount_depth` segments of the mount point off the URI, as the client sent
    it: never rebuilt from decoded segments (``/room/a%2Fb`` stays that, and is refused
    like the original refuses it)."""
    path, question, query = request.uri.partition(b"?")
    segments = path.split(b"/")[1 + mount_depth:]
    request.uri = b"/" + b"/".join(segments) + question + query


class _HeadOf(Resource):
    """Answers HEAD with `resource`'s headers and Content-Length, and no body: Twisted
    would otherwise warn, with the whole URI, that a HEAD request returned a body."""

    isLeaf = True

    def __init__(self, resource: Resource) -> None:
        super().__init__()
        self._resource = resource

    def render(self, request: Request) -> bytes | int:
        body = self._resource.render(request)
        if body is NOT_DONE_YET or not isinstance(body, bytes):
            return body
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class RelayRequest(Request):
    """Says `Server: iw-relay` rather than Twisted's name and version."""

    def render(self, resrc: Resource) -> None:
        self.setHeader(b"server", SERVER_NAME)
        if self.method == b"HEAD":
            resrc = _HeadOf(resrc)
        super().render(resrc)


class OneRequestChannel(HTTPChannel):
    """Closes the connection after one answer: the front door has read and checked that
    one request head, and nothing after it."""

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False


class RelaySite(Site):
    """A Site that writes no access log: request paths carry room ids, which are secrets."""

    displayTracebacks = False
    requestFactory = RelayRequest

    def log(self, request: http.Request) -> None:
        pass


class FrontDoorSite(RelaySite):
    """The relay's Site behind its front door (frontdoor.py): one request a connection."""

    # Twisted types this as a factory of its private channel wrapper; Site.buildProtocol
    # takes any HTTPChannel class, as it did before the annotation.
    protocol = OneRequestChannel  # type: ignore[assignment]
