"""Connection state recovery (``--recovery-window``): what a room remembers so that a
member whose connection dropped comes back as itself and misses nothing.

No I/O and no reactor here: time comes from an injected clock (anything with
``seconds()``), so every rule is tested with ``twisted.internet.task.Clock``.

- `RoomHistory`: one room's recent frames, each with its ``seq`` (strictly increasing
  within an ``epoch``), bounded by count, bytes and age; `since` answers exactly what one
  member missed, or why that cannot be known.
- `HistoryStore` (a Protocol): what the registry needs from history; `MemoryHistory`
  implements it for one node, a Redis Streams store implements it for a cluster.
- `ResumeTokens`: HMAC-SHA256 tokens bound to a room, a connection id, a generation and
  an expiry.
- `Sessions`: presence grace. A dropped member is *away* (its peers are told nothing)
  until it resumes or the window passes.
- `Recovery`: the one object the registry and the protocol call, on one node. In a
  cluster, history and sessions live in Redis (iw_relay.cluster_recovery), and this
  object only keeps the counters.

Nothing here logs; a token, a room id or a frame must never reach a log line.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Close codes after which a member is gone at once, when its client sent them.
CLEAN_CLIENT_CLOSES = frozenset({1000, 1001})
#: Close codes the server sends that end a member for good: a policy close (bad token,
#: flood, full room) and 1000 (its room expired). Other server closes (1001 shutdown,
#: 1011, 1013 slow consumer) leave it away, so it can resume (on another node).
FINAL_SERVER_CLOSES = frozenset({1000, 1008})
#: Largest ``since`` accepted: JavaScript's largest exact integer.
MAX_SEQ = 2**53 - 1
#: Per-entry overhead counted in `HistoryUsage.memory_bytes` (the Entry, the bytes
#: object's header, the deque slot).
ENTRY_OVERHEAD = 140  # measured with tracemalloc: 140 bytes whatever the frame size


class RecoveryFailure(enum.Enum):
    """Why a resume became a fresh join; the value is the /stats and /metrics label."""

    INVALID_TOKEN = "invalid_token"  # malformed, forged, or for another room
    EXPIRED_TOKEN = "expired_token"  # past the expiry it carries
    SESSION_ENDED = "session_ended"  # the window passed, or it left cleanly
    TOKEN_REUSED = "token_reused"  # that token was already used to resume
    EPOCH_CHANGED = "epoch_changed"  # the room's history was lost since
    HISTORY_TRIMMED = "history_trimmed"  # a message after `since` is no longer kept
    BAD_SINCE = "bad_since"  # not a seq of this stream


def keeps_grace(close_code: int | None, closed_by_server: bool) -> bool:
    """Whether a member whose connection closed this way is *away* rather than gone."""
    if closed_by_server:
        return close_code not in FINAL_SERVER_CLOSES
    return close_code not in CLEAN_CLIENT_CLOSES


def with_seq(payload: bytes, seq: int) -> bytes:
    """A relayed JSON object (compact, as `messages.encode` writes it) with ``seq`` added.

    The caller removes any client-supplied ``seq`` before encoding: the relay owns it.
    """
    if payload[-1:] != b"}":
        raise ValueError("not a JSON object")
    if payload == b"{}":
        return b'{"seq":%d}' % seq
    return payload[:-1] + b',"seq":%d}' % seq


def new_epoch() -> str:
    """An unguessable stream name: a resume naming an older stream is refused."""
    return secrets.token_hex(8)


# -- history ---------------------------------------------------------------------------


class Entry:
    """One kept frame. A plain slotted class: it is made once per relayed message, and a
    frozen dataclass costs four times as much to build."""

    __slots__ = ("at", "frame", "sender", "seq", "target")

    def __init__(self, seq: int, frame: bytes, sender: str | None, target: str | None,
                 at: float) -> None:
        self.seq = seq
        self.frame = frame  # what recipients get, ``seq`` included
        self.sender = sender  # a connection id, never given its own frames back
        self.target = target  # a unicast's only recipient; None: all but the sender
        self.at = at


@dataclass(frozen=True)
class HistoryUsage:
    """What /stats and /metrics show: rooms with history, messages and bytes kept."""

    rooms: int = 0
    messages: int = 0
    bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.bytes + self.messages * ENTRY_OVERHEAD

    def __add__(self, other: HistoryUsage) -> HistoryUsage:
        return HistoryUsage(self.rooms + other.rooms, self.messages + other.messages,
                            self.bytes + other.bytes)


class RoomHistory:
    """One room's frames of the last `window` seconds, at most `max_messages` of them and
    `max_bytes` of frames; the oldest go first. ``seq`` starts at 1; ``0`` means "before
    anything"."""

    __slots__ = ("_entries", "bytes", "epoch", "last_seq", "max_bytes", "max_messages",
                 "trimmed_through", "window")

    def __init__(self, window: float, max_messages: int, max_bytes: int,
                 epoch: str | None = None) -> None:
        self.window = window
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.epoch = epoch or new_epoch()
        self.last_seq = 0
        #: The highest seq no longer kept (0: nothing was ever dropped).
        self.trimmed_through = 0
        self.bytes = 0
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, payload: bytes, sender: str | None, target: str | None,
               now: float) -> Entry:
        """Give `payload` the next seq and keep it; the frame to send is ``.frame``."""
        seq = self.last_seq = self.last_seq + 1
        frame = with_seq(payload, seq)
        entry = Entry(seq, frame, sender, target, now)
        entries = self._entries
        entries.append(entry)
        self.bytes += len(frame)
        if (len(entries) > self.max_messages or self.bytes > self.max_bytes
                or entries[0].at < now - self.window):
            self.trim(now)
        return entry

    def trim(self, now: float) -> None:
        """Forget what is over the count, the bytes, or older than the window."""
        entries = self._entries
        oldest_kept = now - self.window
        while entries and (len(entries) > self.max_messages or self.bytes > self.max_bytes
                           or entries[0].at < oldest_kept):
            gone = entries.popleft()
            self.bytes -= len(gone.frame)
            self.trimmed_through = gone.seq

    def since(self, seq: int, epoch: str, connection_id: str,
              now: float) -> list[bytes] | RecoveryFailure:
        """Every frame meant for `connection_id` with a seq above `seq`, in order, once;
        or why they cannot all be given."""
        if not hmac.compare_digest(epoch.encode(), self.epoch.encode()):
            return RecoveryFailure.EPOCH_CHANGED
        if not 0 <= seq <= self.last_seq:
            return RecoveryFailure.BAD_SINCE
        self.trim(now)
        if self.trimmed_through > seq:
            return RecoveryFailure.HISTORY_TRIMMED
        entries = self._entries
        start = seq + 1 - entries[0].seq if entries else 0
        return [entry.frame for entry in islice(entries, max(start, 0), None)
                if entry.sender != connection_id
                and (entry.target is None or entry.target == connection_id)]

    def usage(self) -> HistoryUsage:
        return HistoryUsage(1, len(self._entries), self.bytes)


