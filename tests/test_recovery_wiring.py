"""Connection recovery wired into the real relay (registry and protocol), in memory with
a Clock: every wire rule of --recovery-window, and that 0 keeps today's protocol."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import pytest_twisted

from iw_relay.config import RelayConfig
from tests.clients import MemoryRelay

WINDOW = 30.0


def config(**overrides) -> RelayConfig:
    return RelayConfig(ping_interval=0, recovery_window=overrides.pop("window", WINDOW),
                       **overrides)


@pytest.fixture
def on(make_relay) -> MemoryRelay:
    return make_relay(config())


def drop(relay: MemoryRelay, client) -> None:
    """The client's network goes away: no close frame, the relay sees 1006."""
    client.transport.loseConnection()
    relay.flush()


def resume_path(client, room: str = "abc", since: int | None = None, *, query_room=False,
                token: str | None = None, epoch: str | None = None) -> str:
    first = client.received[0]
    seqs = [m["seq"] for m in client.received if "seq" in m and m is not first]
    since = since if since is not None else (seqs[-1] if seqs else first["seq"])
    query = (f"resume={quote(token or first['resumeToken'])}&since={since}"
             f"&epoch={epoch or first['epoch']}")
    return f"/?room={room}&{query}" if query_room else f"/room/{room}?{query}"


def kinds(client) -> list[str]:
    return [m["type"] for m in client.received]


def ops(client) -> list[int]:
    return [m["n"] for m in client.received if m["type"] == "op"]


def test_off_keeps_todays_wire_protocol_byte_for_byte(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0))
    a = relay.join()
    b = relay.join()
    a.sendMessage(b'{"type":"op","seq":7,"n":1}')
    relay.flush()
    cid_a, cid_b = a.received[0]["connectionId"], b.received[0]["connectionId"]
    assert b.raw[0] == (b'{"type":"connected","connectionId":"%s","roomId":"abc",'
                        b'"userCount":2,"peers":["%s"]}' % (cid_b.encode(), cid_a.encode()))
    assert a.raw[1] == b'{"type":"user-joined","connectionId":"%s","userCount":2}' % (
        cid_b.encode())
    assert b.raw[1] == (b'{"type":"op","seq":7,"n":1,"connectionId":"%s",'
                        b'"timestamp":1700000000000}' % cid_a.encode())
    # A resume query is ignored: a fresh join, nothing about recovery.
    c = relay.connect(resume_path_off := "/room/abc?resume=x&since=1&epoch=e")
    assert resume_path_off and set(c.received[0]) == {"type", "connectionId", "roomId",
                                                      "userCount", "peers"}
    drop(relay, a)
    assert b.messages_of("user-left")  # at once, as ever
    stats = stats_of(relay)
    assert not any(key.startswith("recover") for key in stats)
    assert relay.registry.recovery.history.usage().messages == 0


def stats_of(relay: MemoryRelay) -> dict:
    from twisted.web.test.requesthelper import DummyRequest

    from iw_relay.web import StatsResource

    request = DummyRequest([b""])
    request.method = b"GET"
    return json.loads(StatsResource(relay.registry).render(request))


def test_on_every_relayed_message_has_a_strictly_increasing_seq(on):
    a = on.join()
    b = on.join()
    first = b.received[0]
    assert first["recovered"] is False and len(first["epoch"]) == 16
    assert a.received[0]["seq"] == 0  # nothing before the first member
    assert isinstance(first["resumeToken"], str) and first["seq"] == 1  # a's user-joined
    joined = a.received[1]
    assert joined["type"] == "user-joined" and joined["seq"] == 2
    for n in range(3):
        a.send_json({"type": "op", "n": n, "seq": 999})  # the client's seq goes
        b.send_json({"type": "op", "n": 10 + n})
    on.flush()
    got_b = [m for m in b.received[1:]]
    seqs_b, seqs_a = [m["seq"] for m in got_b], [m["seq"] for m in a.received[2:]]
    assert seqs_a == sorted(seqs_a) and seqs_b == sorted(seqs_b)
    assert sorted(seqs_a + seqs_b) == list(range(3, 9))  # one room-wide sequence
    assert all(b'"seq":999' not in raw for raw in b.raw)
    assert all(raw.count(b'"seq"') == 1 for raw in b.raw[1:])


