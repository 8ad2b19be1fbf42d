"""RoomRegistry: rooms, members, fan-out, counters and the expiry sweep.

It knows nothing of WebSockets: a member is anything with a `connection_id`, a
`deliver(frame)` and a `close(code, reason)` (see `Member`). Frames handed to members
come from `prepare(payload)`, called once per broadcast, so the WebSocket layer can
frame a message once for all of its recipients.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from iw_relay import messages
from iw_relay.admission import ConnectionCounter
from iw_relay.config import RelayConfig
from iw_relay.metrics import DurationHistogram


class Member(Protocol):
    connection_id: str

    def deliver(self, frame: Any) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


def room_hash(room_id: str) -> str:
    """What logs show instead of a room id: room ids are secrets."""
    return hashlib.sha256(room_id.encode()).hexdigest()[:12]


@dataclass(eq=False)
class Room:
    room_id: str
    expires_at: float
    members: dict[str, Member] = field(default_factory=dict)


@dataclass
class RelayStats:
    """The counters /stats reports; names as on the wire."""

    messagesRelayed: int = 0
    connectionsTotal: int = 0
    disconnectionsTotal: int = 0
    rateLimitsHit: int = 0
    slowConsumersDropped: int = 0
    connectionsRefused: int = 0
    bytesReceived: int = 0
    bytesSent: int = 0


class RoomRegistry(Service):
    _log = Logger()

    def __init__(
        self,
        config: RelayConfig,
        clock: IReactorTime,
        prepare: Callable[[bytes], Any] = lambda payload: payload,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.prepare = prepare
        self.wall_clock = wall_clock
        self.stats = RelayStats()
        self.refusals: Counter[str] = Counter()
        #: Open WebSockets (joined or not), in all and per client address.
        self.connections = ConnectionCounter()
        self.closes: Counter[int] = Counter()
        self.relay_seconds = DurationHistogram()
        self.started_at = clock.seconds()
        self.start_time_ms = int(wall_clock() * 1000)
        self.rooms: dict[str, Room] = {}
        self._room_of: dict[Member, Room] = {}
        self._sweeper = LoopingCall(self.sweep_expired)
        self._sweeper.clock = clock
        self._emptied: list[Deferred[None]] = []
        self._shut_down: Deferred[None] | None = None
        self.stopping = False

    # -- membership ------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._room_of)

    def join(self, member: Member, room_id: str) -> Room:
        """Add `member` to `room_id` (creating it), tell it and the others."""
        room = self.rooms.get(room_id)
        if room is None:
            room = Room(room_id, self.clock.seconds() + self.config.room_expiry)
            self.rooms[room_id] = room
            self._log.debug("room {room} created", room=room_hash(room_id))
        room.members[member.connection_id] = member
        self._room_of[member] = room
        self.stats.connectionsTotal += 1
        count = len(room.members)
        self._log.info(
            "{connection_id} joined room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room_id), count=count,
        )
        peers = [other for other in room.members if other != member.connection_id]
        member.deliver(self.prepare(messages.connected(member.connection_id, room_id, count,
                                                       peers)))
        self._fan_out(room, messages.user_joined(member.connection_id, count), member)
        return room

    def leave(self, member: Member, close_code: int | None = None) -> None:
        """Remove `member` wherever it is; a second call for the same member does nothing.

        `close_code` is how its connection closed (1006 when it simply dropped).
        """
        room = self._room_of.pop(member, None)
        if room is None:
            return
        self.closes[close_code or 1006] += 1
        del room.members[member.connection_id]
        self.stats.disconnectionsTotal += 1
        count = len(room.members)
        self._log.info(
            "{connection_id} left room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room.room_id), count=count,
        )
        if count:
            self._fan_out(room, messages.user_left(member.connection_id, count), None)
        elif self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]
        if not self._room_of:
            emptied, self._emptied = self._emptied, []
            for waiting in emptied:
                waiting.callback(None)

    def room_of(self, member: Member) -> Room | None:
        return self._room_of.get(member)

    def room_size(self, room_id: str) -> int:
        room = self.rooms.get(room_id)
        return len(room.members) if room is not None else 0

    def cluster_status(self) -> dict[str, Any] | None:
        """What /health and /stats add in cluster mode (iw_relay.cluster); None here."""
        return None

    # -- relaying --------------------------------------------------------------------

    def broadcast(self, sender: Member, payload: bytes) -> None:
        """Relay an accepted, stamped message to the other members of `sender`'s room."""
        room = self._room_of.get(sender)
        if room is None:
            return
        self.stats.messagesRelayed += 1
        started = perf_counter()
        self._fan_out(room, payload, sender)
        self.relay_seconds.observe(perf_counter() - started)

    def unicast(self, sender: Member, target: str, payload: bytes) -> bool:
        """Relay an accepted, stamped message to the one member `target` of `sender`'s
        room; False (nothing sent, nothing counted) when there is no such other member."""
        room = self._room_of.get(sender)
        if room is None:
            return True  # left meanwhile: dropped silently, as broadcast() does
        member = room.members.get(target)
        if member is None or member is sender:
            return False
        self.stats.messagesRelayed += 1
        started = perf_counter()
        self._deliver_one(member, self.prepare(payload))
        self.relay_seconds.observe(perf_counter() - started)
        return True

    def _deliver_one(self, member: Member, frame: Any) -> None:
        try:
            member.deliver(frame)
        except Exception:
            self._log.failure("delivery to {connection_id} failed",
                              connection_id=member.connection_id)
            self._close_quietly(member, messages.CLOSE_INTERNAL_ERROR,
                                messages.INTERNAL_ERROR_REASON)

    def _fan_out(self, room: Room, payload: bytes, exclude: Member | None) -> None:
        if len(room.members) < 2 and exclude is not None:
            return
        frame = self.prepare(payload)
        for member in list(room.members.values()):
            if member is not exclude:
                # _deliver_one inlined: this loop runs once per delivery.
                try:
                    member.deliver(frame)
                except Exception:
                    self._log.failure("delivery to {connection_id} failed",
                                      connection_id=member.connection_id)
                    self._close_quietly(member, messages.CLOSE_INTERNAL_ERROR,
                                        messages.INTERNAL_ERROR_REASON)

    def _say_goodbye(self, member: Member, notice: Any, code: int, reason: str) -> None:
        """Deliver `notice` and close; a member that fails here harms no other member."""
        with self._log.failuresHandled("closing {connection_id} failed",
                                       connection_id=member.connection_id):
            member.deliver(notice)
            member.close(code, reason)

    def _close_quietly(self, member: Member, code: int, reason: str) -> None:
        with self._log.failuresHandled("closing {connection_id} failed",
                                       connection_id=member.connection_id):
            member.close(code, reason)

    def count_rate_limited(self) -> None:
        self.stats.rateLimitsHit += 1

    def count_slow_consumer(self) -> None:
        self.stats.slowConsumersDropped += 1

    def count_refused(self, reason: str) -> None:
        """A handshake refused before joining (limits, origin); `reason` is a short key."""
        self.stats.connectionsRefused += 1
        self.refusals[reason] += 1

    # -- expiry ----------------------------------------------------------------------

    def sweep_expired(self) -> None:
        """Expire every room past its deadline; one bad room never stops the sweep."""
        now = self.clock.seconds()
        for room in [r for r in self.rooms.values() if r.expires_at <= now]:
            with self._log.failuresHandled("expiring room {room} failed",
                                           room=room_hash(room.room_id)):
                self.expire(room)

    def expire(self, room: Room) -> None:
        """Tell every member, close them with 1000; the room id is free at once."""
        if self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]
        self._log.info("room {room} expired with {count} members",
                       room=room_hash(room.room_id), count=len(room.members))
        text = messages.expiry_text(self.config.room_expiry)
        notice = self.prepare(messages.room_expired(text))
        for member in list(room.members.values()):
            self._say_goodbye(member, notice, messages.CLOSE_NORMAL, text)

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        self._sweeper.start(self.config.cleanup_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.shut_down()

    def shut_down(self) -> Deferred[None]:
        """Say goodbye to every member; fires when they are all gone or time is up.

        Members get `server-shutdown` at once (and `stopping` makes /health answer 503
        and new handshakes be refused); those still here after --drain-timeout are closed
        with 1001; the Deferred fires when the last has gone, or --shutdown-timeout later.
        Calling it again returns the same Deferred.
        """
        if self._shut_down is None:
            self.stopping = True
            if self._sweeper.running:
                self._sweeper.stop()
            self._shut_down = Deferred.fromCoroutine(self._say_goodbye_to_everyone())
        return self._shut_down

    async def _say_goodbye_to_everyone(self) -> None:
        members = list(self._room_of)
        if not members:
            return
        self._log.info("shutting down: {count} connections", count=len(members))
        notice = self.prepare(messages.server_shutdown())
        for member in members:
            with self._log.failuresHandled("notifying {connection_id} failed",
                                           connection_id=member.connection_id):
                member.deliver(notice)
        if self.config.drain_timeout > 0:
            await self._wait_until_empty(self.config.drain_timeout, "drain")
        for member in list(self._room_of):
            self._close_quietly(member, messages.CLOSE_GOING_AWAY, messages.SHUTDOWN_REASON)
        if self._room_of:
            await self._wait_until_empty(self.config.shutdown_timeout, "shutdown")

    def _wait_until_empty(self, timeout: float, wait: str) -> Deferred[None]:
        emptied: Deferred[None] = Deferred()
        self._emptied.append(emptied)
        timer = self.clock.callLater(timeout, self._give_up_waiting, emptied, wait)
        emptied.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return emptied

    def _give_up_waiting(self, emptied: Deferred[None], wait: str) -> None:
        # After the drain, staying is allowed; after the shutdown timeout, it is not.
        log = self._log.info if wait == "drain" else self._log.warn
        log("{count} connections still open after the {wait} timeout",
            count=self.connection_count, wait=wait)
        if emptied in self._emptied:
            self._emptied.remove(emptied)
        emptied.callback(None)

