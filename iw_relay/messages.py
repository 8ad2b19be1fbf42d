"""What goes over the wire: server message builders, error and close codes, JSON.

Client JSON is decoded with the standard library because it accepts the lone surrogate
escapes ("\\ud83d") that an editor produces when an operation splits an emoji, and
re-encodes them as the same escapes (ensure_ascii), so peers get them unchanged.
"""

from __future__ import annotations

import json
from json import scanner
from typing import Any

# Error codes sent in {"type": "error", "code": ...}.
PARSE_ERROR = "PARSE_ERROR"
INVALID_MESSAGE = "INVALID_MESSAGE"
RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
ROOM_FULL = "ROOM_FULL"
UNKNOWN_PEER = "UNKNOWN_PEER"
RESERVED_TYPE = "RESERVED_TYPE"

# Types only the server sends: a client sending one could impersonate the server (a forged
# ``connected`` or ``user-left``), so such a message is refused and never relayed.
RESERVED_TYPES = frozenset({"connected", "user-joined", "user-left", "room-expired",
                            "server-shutdown", "error"})

# WebSocket close codes used by the relay.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

ROOM_ID_REQUIRED = "Room ID required. Use /room/{roomId} or /?room={roomId}"
ROOM_ID_INVALID = (
    "Invalid room ID format. Use alphanumeric characters, dash, or underscore only."
)
SHUTDOWN_REASON = "Server shutting down"
SHUTDOWN_MESSAGE = "Server is shutting down"
INTERNAL_ERROR_REASON = "Internal server error"
ROOM_FULL_MESSAGE = "Room is full"
FLOOD_REASON = "Rate limit exceeded"
AUTH_REASON = "Invalid authentication token"
RESUMED_REASON = "Session resumed on another connection"
SLOW_CONSUMER_REASON = "Slow consumer: messages were not read in time"

PARSE_ERROR_MESSAGE = "Invalid message format - must be valid JSON"
INVALID_MESSAGE_MESSAGE = "Message must have a type field"
UNKNOWN_PEER_MESSAGE = "No such peer in this room"
RESERVED_TYPE_MESSAGE = "Message type is reserved for the server"


class MessageError(Exception):
    """A client message that is refused; `code` is the error code sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(message: dict[str, Any]) -> bytes:
    """Compact, ASCII-only JSON: lone surrogates stay valid \\u escapes."""
    return _encoder.encode(message).encode("ascii")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


_JSON_BLANKS = b" \t\n\r"
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
# What _decoder.decode runs, minus its two whitespace regexes (typeshed mistypes the
# argument: it is the decoder whose options the scanner follows).
_scan_once = scanner.make_scanner(_decoder)  # type: ignore[arg-type]


def _parse(text: str) -> Any:
    """What `_decoder.decode(text)` returns, without its two whitespace scans when the
    text is one object edge to edge (nearly every client message)."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            value, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            pass  # the full decoder says what is wrong
        else:
            if end == len(text):
                return value
    return _decoder.decode(text)


def decode_client_message(payload: bytes) -> dict[str, Any]:
    """The client's JSON object; MessageError when it is not one the relay accepts."""
    try:
        message = _parse(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON, NaN/Infinity, numbers out of range.
        raise MessageError(PARSE_ERROR, PARSE_ERROR_MESSAGE) from None
    if not isinstance(message, dict):
        raise MessageError(INVALID_MESSAGE, INVALID_MESSAGE_MESSAGE)
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise MessageError(INVALID_MESSAGE, INVALID_MESSAGE_MESSAGE)
    if kind in RESERVED_TYPES:
        raise MessageError(RESERVED_TYPE, RESERVED_TYPE_MESSAGE)
    return message


def stamped(payload: bytes, connection_id: str, timestamp_ms: int,
            owns_seq: bool = False) -> tuple[bytes, str | None]:
    """The relayed form of a client frame (every field it had, plus the sender's id and
    the time) and its unicast target: its ``to`` when that is a string (a member's
    connection id), else None (a broadcast, as for every client before ``to`` existed).
    The ``to`` field stays in the relayed message. MessageError when the frame is not a
    message the relay accepts.

    `owns_seq` (connection recovery on): a ``seq`` the client put in is removed, since
    the relay adds its own; with recovery off it stays, as it always did."""
    message = decode_client_message(payload)
    target = message.get("to")
    target = target if isinstance(target, str) else None
    if owns_seq and "seq" in message:
        message.pop("seq")
    elif ("connectionId" not in message and "timestamp" not in message
            and payload.isascii()):
        # The client's own JSON, already checked, with the two stamps appended before its
        # closing brace: re-encoding the whole message cost more than decoding it. Its
        # spacing and escapes reach the peers as the client wrote them (same JSON value);
        # non-ASCII text is re-encoded, so that it always arrives as \u escapes.
        body = payload.rstrip(_JSON_BLANKS)
        if body.endswith(b"}"):
            return b'%s,"connectionId":"%s","timestamp":%d}' % (
                body[:-1], connection_id.encode("ascii"), timestamp_ms), target
    message["connectionId"] = connection_id
    message["timestamp"] = timestamp_ms
    try:
        return encode(message), target
    except (ValueError, RecursionError):
        raise MessageError(PARSE_ERROR, PARSE_ERROR_MESSAGE) from None


def error(code: str, message: str) -> bytes:
    return encode({"type": "error", "message": message, "code": code})


def rate_limit_error(limit: int, window: float) -> bytes:
    per = "second" if window == 1 else f"{window:g} seconds"
    return error(RATE_LIMIT_EXCEEDED, f"Rate limit exceeded ({limit} messages/{per})")


def connected(connection_id: str, room_id: str, user_count: int,
              peers: list[str] | None = None,
              recovery: dict[str, object] | None = None) -> bytes:
    """`peers`: the connection ids of the others in the room (WebRTC signaling);
    `recovery`: ``epoch``, ``seq``, ``resumeToken``, ``recovered`` (recovery on only)."""
    message = {"type": "connected", "connectionId": connection_id, "roomId": room_id,
               "userCount": user_count, "peers": peers or []}
    if recovery:
        message.update(recovery)
    return encode(message)


def user_joined(connection_id: str, user_count: int) -> bytes:
    return encode({"type": "user-joined", "connectionId": connection_id,
                   "userCount": user_count})


def user_left(connection_id: str, user_count: int) -> bytes:
    return encode({"type": "user-left", "connectionId": connection_id,
                   "userCount": user_count})


def expiry_text(seconds: float) -> str:
    """'Room expired after 24 hours' for the default; other lifetimes in their unit."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"Room expired after {count} {unit}{'s' if count != 1 else ''}"
    return f"Room expired after {seconds:g} seconds"


def room_expired(text: str) -> bytes:
    return encode({"type": "room-expired", "message": text})


def server_shutdown() -> bytes:
    return encode({"type": "server-shutdown", "message": SHUTDOWN_MESSAGE})