def test_a_resume_gets_its_id_what_it_missed_once_in_order_then_live(on):
    a = on.join()
    b = on.join()
    c = on.join()
    drop(on, a)
    cid_a = a.received[0]["connectionId"]
    cid_c = c.received[0]["connectionId"]
    for n in range(5):
        b.send_json({"type": "op", "n": n})
    b.send_json({"type": "op", "n": 100, "to": cid_a})  # for a only
    b.send_json({"type": "op", "n": 200, "to": cid_c})  # never for a
    on.flush()
    assert b.messages_of("user-left") == [] and c.messages_of("user-left") == []
    back = on.connect(resume_path(a))
    connected = back.received[0]
    assert connected["connectionId"] == cid_a and connected["recovered"] is True
    assert connected["userCount"] == 3 and sorted(connected["peers"]) == sorted(
        [b.received[0]["connectionId"], cid_c])
    assert connected["resumeToken"] != a.received[0]["resumeToken"]
    assert ops(back) == [0, 1, 2, 3, 4, 100]
    seqs = [m["seq"] for m in back.received[1:]]
    assert seqs == sorted(set(seqs))
    b.send_json({"type": "op", "n": 5})
    on.flush()
    assert ops(back)[-1] == 5
    assert "user-joined" not in kinds(b)[1:] or kinds(b).count("user-joined") == 1
    assert [m["connectionId"] for m in b.messages_of("user-joined")] == [cid_c]
    assert b.messages_of("user-left") == []
    assert on.registry.recovery.stats.succeeded == 1
    # What a sent after it came back reaches the others under its old id.
    back.send_json({"type": "op", "n": 7})
    on.flush()
    assert b.received[-1]["connectionId"] == cid_a


def test_a_resume_through_the_query_form(on):
    a = on.join("qroom")
    b = on.join("qroom")
    drop(on, a)
    b.send_json({"type": "op", "n": 1})
    on.flush()
    back = on.connect(resume_path(a, "qroom", query_room=True))
    assert back.received[0]["recovered"] is True and ops(back) == [1]


def test_the_window_passing_says_user_left_and_the_resume_fails(on):
    a = on.join()
    b = on.join()
    drop(on, a)
    on.advance(WINDOW - 0.01)
    assert b.messages_of("user-left") == []
    on.advance(0.02)
    left = b.messages_of("user-left")
    assert len(left) == 1 and left[0]["userCount"] == 1 and "seq" in left[0]
    back = on.connect(resume_path(a))
    fresh = back.received[0]
    assert fresh["recovered"] is False
    assert fresh["connectionId"] != a.received[0]["connectionId"]
    assert on.registry.recovery.stats.failed == {"session_ended": 1}
    assert b.messages_of("user-joined")[-1]["connectionId"] == fresh["connectionId"]


def test_a_resume_just_before_the_grace_timer_cancels_it(on):
    a = on.join()
    b = on.join()
    drop(on, a)
    on.advance(WINDOW - 0.001)
    back = on.connect(resume_path(a))
    assert back.received[0]["recovered"] is True
    on.advance(WINDOW * 2)
    assert b.messages_of("user-left") == [] and on.registry.room_size("abc") == 2


@pytest.mark.parametrize("code", [1000, 1001])
def test_a_clean_close_says_user_left_at_once(on, code):
    a = on.join()
    b = on.join()
    a.sendCloseFrame(code=code, isReply=False)
    on.flush()
    assert len(b.messages_of("user-left")) == 1
    back = on.connect(resume_path(a))
    assert back.received[0]["recovered"] is False


@pytest.mark.parametrize("token,reason", [
    ("A" * 50, "invalid_token"), ("not a token", "invalid_token"), ("", "invalid_token")])
def test_forged_tokens_join_afresh(on, token, reason):
    a = on.join()
    b = on.join()
    drop(on, a)
    back = on.connect(resume_path(a, token=token or "x"))
    assert back.received[0]["recovered"] is False
    assert on.registry.recovery.stats.failed == {reason: 1}
    assert b.messages_of("user-left") == []  # a forged token ends nobody


def test_an_expired_token_joins_afresh(make_relay):
    relay = make_relay(config(room_expiry=60.0, window=3600.0))
    a = relay.join()
    relay.join()
    relay.advance(61 + 3600)
    # The room expired (and with it every session); the token's own expiry passed too.
    back = relay.connect(resume_path(a))
    assert back.received[0]["recovered"] is False
    assert set(relay.registry.recovery.stats.failed) <= {"expired_token", "session_ended"}


def test_two_resumes_with_one_token_in_the_same_turn_one_wins(on):
    a = on.join()
    b = on.join()
    drop(on, a)
    path = resume_path(a)
    first = on.connect(path, flush=False)
    second = on.connect(path, flush=False)
    on.flush()
    recovered = sorted([first.received[0]["recovered"], second.received[0]["recovered"]])
    assert recovered == [False, True]
    assert on.registry.recovery.stats.failed == {"token_reused": 1}
    assert on.registry.recovery.stats.succeeded == 1
    # The loser joined afresh; the winner's peers heard nothing of the drop.
    assert b.messages_of("user-left") == [] and len(b.messages_of("user-joined")) == 1


def test_a_takeover_closes_the_old_connection_quietly(on):
    a = on.join()
    b = on.join()
    back = on.connect(resume_path(a))  # a's old connection still looks open
    assert back.received[0]["recovered"] is True
    assert a.close_code is not None  # closed by the relay
    assert b.messages_of("user-left") == [] and on.registry.room_size("abc") == 2
    b.send_json({"type": "op", "n": 1})
    on.flush()
    assert ops(back) == [1] and ops(a) == []


