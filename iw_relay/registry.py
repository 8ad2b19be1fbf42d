"""RoomRegistry: rooms, members, fan-out, counters and the expiry sweep.

It knows nothing of WebSockets: a member is anything with a `connection_id`, a
`deliver(frame)` and a `close(code, reason)` (see `Member`). Frames handed to members
come from `prepare(payload)`, called once per broadcast, so the WebSocket layer can
frame a message once for all of its recipients.

It knows nothing of Redis either: other nodes are behind `backplane` (iw_relay.backplane;
one node by default), which it tells of joins, leaves, expiry and the messages for
members elsewhere, and which tells it, through the `BackplaneEvents` methods, what the
other nodes did. A room costs the backplane nothing per message while all its members
are here (`Room.nodes` is empty).

Ordering when a member joins a room that has members on other nodes: it is held
"pending" (it receives nothing, what it sends is kept) until the backplane commits the
join, then gets `connected` and, from then on, every message relayed to its node. The
Redis backplane commits a join by a marker in the node's own inbox, written by the same
script that adds the member and tells the other nodes: so every message Redis passes
to this node after the join reaches the member, none from before, and each other node
starts sending to this node from the moment it hears of the join (when it also tells
its members `user-joined`).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from iw_relay import messages
from iw_relay.admission import ConnectionCounter
from iw_relay.backplane.base import Backplane
from iw_relay.backplane.local import LocalBackplane
from iw_relay.config import RelayConfig
from iw_relay.logs import RefusalLog
from iw_relay.metrics import DurationHistogram
from iw_relay.recovery import Recovery, RecoveryFailure

if TYPE_CHECKING:
    from iw_relay.cluster_recovery import ClusterRecovery

#: Messages kept from a member whose join is not committed yet (relayed once it is).
PENDING_MESSAGES = 1000
#: How a join refused for a full room is logged (RefusalLog: no room, bounded reasons).
ROOM_FULL_REASON = "room is full"
#: Another node's "expired" is followed if our deadline is this close (clock skew).
EXPIRY_SKEW = 5.0


class Member(Protocol):
    connection_id: str

    def deliver(self, frame: Any) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


def room_hash(room_id: str) -> str:
    """What logs show instead of a room id: room ids are secrets."""
    return hashlib.sha256(room_id.encode()).hexdigest()[:12]


def room_key(room_id: str) -> str:
    """What the other nodes (and Redis) know a room by: a hash, never the id."""
    return hashlib.sha256(b"iwrelay-room:" + room_id.encode()).hexdigest()[:32]


@dataclass(eq=False)
class Room:
    room_id: str
    expires_at: float
    key: str = ""
    #: This node's members, in the order they joined (pending ones included).
    members: dict[str, Member] = field(default_factory=dict)
    #: Members on other nodes: connection id -> node.
    remote: dict[str, str] = field(default_factory=dict)
    #: How many of `remote` each other node has: where relayed messages must go.
    nodes: Counter[str] = field(default_factory=Counter)
    #: Members whose join the backplane has not committed yet, with what they sent
    #: meanwhile (target or None, payload), relayed once they are in.
    pending: dict[Member, list[tuple[str | None, bytes]]] = field(default_factory=dict)
    #: False while this node has no snapshot of the remote members (presence events
    #: are then held back in `early`, and applied after the snapshot).
    synced: bool = False
    early: list[tuple[bool, str, str]] = field(default_factory=list)
    expired: bool = False
    #: Members whose connection dropped and who may still resume (--recovery-window):
    #: their peers have not been told, so they still count and are still peers.
    away: set[str] = field(default_factory=set)

    def count(self) -> int:
        return len(self.members) - len(self.pending) + len(self.remote) + len(self.away)

    def add_remote(self, connection_id: str, node: str) -> bool:
        if connection_id in self.remote or connection_id in self.members:
            return False
        self.remote[connection_id] = node
        self.nodes[node] += 1
        return True

    def drop_remote(self, connection_id: str) -> bool:
        node = self.remote.pop(connection_id, None)
        if node is None:
            return False
        self.nodes[node] -= 1
        if not self.nodes[node]:
            del self.nodes[node]
        return True


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
    """Every room of this node, and through `backplane` their members on other nodes.

    One join path, one leave path, one delivery policy: a member whose delivery fails
    (a message or presence) is closed with 1011 and harms no other member. The backplane
    answers through the `BackplaneEvents` methods below (`join_committed`...).
    """

    _log = Logger()

    def __init__(
        self,
        config: RelayConfig,
        clock: IReactorTime,
        prepare: Callable[[bytes], Any] = lambda payload: payload,
        wall_clock: Callable[[], float] = time.time,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.prepare = prepare
        #: Set by the service (RelayServerFactory.write_through): writes a fan-out's frame
        #: at once to the members it can (those it fails go to the third argument),
        #: returns those left for Member.deliver (None: deliver to each).
        self.write_through: Callable[[list[Any], Any, Callable[[Any], None]],
                                     list[Any]] | None = None
        self.wall_clock = wall_clock
        self.stats = RelayStats()
        self.refusals: Counter[str] = Counter()
        #: Every "refused N connection(s)" line (front door limits, joins refused).
        self.refusal_log = RefusalLog(clock)
        #: Open WebSockets (joined or not), in all and per client address.
        self.connections = ConnectionCounter()
        self.closes: Counter[int] = Counter()
        self.relay_seconds = DurationHistogram()
        self.started_at = clock.seconds()
        self.start_time_ms = int(wall_clock() * 1000)
        self.rooms: dict[str, Room] = {}
        self._by_key: dict[str, Room] = {}
        self._room_of: dict[Member, Room] = {}
        self._sweeper = LoopingCall(self.sweep_expired)
        self._sweeper.clock = clock
        self._emptied: list[Deferred[None]] = []
        self._shut_down: Deferred[None] | None = None
        self.stopping = False
        self.backplane: Backplane = backplane if backplane is not None else LocalBackplane()
        self.backplane.attach(self)
        #: Connection-state recovery; with --recovery-window 0 (the default) it is off and
        #: nothing below calls it on the hot path (`_recording`).
        self.recovery = Recovery(
            clock, config.recovery_window, config.recovery_max_messages,
            config.recovery_max_bytes, token_lifetime=config.room_expiry + config.recovery_window,
            gone=self._gone)
        self._recording = self.recovery.enabled and not self.backplane.shared
        #: Recovery in a cluster (iw_relay.cluster_recovery): history and sessions in the
        #: store, every relayed message sequenced there.
        self._cluster: ClusterRecovery | None = None
        if self.recovery.enabled and self.backplane.shared:
            from iw_relay.backplane.shared import SharedBackplane
            from iw_relay.cluster_recovery import ClusterRecovery

            assert isinstance(self.backplane, SharedBackplane)
            self._cluster = ClusterRecovery(self, self.backplane, self.recovery, config)

    # -- membership ------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._room_of)

    def join(self, member: Member, room_id: str) -> Room:
        """Add `member` to `room_id` (creating it); once the backplane commits the join
        (at once on one node), the member gets `connected` and the others `user-joined`."""
        room = self.rooms.get(room_id)
        if room is None:
            room = Room(room_id, self.clock.seconds() + self.config.room_expiry,
                        key=room_key(room_id))
            self.rooms[room_id] = room
            self._by_key[room.key] = room
            self._log.debug("room {room} created", room=room_hash(room_id))
        room.members[member.connection_id] = member
        room.pending[member] = []
        self._room_of[member] = room
        self.stats.connectionsTotal += 1
        self.backplane.join(room.key, member.connection_id, room.expires_at,
                            self.config.max_room_size)
        return room

    def join_committed(self, key: str, connection_id: str, deadline: float | None,
                       members: dict[str, str] | None) -> None:
        room = self._by_key.get(key)
        member = room.members.get(connection_id) if room is not None else None
        if room is None or member is None or member not in room.pending:
            return  # left meanwhile
        if deadline is not None:
            room.expires_at = deadline
        if members is not None and not room.synced:
            # Members already here are told of remote members they did not know of.
            self._apply_snapshot(room, members,
                                 announce=len(room.members) > len(room.pending))
        if self._cluster is not None:
            self._cluster.open(member, room)  # `connected` once its session is open
            return
        self._welcome(member, room)

    def join_refused(self, key: str, connection_id: str) -> None:
        """The room is full on the other nodes: ROOM_FULL, close 1008, as on one node."""
        room = self._by_key.get(key)
        member = room.members.get(connection_id) if room is not None else None
        if room is None or member is None or member not in room.pending:
            return
        self.refusal_log(ROOM_FULL_REASON)
        self._forget(member, room, messages.CLOSE_POLICY_VIOLATION)
        self._say_goodbye(member, self.prepare(messages.error(messages.ROOM_FULL,
                                                              messages.ROOM_FULL_MESSAGE)),
                          messages.CLOSE_POLICY_VIOLATION, messages.ROOM_FULL_MESSAGE)

    def _welcome(self, member: Member, room: Room,
                 fields: dict[str, object] | None = None) -> None:
        """`connected` for the joiner (with `fields`: recovery's, in a cluster),
        `user-joined` for the others here, then what it sent while it was joining."""
        sent = room.pending.pop(member)
        count = room.count()
        self._log.info(
            "{connection_id} joined room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room.room_id), count=count,
        )
        peers = self._peers(room, member)
        if self._recording:
            fields = self.recovery.joined(room.room_id, member.connection_id)
        self._deliver_one(member, self.prepare(messages.connected(
            member.connection_id, room.room_id, count, peers, fields)))
        self._fan_out(room, self._record(room, messages.user_joined(member.connection_id, count),
                                         member.connection_id), member)
        for target, payload in sent:
            if self._room_of.get(member) is not room:
                break
            if target is None:
                self.broadcast(member, payload)
            else:
                self.unicast(member, target, payload)

    def leave(self, member: Member, close_code: int | None = None,
              closed_by_server: bool = False) -> None:
        """Remove `member` wherever it is; a second call for the same member does nothing.

        `close_code` is how its connection closed (1006 when it simply dropped). With
        recovery on, a member that may resume is only *away*: its peers hear nothing now,
        and its ``user-left`` goes out when its window passes (`_gone`).
        """
        room = self._room_of.get(member)
        if room is None:
            if self._cluster is not None:
                self._cluster.abandon(member)  # it may be resuming
            return
        was_pending = member in room.pending
        code = close_code or 1006
        away = (self._recording and not was_pending and not room.expired
                and self.recovery.dropped(room.room_id, member.connection_id, code,
                                          closed_by_server))
        if self._cluster is not None and not was_pending:
            away = self._cluster.dropped(room, member.connection_id, code, closed_by_server,
                                         final=room.expired)
        if away:
            room.away.add(member.connection_id)
        self._forget(member, room, code)
        count = room.count()
        if away:
            self._log.info("{connection_id} dropped from room {room}: away until it "
                           "resumes or its window passes",
                           connection_id=member.connection_id, room=room_hash(room.room_id))
            return
        self._log.info(
            "{connection_id} left room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room.room_id), count=count,
        )
        if not was_pending and not room.expired:
            self._fan_out(room, self._record(room, messages.user_left(member.connection_id,
                                                                      count),
                                             member.connection_id), None)
        if not room.expired:
            self.backplane.leave(room.key, member.connection_id)

    def _forget(self, member: Member, room: Room, close_code: int) -> None:
        """The one place a member stops being one: counted, its room deleted if empty."""
        del self._room_of[member]
        del room.members[member.connection_id]
        room.pending.pop(member, None)
        self.closes[close_code] += 1
        self.stats.disconnectionsTotal += 1
        self._delete_if_empty(room)
        if not self._room_of:
            emptied, self._emptied = self._emptied, []
            for waiting in emptied:
                waiting.callback(None)

    def _delete_if_empty(self, room: Room) -> None:
        """A room with no member here and none away is deleted (with its history: a
        later join starts a new stream, with a new epoch)."""
        if room.members or room.away:
            return
        if self._by_key.get(room.key) is room:
            del self._by_key[room.key]
        if self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]
            if self._recording:
                self.recovery.room_gone(room.room_id)

    @staticmethod
    def _peers(room: Room, member: Member) -> list[str]:
        """The others' connection ids, as `connected` lists them: members here that
        have joined, members away, members on other nodes."""
        peers = [connection_id for connection_id, other in room.members.items()
                 if other is not member and other not in room.pending]
        peers.extend(room.away)
        peers.extend(room.remote)
        return peers

    # -- recovery ----------------------------------------------------------------------

    def _record(self, room: Room, payload: bytes, sender: str | None,
                target: str | None = None) -> bytes:
        """The frame to send for `payload`: with recovery on, with its ``seq`` and kept
        in the room's history; else `payload` itself."""
        if self._recording:
            return self.recovery.record(room.room_id, payload, sender, target)
        return payload

    def resume(self, member: Member, room_id: str, token: str | None, since: str | None,
               epoch: str | None) -> bool:
        """Rejoin `member` as the away (or not yet seen to drop) member its resume token
        names: `connected` with ``recovered: true``, then what it missed, in order; its
        peers hear nothing. False when that is impossible (counted by reason; a genuine
        token's member is ended first): the caller makes it a fresh join."""
        if self._cluster is not None and token:
            self._cluster.resume(member, room_id, token, since, epoch)  # settled later
            return True
        if not self._recording or not token:
            return False
        outcome = self.recovery.resume(room_id, token, since, epoch)
        room = self.rooms.get(room_id)
        if isinstance(outcome, RecoveryFailure) or room is None:
            reason = outcome.value if isinstance(outcome, RecoveryFailure) else "no room"
            self._log.info("a resume in room {room} failed ({reason}): joining afresh",
                           room=room_hash(room_id), reason=reason)
            return False
        self._attach(member, room, outcome.connection_id, outcome.fields, outcome.frames)
        return True

    def _attach(self, member: Member, room: Room, connection_id: str,
                fields: dict[str, object], frames: list[bytes]) -> None:
        """A won resume: `member` is `connection_id` again; `connected` with `fields`,
        then `frames` (what it missed); its peers hear nothing."""
        old = room.members.get(connection_id)
        if old is not None:
            # A takeover: the old connection has not been seen to die. It goes quietly.
            self._detach_quietly(room, old)
        room.away.discard(connection_id)
        room.drop_remote(connection_id)  # (in a cluster: it was on another node)
        member.connection_id = connection_id
        room.members[connection_id] = member
        self._room_of[member] = room
        self.stats.connectionsTotal += 1
        self._log.info("{connection_id} resumed in room {room} ({count} missed messages)",
                       connection_id=connection_id, room=room_hash(room.room_id),
                       count=len(frames))
        self._deliver_one(member, self.prepare(messages.connected(
            connection_id, room.room_id, room.count(), self._peers(room, member), fields)))
        for frame in frames:
            self._deliver_one(member, self.prepare(frame))

    def _detach_quietly(self, room: Room, member: Member) -> None:
        """A connection replaced by its member's resume: closed, its peers told nothing."""
        del self._room_of[member]
        del room.members[member.connection_id]
        room.pending.pop(member, None)
        self.stats.disconnectionsTotal += 1
        self._close_quietly(member, messages.CLOSE_NORMAL, messages.RESUMED_REASON)

    def resumed_room(self, room_id: str, deadline: float | None,
                     members: dict[str, str]) -> Room:
        """The room a member resumes into here, in a cluster: made from the store's view
        when this node has no member there."""
        room = self.rooms.get(room_id)
        if room is None:
            room = Room(room_id, deadline or self.clock.seconds() + self.config.room_expiry,
                        key=room_key(room_id))
            self.rooms[room_id] = room
            self._by_key[room.key] = room
        if not room.synced:
            self._apply_snapshot(room, members, announce=False)
        return room

    def _gone(self, room_id: str, connection_id: str, tell_others: bool = True) -> None:
        """An away member's window passed (or a resume with its token failed): its peers
        get its ``user-left`` now. A connection still attached to it (one the relay has
        not yet seen die, replaced by a failed resume) is closed quietly. `tell_others`
        False: a dead node's member, whose end every node finds on its own."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        with self._log.failuresHandled("ending {connection_id} failed",
                                       connection_id=connection_id):
            room.away.discard(connection_id)
            room.drop_remote(connection_id)
            attached = room.members.get(connection_id)
            if attached is not None:
                self._forget(attached, room, messages.CLOSE_NORMAL)
                self._close_quietly(attached, messages.CLOSE_NORMAL,
                                    messages.RESUMED_REASON)
            count = room.count()
            self._log.info("{connection_id} left room {room} ({count} members)",
                           connection_id=connection_id, room=room_hash(room_id), count=count)
            if not room.expired:
                self._fan_out(room, self._record(room, messages.user_left(connection_id, count),
                                                 connection_id), None)
                if tell_others:
                    self.backplane.leave(room.key, connection_id)
            self._delete_if_empty(room)

    def room_size(self, room_id: str) -> int:
        """Members on every node, those still joining included."""
        room = self.rooms.get(room_id)
        if room is None:
            return 0
        return len(room.members) + len(room.remote) + len(room.away)

    # -- relaying --------------------------------------------------------------------

    def broadcast(self, sender: Member, payload: bytes) -> None:
        """Relay an accepted, stamped message to the other members of `sender`'s room,
        here and, only while it has some there, on the other nodes."""
        room = self._room_of.get(sender)
        if room is None:
            if self._cluster is not None:
                self._cluster.hold(sender, None, payload)  # it may be resuming
            return
        if room.pending and sender in room.pending:
            self._hold(room, sender, None, payload)
            return
        self.stats.messagesRelayed += 1
        if self._cluster is not None:  # every member, here too, gets it from the store
            self._cluster.sequence(room, sender.connection_id, None, payload)
            return
        started = perf_counter()
        if self._recording:
            payload = self.recovery.record(room.room_id, payload, sender.connection_id)
        self._fan_out(room, payload, sender)
        if room.nodes:
            self.backplane.publish(room.key, room.nodes, payload)
        self.relay_seconds.observe(perf_counter() - started)

    def unicast(self, sender: Member, target: str, payload: bytes) -> bool:
        """Relay an accepted, stamped message to the one member `target` of `sender`'s
        room (on any node); False (nothing sent, nothing counted) when there is no such
        other member."""
        room = self._room_of.get(sender)
        if room is None:
            if self._cluster is not None:
                self._cluster.hold(sender, target, payload)  # it may be resuming
            return True  # left meanwhile: dropped silently, as broadcast() does
        member = room.members.get(target)
        node = room.remote.get(target) if member is None else None
        away = member is None and node is None and target in room.away
        if member is sender or (member is None and node is None and not away) or (
                member is not None and member in room.pending):
            return False
        if room.pending and sender in room.pending:
            self._hold(room, sender, target, payload)
            return True
        self.stats.messagesRelayed += 1
        if self._cluster is not None:  # kept for its target only, sent to its node only
            self._cluster.sequence(room, sender.connection_id, target, payload)
            return True
        started = perf_counter()
        if self._recording:  # kept for its target only (an away one gets it on resume)
            payload = self.recovery.record(room.room_id, payload, sender.connection_id,
                                           target)
        if member is not None:
            self._deliver_one(member, self.prepare(payload))
        elif node is not None:  # (else the target is away: it gets it on resume)
            self.backplane.unicast(room.key, node, target, payload)
        self.relay_seconds.observe(perf_counter() - started)
        return True

    def _hold(self, room: Room, sender: Member, target: str | None, payload: bytes) -> None:
        held = room.pending[sender]
        if len(held) < PENDING_MESSAGES:
            held.append((target, payload))

    def _deliver_one(self, member: Member, frame: Any) -> None:
        try:
            member.deliver(frame)
        except Exception:
            self._delivery_failed(member)

    def _delivery_failed(self, member: Member) -> None:
        """The one rule for a member a frame could not be given to (called while the
        exception is handled): logged, and the member closed with 1011."""
        self._log.failure("delivery to {connection_id} failed",
                          connection_id=member.connection_id)
        self._close_quietly(member, messages.CLOSE_INTERNAL_ERROR,
                            messages.INTERNAL_ERROR_REASON)

    def _fan_out(self, room: Room, payload: bytes, exclude: Member | None) -> None:
        """A message or presence to every member here but `exclude` and those joining."""
        members = room.members
        if len(members) < 2 and exclude is not None:
            return
        frame = self.prepare(payload)
        pending = room.pending
        recipients = [member for member in members.values()
                      if member is not exclude and not (pending and member in pending)]
        if self.write_through is not None:
            recipients = self.write_through(recipients, frame, self._delivery_failed)
        for member in recipients:
            try:  # _deliver_one inlined: this loop runs once per delivery
                member.deliver(frame)
            except Exception:
                self._delivery_failed(member)

    # -- what the other nodes say (BackplaneEvents) ------------------------------------

    def remote_message(self, key: str, payload: bytes) -> None:
        room = self._by_key.get(key)
        if room is not None and not room.expired:
            self._fan_out(room, payload, None)

    def remote_sequenced(self, key: str, seq: int, sender: str, target: str,
                         frame: bytes) -> None:
        if self._cluster is not None:
            self._cluster.heard(key, seq, sender, target, frame)
        room = self._by_key.get(key)
        if room is None or room.expired:
            return
        if not target:
            self._fan_out(room, frame, room.members.get(sender))
            return
        member = room.members.get(target)
        if member is not None and member not in room.pending:
            self._deliver_one(member, self.prepare(frame))

    def remote_unicast(self, key: str, target: str, payload: bytes) -> None:
        room = self._by_key.get(key)
        if room is None:
            return
        member = room.members.get(target)
        if member is not None and member not in room.pending:
            self._deliver_one(member, self.prepare(payload))

    def remote_joined(self, key: str, connection_id: str, node: str) -> None:
        room = self._by_key.get(key)
        if room is None or room.expired:
            return
        if self._cluster is not None and self._cluster.moved(room, connection_id, node):
            return  # a resume moved a member it knows
        if not room.synced:
            room.early.append((True, connection_id, node))
        elif room.add_remote(connection_id, node):
            self._fan_out(room, messages.user_joined(connection_id, room.count()), None)

    def remote_left(self, key: str, connection_id: str) -> None:
        room = self._by_key.get(key)
        if room is None or room.expired:
            return
        if not room.synced:
            room.early.append((False, connection_id, ""))
        elif room.drop_remote(connection_id) and room.expires_at > self.clock.seconds():
            # (an expiring room's members get room-expired instead)
            self._fan_out(room, messages.user_left(connection_id, room.count()), None)

    def remote_expired(self, key: str) -> None:
        room = self._by_key.get(key)
        if room is not None and room.expires_at <= self.clock.seconds() + EXPIRY_SKEW:
            self._expire_here(room)

    def node_died(self, node: str) -> None:
        if self._cluster is not None:
            self._cluster.node_died(node)  # its members are away, not gone
            return
        for room in list(self._by_key.values()):
            for connection_id in [c for c, n in room.remote.items() if n == node]:
                room.drop_remote(connection_id)
                if not room.expired:
                    self._fan_out(room, messages.user_left(connection_id, room.count()), None)

    def begin_sync(self) -> dict[str, tuple[float, list[str]]]:
        rooms = {}
        for key, room in self._by_key.items():
            room.synced = False
            rooms[key] = (room.expires_at, [c for c, m in room.members.items()
                                            if m not in room.pending])
        return rooms

    def reconcile(self, key: str, deadline: float | None,
                  members: dict[str, str]) -> list[tuple[str, str]]:
        room = self._by_key.get(key)
        if room is None or room.expired:
            return []
        if deadline is not None:
            room.expires_at = deadline
        return self._apply_snapshot(room, members, announce=True)

    def remote_nodes(self) -> set[str]:
        return {node for room in self._by_key.values() for node in room.nodes}

    def _apply_snapshot(self, room: Room, members: dict[str, str],
                        announce: bool) -> list[tuple[str, str]]:
        """The store's view of the room, then the events held back while it was asked."""
        own = self.backplane.node_id
        stale = [(c, n) for c, n in room.remote.items() if c not in members]
        for connection_id, node in members.items():
            if node != own and room.add_remote(connection_id, node) and announce:
                self._fan_out(room, messages.user_joined(connection_id, room.count()), None)
        room.synced = True
        early, room.early = room.early, []
        for joined, connection_id, node in early:
            if joined:
                self.remote_joined(room.key, connection_id, node)
            else:
                self.remote_left(room.key, connection_id)
        return [(c, n) for c, n in stale if c in room.remote]

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
        if self._recording:
            self.recovery.history.trim_all()
        for room in [r for r in self.rooms.values() if r.expires_at <= now]:
            with self._log.failuresHandled("expiring room {room} failed",
                                           room=room_hash(room.room_id)):
                self.expire(room)

    def expire(self, room: Room) -> None:
        """Expire here and on the other nodes (their members share the deadline)."""
        if not room.expired:
            self.backplane.expire(room.key)
        self._expire_here(room)

    def _expire_here(self, room: Room) -> None:
        """Tell every member, close them with 1000; the room id is free at once."""
        if room.expired:
            return
        room.expired = True
        room.remote.clear()
        room.nodes.clear()
        for member in list(room.pending):
            self._welcome(member, room)  # so that it can be told the room expired
        if self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]
            if self._recording:
                self.recovery.room_gone(room.room_id)
        if self._by_key.get(room.key) is room:
            del self._by_key[room.key]
        room.away.clear()
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
        self.backplane.start()

    def stopService(self) -> Deferred[None]:
        """Say goodbye to every member (their leaves reach the other nodes), then leave
        the backplane."""
        super().stopService()
        stopped: Deferred[None] = Deferred()
        # No grace timer outlives the service.
        shut = self.shut_down()
        shut.addBoth(lambda _: self.recovery.sessions.stop())
        shut.addBoth(lambda _: self._cluster.stop() if self._cluster is not None else None)
        shut.addBoth(lambda _: maybeDeferred(self.backplane.stop))
        shut.addBoth(lambda _: stopped.callback(None))
        return stopped

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