@dataclass(frozen=True)
class Head:
    """Where a room's stream stands: what a joining member's ``connected`` carries."""

    epoch: str
    seq: int


class HistoryStore(Protocol):
    """A room history behind Deferreds: `MemoryHistory` here, and
    ``iw_relay.backplane.history.RedisHistory`` over the cluster's Redis scripts (the
    relay itself, in a cluster, drives those scripts through its backplane: see
    iw_relay.cluster_recovery, where appending is sequencing and publishing at once).
    """

    def head(self, room_id: str) -> Deferred[Head]: ...

    def append(self, room_id: str, payload: bytes, sender: str | None,
               target: str | None) -> Deferred[Entry]: ...

    def since(self, room_id: str, seq: int, epoch: str,
              connection_id: str) -> Deferred[list[bytes] | RecoveryFailure]: ...

    def drop(self, room_id: str) -> Deferred[None]: ...

    def usage(self) -> HistoryUsage: ...


class MemoryHistory:
    """The one-node `HistoryStore`: a `RoomHistory` per room that has one.

    The ``*_now`` methods are the synchronous core the one-node registry calls on its hot
    path; the `HistoryStore` methods wrap them in already-fired Deferreds.
    """

    def __init__(self, clock: _Clock, window: float, max_messages: int,
                 max_bytes: int) -> None:
        self.clock = clock
        self.window = window
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._rooms: dict[str, RoomHistory] = {}

    def room(self, room_id: str) -> RoomHistory:
        history = self._rooms.get(room_id)
        if history is None:
            history = RoomHistory(self.window, self.max_messages, self.max_bytes)
            self._rooms[room_id] = history
        return history

    def head_now(self, room_id: str) -> Head:
        history = self.room(room_id)
        return Head(history.epoch, history.last_seq)

    def append_now(self, room_id: str, payload: bytes, sender: str | None,
                   target: str | None) -> Entry:
        return self.room(room_id).append(payload, sender, target, self.clock.seconds())

    def since_now(self, room_id: str, seq: int, epoch: str,
                  connection_id: str) -> list[bytes] | RecoveryFailure:
        history = self._rooms.get(room_id)
        if history is None:
            return RecoveryFailure.EPOCH_CHANGED  # the room was deleted since
        return history.since(seq, epoch, connection_id, self.clock.seconds())

    def drop_now(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)

    def trim_all(self) -> None:
        """Age out idle rooms' frames (the registry's expiry sweep calls it)."""
        now = self.clock.seconds()
        for history in self._rooms.values():
            history.trim(now)

    def usage(self) -> HistoryUsage:
        total = HistoryUsage()
        for history in self._rooms.values():
            total += history.usage()
        return total

    # HistoryStore
    def head(self, room_id: str) -> Deferred[Head]:
        from twisted.internet.defer import succeed

        return succeed(self.head_now(room_id))

    def append(self, room_id: str, payload: bytes, sender: str | None,
               target: str | None) -> Deferred[Entry]:
        from twisted.internet.defer import succeed

        return succeed(self.append_now(room_id, payload, sender, target))

    def since(self, room_id: str, seq: int, epoch: str,
              connection_id: str) -> Deferred[list[bytes] | RecoveryFailure]:
        from twisted.internet.defer import succeed

        return succeed(self.since_now(room_id, seq, epoch, connection_id))

    def drop(self, room_id: str) -> Deferred[None]:
        from twisted.internet.defer import succeed

        self.drop_now(room_id)
        return succeed(None)


