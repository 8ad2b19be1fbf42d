"""Connection recovery's rules (iw_relay.recovery), in memory, time driven by a Clock."""

from __future__ import annotations

import base64
import json

import pytest
from twisted.internet.task import Clock

from iw_relay import messages
from iw_relay.config import RelayConfig
from iw_relay.recovery import (
    HistoryStore,
    HistoryUsage,
    MemoryHistory,
    Recovery,
    RecoveryFailure,
    Resumed,
    ResumeTokens,
    RoomHistory,
    keeps_grace,
    parse_since,
    with_seq,
)

ROOM = "room-a"
A, B, C = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"


def frame(text: str, sender: str = A) -> bytes:
    return messages.encode({"type": "op", "text": text, "connectionId": sender})


def texts(frames: list[bytes]) -> list[str]:
    return [json.loads(f)["text"] for f in frames]


class World:
    """A Recovery with the gone() calls it made."""

    def __init__(self, window: float = 120, max_messages: int = 1000,
                 max_bytes: int = 1 << 20, **kwargs) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.gone: list[tuple[str, str]] = []
        self.recovery = Recovery(self.clock, window, max_messages, max_bytes,
                                 gone=lambda room, cid: self.gone.append((room, cid)),
                                 **kwargs)

    def join(self, cid: str, room: str = ROOM) -> dict:
        return self.recovery.joined(room, cid)

    def send(self, text: str, sender: str = A, target: str | None = None,
             room: str = ROOM) -> bytes:
        return self.recovery.record(room, frame(text, sender), sender, target)

    def resume(self, fields: dict, since: int | str | None = None, room: str = ROOM,
               epoch: str | None = None):
        return self.recovery.resume(room, fields["resumeToken"],
                                    fields["seq"] if since is None else since,
                                    fields["epoch"] if epoch is None else epoch)


# -- wire details -------------------------------------------------------------------------

def test_with_seq_adds_the_field_to_a_compact_object():
    assert json.loads(with_seq(b'{"type":"x"}', 7)) == {"type": "x", "seq": 7}
    assert json.loads(with_seq(b"{}", 1)) == {"seq": 1}
    with pytest.raises(ValueError):
        with_seq(b"[1]", 1)


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), (str(2**53 - 1), 2**53 - 1), (str(2**53), None), ("-1", None),
    ("1.5", None), ("", None), (None, None), ("\u0663", None), ("1e3", None),
])
def test_since_parsing(text, value):
    assert parse_since(text) == value


@pytest.mark.parametrize("code, by_server, grace", [
    (1000, False, False), (1001, False, False),  # clean client closes end it at once
    (1006, False, True), (None, False, True), (4000, False, True),
    (1001, True, True), (1013, True, True), (1011, True, True),  # the server's fault
    (1008, True, False), (1000, True, False),  # kicked, or the room expired
])
def test_which_closes_keep_grace(code, by_server, grace):
    assert keeps_grace(code, by_server) is grace


def test_off_by_default_changes_nothing():
    config = RelayConfig()
    assert config.recovery_window == 0
    world = World(window=0)
    assert world.join(A) == {}
    payload = frame("x")
    assert world.recovery.record(ROOM, payload, A) is payload
    assert world.recovery.dropped(ROOM, A, 1006) is False
    token = ResumeTokens().issue(ROOM, A, 0, 4e9)
    assert world.recovery.resume(ROOM, token, "0", "e") is RecoveryFailure.SESSION_ENDED
    assert world.recovery.stats.failed == {} and world.clock.getDelayedCalls() == []
    assert world.recovery.snapshot() == {}
    assert list(world.recovery.metric_families()) == []


def test_config_refuses_negative_windows_and_empty_bounds():
    with pytest.raises(ValueError):
        RelayConfig(recovery_window=-1)
    with pytest.raises(ValueError):
        RelayConfig(recovery_max_messages=0)


# -- history ------------------------------------------------------------------------------

def test_seq_is_strictly_increasing_and_in_every_frame():
    world = World()
    seqs = [json.loads(world.send(str(i)))["seq"] for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]


