"""The lean frame path behaves exactly like Autobahn's: the same streams of frames,
valid or not, split anywhere, give the same messages, replies, closes and counters."""

import json
import struct
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iw_relay.config import RelayConfig
from iw_relay.fastframe import next_simple_frame
from iw_relay.protocol import CLOSE_HANDSHAKE_TIMEOUT, RelayServerProtocol
from tests.clients import MemoryRelay

MAX_SIZE = 300


def frame(opcode, payload, fin=True, rsv=0, key=b"\x01\x02\x03\x04", masked=True,
          long_form=False):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126 and not long_form:
        header = bytes([first, mask_bit | len(payload)])
    else:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", len(payload))
    if not masked:
        return header + payload
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


messages = st.builds(lambda n, pad: json.dumps({"type": "op", "n": n, "pad": pad}).encode(),
                     st.integers(0, 99), st.text(max_size=160))
payloads = st.one_of(messages, st.binary(max_size=200),
                     st.sampled_from([b"\xff\xfe", b'{"type":"\xc3"}', b"\xed\xa0\x80",
                                      b"null", b"{}", b'{"type":"op"}']))
keys = st.binary(min_size=4, max_size=4)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["text", "text", "text", "binary", "ping", "pong", "close",
                                 "fragmented", "unmasked", "rsv", "opcode", "oversize",
                                 "long_form", "continuation"]))
    key = draw(keys)
    payload = draw(payloads)
    if kind == "text":
        return frame(0x1, payload, key=key)
    if kind == "binary":
        return frame(0x2, payload, key=key)
    if kind == "ping":
        return frame(0x9, payload[:125], key=key)
    if kind == "pong":
        return frame(0xA, payload[:125], key=key)
    if kind == "close":
        return frame(0x8, struct.pack("!H", 1000) + b"bye", key=key)
    if kind == "fragmented":
        cut = draw(st.integers(0, len(payload)))
        middle = draw(st.booleans())
        parts = [frame(0x1, payload[:cut], fin=False, key=key)]
        if middle:
            parts.append(frame(0x9, b"in-between", key=key))
        parts.append(frame(0x0, payload[cut:], key=key))
        return b"".join(parts)
    if kind == "unmasked":
        return frame(0x1, payload, masked=False)
    if kind == "rsv":
        return frame(0x1, payload, rsv=draw(st.integers(1, 7)), key=key)
    if kind == "opcode":
        return frame(draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xF])), payload, key=key)
    if kind == "oversize":
        return frame(0x1, b"x" * (MAX_SIZE + draw(st.integers(1, 200))), key=key)
    if kind == "long_form":  # a 16-bit length for a short payload: not minimal
        return frame(0x1, payload[:100], key=key, long_form=True)
    return frame(0x0, payload, key=key)  # a continuation outside any message


def run(stream, cuts, fast):
    RelayServerProtocol.fast_frames = fast
    relay = MemoryRelay(RelayConfig(ping_interval=0, rate_limit=10_000,
                                    max_message_size=MAX_SIZE))
    try:
        sender, peer = relay.join(), relay.join()
        names = {sender.received[0]["connectionId"]: "sender",
                 peer.received[0]["connectionId"]: "peer"}
        bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
        for begin, end in pairwise(bounds):
            sender.transport.write(stream[begin:end])
            relay.flush()
        # A close reply can land behind unparsed junk, depending on the client's random
        # mask: let the close-handshake timeout settle those on both paths alike.
        relay.advance(CLOSE_HANDSHAKE_TIMEOUT + 1)

        def named(messages):
            return [{k: names.get(v, v) if k == "connectionId" else v
                     for k, v in message.items()} for message in messages]

        stats = relay.registry.stats
        server = relay.servers[0]
        return {
            "peer": named(peer.received[1:]),
            "sender": named(sender.received[1:]),
            "sender_close": (sender.close_code, sender.close_reason),
            "state": server.state,
            "counters": (stats.messagesRelayed, stats.disconnectionsTotal,
                         stats.bytesReceived),
            "traffic": (server.trafficStats.incomingWebSocketMessages,
                        server.trafficStats.incomingWebSocketFrames),
        }
    finally:
        relay.close()
        RelayServerProtocol.fast_frames = True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=8), st.lists(st.integers(0, 10_000),
                                                             max_size=6))
def test_the_lean_path_behaves_like_autobahns(parts, cuts):
    stream = b"".join(parts)
    assert run(stream, cuts, fast=True) == run(stream, cuts, fast=False)


@given(st.binary(max_size=300), keys)
def test_unmasking_is_xor_with_the_repeated_key(payload, key):
    data = b"\x00" + frame(0x2, payload, key=key)  # at an offset: start is honoured
    assert next_simple_frame(data, 1, 0) == (payload, True, len(data))


def test_only_simple_frames_take_the_lean_path():
    assert next_simple_frame(frame(0x1, b'{"type":"op"}'), 0, 0)[:2] == (b'{"type":"op"}',
                                                                        False)
    assert next_simple_frame(frame(0x2, b"\x00\xff"), 0, 0)[:2] == (b"\x00\xff", True)
    long = frame(0x1, b"y" * 300)
    assert next_simple_frame(long, 0, 0)[2] == len(long)
    for other in (frame(0x1, b"ab", fin=False), frame(0x9, b"ping"), frame(0x1, b"\xff"),
                  frame(0x1, b"a", rsv=4), frame(0x1, b"a", masked=False),
                  frame(0x1, b"abc", long_form=True), frame(0x1, b"a")[:-1]):
        assert next_simple_frame(other, 0, 0) is None
    assert next_simple_frame(long, 0, 299) is None  # over the limit: Autobahn says 1009
