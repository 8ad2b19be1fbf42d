"""The single-node backplane (the default): there are no other nodes, so it costs nothing."""

from __future__ import annotations

from typing import Any

from iw_relay.backplane.base import BackplaneEvents


class LocalBackplane:
    """Every join holds at once; nothing ever leaves the process."""

    node_id = "local"
    shared = False

    def __init__(self) -> None:
        self._events: BackplaneEvents | None = None

    def attach(self, events: BackplaneEvents) -> None:
        self._events = events

    def start(self) -> None:
        pass

    def stop(self) -> None:
        return None

    def join(self, key: str, connection_id: str, deadline: float, max_size: int) -> None:
        assert self._events is not None, "attach() first"
        self._events.join_committed(key, connection_id, None, None)

    def leave(self, key: str, connection_id: str) -> None:
        pass

    def publish(self, key: str, nodes: Any, payload: bytes) -> None:
        pass

    def unicast(self, key: str, node: str, target: str, payload: bytes) -> None:
        pass

    def expire(self, key: str) -> None:
        pass

    def status(self) -> dict[str, Any] | None:
        return None