def test_a_member_gets_exactly_what_it_missed_in_order_once():
    world = World()
    joined_b = world.join(B)
    world.join(A)
    world.send("before")
    seen = json.loads(world.send("seen by b"))["seq"]
    for text in ("m1", "m2", "m3"):
        world.send(text)
    world.send("b's own", sender=B)
    assert world.recovery.dropped(ROOM, B, 1006) is True
    resumed = world.resume(joined_b, since=seen)
    assert isinstance(resumed, Resumed)
    assert resumed.connection_id == B and resumed.takeover is False
    assert texts(resumed.frames) == ["m1", "m2", "m3"]  # never its own frame back
    assert resumed.fields["recovered"] is True


def test_a_member_is_owed_nothing_from_before_it_joined_whatever_since_says():
    world = World()
    world.send("before b")
    joined = world.join(B)
    world.send("after b")
    world.recovery.dropped(ROOM, B, 1006)
    resumed = world.resume(joined, since=0)
    assert texts(resumed.frames) == ["after b"]


def test_unicast_is_kept_only_for_its_target():
    world = World()
    joined = {cid: world.join(cid) for cid in (A, B, C)}
    world.send("to b", sender=A, target=B)
    world.send("to c", sender=A, target=C)
    world.send("everyone", sender=A)
    for cid in (B, C):
        world.recovery.dropped(ROOM, cid, 1006)
    assert texts(world.resume(joined[B]).frames) == ["to b", "everyone"]
    assert texts(world.resume(joined[C]).frames) == ["to c", "everyone"]


def test_history_trimmed_by_count_fails_only_past_since():
    world = World(max_messages=3)
    joined = world.join(B)
    sent = [json.loads(world.send(str(i)))["seq"] for i in range(5)]  # keeps 3, 4, 5
    assert world.recovery.history.usage().messages == 3
    world.recovery.dropped(ROOM, B, 1006)
    assert world.resume(joined, since=sent[0]) is RecoveryFailure.HISTORY_TRIMMED
    assert world.gone == [(ROOM, B)]  # a failed resume ends the away member at once


def test_history_trimmed_by_count_still_serves_a_recent_since():
    world = World(max_messages=3)
    joined = world.join(B)
    for i in range(5):
        world.send(str(i))
    world.recovery.dropped(ROOM, B, 1006)
    assert texts(world.resume(joined, since=2).frames) == ["2", "3", "4"]


def test_history_trimmed_by_bytes():
    one = len(with_seq(frame("0"), 1))
    history = RoomHistory(window=60, max_messages=1000, max_bytes=one * 2 + 1)
    for i in range(4):
        history.append(frame(str(i)), A, None, now=0)
    assert len(history) == 2 and history.bytes <= one * 2 + 1
    assert history.since(1, history.epoch, B, now=0) is RecoveryFailure.HISTORY_TRIMMED
    assert texts(history.since(2, history.epoch, B, now=0)) == ["2", "3"]
    assert texts(history.since(3, history.epoch, B, now=0)) == ["3"]
    # A single frame over the byte bound is not kept at all.
    history.append(b'{"type":"big","text":"' + b"x" * one * 3 + b'"}', A, None, now=0)
    assert len(history) == 0 and history.bytes == 0
    assert history.since(4, history.epoch, B, now=0) is RecoveryFailure.HISTORY_TRIMMED


def test_history_ages_out_after_the_window():
    clock = Clock()
    store = MemoryHistory(clock, window=10, max_messages=100, max_bytes=1 << 20)
    store.append_now(ROOM, frame("old"), A, None)
    clock.advance(6)
    store.append_now(ROOM, frame("new"), A, None)
    head = store.head_now(ROOM)
    clock.advance(4.5)  # "old" is 10.5 s old
    store.trim_all()
    assert store.usage().messages == 1
    assert store.since_now(ROOM, 0, head.epoch, B) is RecoveryFailure.HISTORY_TRIMMED
    assert texts(store.since_now(ROOM, 1, head.epoch, B)) == ["new"]


def test_since_ahead_of_the_stream_and_a_changed_epoch_fail():
    world = World()
    joined = world.join(B)
    world.send("x")
    world.recovery.dropped(ROOM, B, 1006)
    assert world.resume(joined, since=99) is RecoveryFailure.BAD_SINCE
    world = World()
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    assert world.resume(joined, since="12abc") is RecoveryFailure.BAD_SINCE
    world = World()
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    assert world.resume(joined, epoch="0000000000000000") is RecoveryFailure.EPOCH_CHANGED


