import pytest
from twisted.internet.task import Clock

from iw_relay.config import RelayConfig
from iw_relay.registry import RoomRegistry, room_hash
from tests.members import Member


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    registry = RoomRegistry(RelayConfig(room_expiry=100, cleanup_interval=10), clock)
    registry.startService()
    yield registry
    if registry.running:
        registry.stopService()


def check_counters(registry):
    stats = registry.stats
    assert stats.connectionsTotal - stats.disconnectionsTotal == registry.connection_count


def test_join_creates_room_and_announces(registry):
    a, b = Member(None, "a"), Member(None, "b")
    registry.join(a, "room1")
    registry.join(b, "room1")
    assert a.delivered == [
        {"type": "connected", "connectionId": "a", "roomId": "room1", "userCount": 1,
         "peers": []},
        {"type": "user-joined", "connectionId": "b", "userCount": 2},
    ]
    assert b.delivered == [
        {"type": "connected", "connectionId": "b", "roomId": "room1", "userCount": 2,
         "peers": ["a"]}]
    assert list(registry.rooms) == ["room1"]
    check_counters(registry)


def test_broadcast_reaches_others_in_the_room_only(registry):
    a, b, c, other = Member(None, "a"), Member(None, "b"), Member(None, "c"), Member(None, "x")
    for member in (a, b, c):
        registry.join(member, "r")
    registry.join(other, "elsewhere")
    registry.broadcast(a, b'{"type":"op","n":1}')
    assert b.delivered[-1] == c.delivered[-1] == {"type": "op", "n": 1}
    assert "op" not in a.kinds() and "op" not in other.kinds()
    assert registry.stats.messagesRelayed == 1


def test_a_message_from_a_lone_member_is_still_counted(registry):
    a = Member(None, "a")
    registry.join(a, "r")
    registry.broadcast(a, b'{"type":"op"}')
    assert registry.stats.messagesRelayed == 1
    assert a.kinds() == ["connected"]


def test_leave_announces_once_and_deletes_empty_room(registry):
    a, b = Member(None, "a"), Member(None, "b")
    registry.join(a, "r")
    registry.join(b, "r")
    registry.leave(b)
    registry.leave(b)  # a second departure of the same member is ignored
    assert a.delivered[-1] == {
        "type": "user-left", "connectionId": "b", "userCount": 1}
    assert a.kinds().count("user-left") == 1
    assert registry.stats.disconnectionsTotal == 1
    registry.leave(a)
    assert registry.rooms == {}
    check_counters(registry)


def test_empty_room_is_recreated_with_a_new_expiry(registry, clock):
    a = Member(None, "a")
    registry.join(a, "r")
    first_expiry = registry.rooms["r"].expires_at
    clock.advance(50)
    registry.leave(a)
    registry.join(Member(None, "b"), "r")
    assert registry.rooms["r"].expires_at == first_expiry + 50


def test_expiry_fixed_at_creation_and_swept_at_the_right_tick(registry, clock):
    a = Member(None, "a")
    registry.join(a, "r")          # created at 0: expires at 100
    clock.pump([10] * 5)
    registry.join(Member(None, "b"), "r")  # a later join does not move the expiry
    clock.pump([10] * 4)           # t = 90: not yet
    assert a.closed_with is None
    clock.pump([10])               # t = 100: the sweep at 100 expires it
    assert a.closed_with == (1000, "Room expired after 100 seconds")
    assert a.delivered[-1] == {"type": "room-expired",
                               "message": "Room expired after 100 seconds"}
    # The room id is free at once; the members still count until they have closed.
    assert registry.rooms == {}
    assert registry.connection_count == 2
    registry.leave(a)
    check_counters(registry)
    assert registry.stats.disconnectionsTotal == 1


def test_default_expiry_text_is_the_originals():
    registry = RoomRegistry(RelayConfig(), Clock())
    a = Member(None, "a")
    registry.join(a, "r")
    registry.expire(registry.rooms["r"])
    assert a.closed_with == (1000, "Room expired after 24 hours")


def test_sweep_survives_a_failing_member(registry, clock, logged_failures):
    broken, fine, neighbour = (Member(None, "broken", fail_on_close=True), Member(None, "fine"),
                               Member(None, "neighbour"))
    registry.join(broken, "r1")
    registry.join(neighbour, "r1")
    registry.join(fine, "r2")
    clock.pump([10] * 10)
    assert fine.closed_with is not None
    assert neighbour.closed_with is not None
    failures = logged_failures.take()
    assert len(failures) == 1 and "broken member" in failures[0]["log_failure"].getTraceback()
    # And the LoopingCall is still running: a room created later expires too.
    later = Member(None, "later")
    registry.join(later, "r3")
    clock.pump([10] * 10)
    assert later.closed_with is not None
    for member in (broken, neighbour, fine, later):
        registry.leave(member)


def test_sweep_survives_an_exception_in_the_sweep_itself(registry, clock, logged_failures):
    registry.join(Member(None, "a"), "r1")
    real_expire = registry.expire
    calls = []

    def expire_fails_once(room):
        calls.append(room.room_id)
        if len(calls) == 1:
            raise RuntimeError("sweep bug")
        real_expire(room)

    registry.expire = expire_fails_once
    clock.pump([10] * 10)
    assert len(logged_failures.take()) == 1
    clock.pump([10])
    assert calls == ["r1", "r1"] and registry.rooms == {}


def test_a_failing_delivery_harms_no_other_member(registry, logged_failures):
    class Broken(Member):
        def deliver(self, frame):
            if b'"op"' in frame:
                raise RuntimeError("cannot deliver")
            super().deliver(frame)

    sender, broken, fine = Member(None, "s"), Broken(None, "b"), Member(None, "f")
    for member in (sender, broken, fine):
        registry.join(member, "r")
    registry.broadcast(sender, b'{"type":"op"}')
    assert fine.delivered[-1] == {"type": "op"}
    assert broken.closed_with == (1011, "Internal server error")
    assert len(logged_failures.take()) == 1


def test_stop_survives_a_failing_member(clock, logged_failures):
    registry = RoomRegistry(RelayConfig(), clock)
    broken, fine = Member(None, "broken", fail_on_close=True), Member(None, "fine")
    registry.join(broken, "r")
    registry.join(fine, "r")
    stopped = registry.stopService()
    assert fine.closed_with == (1001, "Server shutting down")
    assert len(logged_failures.take()) == 1
    registry.leave(broken)
    registry.leave(fine)
    assert stopped.called


def test_logs_carry_a_hash_never_the_room_id(registry):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        registry.join(Member(None, "a"), "secret-room")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events
    assert all("secret-room" not in repr(event) for event in events)
    assert any(event.get("room") == room_hash("secret-room") for event in events)


def test_stop_tells_everyone_and_waits_for_them(registry, clock):
    a, b = Member(None, "a"), Member(None, "b")
    registry.join(a, "r")
    registry.join(b, "s")
    stopped = registry.stopService()
    assert a.delivered[-1] == {"type": "server-shutdown", "message": "Server is shutting down"}
    assert a.closed_with == b.closed_with == (1001, "Server shutting down")
    assert not stopped.called
    registry.leave(a)
    assert not stopped.called
    registry.leave(b)
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_stop_gives_up_after_the_shutdown_timeout(clock):
    registry = RoomRegistry(RelayConfig(shutdown_timeout=3), clock)
    registry.startService()
    registry.join(Member(None, "a"), "r")
    stopped = registry.stopService()
    clock.advance(2.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_stop_with_nobody_connected_is_immediate(registry):
    assert registry.stopService().called
