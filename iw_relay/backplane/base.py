"""What a node tells the other nodes, what it hears back, and the wire format between them.

`Backplane` is the registry's one way out of the process: joins, leaves, messages for the
members on other nodes, expiry. `BackplaneEvents` (implemented by the registry) is the way
back in. A backplane never touches a member; the registry never touches Redis.

The wire codec (`encode_*`, `decode`) is versioned and validates every envelope: ids are
16 lower-case hex characters, room keys 32, sizes are bounded, relayed payloads are JSON
objects with a non-empty string ``type``. A bad entry is counted and dropped; what follows
it in the same envelope is dropped too when its framing can no longer be trusted.

Envelope (one PUBLISH to a node's inbox)::

    b"1" sender-node(16) entry...
    entry := kind(1) room-key(32) body
      m  len ":" payload                  a relayed message for every member there
      u  target(16) len ":" payload       a unicast for one member there
      j  connection(16)                   the sender node's member joined
      l  connection(16)                   a member left
      x                                   the room expired
      c  connection(16) len ":" snapshot  your member's join is committed
                                          snapshot := deadline ("," connection node)*
      f  connection(16)                   your member's join is refused: the room is full
      s  sender(16) target(16) seq "," len ":" frame
                                          a frame stamped with its room seq (recovery in a
                                          cluster: written by the sequencing script only);
                                          target is 16 "-" for every member but the sender

The Lua scripts of the Redis backplane write ``j``, ``l``, ``x``, ``c`` and ``f`` entries
themselves, so this layout is also what they build.

Room state is keyed by the room's hash (`key`), never its id, and every relayed message
passes through `Backplane.publish`/`unicast` with its room key: connection-state recovery
(history, resume) can be added as further methods (record and replay per room key) and
entry kinds, without reshaping these; a decoder ignores no unknown kind silently (it
counts it), so a new kind needs a new VERSION only if old nodes must not see it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

VERSION = b"1"
ID_LENGTH = 16
KEY_LENGTH = 32
#: A relayed payload may be this much larger than --max-message-size (the stamp).
STAMP_ALLOWANCE = 256
_ID = re.compile(rb"[0-9a-f]{16}\Z")
_KEY = re.compile(rb"[0-9a-f]{32}\Z")
_DEADLINE = re.compile(rb"[0-9]{1,17}(\.[0-9]{1,17})?\Z")
_MAX_LENGTH_DIGITS = 9
MAX_KNOWN_KEYS = 100_000

#: Entry kinds.
MESSAGE, UNICAST, JOINED, LEFT, EXPIRED, COMMITTED, REFUSED, SEQUENCED = b"mujlxcfs"
#: The target of a sequenced frame meant for every member but its sender.
NO_TARGET = b"-" * ID_LENGTH
_SEQ = re.compile(rb"[0-9]{1,16}\Z")


class BackplaneEvents(Protocol):
    """What a backplane tells its registry (all on the reactor thread)."""

    def join_committed(self, key: str, connection_id: str, deadline: float | None,
                       members: dict[str, str] | None) -> None:
        """Our member's join holds everywhere; `members` (connection id -> node, every
        node) is None when the backplane has no view (one node, or Redis unreachable)."""

    def join_refused(self, key: str, connection_id: str) -> None:
        """Our member's join would overfill the room (--max-room-size, cluster-wide)."""

    def remote_joined(self, key: str, connection_id: str, node: str) -> None: ...

    def remote_left(self, key: str, connection_id: str) -> None: ...

    def remote_message(self, key: str, payload: bytes) -> None: ...

    def remote_unicast(self, key: str, target: str, payload: bytes) -> None: ...

    def remote_expired(self, key: str) -> None: ...

    def remote_sequenced(self, key: str, seq: int, sender: str, target: str,
                         frame: bytes) -> None:
        """A frame Redis stamped with its room seq (recovery in a cluster): for every
        member here but `sender`, or only for `target` when it is not ""."""

    def node_died(self, node: str) -> None:
        """Another node stopped beating: its members are gone."""

    def begin_sync(self) -> dict[str, tuple[float, list[str]]]:
        """A resynchronisation starts: from now until `reconcile`, presence events are
        held back. Returns room key -> (deadline, this node's committed members)."""

    def reconcile(self, key: str, deadline: float | None,
                  members: dict[str, str]) -> list[tuple[str, str]]:
        """The room's members in the store, then the held-back events. Returns the
        remote members this node knew of that the store no longer has, as
        (connection id, node): gone if their node lives, else the dead-node check decides."""

    def remote_nodes(self) -> set[str]:
        """The nodes this node knows to have members in its rooms."""


