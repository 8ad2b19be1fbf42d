"""The one fake member of a RoomRegistry, for the registry, signaling and cluster tests."""

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
    """Records what it is delivered, showing connection ids by their test names, and how
    it was closed.

    Given a registry, closing it leaves that registry, as a closed WebSocket does; given
    None, the test answers the close itself (it calls `leave` when it chooses). With
    `fail_on_close`, closing it raises, as a broken member would."""

    def __init__(self, registry: RoomRegistry | None, name: str, *,
                 fail_on_close: bool = False) -> None:
        self.registry = registry
        self.connection_id = h(name)
        self.delivered: list[dict] = []
        self.closed_with: tuple[int, str] | None = None
        self.fail_on_close = fail_on_close

    def deliver(self, frame: bytes) -> None:
        message = json.loads(frame)
        if "connectionId" in message:
            message["connectionId"] = NAMES.get(message["connectionId"],
                                                message["connectionId"])
        if "peers" in message:
            message["peers"] = [NAMES.get(p, p) for p in message["peers"]]
        self.delivered.append(message)

    def close(self, code: int, reason: str) -> None:
        if self.fail_on_close:
            raise RuntimeError("broken member")
        self.closed_with = (code, reason)
        if self.registry is not None:
            self.registry.leave(self, code)

    def kinds(self) -> list[str]:
        return [m["type"] for m in self.delivered]

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.delivered if m["type"] == kind]

    def presence(self) -> list[tuple[str, str, int]]:
        return [(m["type"], m["connectionId"], m["userCount"]) for m in self.delivered
                if m["type"] in ("connected", "user-joined", "user-left")]

    def ops(self) -> list[int]:
        return [m["n"] for m in self.of("op")]
