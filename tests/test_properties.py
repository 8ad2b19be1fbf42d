"""Property tests of the message pipeline (hypothesis)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iw_relay import messages
from iw_relay.config import RelayConfig
from tests.clients import MemoryRelay

# Lone surrogates (a pair would be the same JSON as the character it encodes).
SURROGATES = st.sampled_from(["\ud83d", "\ude00", "a\ud83db", "\ude00\ud83d", "\udfff"])
STRINGS = st.text(max_size=20) | SURROGATES
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | STRINGS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(STRINGS, children, max_size=4),
    max_leaves=20,
)
MESSAGES = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    STRINGS.filter(bool), st.dictionaries(STRINGS, JSON_VALUES, max_size=6),
)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_relayed_or_refused_with_a_code(payload):
    try:
        relayed = messages.stamped(payload, "0123456789abcdef", 42)[0]
    except messages.MessageError as refused:
        assert refused.code in (messages.PARSE_ERROR, messages.INVALID_MESSAGE)
    else:
        message = json.loads(relayed)
        assert isinstance(message["type"], str) and message["type"]
        assert (message["connectionId"], message["timestamp"]) == ("0123456789abcdef", 42)


@given(MESSAGES)
def test_a_relayed_message_is_the_input_plus_two_stamps(message):
    payload = json.dumps(message).encode()
    relayed = json.loads(messages.stamped(payload, "0123456789abcdef", 1234)[0])
    assert relayed == {**message, "connectionId": "0123456789abcdef", "timestamp": 1234}


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=100), MESSAGES.map(
    lambda m: json.dumps(m).encode())), min_size=1, max_size=12))
def test_over_the_wire_each_message_is_relayed_or_answered_once(payloads):
    relay = MemoryRelay(RelayConfig(ping_interval=0, rate_limit=1000))
    try:
        sender, peer = relay.join(), relay.join()
        expected = []
        for payload in payloads:
            sender.sendMessage(payload, isBinary=True)  # binary: any bytes at all
            try:
                expected.append(json.loads(messages.stamped(payload, "x", 0)[0]))
            except messages.MessageError:
                pass
        relay.flush()
        relayed = [m for m in peer.received[1:]]
        assert len(relayed) == len(expected)
        for got, want in zip(relayed, expected, strict=True):
            assert {**got, "connectionId": "x", "timestamp": 0} == want
        errors = sender.received[2:]  # after connected and user-joined
        assert len(errors) == len(payloads) - len(expected)
        assert all(e["type"] == "error" for e in errors)
        assert sender.close_code is None
    finally:
        relay.close()


@given(MESSAGES.filter(lambda m: m["type"] not in messages.RESERVED_TYPES))
def test_a_message_is_relayed_as_the_client_wrote_it(message):
    """The stamps are appended to the client's own bytes, spacing included (nothing is
    re-encoded), unless it sent a stamp itself."""
    payload = json.dumps(message).encode()
    relayed = messages.stamped(payload, "0123456789abcdef", 1234)[0]
    if "connectionId" in message or "timestamp" in message:
        assert json.loads(relayed)["connectionId"] == "0123456789abcdef"
    else:
        assert relayed == payload[:-1] + b',"connectionId":"0123456789abcdef","timestamp":1234}'


def _standard_decode(text: str) -> object:
    try:
        return ("value", messages._decoder.decode(text))
    except (ValueError, RecursionError):
        return ("refused",)


JSON_TEXTS = (JSON_VALUES.map(json.dumps) | MESSAGES.map(json.dumps)).flatmap(
    lambda text: st.sampled_from([text, f" {text}", f"{text}\n", f"{text}}}", f"{text}x",
                                  text[:-1], text[1:], text.replace(":", "", 1)]))


@given(JSON_TEXTS | st.text(max_size=40) | st.just("{" * 5000 + "}" * 5000))
def test_the_object_fast_path_decodes_as_the_standard_decoder(text):
    try:
        found: object = ("value", messages._parse(text))
    except (ValueError, RecursionError):
        found = ("refused",)
    assert repr(found) == repr(_standard_decode(text))  # repr: NaN-free, -0.0 told apart