def test_a_recreated_room_has_a_new_epoch():
    world = World()
    first = world.join(A)
    world.recovery.room_gone(ROOM)
    second = world.join(B)
    assert first["epoch"] != second["epoch"] and len(second["epoch"]) == 16
    assert world.resume(first) is RecoveryFailure.SESSION_ENDED


def test_memory_history_implements_the_store_interface():
    store: HistoryStore = MemoryHistory(Clock(), 10, 10, 1 << 20)
    head = store.head(ROOM).result
    entry = store.append(ROOM, frame("x"), A, None).result
    assert entry.seq == head.seq + 1
    assert texts(store.since(ROOM, 0, head.epoch, B).result) == ["x"]
    store.drop(ROOM)
    assert store.since(ROOM, 0, head.epoch, B).result is RecoveryFailure.EPOCH_CHANGED


# -- tokens -------------------------------------------------------------------------------

def test_tokens_are_opaque_and_bound_to_room_connection_and_generation():
    tokens = ResumeTokens()
    token = tokens.issue(ROOM, A, 0, expires_at=2000)
    assert ROOM not in token and A not in token
    claims = tokens.verify(token, ROOM, now=1000)
    assert (claims.connection_id, claims.generation) == (A, 0)
    assert tokens.verify(token, "room-b", now=1000) is RecoveryFailure.INVALID_TOKEN
    assert tokens.issue(ROOM, A, 0, 2000) == token  # deterministic for the same inputs
    assert tokens.issue(ROOM, A, 1, 2000) != token


def test_forged_tokens_fail():
    tokens = ResumeTokens(b"secret")
    token = tokens.issue(ROOM, A, 0, expires_at=2000)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for index in (0, 5, 12, 20, len(raw) - 1):
        forged = bytearray(raw)
        forged[index] ^= 1
        text = base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode()
        assert tokens.verify(text, ROOM, 1000) is RecoveryFailure.INVALID_TOKEN, index
    for junk in ("", "x", "!!!!", token + "A", token[:-2], "\u00e9" * 40):
        assert tokens.verify(junk, ROOM, 1000) is RecoveryFailure.INVALID_TOKEN
    assert ResumeTokens(b"other").verify(token, ROOM, 1000) is RecoveryFailure.INVALID_TOKEN
    # Any node with the same secret accepts it: a cluster shares the secret.
    assert ResumeTokens(b"secret").verify(token, ROOM, 1000).connection_id == A
    # Two processes without a secret do not accept each other's tokens.
    assert ResumeTokens().verify(ResumeTokens().issue(ROOM, A, 0, 2000), ROOM,
                                 1000) is RecoveryFailure.INVALID_TOKEN


def test_expired_tokens_fail():
    tokens = ResumeTokens()
    token = tokens.issue(ROOM, A, 0, expires_at=2000)
    assert tokens.verify(token, ROOM, now=1999.9).connection_id == A
    assert tokens.verify(token, ROOM, now=2000) is RecoveryFailure.EXPIRED_TOKEN


def test_a_forged_token_through_the_facade_is_counted_and_harms_no_one():
    world = World()
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    forged = dict(joined, resumeToken=ResumeTokens().issue(ROOM, B, 0, 4e9))
    assert world.resume(forged) is RecoveryFailure.INVALID_TOKEN
    assert world.gone == []  # the real member may still come back
    assert isinstance(world.resume(joined), Resumed)
    assert world.recovery.snapshot()["recoveriesFailed"] == {"invalid_token": 1}
    assert world.recovery.snapshot()["recoveriesSucceeded"] == 1


def test_an_expired_token_through_the_facade():
    world = World(window=120, token_lifetime=60)
    joined = world.join(B)
    world.clock.advance(59)
    world.recovery.dropped(ROOM, B, 1006)
    world.clock.advance(1)
    assert world.resume(joined) is RecoveryFailure.EXPIRED_TOKEN


# -- presence grace -----------------------------------------------------------------------

