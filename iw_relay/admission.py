"""Who may connect: client address behind trusted proxies, origins, connection limits
and room tokens. The front door counts and refuses before any protocol is built.
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


LOOPBACK = ("127.0.0.0/8", "::1/128")


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def proxy_networks(configured: Iterable[str]) -> tuple[Network, ...]:
    """The proxies whose forwarding headers are believed: the configured networks, or
    loopback when none is configured (a proxy on the same host, as uvicorn and gunicorn
    assume by default)."""
    return parse_networks(tuple(configured) or LOOPBACK)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a forwarding header entry: bare, ``ip:port``, ``[v6]`` or
    ``[v6]:port``; None when it is none of those (``unknown``, an obfuscated name...)."""
    text = text.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        text = inside
    elif text.count(":") == 1:  # IPv4 with a port (an IPv6 address has two colons or more)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: Any, proxies: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in proxies)


def is_trusted_proxy(peer: str, proxies: tuple[Network, ...]) -> bool:
    """Whether forwarding headers from the TCP peer `peer` are believed."""
    return _trusted(_ip(peer), proxies)


def _entry_key(entry: str) -> str:
    """The counting key of a header entry: its address, else the (bounded) text itself,
    so that unrelated clients never share the proxy's own address."""
    address = _ip(entry)
    return str(address) if address is not None else "unparsed:" + entry.strip().lower()[:64]


def client_address(peer: str, forwarded_for: str | None, real_ip: str | None,
                   proxies: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy.

    Behind trusted proxies, X-Forwarded-For is read from the right, trusted hops are
    skipped, and the first entry that is not a trusted proxy is the client (anything left
    of it could be forged); a port is stripped. That entry was written by a trusted proxy:
    when it does not parse (``unknown``) it is still that client's key, never the proxy's
    address. Every hop trusted: the leftmost. X-Real-IP is used when there is no
    X-Forwarded-For.
    """
    if not proxies or not _trusted(_ip(peer), proxies):
        return peer
    if forwarded_for:
        entries = [entry for entry in forwarded_for.split(",") if entry.strip()]
        for entry in reversed(entries):
            if not _trusted(_ip(entry), proxies):
                return _entry_key(entry)
        if entries:
            return _entry_key(entries[0])
    if real_ip and real_ip.strip():
        return _entry_key(real_ip)
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
    """Open connections (from accept to close, handshake phase included), in all and per
    client address. The address None counts in the total only: a connection from a
    trusted proxy whose client is not known yet."""

    def __init__(self) -> None:
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.websockets = 0  # of the total, those past their WebSocket handshake

    def add(self, address: str | None) -> None:
        self.total += 1
        if address is not None:
            self.per_address[address] += 1

    def remove(self, address: str | None) -> None:
        self.total -= 1
        if address is not None:
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]

    def move(self, old: str | None, new: str | None) -> None:
        """Charge an already counted connection to another address."""
        self.remove(old)
        self.add(new)

    def refusal(self, address: str | None, max_total: int, max_per_address: int
                ) -> str | None:
        """Why a new connection from `address` is over a limit, or None."""
        if max_total and self.total >= max_total:
            return "max-connections"
        if (address is not None and max_per_address
                and self.per_address.get(address, 0) >= max_per_address):
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
