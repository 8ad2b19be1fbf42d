"""Connection-recovery history in Redis Streams: the cluster `HistoryStore`.

A room's history is a stream ``iwrelay:h:{room key}`` (the room key is a hash: a room id
is never a Redis key) with ``...:seq``, ``...:epoch`` and ``...:bytes`` beside it. Each
append is one Lua script that takes the next seq, splices it into the frame and appends
it, then trims by count, bytes and age: the seq is the same on every node. The stream
and its byte count live for the window after the last append; the seq and the epoch for
`head_ttl` (a room's lifetime plus the window), so a quiet room keeps its epoch and a
member that missed nothing can still resume.

The relay itself reaches these scripts through the backplane's store
(iw_relay.backplane.redis, driven by iw_relay.cluster_recovery), where the append is the
cluster's sequencing script, which also publishes; this class is the same history as a
standalone `HistoryStore`, with room ids, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import Any

from twisted.internet.defer import Deferred

from iw_relay.recovery import Entry, Head, HistoryUsage, RecoveryFailure, new_epoch
from iw_relay.registry import room_key


def _script(name: str) -> str:
    return files("iw_relay.backplane").joinpath("lua", f"{name}.lua").read_text()


HEAD, SINCE = (_script(f"history_{name}") for name in ("head", "since"))
APPEND = _script("sequence")

#: run(script, keys, args) -> Deferred of the script's answer (txredisapi's ``eval``).
Run = Callable[[str, list[str], list[Any]], Deferred]


def history_keys(room_id: str) -> list[str]:
    """stream, seq, epoch, bytes: all named by the room's hash."""
    base = f"iwrelay:h:{room_key(room_id)}"
    return [base, f"{base}:seq", f"{base}:epoch", f"{base}:bytes"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RedisHistory:
    """`HistoryStore` over Redis Streams; every method answers with a Deferred."""

    def __init__(self, run: Run, clock: Any, window: float, max_messages: int,
                 max_bytes: int, head_ttl: float) -> None:
        self._run = run
        self.clock = clock
        self.window_ms = max(1, int(window * 1000))
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.head_ttl_ms = max(self.window_ms, int(head_ttl * 1000))

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def head(self, room_id: str) -> Deferred[Head]:
        answer = self._run(HEAD, history_keys(room_id), [new_epoch(), self.head_ttl_ms])
        return answer.addCallback(lambda reply: Head(_text(reply[0]), int(reply[1])))

    def append(self, room_id: str, payload: bytes, sender: str | None,
               target: str | None) -> Deferred[Entry]:
        now = self._now_ms()
        # The cluster's sequencing script with one frame and no node to publish to.
        args = ["", "", "", now, self.window_ms, self.max_messages, self.max_bytes,
                new_epoch(), self.head_ttl_ms, sender or "", target or "", payload]

        def kept(reply: list[Any]) -> Entry:
            return Entry(int(reply[0]), _bytes(reply[1]), sender, target, now / 1000)

        keys = [*history_keys(room_id), "iwrelay:m:" + room_key(room_id)]
        return self._run(APPEND, keys, args).addCallback(kept)

    def since(self, room_id: str, seq: int, epoch: str,
              connection_id: str) -> Deferred[list[bytes] | RecoveryFailure]:
        args = [seq, epoch, self._now_ms(), self.window_ms]

        def owed(reply: list[Any]) -> list[bytes] | RecoveryFailure:
            if _text(reply[0]) != "ok":
                return RecoveryFailure(_text(reply[0]))
            frames = []
            for at in range(2, len(reply), 3):
                sender, target = _text(reply[at + 1]), _text(reply[at + 2])
                if sender != connection_id and target in ("", connection_id):
                    frames.append(_bytes(reply[at]))
            return frames

        return self._run(SINCE, history_keys(room_id)[:3], args).addCallback(owed)

    def drop(self, room_id: str) -> Deferred[None]:
        keys = history_keys(room_id)
        return self._run("redis.call('DEL', unpack(KEYS))", keys, []).addCallback(
            lambda _: None)

    def usage(self) -> HistoryUsage:
        """Kept in Redis, not here: sized with Redis's own memory figures."""
        return HistoryUsage()
