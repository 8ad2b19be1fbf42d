"""Who may open a WebSocket: client address behind trusted proxies, origins, connection
limits and room tokens. Checked before Autobahn builds a protocol, so refusing is cheap.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

import jwt

from iw_relay.config import parse_origin

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: Any, proxies: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in proxies)


def client_address(peer: str, forwarded_for: str | None, real_ip: str | None,
                   proxies: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy.

    Behind trusted proxies, X-Forwarded-For is read from the right: the first address
    that is not a trusted proxy is the client (anything left of it could be forged).
    X-Real-IP is used when there is no X-Forwarded-For.
    """
    if not proxies or not _trusted(_ip(peer), proxies):
        return peer
    if forwarded_for:
        hops = [_ip(hop) for hop in forwarded_for.split(",")]
        if None in hops:
            return peer
        for hop in reversed(hops):
            if not _trusted(hop, proxies):
                return str(hop)
        return str(hops[0])
    if real_ip and _ip(real_ip) is not None:
        return str(_ip(real_ip))
    return peer


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Any origin when none is configured; a request without Origin is not a browser's."""
    if not allowed or origin is None:
        return True
    try:
        return parse_origin(origin) in allowed
    except ValueError:
        return False


class ConnectionCounter:
    """Open WebSocket connections, in all and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_address: Counter[str] = Counter()

    def add(self, address: str) -> None:
        self.total += 1
        self.per_address[address] += 1

    def remove(self, address: str) -> None:
        self.total -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]

    def refusal(self, address: str, max_total: int, max_per_address: int) -> str | None:
        """Why a new connection from `address` is over a limit, or None."""
        if max_total and self.total >= max_total:
            return "max-connections"
        if max_per_address and self.per_address.get(address, 0) >= max_per_address:
            return "max-connections-per-ip"
        return None


def token_allows(token: str | None, secret: bytes, room_id: str) -> bool:
    """A valid, unexpired HS256 JWT whose `room` is `room_id` or whose `rooms` (a list of
    glob patterns such as "team-*") matches it."""
    if not token:
        return False
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"],
                            options={"require": ["exp"]})
    except jwt.PyJWTError:
        return False
    if claims.get("room") == room_id:
        return True
    patterns = claims.get("rooms")
    if isinstance(patterns, list):
        return any(isinstance(p, str) and fnmatchcase(room_id, p) for p in patterns)
    return False
