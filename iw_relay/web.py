"""The HTTP side, on the same port as the WebSockets: /health, /stats, the upgrade, 404.

Any request asking for a WebSocket upgrade, on any path, goes to the relay (an upgrade on
/health without a room is a join without a room id, as in the original). Everything else
is /health, /stats or the original's plain-text 404.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from iw_relay.registry import RoomRegistry

NOT_FOUND_TEXT = b"Impossible Writer Relay - Use WebSocket endpoint: ws://host/room/{roomId}"
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
            "openWebSockets": registry.connections.total,
            "trackedAddresses": len(registry.connections.per_address),
            "startTime": registry.start_time_ms,
            "currentRooms": len(registry.rooms),
            "currentConnections": registry.connection_count,
            "uptime": uptime,
            "uptimeFormatted": format_uptime(uptime),
        }
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

    def getChildWithDefault(self, name: bytes, request: Request) -> Resource:
        if is_websocket_upgrade(request):
            _make_uri_relative(request, len(request.prepath) - 1)
            return self._websocket
        # /health, /stats and the optional pages (/ice-servers, /demo; /demo/ too).
        if not request.postpath or request.postpath == [b""]:
            page = self._pages.get(name)
            if page is not None and (not request.postpath or name == b"demo"):
                return page
        return self._not_found

    def render(self, request: Request) -> bytes | int:
        """The mount point itself, reached without a trailing slash."""
        if is_websocket_upgrade(request):
            _make_uri_relative(request, None)
            return self._websocket.render(request)
        return self._not_found.render(request)


def _make_uri_relative(request: Request, mount_depth: int | None) -> None:
    """Drop the mount point's `mount_depth` leading segments (None: the whole path) from
    the request target, keeping the rest as the client sent it (still percent-encoded:
    the room id is read from the raw target)."""
    path, question, query = request.uri.partition(b"?")
    kept = [] if mount_depth is None else path.split(b"/")[1 + mount_depth:]
    request.uri = b"/" + b"/".join(kept) + question + query


class RelaySite(Site):
    """A Site that writes no access log: request paths carry room ids, which are secrets."""

    displayTracebacks = False

    def log(self, request: Request) -> None:
        pass
