"""The backplane's wire codec: what a node encodes, another decodes unchanged; anything
else is counted and dropped, never handed on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iw_relay.backplane.base import (
    COMMITTED,
    JOINED,
    MESSAGE,
    UNICAST,
    Codec,
    encode_committed,
    encode_header,
    encode_message,
    encode_presence,
    encode_unicast,
    valid_payload,
)

ids = st.text("0123456789abcdef", min_size=16, max_size=16)
keys = st.text("0123456789abcdef", min_size=32, max_size=32)
messages = st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20),
                           max_size=4).map(lambda d: {**d, "type": "op"})


@settings(max_examples=60, deadline=None)
@given(ids, keys, ids, st.lists(messages, min_size=1, max_size=5), ids)
def test_what_is_encoded_decodes_unchanged(node, key, target, bodies, joiner):
    payloads = [json.dumps(body).encode() for body in bodies]
    envelope = (encode_header(node)
                + b"".join(encode_message(key.encode(), p) for p in payloads)
                + encode_unicast(key.encode(), target, payloads[0])
                + encode_presence(b"j", key, joiner)
                + encode_committed(key, joiner, 1795968005.625, {target: node}))
    codec = Codec(max_payload=1 << 20)
    sender, entries = codec.decode(envelope)
    assert sender == node and not codec.dropped
    assert [(e.kind, e.payload) for e in entries[:len(payloads)]] == [
        (MESSAGE, p) for p in payloads]
    unicast, joined, committed = entries[len(payloads):]
    assert (unicast.kind, unicast.connection_id, unicast.payload) == (
        UNICAST, target, payloads[0])
    assert (joined.kind, joined.key, joined.connection_id) == (JOINED, key, joiner)
    assert (committed.kind, committed.deadline, committed.members) == (
        COMMITTED, 1795968005.625, {target: node})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_yield_a_bad_entry(data):
    codec = Codec(max_payload=1 << 20)
    _, entries = codec.decode(data)
    for entry in entries:
        assert len(entry.key) == 32 and set(entry.key) <= set("0123456789abcdef")
        if entry.kind in (MESSAGE, UNICAST):
            assert json.loads(entry.payload)["type"]
        if entry.connection_id:
            assert len(entry.connection_id) == 16


def test_a_payload_over_the_size_limit_is_dropped():
    codec = Codec(max_payload=100)
    big = json.dumps({"type": "op", "pad": "x" * 400}).encode()
    _, entries = codec.decode(encode_header("a" * 16) + encode_message(b"b" * 32, big))
    assert entries == [] and codec.dropped["length"] == 1


@pytest.mark.parametrize("payload, valid", [
    (b'{"type":"op","n":[1,{"a":null}]}', True),
    (b' \t{"type": "op"} \r\n', True),  # a sender's own spacing
    (b'{"type":"op"}x', False),
    (b'{"type":"op"}{"type":"op"}', False),
    (b'{"type":"op"', False),
    (b'{"type":""}', False),
    (b'{"type":1}', False),
    (b'{"kind":"op"}', False),
    (b'["type","op"]', False),
    (b'"op"', False),
    (b'', False),
    (b'{"type":"\xff"}', False),
    (b'{"type":"op","deep":' + b'[' * 100_000 + b']' * 100_000 + b'}', False),
])
def test_a_relayed_payload_must_be_one_json_object_with_a_type(payload, valid):
    assert valid_payload(payload) is valid