def test_history_trimmed_by_count_and_by_bytes(make_relay):
    relay = make_relay(config(recovery_max_messages=5))
    a, b = relay.join(), relay.join()
    drop(relay, a)
    for n in range(10):
        b.send_json({"type": "op", "n": n})
    relay.flush()
    back = relay.connect(resume_path(a))
    assert back.received[0]["recovered"] is False
    assert relay.registry.recovery.stats.failed == {"history_trimmed": 1}
    assert len(b.messages_of("user-left")) == 1  # the old member ended at once

    relay = make_relay(config(recovery_max_bytes=300))
    a, b = relay.join(), relay.join()
    drop(relay, a)
    b.send_json({"type": "op", "n": 0, "pad": "x" * 200})
    b.send_json({"type": "op", "n": 1, "pad": "x" * 200})
    relay.flush()
    assert relay.registry.recovery.history.usage().bytes <= 300
    back = relay.connect(resume_path(a))
    assert relay.registry.recovery.stats.failed == {"history_trimmed": 1}


def test_a_wrong_epoch_or_a_bad_since_joins_afresh(on):
    a, b = on.join(), on.join()
    drop(on, a)
    back = on.connect(resume_path(a, epoch="0" * 16))
    assert back.received[0]["recovered"] is False
    c, d = on.join("other"), on.join("other")
    drop(on, c)
    back = on.connect(resume_path(c, "other", since=99))
    assert back.received[0]["recovered"] is False
    assert on.registry.recovery.stats.failed == {"epoch_changed": 1, "bad_since": 1}
    assert b and d


def test_unicast_to_an_away_member_is_kept_for_it_only(on):
    a, b, c = on.join(), on.join(), on.join()
    cid_a = a.received[0]["connectionId"]
    drop(on, a)
    drop(on, c)
    b.send_json({"type": "op", "n": 1, "to": cid_a})
    on.flush()
    assert b.messages_of("error") == []  # an away member is no unknown peer
    back_c = on.connect(resume_path(c))
    back_a = on.connect(resume_path(a))
    assert ops(back_a) == [1] and ops(back_c) == []


def test_a_room_whose_members_are_all_away_is_kept_until_the_window_ends(on):
    a = on.join("lonely")
    drop(on, a)
    assert "lonely" in on.registry.rooms
    back = on.connect(resume_path(a, "lonely"))
    assert back.received[0]["recovered"] is True
    drop(on, back)
    on.advance(WINDOW + 1)
    assert "lonely" not in on.registry.rooms
    assert on.registry.recovery.history.usage().rooms == 0


def test_a_server_shutdown_leaves_members_away_and_no_timer_behind(on):
    a, b = on.join(), on.join()
    on.service.stopService()
    on.advance(60)
    assert a.close_code == 1001 and b.close_code == 1001
    assert on.clock.getDelayedCalls() == [] or all(
        not call.active() for call in on.clock.getDelayedCalls())


def test_counters_and_history_in_stats_and_metrics(on):
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from iw_relay.metrics import RelayCollector

    a, b = on.join(), on.join()
    drop(on, a)
    b.send_json({"type": "op", "n": 1})
    on.flush()
    on.connect(resume_path(a))
    on.connect("/room/abc?resume=forged&since=0&epoch=x")
    stats = stats_of(on)
    assert stats["recoveriesSucceeded"] == 1
    assert stats["recoveriesFailed"] == {"invalid_token": 1}
    assert stats["recoveryHistoryMessages"] >= 2 and stats["recoveryMemoryBytes"] > 0
    registry = CollectorRegistry()
    registry.register(RelayCollector(on.registry))
    text = generate_latest(registry).decode()
    assert "iwrelay_recoveries_succeeded_total 1.0" in text
    assert 'iwrelay_recoveries_failed_total{reason="invalid_token"} 1.0' in text
    assert "iwrelay_recovery_history_bytes" in text


def test_no_token_room_id_or_body_in_the_logs(on):
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        a, b = on.join("secretroom"), on.join("secretroom")
        drop(on, a)
        b.send_json({"type": "op", "n": "secretbody"})
        on.flush()
        token = a.received[0]["resumeToken"]
        on.connect(resume_path(a, "secretroom"))
        on.connect(f"/room/secretroom?resume={token}&since=0&epoch=x")
        on.advance(WINDOW + 1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert events
    for secret in ("secretroom", "secretbody", token):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_the_relay_serves_client_js_with_its_headers(make_relay):
    from treq.testing import StubTreq

    from iw_relay.clientjs import script

    relay = make_relay(RelayConfig(ping_interval=0))  # served whether recovery is on or not
    client = StubTreq(relay.service.resource)
    response = await client.get("http://relay.example/client.js")
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert headers.getRawHeaders("cache-control") == ["public, max-age=600"]
    (etag,) = headers.getRawHeaders("etag")
    assert await response.content() == script()
    again = await client.get("http://relay.example/client.js",
                             headers={"If-None-Match": etag})
    assert again.code == 304