class Backplane(Protocol):
    """What the registry tells the other nodes. Every method returns at once."""

    node_id: str
    #: False for a single node: the registry then skips everything cluster-only.
    shared: bool

    def attach(self, events: BackplaneEvents) -> None:
        """Who hears what the other nodes say (the registry, from its constructor)."""

    def start(self) -> None:
        """Start talking to the other nodes (the registry's startService)."""

    def stop(self) -> Any:
        """Leave the cluster; may return a Deferred."""

    def join(self, key: str, connection_id: str, deadline: float, max_size: int) -> None:
        """Ask for a join; the answer comes as `join_committed` or `join_refused` (maybe
        before this returns)."""

    def leave(self, key: str, connection_id: str) -> None: ...

    def publish(self, key: str, nodes: Any, payload: bytes) -> None:
        """A relayed message for the members of `key` on `nodes` (never this node)."""

    def unicast(self, key: str, node: str, target: str, payload: bytes) -> None: ...

    def expire(self, key: str) -> None: ...

    def status(self) -> dict[str, Any] | None:
        """What /health, /stats and /metrics report; None for a single node."""


# -- codec ------------------------------------------------------------------------------


class EnvelopeError(ValueError):
    """Why an envelope or one of its entries was dropped (a short key, for counting)."""


class Entry(NamedTuple):
    kind: int
    key: str
    connection_id: str = ""
    payload: bytes = b""
    deadline: float | None = None
    members: dict[str, str] | None = None
    target: str = ""
    seq: int = 0


def encode_header(node: str) -> bytes:
    return VERSION + node.encode()


def encode_message(key: bytes, payload: bytes) -> bytes:
    return b"m" + key + b"%d:" % len(payload) + payload


def encode_unicast(key: bytes, target: str, payload: bytes) -> bytes:
    return b"u" + key + target.encode() + b"%d:" % len(payload) + payload


def encode_presence(kind: bytes, key: str, connection_id: str = "") -> bytes:
    return kind + key.encode() + connection_id.encode()


def encode_sequenced(key: str, seq: int, sender: str, target: str | None,
                     frame: bytes) -> bytes:
    """What the sequencing script writes (the memory bus writes it with this)."""
    return (b"s" + key.encode() + sender.encode() + (target.encode() if target else NO_TARGET)
            + b"%d,%d:" % (seq, len(frame)) + frame)


def encode_committed(key: str, connection_id: str, deadline: float,
                     members: dict[str, str]) -> bytes:
    snapshot = repr(deadline).encode() + b"".join(
        b"," + c.encode() + n.encode() for c, n in members.items())
    return b"c" + key.encode() + connection_id.encode() + b"%d:" % len(snapshot) + snapshot


_json_decoder = json.JSONDecoder()
_json_decode = _json_decoder.decode
#: The C scanner behind json.loads, called directly: valid_payload runs once per relayed
#: message received, and the two Python layers around it were a third of its cost.
_json_scan: Callable[[str, int], tuple[Any, int]] = (
    _json_decoder.scan_once)  # type: ignore[attr-defined]


def valid_payload(payload: bytes) -> bool:
    """A relayed message is a JSON object with a non-empty string type."""
    try:
        text = payload.decode()
        if text[:1] == "{":  # what nodes send; anything else takes the full decoder
            message, end = _json_scan(text, 0)
            if end != len(text):
                message = _json_decode(text)
        else:
            message = _json_decode(text)
    except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError: ValueError
        return False
    kind = message.get("type") if type(message) is dict else None
    return type(kind) is str and kind != ""