def test_the_window_expiring_ends_an_away_member_once():
    world = World(window=120)
    joined = world.join(B)
    assert world.recovery.dropped(ROOM, B, 1006) is True
    assert world.recovery.keeps_room(ROOM)
    world.clock.advance(119.9)
    assert world.gone == []
    assert world.recovery.snapshot()["recoveryAwayMembers"] == 1
    world.clock.advance(0.1)
    assert world.gone == [(ROOM, B)]
    world.clock.advance(1000)
    assert world.gone == [(ROOM, B)]
    assert world.resume(joined) is RecoveryFailure.SESSION_ENDED
    assert not world.recovery.keeps_room(ROOM)


def test_a_resume_within_the_window_cancels_the_grace_timer():
    world = World(window=120)
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    world.clock.advance(119)
    assert isinstance(world.resume(joined), Resumed)
    world.clock.advance(1000)
    assert world.gone == []
    assert world.clock.getDelayedCalls() == []


@pytest.mark.parametrize("code", [1000, 1001])
def test_a_clean_client_close_ends_it_at_once(code):
    world = World()
    joined = world.join(B)
    assert world.recovery.dropped(ROOM, B, code) is False  # the caller says user-left now
    assert world.clock.getDelayedCalls() == []
    assert world.resume(joined) is RecoveryFailure.SESSION_ENDED
    assert world.gone == []  # the caller already said it


def test_the_server_shutting_down_keeps_grace():
    world = World()
    joined = world.join(B)
    assert world.recovery.dropped(ROOM, B, 1001, closed_by_server=True) is True
    assert isinstance(world.resume(joined), Resumed)


def test_two_resumes_with_one_token_at_the_same_moment_exactly_one_wins():
    world = World()
    joined = world.join(B)
    world.send("m")
    world.recovery.dropped(ROOM, B, 1006)
    first, second = world.resume(joined), world.resume(joined)
    assert isinstance(first, Resumed) and texts(first.frames) == ["m"]
    assert second is RecoveryFailure.TOKEN_REUSED
    # The winner's new token works for its next drop; the old one never again.
    world.recovery.dropped(ROOM, B, 1006)
    assert world.resume(joined) is RecoveryFailure.TOKEN_REUSED
    assert isinstance(world.resume(first.fields), Resumed)
    assert world.gone == []


def test_a_resume_racing_the_grace_timer_the_deadline_wins_ties():
    world = World(window=120)
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    timer = world.clock.getDelayedCalls()[0]
    # Time has reached the deadline, but the reactor has not yet run the timer.
    world.clock.rightNow = timer.getTime()
    assert world.resume(joined) is RecoveryFailure.SESSION_ENDED
    assert world.gone == [(ROOM, B)]  # user-left goes out before the fresh join
    world.clock.advance(0)  # the timer, when it runs, does nothing more
    assert world.gone == [(ROOM, B)]
    assert not timer.active()


def test_a_resume_just_before_the_deadline_wins_over_the_timer():
    world = World(window=120)
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    world.clock.advance(119.999)
    assert isinstance(world.resume(joined), Resumed)
    world.clock.advance(1)
    assert world.gone == []


def test_a_resume_while_the_old_connection_still_looks_open_is_a_takeover():
    world = World()
    joined = world.join(B)
    world.send("m")
    resumed = world.resume(joined)  # the server has not noticed the drop yet
    assert isinstance(resumed, Resumed) and resumed.takeover
    assert texts(resumed.frames) == ["m"]
    # The old connection's close, seen afterwards, must not end the resumed member: the
    # caller ignores the old connection once it was taken over. A second drop is grace.
    assert world.recovery.dropped(ROOM, B, 1006) is True


def test_failures_are_counted_by_reason_and_exported():
    world = World()
    joined = world.join(B)
    world.recovery.dropped(ROOM, B, 1006)
    world.resume(dict(joined, resumeToken="junk"))
    world.resume(joined, since=5)
    families = {f.name: f for f in world.recovery.metric_families()}
    failed = {s.labels["reason"]: s.value for s in families["iwrelay_recoveries_failed"].samples
              if s.name.endswith("_total")}
    assert failed["invalid_token"] == 1 and failed["bad_since"] == 1
    assert failed["history_trimmed"] == 0


