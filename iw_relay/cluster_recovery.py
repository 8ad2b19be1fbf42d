"""Connection recovery in a cluster (``--recovery-window`` with ``--redis``): history and
sessions live in the store, so a member resumes on any node, even when its node died.

The registry hands this object what differs from one node (`recovery.Recovery`):

- **Order.** A relayed message is not delivered here at once: the backplane sequences it
  (one script per room per reactor turn stamps each message with the room's next seq,
  keeps it and publishes it to every node holding members of the room, this one
  included), and each node delivers its members' frames from its inbox
  (`RoomRegistry.remote_sequenced`). Redis runs scripts one at a time and publishes in
  that order to each subscriber, so every member of a room, on any node, sees the room's
  messages in one order: seq order.
- **Joins.** A committed fresh join opens the member's session in the store and learns
  the room's epoch and last seq before ``connected``; frames heard meanwhile are kept,
  and those stamped after that seq follow ``connected``.
- **Resumes.** The token's HMAC key is shared through the store (made once, ``SET NX``).
  A resume claims the session atomically (of two resumes with one token exactly one
  wins; the claim moves the member to this node and tells the other nodes), then reads
  what it missed; live frames heard meanwhile follow, those already replayed skipped.
- **Grace.** A member that dropped is away on every node (its node keeps it in the
  store's member list); when its window passes, its node asks the store whether a resume
  claimed it meanwhile, and says ``user-left`` only if not. A dead node's members become
  away on every node that knew them, with the same check after the window.

Nothing here logs a token, a room id or a frame.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from iw_relay.backplane.shared import Claimed, HistoryLimits, Replay, SharedBackplane
from iw_relay.config import RelayConfig
from iw_relay.recovery import (
    Recovery,
    RecoveryFailure,
    ResumeTokens,
    keeps_grace,
    parse_since,
)

if TYPE_CHECKING:
    from iw_relay.registry import Member, Room, RoomRegistry

#: What a member waiting for the store keeps: (seq, sender, target or "", frame).
Heard = tuple[int, str, str, bytes]
#: Messages kept from a resuming member until its resume is settled.
HELD_MESSAGES = 1000


def owed(connection_id: str, sender: str, target: str) -> bool:
    """Whether a stamped frame is meant for `connection_id`."""
    return sender != connection_id and target in ("", connection_id)


class ClusterRecovery:
    """The registry's connection recovery when its backplane is shared."""

    _log = Logger()

    def __init__(self, registry: RoomRegistry, backplane: SharedBackplane,
                 recovery: Recovery, config: RelayConfig) -> None:
        self.registry = registry
        self.backplane = backplane
        self.recovery = recovery  # its counters; tokens come from the cluster's key
        self.clock = registry.clock
        self.window = config.recovery_window
        self.token_lifetime = config.room_expiry + config.recovery_window
        self.limits = HistoryLimits(
            max(1, int(config.recovery_window * 1000)), config.recovery_max_messages,
            config.recovery_max_bytes, int(self.token_lifetime * 1000))
        backplane.history = self.limits
        self._tokens: ResumeTokens | None = None
        #: Members waiting for the store (a fresh join's head, a resume's claim):
        #: room key -> member -> frames heard meanwhile.
        self._waiting: dict[str, dict[Member, list[Heard]]] = {}
        #: What resuming members sent before their resume was settled.
        self._held: dict[Member, list[tuple[str | None, bytes]]] = {}
        #: Grace timers of away members: (room key, connection id) ->.
        self._timers: dict[tuple[str, str], IDelayedCall] = {}
        recovery.away_count = lambda: len(self._timers)

    @property
    def usable(self) -> bool:
        return self.backplane.state == "connected"

    @property
    def node(self) -> str:
        return self.backplane.node_id

    def stop(self) -> None:
        """The node stops: its away members' fate is for the other nodes to settle (they
        find this node gone and give its members their own window)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    async def _token_issuer(self) -> ResumeTokens:
        if self._tokens is None:
            key = await self.backplane.store.resume_key(secrets.token_bytes(32))
            self._tokens = ResumeTokens(key)
        return self._tokens

    def _token(self, tokens: ResumeTokens, room_id: str, connection_id: str,
               generation: int) -> str:
        return tokens.issue(room_id, connection_id, generation,
                            self.clock.seconds() + self.token_lifetime)

    # -- relaying ----------------------------------------------------------------------

    def sequence(self, room: Room, sender: str, target: str | None, payload: bytes) -> None:
        self.backplane.sequence(room.key, sender, target, payload)

    def heard(self, key: str, seq: int, sender: str, target: str, frame: bytes) -> None:
        """A stamped frame reached this node: kept for the members waiting for the store."""
        waiting = self._waiting.get(key)
        if waiting:
            for frames in waiting.values():
                frames.append((seq, sender, target, frame))

    def _wait(self, key: str, member: Member) -> list[Heard]:
        heard: list[Heard] = []
        self._waiting.setdefault(key, {})[member] = heard
        return heard

    def _stop_waiting(self, key: str, member: Member) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.pop(member, None)
            if not waiting:
                del self._waiting[key]

    def _deliver_heard(self, member: Member, heard: list[Heard], after: int) -> None:
        cid = member.connection_id
        for seq, sender, target, frame in heard:
            if seq > after and owed(cid, sender, target):
                self.registry._deliver_one(member, self.registry.prepare(frame))

    # -- fresh joins -------------------------------------------------------------------

    def open(self, member: Member, room: Room) -> None:
        """A committed join: ``connected`` once the store has the member's session."""
        if not self.usable:
            self.registry._welcome(member, room)
            return
        Deferred.fromCoroutine(self._open(member, room, self._wait(room.key, member)))

    async def _open(self, member: Member, room: Room, heard: list[Heard]) -> None:
        cid = member.connection_id
        fields: dict[str, object] | None = None
        after = 0
        try:
            tokens = await self._token_issuer()
            epoch, after = await self.backplane.store.open_session(self.node, room.key, cid,
                                                                   self.limits)
            fields = {"epoch": epoch, "seq": after,
                      "resumeToken": self._token(tokens, room.room_id, cid, 0),
                      "recovered": False}
        except Exception as problem:  # the store went away: a join without recovery
            self._log.info("opening a session failed ({problem}): joining without "
                           "recovery", problem=type(problem).__name__)
        finally:
            self._stop_waiting(room.key, member)
        if member not in room.pending or self.registry._room_of.get(member) is not room:
            return  # left meanwhile
        self.registry._welcome(member, room, fields)
        self._deliver_heard(member, heard, after)

    # -- resumes -----------------------------------------------------------------------

    def resume(self, member: Member, room_id: str, token: str, since: str | None,
               epoch: str | None) -> None:
        """Settle a resume in the background: the member comes back as itself, or joins
        afresh with ``recovered: false``. What it sends meanwhile is held."""
        from iw_relay.registry import room_key

        key = room_key(room_id)
        self._held[member] = []
        heard = self._wait(key, member)
        Deferred.fromCoroutine(self._resume(member, room_id, key, token, since, epoch, heard))

    def hold(self, member: Member, target: str | None, payload: bytes) -> bool:
        """Keep what a resuming member sends; False when it is not resuming."""
        held = self._held.get(member)
        if held is None:
            return False
        if len(held) < HELD_MESSAGES:
            held.append((target, payload))
        return True

    def abandon(self, member: Member) -> None:
        """A resuming member's connection closed before its resume was settled."""
        self._held.pop(member, None)

    async def _resume(self, member: Member, room_id: str, key: str, token: str,
                      since: str | None, epoch: str | None, heard: list[Heard]) -> None:
        registry = self.registry
        try:
            outcome = await self._claim(room_id, key, token, since, epoch)
        except Exception as problem:
            self._log.info("a resume could not reach the store ({problem})",
                           problem=type(problem).__name__)
            outcome = RecoveryFailure.SESSION_ENDED
        finally:
            self._stop_waiting(key, member)
        abandoned = member not in self._held
        held = self._held.pop(member, [])
        stats = self.recovery.stats
        if isinstance(outcome, RecoveryFailure):
            stats.failed[outcome.value] += 1
            self._log.info("a resume failed ({reason}): joining afresh", reason=outcome.value)
            if not abandoned:
                member.connection_id = secrets.token_hex(8)
                room = registry.join(member, room_id)
                if member in room.pending:
                    room.pending[member].extend(held)
            return
        cid, claimed, replay, fields = outcome
        stats.succeeded += 1
        stats.replayed += len(replay.frames)
        room = registry.resumed_room(room_id, claimed.deadline, claimed.members)
        registry._attach(member, room, cid, fields, replay.frames)
        self._disarm(key, member.connection_id)
        self._deliver_heard(member, heard, replay.last_seq)
        for target, payload in held:
            if target is None:
                registry.broadcast(member, payload)
            else:
                registry.unicast(member, target, payload)
        if abandoned:
            registry.leave(member, 1006)

    async def _claim(self, room_id: str, key: str, token: str, since: str | None,
                     epoch: str | None
                     ) -> tuple[str, Claimed, Replay, dict[str, object]] | RecoveryFailure:
        tokens = await self._token_issuer()
        claims = tokens.verify(token, room_id, self.clock.seconds())
        if isinstance(claims, RecoveryFailure):
            return claims
        seq = parse_since(since)
        if seq is None or epoch is None:
            return RecoveryFailure.BAD_SINCE if seq is None else RecoveryFailure.EPOCH_CHANGED
        store, cid = self.backplane.store, claims.connection_id
        claimed = await store.claim_session(self.node, key, cid, claims.generation,
                                            self.limits)
        if isinstance(claimed, str):
            return RecoveryFailure(claimed)
        replay = await store.history_since(key, max(seq, claimed.joined_seq), epoch, cid,
                                           self.limits)
        if isinstance(replay, str):
            # Claimed, but it cannot have what it missed: the member is gone everywhere.
            await store.close_session(self.node, key, cid)
            if room_id in self.registry.rooms:
                self.registry._gone(room_id, cid)
            else:
                self.backplane.leave(key, cid)
            return RecoveryFailure(replay)
        fields: dict[str, object] = {"epoch": epoch, "seq": replay.last_seq,
                  "resumeToken": self._token(tokens, room_id, cid, claimed.generation),
                  "recovered": True}
        return cid, claimed, replay, fields

    # -- away members ------------------------------------------------------------------

    def dropped(self, room: Room, connection_id: str, close_code: int,
                closed_by_server: bool, final: bool = False) -> bool:
        """True: the member is away (say nothing now); False: it is gone (and its
        session ends: `final` when its room expired)."""
        grace = not final and keeps_grace(close_code, closed_by_server)
        if self.usable:
            try:
                self.backplane.store.drop_session(self.node, room.key, connection_id, grace,
                                                  self.limits).addErrback(lambda _: None)
            except ConnectionError:
                pass
        if grace:
            self._arm(room, connection_id, self.node)
        return grace

    def node_died(self, node: str) -> None:
        """A dead node's members are away for the window, not gone."""
        for room in list(self.registry._by_key.values()):
            for connection_id in [c for c, n in room.remote.items() if n == node]:
                room.drop_remote(connection_id)
                if not room.expired:
                    room.away.add(connection_id)
                    self._arm(room, connection_id, node)

    def moved(self, room: Room, connection_id: str, node: str) -> bool:
        """A join entry for a member this node knows: a resume moved it to `node`. It
        moves there silently (a connection still attached here is closed quietly)."""
        member = room.members.get(connection_id)
        if member is not None and member not in room.pending:
            self.registry._detach_quietly(room, member)
        elif connection_id in room.away:
            room.away.discard(connection_id)
            self._disarm(room.key, connection_id)
        elif not room.drop_remote(connection_id):
            return False
        room.add_remote(connection_id, node)
        self.registry._delete_if_empty(room)
        return True

    def _arm(self, room: Room, connection_id: str, node: str) -> None:
        """`node`: the node it dropped from (this one, or a dead one)."""
        self._disarm(room.key, connection_id)
        self._timers[(room.key, connection_id)] = self.clock.callLater(
            self.window, self._window_passed, room, connection_id, node)

    def _disarm(self, key: str, connection_id: str) -> None:
        timer = self._timers.pop((key, connection_id), None)
        if timer is not None and timer.active():
            timer.cancel()

    def _window_passed(self, room: Room, connection_id: str, node: str) -> None:
        self._timers.pop((room.key, connection_id), None)
        Deferred.fromCoroutine(self._settle(room, connection_id, node))

    async def _settle(self, room: Room, connection_id: str, node: str) -> None:
        """Unless a resume claimed it meanwhile, the member is gone: ``user-left``."""
        gone = True
        if self.usable:
            try:
                gone = await self.backplane.store.close_session(node, room.key,
                                                                connection_id)
            except Exception:
                gone = True  # the store is unreachable: as on one node
        registry = self.registry
        if not gone or connection_id not in room.away or registry.rooms.get(
                room.room_id) is not room:
            return  # resumed (its join entry moves it), or the room is gone
        # A dead node's member: every node that knew it finds its end on its own.
        registry._gone(room.room_id, connection_id, tell_others=node == self.node)