class Codec:
    """Decodes envelopes, counting what it drops (by reason) in `dropped`, and all of
    it in `dropped_total`."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload + STAMP_ALLOWANCE
        self.dropped: Counter[str] = Counter()
        self.dropped_total = 0
        #: Room keys already checked (a regex per entry is a tenth of the cost).
        self._keys: dict[bytes, str] = {}

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_total += 1

    def decode(self, envelope: bytes) -> tuple[str, list[Entry]]:
        """The sender node and the valid entries; bad ones are counted and skipped."""
        entries: list[Entry] = []
        if envelope[:1] != VERSION:
            self._drop("version")
            return "", []
        sender = envelope[1:1 + ID_LENGTH]
        if not _ID.match(sender):
            self._drop("sender")
            return "", []
        try:
            self._entries(envelope, 1 + ID_LENGTH, entries)
        except EnvelopeError as problem:
            self._drop(str(problem))
        return sender.decode(), entries

    def _entries(self, data: bytes, at: int, entries: list[Entry]) -> None:
        """Appends the valid entries of `data` from `at` (a loop, not a generator: it
        runs once per message received from another node)."""
        end = len(data)
        if at >= end:
            raise EnvelopeError("empty")
        keys = self._keys
        max_payload = self.max_payload
        append = entries.append
        while at < end:
            kind = data[at]
            key = data[at + 1:at + 1 + KEY_LENGTH]
            text_key = keys.get(key)
            if text_key is None:
                if not _KEY.match(key):
                    raise EnvelopeError("key")
                if len(keys) >= MAX_KNOWN_KEYS:
                    keys.clear()
                text_key = keys[key] = key.decode()
            at += 1 + KEY_LENGTH
            if kind == MESSAGE:  # the common case first, _sized inlined
                colon = data.find(b":", at, at + _MAX_LENGTH_DIGITS + 1)
                digits = data[at:colon]
                if colon < 0 or not digits.isdigit():
                    raise EnvelopeError("length")
                at = colon + 1 + int(digits)
                if at - colon - 1 > max_payload or at > end:
                    raise EnvelopeError("length")
                body = data[colon + 1:at]
                if valid_payload(body):
                    append(Entry(kind, text_key, "", body))
                else:
                    self._drop("payload")
                continue
            if kind == SEQUENCED:
                entry, at = self._sequenced(data, at, text_key)
                if entry is not None:
                    append(entry)
                continue
            if kind in (JOINED, LEFT, REFUSED, UNICAST, COMMITTED):
                connection = data[at:at + ID_LENGTH]
                if not _ID.match(connection):
                    raise EnvelopeError("id")
                at += ID_LENGTH
                connection_id = connection.decode()
            else:
                connection_id = ""
            if kind in (JOINED, LEFT, REFUSED):
                append(Entry(kind, text_key, connection_id))
            elif kind == EXPIRED:
                append(Entry(kind, text_key))
            elif kind in (UNICAST, COMMITTED):
                body, at = self._sized(data, at)
                if kind == COMMITTED:
                    committed = self._committed(text_key, connection_id, body)
                    if committed is not None:
                        append(committed)
                elif valid_payload(body):
                    append(Entry(kind, text_key, connection_id, body))
                else:
                    self._drop("payload")
            else:
                raise EnvelopeError("kind")

    def _sized(self, data: bytes, at: int) -> tuple[bytes, int]:
        colon = data.find(b":", at, at + _MAX_LENGTH_DIGITS + 1)
        digits = data[at:colon]
        if colon < 0 or not digits.isdigit():
            raise EnvelopeError("length")
        size = int(digits)
        start = colon + 1
        if size > self.max_payload or start + size > len(data):
            raise EnvelopeError("length")
        return data[start:start + size], start + size

    def _sequenced(self, data: bytes, at: int, key: str) -> tuple[Entry | None, int]:
        sender, target = data[at:at + ID_LENGTH], data[at + ID_LENGTH:at + 2 * ID_LENGTH]
        if not _ID.match(sender) or not (target == NO_TARGET or _ID.match(target)):
            raise EnvelopeError("id")
        at += 2 * ID_LENGTH
        comma = data.find(b",", at, at + 17)
        if comma < 0 or not _SEQ.match(data[at:comma]):
            raise EnvelopeError("seq")
        seq = int(data[at:comma])
        frame, at = self._sized(data, comma + 1)
        if not valid_payload(frame):
            self._drop("payload")
            return None, at
        return Entry(SEQUENCED, key, sender.decode(), frame,
                     target="" if target == NO_TARGET else target.decode(), seq=seq), at

    def _committed(self, key: str, connection_id: str, snapshot: bytes) -> Entry | None:
        deadline, *pairs = snapshot.split(b",")
        members: dict[str, str] = {}
        if not _DEADLINE.match(deadline):
            self._drop("snapshot")
            return None
        for pair in pairs:
            if len(pair) != 2 * ID_LENGTH or not (_ID.match(pair[:ID_LENGTH])
                                                   and _ID.match(pair[ID_LENGTH:])):
                self._drop("snapshot")
                return None
            members[pair[:ID_LENGTH].decode()] = pair[ID_LENGTH:].decode()
        return Entry(COMMITTED, key, connection_id, deadline=float(deadline), members=members)