def test_memory_accounting():
    world = World()
    world.join(A)
    world.send("x" * 100)
    world.send("y" * 100, target=B)
    snapshot = world.recovery.snapshot()
    assert snapshot["recoveryHistoryMessages"] == 2
    assert snapshot["recoveryHistoryBytes"] == sum(
        len(with_seq(frame(t), i + 1)) for i, t in enumerate(("x" * 100, "y" * 100)))
    assert snapshot["recoveryMemoryBytes"] > snapshot["recoveryHistoryBytes"]
    world.recovery.room_gone(ROOM)
    assert world.recovery.snapshot()["recoveryHistoryBytes"] == 0


def test_sessions_claim_alone_also_lets_the_deadline_win_ties():
    """`Sessions.claim` is the store-level atomic step (a Lua script in Redis): it keeps
    the rule by itself, without the facade's prior check."""
    from iw_relay.recovery import Sessions

    clock = Clock()
    gone: list[tuple[str, str]] = []
    sessions = Sessions(clock, 30, lambda room, cid: gone.append((room, cid)))
    sessions.joined(ROOM, B, 0)
    sessions.dropped(ROOM, B, grace=True)
    clock.rightNow = 30  # the timer is due but has not run
    assert sessions.claim(ROOM, B, 0) is RecoveryFailure.SESSION_ENDED
    assert gone == [(ROOM, B)]
    sessions.joined(ROOM, C, 0)
    sessions.dropped(ROOM, C, grace=True)
    assert sessions.claim(ROOM, C, 0).takeover is False
    assert sessions.claim(ROOM, C, 0) is RecoveryFailure.TOKEN_REUSED
    assert sessions.claim(ROOM, C, 1).takeover is True


def test_the_recovery_page_is_valid_and_covers_the_options_and_fields():
    from pathlib import Path

    import docutils.core
    import docutils.utils

    from iw_relay.config import OPTION_PARSERS

    text = (Path(__file__).resolve().parent.parent / "docs" / "recovery.rst").read_text()
    docutils.core.publish_doctree(text, settings_overrides={
        "halt_level": docutils.utils.Reporter.WARNING_LEVEL, "report_level": 5})
    for option in (o for o in OPTION_PARSERS if o.startswith("recovery-")):
        assert f"``--{option}" in text, option
    for name in ("epoch", "seq", "resumeToken", "recovered", "?resume=TOKEN&since=SEQ&epoch="):
        assert name in text
    for reason in RecoveryFailure:
        assert f"``{reason.value}``" in text
    token = ResumeTokens().issue(ROOM, A, 0, 2e9)
    assert f"A token is {len(token)} URL-safe characters" in text


def test_the_memory_estimate_is_close_to_what_python_allocates():
    import tracemalloc

    world = World(max_bytes=1 << 24)
    world.send("warm-up")
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(500):
            world.send("x" * (i % 300))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    allocated = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    usage = world.recovery.history.usage()
    kept_since = usage.memory_bytes - HistoryUsage(1, 1, len(with_seq(frame("warm-up"), 1))
                                                   ).memory_bytes
    assert abs(kept_since - allocated) / allocated < 0.15, (kept_since, allocated)


def test_sessions_are_counted_and_indexed_by_room():
    world = World()
    for cid in (A, B):
        world.join(cid)
    world.join(C, room="room-b")
    sessions = world.recovery.sessions
    assert len(sessions) == 3 and len(sessions.in_room(ROOM)) == 2
    world.recovery.dropped(ROOM, A, 1000)
    world.recovery.dropped(ROOM, B, 1006)
    assert len(sessions) == 2 and world.recovery.keeps_room(ROOM)
    world.clock.advance(120)
    assert len(sessions) == 1 and not world.recovery.keeps_room(ROOM)
    world.recovery.room_gone("room-b")
    assert len(sessions) == 0 and sessions.in_room("room-b") == []


def test_a_failed_takeover_ends_the_old_session_and_its_token():
    """The relay still holds the old connection; the resume cannot be served (history
    trimmed): the member is gone at once (the caller closes the old connection and says
    user-left), and the old token never works again."""
    world = World(max_messages=1)
    joined = world.join(B)
    world.send("1")
    world.send("2")
    assert world.resume(joined) is RecoveryFailure.HISTORY_TRIMMED
    assert world.gone == [(ROOM, B)]
    assert world.resume(joined) is RecoveryFailure.SESSION_ENDED
    assert world.gone == [(ROOM, B)]