class _Clock(Protocol):
    def seconds(self) -> float: ...


# -- resume tokens -----------------------------------------------------------------------

_TOKEN_VERSION = 1
# version, expiry (whole seconds), generation, connection id (8 bytes), then the MAC.
_TOKEN_BODY = struct.Struct(">BQI8s")
_MAC_SIZE = 16  # 128 bits of HMAC-SHA256: forging one is 2**-128 a try


@dataclass(frozen=True)
class TokenClaims:
    connection_id: str
    generation: int
    expires_at: int


class ResumeTokens:
    """Opaque resume tokens: HMAC-SHA256 over the room id and the token's fields.

    The room id is in the MAC, not in the token, so a token neither reveals its room nor
    works in another. With no secret, a random per-process key: tokens die with the
    process, as does its in-memory history. A cluster gives every node the same secret
    (a configured one, or one agreed through Redis with ``SET NX``).
    """

    def __init__(self, secret: bytes | None = None) -> None:
        base = secret if secret is not None else secrets.token_bytes(32)
        # A key of its own, so that the same secret used elsewhere (room tokens) cannot
        # be turned into resume tokens or the reverse.
        self._key = hmac.new(base, b"iw-relay resume token v1", hashlib.sha256).digest()

    def _mac(self, room_id: str, body: bytes) -> bytes:
        signed = hmac.new(self._key, body, hashlib.sha256)
        signed.update(room_id.encode("utf-8"))
        return signed.digest()[:_MAC_SIZE]

    def issue(self, room_id: str, connection_id: str, generation: int,
              expires_at: float) -> str:
        body = _TOKEN_BODY.pack(_TOKEN_VERSION, int(expires_at), generation,
                                bytes.fromhex(connection_id))
        token = body + self._mac(room_id, body)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")

    def verify(self, token: str, room_id: str, now: float) -> TokenClaims | RecoveryFailure:
        """The token's claims when this relay issued it for `room_id` and it has not
        expired. The MAC is compared in constant time."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return RecoveryFailure.INVALID_TOKEN
        if len(raw) != _TOKEN_BODY.size + _MAC_SIZE:
            return RecoveryFailure.INVALID_TOKEN
        body, mac = raw[:_TOKEN_BODY.size], raw[_TOKEN_BODY.size:]
        if not hmac.compare_digest(mac, self._mac(room_id, body)):
            return RecoveryFailure.INVALID_TOKEN
        version, expires_at, generation, connection_id = _TOKEN_BODY.unpack(body)
        if version != _TOKEN_VERSION:
            return RecoveryFailure.INVALID_TOKEN
        if now >= expires_at:
            return RecoveryFailure.EXPIRED_TOKEN
        return TokenClaims(connection_id.hex(), generation, expires_at)


# -- presence grace --------------------------------------------------------------------


class SessionState(enum.Enum):
    PRESENT = "present"  # a connection is attached
    AWAY = "away"  # dropped; peers are told nothing until the grace deadline


@dataclass(eq=False)
class Session:
    room_id: str
    connection_id: str
    joined_seq: int  # the room's seq when it joined: it is owed nothing before
    state: SessionState = SessionState.PRESENT
    generation: int = 0
    deadline: float = 0.0
    timer: IDelayedCall | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Claim:
    """A won resume: the session is present again under `generation`.

    `takeover`: the session's old connection was still attached (the server had not yet
    seen it drop); the caller closes it without telling the peers anything.
    """

    session: Session
    takeover: bool


class Sessions:
    """Presence grace, one node's bookkeeping (a cluster keeps it in Redis, with the
    deadline as a key TTL and the claim as a Lua script: iw_relay.cluster_recovery).

    Rules:
    - a member that drops is *away*: `gone` is called `window` seconds later unless it
      resumed; a clean client close (1000, 1001) and a final server close end it at once;
    - the deadline wins ties: a resume at or after ``drop + window`` fails with
      ``SESSION_ENDED`` and the member's `gone` runs first, even when the reactor has not
      yet run the timer;
    - a token works once: the first `claim` bumps the generation, so a second resume with
      the same token (at the same moment or later) fails with ``TOKEN_REUSED``.
    """

    def __init__(self, clock: IReactorTime, window: float,
                 gone: Callable[[str, str], None]) -> None:
        self.clock = clock
        self.window = window
        self._gone = gone
        self._rooms: dict[str, dict[str, Session]] = {}  # room id -> connection id ->
        self._count = 0
        self._stopped = False

    def stop(self) -> None:
        """The relay is stopping: cancel every grace timer; from now on a drop is final
        (nobody would be left to say its ``user-left`` later)."""
        self._stopped = True
        for room in self._rooms.values():
            for session in room.values():
                self._cancel_timer(session)

    def __len__(self) -> int:
        return self._count

    def get(self, room_id: str, connection_id: str) -> Session | None:
        room = self._rooms.get(room_id)
        return room.get(connection_id) if room is not None else None

    def away_count(self) -> int:
        return sum(s.state is SessionState.AWAY
                   for room in self._rooms.values() for s in room.values())

    def in_room(self, room_id: str) -> list[Session]:
        return list(self._rooms.get(room_id, {}).values())

    def has_room(self, room_id: str) -> bool:
        return room_id in self._rooms

    def joined(self, room_id: str, connection_id: str, joined_seq: int) -> Session:
        session = Session(room_id, connection_id, joined_seq)
        room = self._rooms.setdefault(room_id, {})
        if connection_id not in room:
            self._count += 1
        room[connection_id] = session
        return session

    def dropped(self, room_id: str, connection_id: str, grace: bool) -> bool:
        """Its connection closed; True when it is now away (its peers hear nothing yet),
        False when it is gone (the caller says ``user-left`` now; `gone` is not called)."""
        session = self.get(room_id, connection_id)
        if session is None:
            return False
        if not grace or self.window <= 0 or self._stopped:
            self._forget(session)
            return False
        session.state = SessionState.AWAY
        session.deadline = self.clock.seconds() + self.window
        session.timer = self.clock.callLater(self.window, self._deadline, session)
        return True

    def claim(self, room_id: str, connection_id: str,
              generation: int) -> Claim | RecoveryFailure:
        """Attach a new connection to the session, if the token's generation is current
        and its grace has not run out."""
        session = self.get(room_id, connection_id)
        if session is None:
            return RecoveryFailure.SESSION_ENDED
        if session.state is SessionState.AWAY and self.clock.seconds() >= session.deadline:
            self._deadline(session)  # the deadline wins the tie: its user-left goes first
            return RecoveryFailure.SESSION_ENDED
        if generation != session.generation:
            return RecoveryFailure.TOKEN_REUSED
        takeover = session.state is SessionState.PRESENT
        session.generation += 1
        session.state = SessionState.PRESENT
        self._cancel_timer(session)
        return Claim(session, takeover)

    def check(self, room_id: str, connection_id: str,
              generation: int) -> Session | RecoveryFailure:
        """What `claim` would answer, without claiming (no side effect)."""
        session = self.get(room_id, connection_id)
        if session is None or (session.state is SessionState.AWAY
                               and self.clock.seconds() >= session.deadline):
            return RecoveryFailure.SESSION_ENDED
        if generation != session.generation:
            return RecoveryFailure.TOKEN_REUSED
        return session

    def end(self, room_id: str, connection_id: str) -> None:
        """The member is gone now (a resume with its valid token failed): `gone` runs at
        once. If it still looked present (an old connection the relay has not seen die),
        `gone` must also close that connection quietly: its owner is joining afresh."""
        session = self.get(room_id, connection_id)
        if session is not None:
            self._forget(session)
            self._gone(room_id, connection_id)

    def end_room(self, room_id: str) -> None:
        """The room is gone (expired, deleted): forget its sessions, calling nothing."""
        for session in self.in_room(room_id):
            self._forget(session)

    def _deadline(self, session: Session) -> None:
        if self.get(session.room_id, session.connection_id) is not session:
            return
        if session.state is not SessionState.AWAY:
            return
        self._forget(session)
        self._gone(session.room_id, session.connection_id)

    def _forget(self, session: Session) -> None:
        self._cancel_timer(session)
        room = self._rooms.get(session.room_id)
        if room is not None and room.get(session.connection_id) is session:
            del room[session.connection_id]
            self._count -= 1
            if not room:
                del self._rooms[session.room_id]

    @staticmethod
    def _cancel_timer(session: Session) -> None:
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None


# -- the facade ------------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    """A won resume: send ``connected`` with these fields and ``recovered: true``, then
    `frames` in order, then live traffic."""

    connection_id: str
    frames: list[bytes]
    takeover: bool
    fields: dict[str, object]


@dataclass
class RecoveryStats:
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    replayed: int = 0  # frames sent by successful resumes


def parse_since(text: str | None) -> int | None:
    """``since`` from a query string: a whole number in [0, 2**53); None when it is not."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 16:
        return None
    value = int(text)
    return value if value <= MAX_SEQ else None


