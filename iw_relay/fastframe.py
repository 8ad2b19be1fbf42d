"""A lean path (taken by _autobahn.py only) for the frame clients send nearly always: one
whole, masked, unfragmented text or binary frame of under 64 KiB, with no reserved bits.

Autobahn's general frame machinery (masker objects, per-frame callbacks, futures) is most
of the CPU the relay spends per message. `next_simple_frame` recognises the common frame
and nothing else; everything else (control frames, fragments, large or partial frames,
anything invalid, including text that is not UTF-8) is left to Autobahn, which closes
with the right code. tests/test_fastframe.py checks that both paths behave alike.
"""

from __future__ import annotations

_TEXT, _BINARY = 0x1, 0x2
_FIN = 0x80
_MASKED = 0x80


def next_simple_frame(data: bytes, start: int, max_size: int
                      ) -> tuple[bytes, bool, int] | None:
    """(payload, is_binary, end) for a simple frame at `data[start:]`, else None.

    `max_size` is the smallest payload limit in force (0: none); a frame over it is left
    to Autobahn, which fails the connection with 1009.
    """
    available = len(data) - start
    if available < 6:
        return None
    first, second = data[start], data[start + 1]
    opcode = first & 0x0F
    if first & 0xF0 != _FIN or opcode not in (_TEXT, _BINARY) or not second & _MASKED:
        return None
    length = second & 0x7F
    if length < 126:
        header = 6
    elif length == 126 and available >= 8:
        length = (data[start + 2] << 8) | data[start + 3]
        if length < 126:  # not the minimal encoding: a protocol error, Autobahn's to say
            return None
        header = 8
    else:
        return None
    end = start + header + length
    if end > len(data) or (max_size and length > max_size):
        return None
    # Unmasked as one big-integer XOR with the repeated 4-byte key (C speed), inline:
    # this runs once per message.
    key = data[start + header - 4:start + header]
    masked = int.from_bytes(data[start + header:end], "little")
    stream = int.from_bytes((key * ((length + 3) // 4))[:length], "little")
    payload = (masked ^ stream).to_bytes(length, "little")
    if opcode == _TEXT and not payload.isascii():  # ASCII is valid UTF-8 (and far cheaper)
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return payload, opcode == _BINARY, end
