"""A fake member of a RoomRegistry, for the registry and cluster tests."""

from __future__ import annotations

import json
import re

from iw_relay.registry import RoomRegistry

NAMES: dict[str, str] = {}
_ID = re.compile(r"[0-9a-f]{16}\Z")


def h(name: str) -> str:
    """A readable test name as a connection id (16 hex digits, as the relay makes);
    a name that is one already stays as it is."""
    connection_id = name if _ID.match(name) else name.encode().hex().rjust(16, "0")
    NAMES[connection_id] = name
    return connection_id


class Member:
    """Closing it leaves its registry, as a closed WebSocket does. Its frames show
    connection ids by their test names."""

    def __init__(self, registry: RoomRegistry, name: str) -> None:
        self.registry = registry
        self.connection_id = h(name)
        self.delivered: list[dict] = []
        self.closed_with: tuple[int, str] | None = None

    def deliver(self, frame: bytes) -> None:
        message = json.loads(frame)
        if "connectionId" in message:
            message["connectionId"] = NAMES.get(message["connectionId"],
                                                message["connectionId"])
        if "peers" in message:
            message["peers"] = [NAMES.get(p, p) for p in message["peers"]]
        self.delivered.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self.registry.leave(self, code)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.delivered if m["type"] == kind]

    def presence(self) -> list[tuple[str, str, int]]:
        return [(m["type"], m["connectionId"], m["userCount"]) for m in self.delivered
                if m["type"] in ("connected", "user-joined", "user-left")]

    def ops(self) -> list[int]:
        return [m["n"] for m in self.of("op")]