class Recovery:
    """Everything the registry and the protocol call, on one node. With ``window == 0``
    (the default) it is off: `joined` adds no field, `record` returns the frame
    unchanged, `dropped` answers False, and ``?resume=`` is ignored.

    Wiring it in (the registry's and the protocol's side):

    - ``connected`` gets ``recovery.joined(room_id, connection_id)``;
    - every relayed frame, and ``user-joined`` / ``user-left``, goes out as
      ``recovery.record(room_id, payload, sender, target)``;
    - on close: ``if recovery.dropped(room_id, cid, code, by_server): return`` (away:
      say nothing); `gone` is later called with ``(room_id, cid)`` to say ``user-left``
      (closing first, quietly, any connection still attached to that member: one a
      failed resume replaced);
    - a handshake with ``?resume=`` calls `resume`: a `Resumed` rejoins the member under
      its old id (closing the old connection quietly on a takeover); a `RecoveryFailure`
      makes it a fresh join whose ``connected`` has ``recovered: false``;
    - a deleted or expired room calls `room_gone`;
    - a room whose members are all away is kept (`keeps_room`) so its history survives.
    """

    def __init__(self, clock: IReactorTime, window: float, max_messages: int = 1000,
                 max_bytes: int = 1024 * 1024, *, tokens: ResumeTokens | None = None,
                 token_lifetime: float | None = None,
                 gone: Callable[[str, str], None] = lambda room_id, cid: None) -> None:
        self.clock = clock
        self.window = window
        self.history = MemoryHistory(clock, window, max_messages, max_bytes)
        self.tokens = tokens or ResumeTokens()
        #: Outer bound of a token; a member cannot outlive its room, so the registry
        #: passes the room lifetime plus the window.
        self.token_lifetime = token_lifetime if token_lifetime is not None else (
            24 * 3600.0 + window)
        self.sessions = Sessions(clock, window, gone)
        self.stats = RecoveryStats()
        #: Members away now (a cluster counts its own).
        self.away_count: Callable[[], int] = self.sessions.away_count

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def _token(self, session: Session) -> str:
        return self.tokens.issue(session.room_id, session.connection_id, session.generation,
                                 self.clock.seconds() + self.token_lifetime)

    def joined(self, room_id: str, connection_id: str) -> dict[str, object]:
        """The fields a fresh join's ``connected`` carries: ``epoch``, ``seq`` (the last
        seq before this join: the first ``since``), ``resumeToken``, ``recovered``."""
        if not self.enabled:
            return {}
        head = self.history.head_now(room_id)
        session = self.sessions.joined(room_id, connection_id, head.seq)
        return {"epoch": head.epoch, "seq": head.seq, "resumeToken": self._token(session),
                "recovered": False}

    def record(self, room_id: str, payload: bytes, sender: str | None,
               target: str | None = None) -> bytes:
        """The frame to send for `payload`, kept in the room's history; unchanged when
        recovery is off."""
        if not self.enabled:
            return payload
        return self.history.append_now(room_id, payload, sender, target).frame

    def dropped(self, room_id: str, connection_id: str, close_code: int | None,
                closed_by_server: bool = False) -> bool:
        """True: the member is away, say nothing now. False: it is gone, say user-left."""
        if not self.enabled:
            return False
        return self.sessions.dropped(room_id, connection_id,
                                     keeps_grace(close_code, closed_by_server))

    def keeps_room(self, room_id: str) -> bool:
        """A room with no connection left is kept while any of its members is away."""
        return self.enabled and self.sessions.has_room(room_id)

    def room_gone(self, room_id: str) -> None:
        self.sessions.end_room(room_id)
        self.history.drop_now(room_id)

    def resume(self, room_id: str, token: str, since: str | int | None,
               epoch: str | None) -> Resumed | RecoveryFailure:
        """Resume a session from ``?resume=TOKEN&since=SEQ&epoch=E``: exactly the frames
        the member is owed, or why not (counted). A failure with a genuine, current
        token ends the session at once (its ``user-left`` goes out before the fresh
        join's ``user-joined``; a connection still attached to it is closed). With
        recovery off there are no sessions: it fails, counting nothing."""
        if not self.enabled:
            return RecoveryFailure.SESSION_ENDED
        outcome = self._resume(room_id, token, since, epoch)
        if isinstance(outcome, RecoveryFailure):
            self.stats.failed[outcome.value] += 1
        else:
            self.stats.succeeded += 1
            self.stats.replayed += len(outcome.frames)
        return outcome

    def _resume(self, room_id: str, token: str, since: str | int | None,
                epoch: str | None) -> Resumed | RecoveryFailure:
        claims = self.tokens.verify(token, room_id, self.clock.seconds())
        if isinstance(claims, RecoveryFailure):
            return claims
        cid = claims.connection_id
        session = self.sessions.check(room_id, cid, claims.generation)
        if isinstance(session, RecoveryFailure):
            if session is RecoveryFailure.SESSION_ENDED:
                self.sessions.end(room_id, cid)  # the deadline tie: user-left first
            return session
        seq = since if isinstance(since, int) else parse_since(since)
        if seq is None or epoch is None:
            self.sessions.end(room_id, cid)
            return RecoveryFailure.BAD_SINCE if seq is None else RecoveryFailure.EPOCH_CHANGED
        # Owed nothing from before its join, whatever `since` says.
        frames = self.history.since_now(room_id, max(seq, session.joined_seq), epoch, cid)
        if isinstance(frames, RecoveryFailure):
            self.sessions.end(room_id, cid)
            return frames
        claim = self.sessions.claim(room_id, cid, claims.generation)
        if isinstance(claim, RecoveryFailure):  # cannot happen after check(): same turn
            return claim
        head = self.history.head_now(room_id)
        fields = {"epoch": head.epoch, "seq": head.seq,
                  "resumeToken": self._token(claim.session), "recovered": True}
        return Resumed(cid, frames, claim.takeover, fields)

    # -- what /stats and /metrics show -----------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """/stats fields (empty when recovery is off: /stats stays as it was)."""
        if not self.enabled:
            return {}
        usage = self.history.usage()
        return {
            "recoveriesSucceeded": self.stats.succeeded,
            "recoveriesFailed": dict(sorted(self.stats.failed.items())),
            "recoveryAwayMembers": self.away_count(),
            "recoveryHistoryMessages": usage.messages,
            "recoveryHistoryBytes": usage.bytes,
            "recoveryMemoryBytes": usage.memory_bytes,
        }

    def metric_families(self) -> Iterator[Metric]:
        """Prometheus families for a collector's ``collect`` (nothing when off)."""
        if not self.enabled:
            return
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("iwrelay_recoveries_succeeded",
                                  "Resumes that recovered the session",
                                  value=self.stats.succeeded)
        failed = CounterMetricFamily("iwrelay_recoveries_failed",
                                     "Resumes that became a fresh join, by reason",
                                     labels=["reason"])
        for reason in RecoveryFailure:
            failed.add_metric([reason.value], self.stats.failed[reason.value])
        yield failed
        usage = self.history.usage()
        yield GaugeMetricFamily("iwrelay_recovery_history_messages",
                                "Frames kept for recovery", value=usage.messages)
        yield GaugeMetricFamily("iwrelay_recovery_history_bytes",
                                "Bytes of frames kept for recovery", value=usage.bytes)
        yield GaugeMetricFamily("iwrelay_recovery_memory_bytes",
                                "Estimated memory held by recovery history",
                                value=usage.memory_bytes)
        yield GaugeMetricFamily("iwrelay_recovery_away_members",
                                "Dropped members within their grace window",
                                value=self.away_count())
